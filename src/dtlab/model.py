"""The Decision Transformer (Chen et al. 2021), whole, in one file.

Tokens are interleaved per step as (R_1, s_1, a_1, R_2, s_2, a_2, ...). Each modality has its own
linear embedding; a learned timestep embedding is added to all three tokens of a step and is the
only position information (as in the original, which removes GPT-2's position embedding). A causal
pre-LN GPT stack runs over the 3K tokens and the action for step t is read from the hidden state of
s_t. The loss lives in dtlab.train, not here.

The model is built from the data's specs (dtlab.spaces): ``ContinuousActions(dim)`` (actions in
[-1, 1], see dtlab.normalizer) are embedded linearly and predicted through tanh;
``DiscreteActions(n)`` indices are embedded with a lookup table and predicted as n logits, as the
original's Atari model does. Vector (and flattened Dict) observations are embedded linearly;
``ImageObservations`` frame stacks (B, K, stack, H, W), scaled to [0, 1], go through the
Nature-DQN convolutional encoder (``ImageEncoder``), the DT Atari model's state embedding. The
model owns its token layout: callers hand it per-step inputs (normalized observations,
model-space actions, scaled returns-to-go, timesteps), never tokens.

Reference: github.com/kzl/decision-transformer, gym/decision_transformer/models/
decision_transformer.py (embed_ln over the stacked tokens, tanh action head). Deviations from its
Atari model (atari/mingpt/model_atari.py), which dtlab does not copy: returns-to-go and actions
are embedded as for the gym tasks (no tanh after them, embed_ln over the tokens), and the
timestep embedding is the only position information (the Atari model adds a learned position
within the window, ``pos_emb``, to its ``global_pos_emb``).

Baselines (``ModelConfig.architecture``, built by ``build_model``): transformer-bc is the same
model without return-to-go tokens, (s_1, a_1, s_2, a_2, ...), the action for step t read from s_t;
mlp-bc (``MLPBC``) sees the current state alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtlab.config import ModelConfig
from dtlab.errors import ConfigError
from dtlab.spaces import (ActionSpec, ContinuousActions, DiscreteActions, ImageObservations,
                          ObservationSpec)


class ImageEncoder(nn.Module):
    """Frame stacks -> state embeddings: (..., stack, H, W) floats in [0, 1] -> (..., out).

    The Nature-DQN torso (Mnih et al. 2015, "Human-level control through deep reinforcement
    learning", Methods: 32 filters 8 x 8 stride 4, 64 filters 4 x 4 stride 2, 64 filters 3 x 3
    stride 1, each followed by a ReLU, no padding), flattened (64 x 7 x 7 = 3136 values for
    84 x 84 frames) and mapped linearly to ``out`` features with tanh, as the DT Atari model's
    ``state_encoder`` does (github.com/kzl/decision-transformer, atari/mingpt/model_atari.py:
    ``nn.Linear(3136, config.n_embd), nn.Tanh()``; Nature-DQN has a 512-unit ReLU layer there
    instead). Its layers keep PyTorch's default initialization, as there (the state encoder is
    built after ``_init_weights`` runs).
    """

    def __init__(self, spec: ImageObservations, out: int) -> None:
        super().__init__()
        h, w = spec.shape
        for kernel, stride in ((8, 4), (4, 2), (3, 1)):
            h, w = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        self.conv = nn.Sequential(
            nn.Conv2d(spec.stack, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(64 * h * w, out)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        lead = frames.shape[:-3]
        x = self.conv(frames.reshape(-1, *frames.shape[-3:]))  # (B*K, 64 * h * w)
        return torch.tanh(self.fc(x)).reshape(*lead, -1)  # (..., out)


@dataclass
class KVCache:
    """Keys and values of the tokens an incremental rollout has seen (``predict_cached``).

    A ring buffer of the window's 3K - 1 tokens (R_1, s_1, a_1, ..., R_K, s_K; the last step's
    action is not yet known): counting the tokens since the cache was built from 0, token n lives
    in slot n mod (3K - 1), so a new step's three tokens overwrite the oldest step's three in place
    and nothing is copied. Attention does not depend on the order of its keys (the timestep
    embedding is the only position information), so the slots need no reordering; ``positions``
    gives each slot's token number for the causal mask. ``predict_cached`` advances the cache it
    is given, in place, and returns that same object (no stale copy of it exists to misuse).
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


def action_outputs(action_space: ActionSpec) -> tuple[int, bool]:
    """(width of the action head, whether it predicts logits): ``ContinuousActions(dim)`` -> (dim,
    False), actions in [-1, 1] through tanh; ``DiscreteActions(n)`` -> (n, True). ConfigError
    for any other spec."""
    if isinstance(action_space, DiscreteActions):
        return action_space.n, True
    if isinstance(action_space, ContinuousActions):
        return action_space.dim, False
    raise ConfigError(f"the model cannot act in {action_space!r}")


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014), as ``F.dropout``: in training each element is
    zeroed with probability ``p`` and the rest scaled by 1 / (1 - p); the identity otherwise. Same
    shape and dtype as ``x``.

    On the CPU the mask comes from uniform numbers, ``torch.rand(...) >= p`` (float32, so its
    probability is p to within 2^-24 whatever ``x``'s dtype), instead of ``F.dropout``'s
    ``bernoulli_``: on CPUs without Intel MKL's Bernoulli path (this project's AMD EPYC machines)
    that draw costs 18 ns per element against 3.3 ns (docs/benchmarks.md). The masks come from
    torch's default generator, which checkpoints save, so a seeded run is reproducible and a
    resumed one continues bit for bit (a run started before this change draws other masks). Other
    devices keep ``F.dropout`` (CUDA: its fused kernel).
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
              *, is_causal: bool, dropout_p: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (q (B, H, Tq, E), k and v (B, H, T, E), a bool mask
    broadcastable to (B, H, Tq, T), True: attend) with attention-probability dropout drawn as
    ``dropout`` draws it. Without dropout, or off the CPU, it is SDPA itself (fused kernels);
    with dropout on the CPU, SDPA would take its unfused path anyway, so the same arithmetic is
    written out here, in fp32 whatever the inputs' dtype (as SDPA's unfused path computes bf16):
    softmax(q k^T / sqrt(E) masked) -> dropout -> @ v, returned in v's dtype."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=dropout_p)
    with torch.autocast("cpu", enabled=False):  # fp32 scores and softmax under bf16 autocast too
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = q.float() @ k.float().transpose(-2, -1) * scale  # (B, H, Tq, T)
        if is_causal:
            attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool,
                                   device=q.device).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = dropout(scores.softmax(-1), dropout_p, True)  # (B, H, Tq, T)
        return (probs @ v.float()).to(v.dtype)  # (B, H, Tq, E)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.resid_drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                query: slice | None = None) -> torch.Tensor:
        """``query``: compute the outputs of those tokens only (``attn_mask`` then holds just their
        rows); (B, T, D) -> (B, Tq, D). Keys and values still come from every token."""
        b, t, d = x.shape  # (B, T, D), T = 3K tokens
        if query is None:
            q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, T, D)
        else:  # queries of the selected tokens only; keys and values of every token
            q = F.linear(x[:, query], self.qkv.weight[:d], self.qkv.bias[:d])  # (B, Tq, D)
            k, v = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).split(d, dim=2)
        q = q.view(b, q.shape[1], self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, Tq, D/H)
        k = k.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, T, D/H)
        v = v.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, T, D/H)
        y = attention(q, k, v, attn_mask, is_causal=attn_mask is None and query is None,
                      dropout_p=self.dropout if self.training else 0.0)  # (B, H, Tq, D/H)
        y = y.transpose(1, 2).reshape(b, q.shape[2], d)  # (B, Tq, D)
        return self.resid_drop(self.proj(y))

    def forward_cached(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       slots: torch.Tensor, mask: torch.Tensor, last_only: bool) -> torch.Tensor:
        """New tokens ``x`` (B, Tn, D): their keys and values are written into the ring buffers
        ``keys``/``values`` (B, H, S, D/H) at ``slots`` (Tn,) in place, then they attend to the
        buffers under ``mask`` (Tn, S) bool (True: attend). Returns (B, Tn, D), or with
        ``last_only`` the last new token's output alone, (B, 1, D)."""
        b, tn, d = x.shape
        q, k, v = (z.view(b, tn, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in self.qkv(x).split(d, dim=2))  # 3 x (B, H, Tn, D/H)
        keys.index_copy_(2, slots, k.to(keys.dtype))
        values.index_copy_(2, slots, v.to(values.dtype))
        if last_only:
            q, mask, tn = q[:, :, -1:], mask[-1:], 1
        with torch.autocast(x.device.type, enabled=False):  # in the buffers' dtype
            y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, tn, d))  # y: (B, H, Tn, D/H)


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
            Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                query: slice | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), or (B, Tq, D) for the tokens ``query`` selects."""
        h = self.attn(self.ln_1(x), attn_mask, query)
        x = (x if query is None else x[:, query]) + h
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       slots: torch.Tensor, mask: torch.Tensor, last_only: bool) -> torch.Tensor:
        """``CausalSelfAttention.forward_cached`` inside the block: (B, Tn, D) -> (B, Tn, D), or
        (B, 1, D) for the last token only."""
        h = self.attn.forward_cached(self.ln_1(x), keys, values, slots, mask, last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.mlp(self.ln_2(x))


class DecisionTransformer(nn.Module):
    """Predicts a_t from (R_1, s_1, a_1, ..., R_t, s_t) for every step t of a K-step window; with
    ``cfg.architecture == "transformer-bc"`` from (s_1, a_1, ..., s_t): returns-to-go are ignored."""

    def __init__(self, cfg: ModelConfig, observation_space: ObservationSpec,
                 action_space: ActionSpec) -> None:
        """Embeddings and action head from the specs: ``VectorObservations(dim)`` and
        ``DictObservations`` (linear state embedding) or ``ImageObservations`` (``ImageEncoder``);
        ``ContinuousActions(dim)`` (linear embedding, tanh head of width dim) or
        ``DiscreteActions(n)`` (lookup embedding, n logits). Other specs: ConfigError."""
        super().__init__()
        width, self._logits = action_outputs(action_space)
        self.cfg, self.observation_space, self.action_space = cfg, observation_space, action_space
        self.returns_tokens = cfg.architecture != "transformer-bc"
        self.tokens_per_step = 3 if self.returns_tokens else 2  # (R, s, a) or (s, a)
        d = cfg.embed_dim
        self.embed_timestep = nn.Embedding(cfg.max_ep_len, d)
        if self.returns_tokens:
            self.embed_return = nn.Linear(1, d)
        image = isinstance(observation_space, ImageObservations)
        self._image = image
        if not image:
            self.embed_state = nn.Linear(observation_space.dim, d)
        self.embed_action = nn.Embedding(width, d) if self._logits else nn.Linear(width, d)
        self.embed_ln = nn.LayerNorm(d)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.predict_action = nn.Linear(d, width)  # see action_head
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections (Radford et al. 2019, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if image:  # after the init above, as the DT Atari model builds its state_encoder
            self.embed_state = ImageEncoder(observation_space, d)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def action_head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., D) -> actions in [-1, 1] (..., A), or logits (..., n) for indices."""
        out = self.predict_action(h)
        return out if self._logits else torch.tanh(out)

    def encode_observations(self, frames: torch.Tensor) -> torch.Tensor:
        """Image models: frame stacks (..., stack, H, W) in [0, 1] -> their state embeddings
        (..., D), the ``ImageEncoder``'s output. Every method that takes observations also takes
        these in place of the frames, (B, K, D): a rollout encodes each step's frames once and
        keeps the encodings (exact: a step's embedding depends on its own frames only)."""
        return self.embed_state(frames)

    def greedy_action(self, out: torch.Tensor) -> torch.Tensor:
        """Model-space action from the head's output (B, A): continuous actions as they are, the
        most likely index of logits ((B,) int64)."""
        return out.argmax(-1) if self._logits else out

    def empty_actions(self, b: int, k: int, device: torch.device | str) -> torch.Tensor:
        """Zero actions for a (B, K) window: (B, K, act_dim) float32, or (B, K) int64 indices."""
        if self._logits:
            return torch.zeros(b, k, dtype=torch.long, device=device)
        return torch.zeros(b, k, self.action_space.dim, device=device)

    def forward(
        self,
        observations: torch.Tensor,  # (B, K, obs_dim) normalized, or (B, K, stack, H, W) in [0, 1]
        #                              (or their encode_observations, (B, K, D))
        actions: torch.Tensor,  # (B, K, act_dim) in [-1, 1], or (B, K) int64 indices;
        #                         the last step's entry is unused
        returns_to_go: torch.Tensor,  # (B, K, 1), scaled
        timesteps: torch.Tensor,  # (B, K) int64
        masks: torch.Tensor | None = None,  # (B, K) bool, False at left padding; None: all real
    ) -> torch.Tensor:  # (B, K, act_dim) predicted actions in [-1, 1], or (B, K, n) logits
        """Predicted actions for every step of the windows. Timesteps must lie in
        [0, max_ep_len) (ConfigError otherwise)."""
        n = self.tokens_per_step  # s_t is the second-to-last token of each step
        return self._readout(observations, actions, returns_to_go, timesteps, masks,
                             slice(n - 2, None, n))  # from the K state tokens s_1..s_K: (B, K, A)

    def embed(self, observations, actions, returns_to_go, timesteps) -> torch.Tensor:
        """Interleaved token embeddings (R_1, s_1, a_1, R_2, ...): (B, K, .) -> (B, 3K, D); without
        return tokens (s_1, a_1, s_2, ...): (B, 2K, D).

        Timesteps at or beyond ``max_ep_len`` have no embedding: ConfigError, never clamped.
        """
        b, k = observations.shape[:2]
        self._check_timesteps(timesteps)
        time = self.embed_timestep(timesteps)  # (B, K, D)
        s = self._embed_states(observations) + time  # (B, K, D)
        a = self.embed_action(actions) + time  # (B, K, D)
        if self.returns_tokens:
            r = self.embed_return(returns_to_go) + time  # (B, K, D)
            x = torch.stack((r, s, a), dim=2).reshape(b, 3 * k, -1)  # (B, 3K, D)
        else:
            x = torch.stack((s, a), dim=2).reshape(b, 2 * k, -1)  # (B, 2K, D)
        return self.drop(self.embed_ln(x))

    def _check_timesteps(self, timesteps: torch.Tensor) -> None:
        # Checked here on the CPU; on an accelerator the callers check on the host (DTPolicy's step
        # counts, training's episode lengths) so that no forward waits on the device, and an
        # index past the table is a device-side error there, never a clamp.
        latest = int(timesteps.max()) if timesteps.numel() and not timesteps.is_cuda else 0
        if latest >= self.cfg.max_ep_len:
            raise ConfigError(
                f"timestep {latest} is beyond the model's max_ep_len={self.cfg.max_ep_len} (it "
                f"embeds timesteps 0 to {self.cfg.max_ep_len - 1}); cap episodes at "
                f"{self.cfg.max_ep_len} steps with max_steps")

    def _embed_states(self, observations: torch.Tensor) -> torch.Tensor:
        """(B, K, obs_dim) vectors, or (B, K, D) already encoded frames -> (B, K, D)."""
        encoded = self._image and observations.dim() == 3  # (B, K, D) from encode_observations
        return observations if encoded else self.embed_state(observations)

    def _embed_newest(self, observations, actions, returns_to_go, timesteps) -> torch.Tensor:
        """The tokens (a_{t-1}, R_t, s_t) of two steps (B, 2, .): (B, 3, D), equal to
        ``embed(...)[:, 2:5]`` (the LayerNorm is per token) without embedding the other three."""
        self._check_timesteps(timesteps)
        time = self.embed_timestep(timesteps)  # (B, 2, D)
        a = self.embed_action(actions[:, :1]) + time[:, :1]  # (B, 1, D)
        r = self.embed_return(returns_to_go[:, 1:]) + time[:, 1:]  # (B, 1, D)
        s = self._embed_states(observations[:, 1:]) + time[:, 1:]  # (B, 1, D)
        return self.drop(self.embed_ln(torch.cat((a, r, s), dim=1)))  # (B, 3, D)

    def predict_last(self, observations, actions, returns_to_go, timesteps,
                     masks: torch.Tensor | None = None) -> torch.Tensor:
        """The last step's action only, (B, K, .) -> (B, A): equal to ``forward(...)[:, -1]``.

        Saves work in rollouts: the last block computes only s_K's output (its keys and values
        still come from every token), and the action head runs on one token.
        """
        s_last = self.tokens_per_step * observations.shape[1] - 2  # token index of s_K
        return self._readout(observations, actions, returns_to_go, timesteps, masks,
                             slice(s_last, s_last + 1))[:, 0]  # (B, A)

    def _readout(self, observations, actions, returns_to_go, timesteps, masks,
                 query: slice) -> torch.Tensor:
        """Actions predicted from the state tokens ``query`` selects: (B, Tq, A).

        Only those tokens' outputs are used, so the last block computes only them (its keys and
        values still come from every token): exact, and it skips the last block's attention
        output, projection and MLP for every other token (2/3 of them in training, all but one
        in rollouts).
        """
        b, k = observations.shape[:2]
        n = self.tokens_per_step
        x = self.embed(observations, actions, returns_to_go, timesteps)  # (B, 3K, D)
        attn_mask = None if masks is None else self.attention_mask(masks, n)  # (B, 1, 3K, 3K)
        for block in self.blocks[:-1]:
            x = block(x, attn_mask)
        if attn_mask is None:  # all real: plain causal rows for the selected queries
            pos = torch.arange(n * k, device=x.device)  # (3K,)
            row_mask = (pos[None, :] <= pos[query][:, None]).expand(b, 1, -1, -1)  # (B, 1, Tq, 3K)
        else:
            row_mask = attn_mask[:, :, query]  # (B, 1, Tq, 3K)
        x = self.blocks[-1](x, row_mask, query=query)  # (B, Tq, D)
        return self.action_head(self.ln_f(x))  # (B, Tq, A)

    def predict_cached(self, observations, actions, returns_to_go, timesteps,
                       cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Incremental inference for rollouts (eval mode): the action for the newest step (B, A)
        and the cache to pass with the next step. Inputs are steps, (B, n, .) as in ``forward``:

        - ``cache`` None: the newest n steps of the episodes (no padding; n = t + 1 at an
          episode's start, or the last context_len steps when the policy rebuilds its cache later
          in an episode); the tokens up to s_n are computed (exact). Steps beyond the newest
          context_len are outside the window and are not computed.
        - with a ``cache``: the cache's last step, whose action is now known, and the new step
          (n = 2); only the new tokens (a_{t-1}, R_t, s_t) are computed, attending to the cached
          keys/values of the newest context_len - 1 steps. The cache is advanced in place and
          returned (the same object).

        The last block computes s_t's output alone (the other new tokens' keys and values are all
        that is read from it). Exact while the cached tokens are the whole episode so far
        (t < K). Once the window slides, the cached keys/values of older tokens were computed with
        context that has since left the window, so results differ from full-window recomputation
        (``forward``).
        """
        if not self.returns_tokens:
            raise ConfigError(f"kv_cache rollouts need return-to-go tokens; {self.cfg.architecture} "
                              "has none (evaluate it without kv_cache)")
        size = 3 * self.cfg.context_len - 1  # the window's tokens: the ring's slots
        if cache is None:  # the tokens up to s_n: (B, 3n - 1, D), into a new ring buffer
            x = self.embed(observations, actions, returns_to_go, timesteps)[:, :-1]
            b = x.shape[0]
            shape = (b, self.cfg.n_heads, size, self.cfg.embed_dim // self.cfg.n_heads)
            # Buffers in the autocast dtype, except on the CPU: there SDPA over one or a few
            # queries is slower in bf16 than in fp32 (docs/benchmarks.md), so they stay fp32.
            dtype = torch.get_autocast_dtype(x.device.type) \
                if torch.is_autocast_enabled(x.device.type) and x.device.type != "cpu" else x.dtype
            cache = KVCache(tuple(x.new_zeros(shape, dtype=dtype) for _ in self.blocks),
                            tuple(x.new_zeros(shape, dtype=dtype) for _ in self.blocks),
                            torch.full((size,), -1, dtype=torch.long, device=x.device), 0, 0)
            steps = observations.shape[1]
        else:  # a_{t-1}, R_t, s_t: (B, 3, D)
            x = self._embed_newest(observations, actions, returns_to_go, timesteps)
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
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block.forward_cached(x, cache.keys[i], cache.values[i], slots, mask, i == last)
        cache.positions, cache.tokens = positions, first + len(new)
        cache.steps = min(steps, self.cfg.context_len)
        return self.action_head(self.ln_f(x[:, -1])), cache

    @staticmethod
    def attention_mask(masks: torch.Tensor, tokens_per_step: int = 3) -> torch.Tensor:
        """Causal mask with padded keys removed; (B, K) bool -> (B, 1, 3K, 3K) bool (True: attend)
        (2K with ``tokens_per_step`` 2: no return tokens).

        Every token may attend to itself, so the rows of padded queries are never empty (an
        all-masked row would give NaN, and NaN values poison real rows through 0 * NaN).
        """
        b, k = masks.shape
        n = tokens_per_step * k
        keys = masks.repeat_interleave(tokens_per_step, dim=1)  # (B, 3K)
        causal = torch.ones(n, n, dtype=torch.bool, device=masks.device).tril()  # (3K, 3K)
        eye = torch.eye(n, dtype=torch.bool, device=masks.device)  # (3K, 3K)
        return ((causal & keys[:, None, :]) | eye)[:, None]  # (B, 1, 3K, 3K)


class MLPBC(nn.Module):
    """Behaviour cloning with an MLP on the current state alone: a_t from s_t.

    The DT code's BC baseline (github.com/kzl/decision-transformer, gym/decision_transformer/
    models/mlp_bc.py, MLPBCModel with its default max_length=1): ``cfg.n_layers`` hidden layers of
    ``cfg.embed_dim`` units, each followed by the activation and dropout, then a linear head
    (tanh for continuous actions in [-1, 1], logits for discrete ones). Takes the same arguments
    as ``DecisionTransformer`` so that the same sampler, ``train_step`` and policy run it; actions,
    returns-to-go, timesteps and masks are ignored. CORL's BC actor (algorithms/offline/
    any_percent_bc.py: 2 x 256, ReLU, no dropout) is ``embed_dim=256, n_layers=2, dropout=0``.
    Frame stacks (``ImageObservations``) first go through an ``ImageEncoder`` to ``embed_dim``
    features.
    """

    def __init__(self, cfg: ModelConfig, observation_space: ObservationSpec,
                 action_space: ActionSpec) -> None:
        super().__init__()
        out, self._logits = action_outputs(action_space)
        self.cfg, self.observation_space, self.action_space = cfg, observation_space, action_space
        layers: list[nn.Module] = []
        image = isinstance(observation_space, ImageObservations)
        self.encoder = ImageEncoder(observation_space, cfg.embed_dim) if image else None
        width = cfg.embed_dim if image else observation_space.dim
        for _ in range(cfg.n_layers):
            layers += [nn.Linear(width, cfg.embed_dim),
                       nn.ReLU() if cfg.activation == "relu" else nn.GELU(), Dropout(cfg.dropout)]
            width = cfg.embed_dim
        self.hidden = nn.Sequential(*layers)
        self.predict_action = nn.Linear(width, out)

    # The same action head, greedy choice and empty action window as the Decision Transformer.
    action_head = DecisionTransformer.action_head
    greedy_action = DecisionTransformer.greedy_action
    empty_actions = DecisionTransformer.empty_actions

    def encode_observations(self, frames: torch.Tensor) -> torch.Tensor:
        """Image models: frame stacks (..., stack, H, W) -> (..., embed_dim) features, which
        ``forward`` and ``predict_last`` also take in place of the frames."""
        return self.encoder(frames)

    def _features(self, observations: torch.Tensor) -> torch.Tensor:
        """(..., obs_dim) vectors as they are; frame stacks (..., stack, H, W) encoded."""
        image = self.encoder is not None and observations.dim() >= 4
        return self.encoder(observations) if image else observations

    def forward(self, observations: torch.Tensor, actions=None, returns_to_go=None, timesteps=None,
                masks=None) -> torch.Tensor:
        """Each step's action from its own state: (B, K, obs_dim) (or frame stacks
        (B, K, stack, H, W), or their encodings (B, K, D)) -> (B, K, A)."""
        return self.action_head(self.hidden(self._features(observations)))

    def predict_last(self, observations: torch.Tensor, actions=None, returns_to_go=None,
                     timesteps=None, masks=None) -> torch.Tensor:
        """The last step's action, (B, K, obs_dim) (or (B, K, stack, H, W)) -> (B, A)."""
        return self.action_head(self.hidden(self._features(observations[:, -1])))


def build_model(cfg: ModelConfig, observation_space: ObservationSpec,
                action_space: ActionSpec) -> DecisionTransformer | MLPBC:
    """The network ``cfg.architecture`` names (the one place that choice is made)."""
    if cfg.architecture == "mlp-bc":
        return MLPBC(cfg, observation_space, action_space)
    return DecisionTransformer(cfg, observation_space, action_space)
