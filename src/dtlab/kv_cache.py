"""The opt-in approximate cached rollout (``DTPolicy(kv_cache=True)``, ``dtlab evaluate
--kv-cache``): each step computes only its new tokens, attending to cached keys and values.

A step of an exact rollout (``DecisionTransformer.predict_last``) recomputes every token of the
K-step window. Here each token's keys and values are computed once, when the token arrives, and
kept in a ring buffer of the window's 3K - 1 tokens (R_1, s_1, a_1, ..., R_K, s_K; the last
step's action is not yet known); a step computes only its new tokens (a_{t-1}, R_t, s_t).

Exact while the cached tokens are the whole episode so far (t < K). Once the window slides, the
cached keys and values of older tokens were computed with context that has since left the window,
so actions differ from the exact rollout's (score impact: docs/benchmarks.md). Only models with
return-to-go tokens (decision-transformer) are supported.

This module reads the model's public pieces (its embeddings, its blocks' layers and its action
head); the model knows nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dtlab.errors import ConfigError
from dtlab.kernels import few_query_dtype
from dtlab.model import Block, DecisionTransformer


@dataclass
class KVCache:
    """Keys and values of the tokens an incremental rollout has seen (``predict_cached``).

    A ring buffer of the window's 3K - 1 tokens: counting the tokens since the cache was built
    from 0, token n lives in slot n mod (3K - 1), so a new step's three tokens overwrite the
    oldest step's three in place and nothing is copied. Attention does not depend on the order of
    its keys (the timestep embedding is the only position information), so the slots need no
    reordering; ``positions`` gives each slot's token number for the causal mask.
    ``predict_cached`` advances the cache it is given, in place, and returns that same object (no
    stale copy of it exists to misuse).
    """

    keys: tuple[torch.Tensor, ...]  # per layer: (B, H, 3K - 1, D/H)
    values: tuple[torch.Tensor, ...]  # per layer: (B, H, 3K - 1, D/H)
    positions: torch.Tensor  # (3K - 1,) int64: the token number held in each slot, -1 if none yet
    steps: int  # steps in the window (at most K; bookkeeping, the mask uses ``positions``)
    tokens: int  # tokens written since the cache was built

    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache of the batch rows ``rows`` (B',) only: a copy, independent of this one."""
        return KVCache(tuple(k[rows] for k in self.keys), tuple(v[rows] for v in self.values),
                       self.positions.clone(), self.steps, self.tokens)


def predict_cached(model: DecisionTransformer, observations, actions, returns_to_go, timesteps,
                   cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
    """Incremental inference for rollouts (``model`` in eval mode): the action for the newest
    step (B, A), as the model's action head gives it, and the cache to pass with the next step.
    Inputs are steps, (B, n, .) as in ``DecisionTransformer.forward``:

    - ``cache`` None: the newest n steps of the episodes (no padding; n = t + 1 at an episode's
      start, or the last context_len steps when the policy rebuilds its cache later in an
      episode); the tokens up to s_n are computed (exact). Steps beyond the newest context_len
      are outside the window and are not computed.
    - with a ``cache``: the cache's last step, whose action is now known, and the new step
      (n = 2); only the new tokens (a_{t-1}, R_t, s_t) are computed, attending to the cached
      keys/values of the newest context_len - 1 steps. The cache is advanced in place and
      returned (the same object).

    The last block computes s_t's output alone (the other new tokens' keys and values are all
    that is read from it). ConfigError for a model without return-to-go tokens, or a timestep at
    or beyond its ``max_ep_len``.
    """
    if not model.returns_tokens:
        raise ConfigError(f"kv_cache rollouts need return-to-go tokens; {model.cfg.architecture} "
                          "has none (evaluate it without kv_cache)")
    cfg = model.cfg
    size = 3 * cfg.context_len - 1  # the window's tokens: the ring's slots
    if cache is None:  # the tokens up to s_n: (B, 3n - 1, D), into a new ring buffer
        x = model.embed(observations, actions, returns_to_go, timesteps)[:, :-1]
        shape = (x.shape[0], cfg.n_heads, size, cfg.embed_dim // cfg.n_heads)
        dtype = few_query_dtype(x)  # fp32 on the CPU even under bf16 autocast (dtlab.kernels)
        cache = KVCache(tuple(x.new_zeros(shape, dtype=dtype) for _ in model.blocks),
                        tuple(x.new_zeros(shape, dtype=dtype) for _ in model.blocks),
                        torch.full((size,), -1, dtype=torch.long, device=x.device), 0, 0)
        steps = observations.shape[1]
    else:  # a_{t-1}, R_t, s_t: (B, 3, D)
        x = _embed_newest(model, observations, actions, returns_to_go, timesteps)
        steps = cache.steps + 1
    # Tokens older than the window's 3K - 1 (the oldest steps of a first call with n > K, or
    # a_{t-1} when K = 1) are seen by nothing in the window: skip them, so that no slot is
    # written twice in one call.
    drop = max(0, x.shape[1] - size)
    x = x[:, drop:]  # (B, Tn, D)
    first = cache.tokens + drop
    new = torch.arange(first, first + x.shape[1], device=x.device)  # (Tn,) token numbers
    slots = new % size  # (Tn,), distinct
    positions = cache.positions.index_copy(0, slots, new)  # (S,)
    mask = (positions[None, :] >= 0) & (positions[None, :] <= new[:, None])  # (Tn, S)
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        x = _block_step(block, x, cache.keys[i], cache.values[i], slots, mask, i == last)
    cache.positions, cache.tokens = positions, first + len(new)
    cache.steps = min(steps, cfg.context_len)
    return model.predict_action(model.ln_f(x[:, -1])), cache



class CachedSteps:
    """A cached rollout across steps (``DTPolicy`` in kv_cache mode): the ``KVCache`` of the
    episodes it holds (their numbers) at the step it expects next."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.ids: list[int] | None = None
        self.t = -1

    def predict(self, model: DecisionTransformer, idx: torch.Tensor, t: torch.Tensor, obs_w,
                act_w, rtg_w, ts_w, mask_w, invalidate: bool) -> torch.Tensor:
        """The last step's action of episodes ``idx`` (n,) at timesteps ``t`` (n,) from their
        slid windows (``DTPolicy``'s, (n, K, ...)): feed only the new step (and the previous
        step's now known action) when the cache holds these episodes at this step; otherwise
        (first step, steering: ``invalidate``, episodes at different steps) rebuild it from the
        window's real steps (an exact pass). (n, A), or (n, n_actions) logits."""
        k, t0 = obs_w.shape[1], int(t[0])
        same_t = bool((t == t0).all())
        cache = None
        if self.cache is not None and same_t and self.t == t0 and not invalidate:
            ids = idx.tolist()
            if ids == self.ids:
                cache = self.cache
            elif set(ids) <= set(self.ids):  # some episodes ended: keep the others' rows
                pos = {e: i for i, e in enumerate(self.ids)}
                cache = self.cache.select(torch.tensor([pos[e] for e in ids], device=idx.device))
        self.cache = None  # updated in place below: never kept half-updated if a forward fails
        if cache is not None:  # the last two steps: (a_{t-1}) and (R_t, s_t) are new
            pred, new_cache = predict_cached(model, obs_w[:, -2:], act_w[:, -2:],
                                             rtg_w[:, -2:], ts_w[:, -2:], cache)
        elif same_t:
            real = min(t0 + 1, k)  # all selected episodes have exactly this many real steps
            pred, new_cache = predict_cached(model, obs_w[:, -real:], act_w[:, -real:],
                                             rtg_w[:, -real:], ts_w[:, -real:])
        else:  # episodes at different steps: no shared cache, exact recomputation
            pred = model.predict_last(obs_w, act_w, rtg_w, ts_w, mask_w)
            self.cache, self.ids, self.t = None, None, -1
            return pred
        self.cache, self.ids, self.t = new_cache, idx.tolist(), t0 + 1
        return pred

def _embed_newest(model: DecisionTransformer, observations, actions, returns_to_go,
                  timesteps) -> torch.Tensor:
    """The tokens (a_{t-1}, R_t, s_t) of two steps (B, 2, .): (B, 3, D), equal to
    ``model.embed(...)[:, 2:5]`` (the LayerNorm is per token) without embedding the other three."""
    model.check_timesteps(timesteps)
    time = model.embed_timestep(timesteps)  # (B, 2, D)
    a = model.embed_action(actions[:, :1]) + time[:, :1]  # (B, 1, D)
    r = model.embed_return(returns_to_go[:, 1:]) + time[:, 1:]  # (B, 1, D)
    s = model.embed_states(observations[:, 1:]) + time[:, 1:]  # (B, 1, D)
    return model.drop(model.embed_ln(torch.cat((a, r, s), dim=1)))  # (B, 3, D)


def _block_step(block: Block, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                slots: torch.Tensor, mask: torch.Tensor, last_only: bool) -> torch.Tensor:
    """``block`` over the new tokens ``x`` (B, Tn, D): their keys and values are written into the
    ring buffers ``keys``/``values`` (B, H, S, D/H) at ``slots`` (Tn,) in place, then they attend
    to the buffers under ``mask`` (Tn, S) bool (True: attend). Returns (B, Tn, D), or with
    ``last_only`` the last new token's output alone, (B, 1, D). Eval mode: no dropout."""
    attn = block.attn
    d = x.shape[2]
    qkv = attn.qkv(block.ln_1(x)).split(d, dim=2)
    q, k, v = (attn.split_heads(z) for z in qkv)  # 3 x (B, H, Tn, D/H)
    keys.index_copy_(2, slots, k.to(keys.dtype))
    values.index_copy_(2, slots, v.to(values.dtype))
    if last_only:  # only s_t's output is read from the last block
        q, mask, x = q[:, :, -1:], mask[-1:], x[:, -1:]
    with torch.autocast(x.device.type, enabled=False):  # in the buffers' dtype
        y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask)
    x = x + attn.proj(attn.merge_heads(y))  # y: (B, H, Tn, D/H) -> (B, Tn, D)
    return x + block.mlp(block.ln_2(x))
