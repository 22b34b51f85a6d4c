"""The Decision Transformer (Chen et al. 2021), whole, in one file.

Tokens are interleaved per step as (R_1, s_1, a_1, R_2, s_2, a_2, ...). Each modality has its own
linear embedding; a learned timestep embedding is added to all three tokens of a step and is the
only position information (as in the original, which removes GPT-2's position embedding). A causal
pre-LN GPT stack runs over the 3K tokens and the action for step t is read from the hidden state of
s_t. The loss lives in dtlab.train, not here.

Reference: github.com/kzl/decision-transformer, gym/decision_transformer/models/
decision_transformer.py (embed_ln over the stacked tokens, tanh action head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dtlab.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                query: int | None = None) -> torch.Tensor:
        """``query``: compute the output of that one token only (its row of ``attn_mask``);
        (B, T, D) -> (B, 1, D). Keys and values still come from every token."""
        b, t, d = x.shape  # (B, T, D), T = 3K tokens
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, T, D)
        if query is not None:
            q = q[:, query:query + 1]  # (B, 1, D)
        q = q.view(b, q.shape[1], self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, Tq, D/H)
        k = k.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, T, D/H)
        v = v.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and query is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, Tq, D/H)
        y = y.transpose(1, 2).reshape(b, q.shape[2], d)  # (B, Tq, D)
        return self.resid_drop(self.proj(y))

    def forward_cached(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None):
        """New tokens ``x`` (B, Tn, D) attend to cached keys/values ``past`` (2 x (B, H, Tp, D/H))
        and to each other causally. Returns (B, Tn, D) and the extended (keys, values)."""
        b, tn, d = x.shape
        q, k, v = (z.view(b, tn, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in self.qkv(x).split(d, dim=2))  # 3 x (B, H, Tn, D/H)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, Tp + Tn, D/H)
            v = torch.cat([past[1], v], dim=2)
        tp = k.shape[2] - tn
        mask = torch.ones(tn, tp + tn, dtype=torch.bool, device=x.device).tril(diagonal=tp)  # (Tn, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Tn, D/H)
        return self.proj(y.transpose(1, 2).reshape(b, tn, d)), (k, v)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.embed_dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.mlp_ratio * cfg.embed_dim),
            nn.ReLU() if cfg.activation == "relu" else nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.embed_dim, cfg.embed_dim),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                query: int | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), or (B, 1, D) for the single token ``query``."""
        h = self.attn(self.ln_1(x), attn_mask, query)
        x = (x if query is None else x[:, query:query + 1]) + h
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, past):
        h, kv = self.attn.forward_cached(self.ln_1(x), past)
        x = x + h
        return x + self.mlp(self.ln_2(x)), kv


class DecisionTransformer(nn.Module):
    """Predicts a_t from (R_1, s_1, a_1, ..., R_t, s_t) for every step t of a K-step window."""

    def __init__(self, cfg: ModelConfig, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        self.cfg, self.obs_dim, self.act_dim = cfg, obs_dim, act_dim
        d = cfg.embed_dim
        self.embed_timestep = nn.Embedding(cfg.max_ep_len, d)
        self.embed_return = nn.Linear(1, d)
        self.embed_state = nn.Linear(obs_dim, d)
        self.embed_action = nn.Linear(act_dim, d)
        self.embed_ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.predict_action = nn.Linear(d, act_dim)  # followed by tanh: actions live in [-1, 1]
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections (Radford et al. 2019, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        observations: torch.Tensor,  # (B, K, obs_dim), normalized
        actions: torch.Tensor,  # (B, K, act_dim) in [-1, 1]; the last step's entry is unused
        returns_to_go: torch.Tensor,  # (B, K, 1), scaled
        timesteps: torch.Tensor,  # (B, K) int64
        masks: torch.Tensor | None = None,  # (B, K) bool, False at left padding; None: all real
    ) -> torch.Tensor:  # (B, K, act_dim) predicted actions in [-1, 1]
        b, k, _ = observations.shape
        x = self.embed(observations, actions, returns_to_go, timesteps)  # (B, 3K, D)
        attn_mask = None if masks is None else self.attention_mask(masks)  # (B, 1, 3K, 3K)
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.ln_f(x).reshape(b, k, 3, -1)  # (B, K, 3, D)
        return torch.tanh(self.predict_action(x[:, :, 1]))  # from s_t's hidden state: (B, K, A)

    def embed(self, observations, actions, returns_to_go, timesteps) -> torch.Tensor:
        """Interleaved token embeddings (R_1, s_1, a_1, R_2, ...): (B, K, .) -> (B, 3K, D)."""
        b, k, _ = observations.shape
        time = self.embed_timestep(timesteps.clamp(max=self.cfg.max_ep_len - 1))  # (B, K, D)
        r = self.embed_return(returns_to_go) + time  # (B, K, D)
        s = self.embed_state(observations) + time  # (B, K, D)
        a = self.embed_action(actions) + time  # (B, K, D)
        x = torch.stack((r, s, a), dim=2).reshape(b, 3 * k, -1)  # (B, 3K, D)
        return self.drop(self.embed_ln(x))

    def predict_last(self, observations, actions, returns_to_go, timesteps,
                     masks: torch.Tensor | None = None) -> torch.Tensor:
        """The last step's action only, (B, K, .) -> (B, A): equal to ``forward(...)[:, -1]``.

        Saves work in rollouts: the last block computes only s_K's output (its keys and values
        still come from every token), and the action head runs on one token.
        """
        b, k, _ = observations.shape
        x = self.embed(observations, actions, returns_to_go, timesteps)  # (B, 3K, D)
        attn_mask = None if masks is None else self.attention_mask(masks)  # (B, 1, 3K, 3K)
        for block in self.blocks[:-1]:
            x = block(x, attn_mask)
        s_last = 3 * k - 2  # token index of s_K
        if attn_mask is None:  # all real: s_K attends to every token up to itself
            row = torch.arange(3 * k, device=x.device) <= s_last  # (3K,)
            row_mask = row.expand(b, 1, 1, 3 * k)  # (B, 1, 1, 3K)
        else:
            row_mask = attn_mask[:, :, s_last:s_last + 1]  # (B, 1, 1, 3K)
        x = self.blocks[-1](x, row_mask, query=s_last)  # (B, 1, D)
        return torch.tanh(self.predict_action(self.ln_f(x[:, 0])))  # (B, A)

    def predict_cached(self, tokens: torch.Tensor, cache: list | None, keep: int):
        """Incremental inference for rollouts (eval mode): embedded new tokens (B, Tn, D), the last
        of which is s_t, attend to each layer's cached keys/values, of which only the newest
        ``keep`` are kept. Returns the action for s_t (B, A) and the new cache.

        Exact while the cached tokens are the whole episode so far (t < K). Once the window slides,
        the cached keys/values of older tokens were computed with context that has since left the
        window, so results differ from full-window recomputation (``forward``).
        """
        x, new_cache = tokens, []
        for i, block in enumerate(self.blocks):
            past = None if cache is None or keep <= 0 else (cache[i][0][:, :, -keep:],
                                                             cache[i][1][:, :, -keep:])
            x, kv = block.forward_cached(x, past)
            new_cache.append(kv)
        return torch.tanh(self.predict_action(self.ln_f(x[:, -1]))), new_cache

    @staticmethod
    def attention_mask(masks: torch.Tensor) -> torch.Tensor:
        """Causal mask with padded keys removed; (B, K) bool -> (B, 1, 3K, 3K) bool (True: attend).

        Every token may attend to itself, so the rows of padded queries are never empty (an
        all-masked row would give NaN, and NaN values poison real rows through 0 * NaN).
        """
        b, k = masks.shape
        n = 3 * k
        keys = masks.repeat_interleave(3, dim=1)  # (B, 3K)
        causal = torch.ones(n, n, dtype=torch.bool, device=masks.device).tril()  # (3K, 3K)
        eye = torch.eye(n, dtype=torch.bool, device=masks.device)  # (3K, 3K)
        return ((causal & keys[:, None, :]) | eye)[:, None]  # (B, 1, 3K, 3K)
