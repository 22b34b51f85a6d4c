"""Which kernel computes dropout and attention, per device: the model's CPU kernel choices.

Each function computes what its PyTorch counterpart computes (the same distribution, the same
arithmetic); only the kernel differs, and only on the CPU. Why each choice, in one line (the
measurements behind them are in docs/benchmarks.md, "CPU kernel choices"):

- ``dropout``: masks from ``torch.rand(...) >= p``, because ``F.dropout``'s ``bernoulli_`` is
  several times slower per element on CPUs without Intel MKL's Bernoulli path.
- ``attention``: with attention-probability dropout, the softmax is written out so its
  probabilities get ``dropout``'s masks (SDPA takes its unfused path with dropout anyway); without
  dropout, or off the CPU, it is SDPA itself (fused kernels).
- ``few_query_dtype``: a kv-cache step's attention stays fp32 on the CPU under bf16 autocast,
  because SDPA over one to a few queries is slower in bf16 than in fp32 there.

The masks come from torch's default generator, which checkpoints save, so a seeded run is
reproducible and a resumed one continues bit for bit. CUDA keeps ``F.dropout`` and SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014), as ``F.dropout``: in training each element is
    zeroed with probability ``p`` and the rest scaled by 1 / (1 - p); the identity otherwise. Same
    shape and dtype as ``x``.

    On the CPU the mask is ``torch.rand(x.shape) >= p`` (float32 uniforms, so the probability is p
    to within 2^-24 whatever ``x``'s dtype); other devices use ``F.dropout``.
    """
    if not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    if p == 1.0:
        return x * 0.0
    keep = torch.rand(x.shape, device=x.device).ge_(p).to(x.dtype)  # 1 where kept
    return x * keep * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask as ``dropout`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              *, is_causal: bool, dropout_p: float, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (q (B, H, Tq, E), k and v (B, H, T, E), a bool mask
    broadcastable to (B, H, Tq, T), True: attend) with attention-probability dropout drawn as
    ``dropout`` draws it. Returns (B, H, Tq, E) in v's dtype.

    Without dropout, or off the CPU, it is SDPA itself. With dropout on the CPU it is SDPA's
    unfused arithmetic written out, in fp32 whatever the inputs' dtype (as SDPA's unfused path
    computes bf16): softmax(q k^T / sqrt(E) masked) -> dropout -> @ v.
    """
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=dropout_p, scale=scale)
    with torch.autocast("cpu", enabled=False):  # fp32 scores and softmax under bf16 autocast too
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = q.float() @ k.float().transpose(-2, -1) * scale  # (B, H, Tq, T)
        if is_causal:
            attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool,
                                   device=q.device).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = dropout(scores.softmax(-1), dropout_p, True)  # (B, H, Tq, T)
        return (probs @ v.float()).to(v.dtype)  # (B, H, Tq, E)


def few_query_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype for attention over one to a few queries (a kv-cache step) given an input ``x``:
    the autocast dtype where autocast is on, except on the CPU, where SDPA over so few queries is
    slower in bf16 than in fp32 (so it stays in ``x``'s dtype)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and device != "cpu":
        return torch.get_autocast_dtype(device)
    return x.dtype
