"""The Decision Transformer (Chen et al. 2021), the exact model, in one file.

Tokens are interleaved per step as (R_1, s_1, a_1, R_2, s_2, a_2, ...). Each modality has its own
embedding; a learned timestep embedding is added to all three tokens of a step and is the only
position information (as in the original, which removes GPT-2's position embedding). A causal
pre-LN GPT stack runs over the 3K tokens and the action for step t is read from the hidden state of
s_t. The loss lives in dtlab.train; the approximate cached rollout in dtlab.kv_cache; MLP-BC and
the choice among architectures (``build_model``) in dtlab.baselines.

The model is built from the data's specs (dtlab.spaces): ``ContinuousActions(dim)`` (actions in
[-1, 1], see dtlab.normalizer) are embedded linearly and predicted through tanh;
``DiscreteActions(n)`` indices are embedded with a lookup table and predicted as n logits, as the
original's Atari model does. Vector (and flattened Dict) observations are embedded linearly;
``ImageObservations`` frame stacks (B, K, stack, H, W), scaled to [0, 1], go through the
Nature-DQN convolutional encoder (``ImageEncoder``), the DT Atari model's state embedding. The
model owns its token layout: callers hand it per-step inputs (normalized observations,
model-space actions, scaled returns-to-go, timesteps), never tokens. transformer-BC
(``ModelConfig.architecture``) is this model without return-to-go tokens: (s_1, a_1, s_2, ...).

Reference: github.com/kzl/decision-transformer, gym/decision_transformer/models/
decision_transformer.py (embed_ln over the stacked tokens, tanh action head). Deviations from its
Atari model (atari/mingpt/model_atari.py), which dtlab does not copy: returns-to-go and actions
are embedded as for the gym tasks (no tanh after them, embed_ln over the tokens), and the
timestep embedding is the only position information (the Atari model adds a learned position
within the window, ``pos_emb``, to its ``global_pos_emb``). Dropout and attention run through
dtlab.kernels (the same arithmetic; the kernel choice is per device).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dtlab.config import ModelConfig
from dtlab.errors import ConfigError
from dtlab.kernels import Dropout, attention
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


def action_outputs(action_space: ActionSpec) -> tuple[int, bool]:
    """(width of the action head, whether it predicts logits): ``ContinuousActions(dim)`` -> (dim,
    False), actions in [-1, 1] through tanh; ``DiscreteActions(n)`` -> (n, True). ConfigError
    for any other spec."""
    if isinstance(action_space, DiscreteActions):
        return action_space.n, True
    if isinstance(action_space, ContinuousActions):
        return action_space.dim, False
    raise ConfigError(f"the model cannot act in {action_space!r}")


class ActionHead(nn.Linear):
    """The action head of every dtlab network: hidden states (..., D) -> actions in [-1, 1]
    (..., dim) through tanh for ``ContinuousActions(dim)`` (the DT gym code's head), or logits
    (..., n) for ``DiscreteActions(n)`` (its Atari head). A ``nn.Linear``, so its parameters keep
    the names checkpoints store (``predict_action.weight``, ``predict_action.bias``) and its
    initialization is the Linear's. ConfigError for any other action spec."""

    def __init__(self, in_features: int, action_space: ActionSpec) -> None:
        width, logits = action_outputs(action_space)
        super().__init__(in_features, width)
        self.logits, self.action_space = logits, action_space

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = super().forward(h)
        return out if self.logits else torch.tanh(out)

    def greedy_action(self, out: torch.Tensor) -> torch.Tensor:
        """Model-space action from the head's output (B, A): continuous actions as they are, the
        most likely index of logits ((B,) int64)."""
        return out.argmax(-1) if self.logits else out

    def empty_actions(self, b: int, k: int, device: torch.device | str) -> torch.Tensor:
        """Zero actions for a (B, K) window: (B, K, act_dim) float32, or (B, K) int64 indices."""
        if self.logits:
            return torch.zeros(b, k, dtype=torch.long, device=device)
        return torch.zeros(b, k, self.action_space.dim, device=device)


# The log standard deviation of the stochastic head is clamped to this range: the common SAC
# actors' bounds, and those of the ODT (Zheng, Zhang and Grover 2022, "Online Decision
# Transformer") as its authors' code sets them (facebookresearch/online-dt, DiagGaussianActor's
# log_std_bounds). That code maps the head's output into the range through tanh where dtlab
# clamps it (docs/results.md, "Online finetuning").
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
# Data actions at the bounds +-1 have no tanh preimage; the likelihood reads them this far inside.
ACTION_EPS = 1e-6


class StochasticActionHead(nn.Linear):
    """The ODT's stochastic policy head (Zheng et al. 2022, section 3.1): hidden states (..., D) ->
    the parameters of a distribution over actions.

    ``ContinuousActions(dim)``: a tanh-squashed diagonal Gaussian, a = tanh(u), u ~ N(mean, std^2);
    the output is (..., 2 dim) = (mean of u, log std clamped to [LOG_STD_MIN, LOG_STD_MAX]).
    ``DiscreteActions(n)``: a categorical distribution, the output its n logits (as
    ``ActionHead``). One ``nn.Linear``, so it initializes and decays as the deterministic head;
    its parameters are ``predict_action.weight`` and ``.bias`` of width 2 dim (continuous). The
    entropy temperature is the trainer's (dtlab.trainer.EntropyTemperature), not a weight.
    ConfigError for any other action spec."""

    def __init__(self, in_features: int, action_space: ActionSpec) -> None:
        width, logits = action_outputs(action_space)
        super().__init__(in_features, width if logits else 2 * width)
        self.logits, self.action_space, self.width = logits, action_space, width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = super().forward(h)
        if self.logits:
            return out  # (..., n) logits
        mean, log_std = out.split(self.width, dim=-1)  # 2 x (..., A)
        return torch.cat((mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)), dim=-1)  # (..., 2A)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous: (mean, log std) of the Gaussian before tanh, each (..., A)."""
        return out[..., :self.width], out[..., self.width:]

    def greedy_action(self, out: torch.Tensor) -> torch.Tensor:
        """The action evaluation takes: tanh(mean) in [-1, 1] (B, A) (the ODT evaluates the
        mean action), or the most likely index ((B,) int64)."""
        return out.argmax(-1) if self.logits else torch.tanh(self.split(out)[0])

    def sample_action(self, out: torch.Tensor, noise: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
        """Continuous: tanh(mean + temperature x std x noise), noise (B, A) standard normal
        draws; (B, A) in [-1, 1]. (Discrete sampling is dtlab.policy's, from the logits.)"""
        mean, log_std = self.split(out)
        return torch.tanh(mean + temperature * log_std.exp() * noise)

    def log_likelihood(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a | context) of the data's actions, (...,): continuous a (..., A) in [-1, 1]
        (clamped to +-(1 - ACTION_EPS)), the squashed Gaussian's density by the change of
        variables, log N(atanh a; mean, std) - sum log(1 - a^2); discrete: log softmax of the
        logits at the indices (...,) int64."""
        if self.logits:
            return torch.log_softmax(out, -1).gather(-1, actions[..., None]).squeeze(-1)
        mean, log_std = self.split(out)
        a = actions.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)
        gaussian = torch.distributions.Normal(mean, log_std.exp())
        return (gaussian.log_prob(torch.atanh(a)) - torch.log1p(-a.pow(2))).sum(-1)

    def entropy(self, out: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The policy's entropy at each position, (...,). Discrete: the categorical's, exact.
        Continuous: the squashed Gaussian has no closed form; by the change of variables
        H[tanh u] = H[u] + E[sum log(1 - tanh(u)^2)], the Gaussian's entropy exactly and the
        Jacobian term by a one-sample Monte-Carlo estimate at u = mean + std x noise
        (reparameterized, so it is differentiable; the ODT estimates the entropy by sampling,
        section 3.2). ``noise``: (..., A) standard normal draws (continuous only)."""
        if self.logits:
            return torch.distributions.Categorical(logits=out).entropy()
        mean, log_std = self.split(out)
        gaussian = (0.5 * (1.0 + math.log(2 * math.pi)) + log_std).sum(-1)  # (...,)
        u = mean + log_std.exp() * noise  # (..., A)
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|.
        log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return gaussian + log_det.sum(-1)

    def empty_actions(self, b: int, k: int, device: torch.device | str) -> torch.Tensor:
        """Zero actions for a (B, K) window: (B, K, act_dim) float32, or (B, K) int64 indices."""
        if self.logits:
            return torch.zeros(b, k, dtype=torch.long, device=device)
        return torch.zeros(b, k, self.action_space.dim, device=device)


def action_head(policy: str, in_features: int,
                action_space: ActionSpec) -> ActionHead | StochasticActionHead:
    """The head ``policy`` (``ModelConfig.policy``) names: ``ActionHead`` (deterministic) or
    ``StochasticActionHead``."""
    if policy == "stochastic":
        return StochasticActionHead(in_features, action_space)
    return ActionHead(in_features, action_space)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        # SDPA's default scale 1/sqrt(E), E = D/H, given as a constant: the same value, and an
        # exported graph then holds it as a constant instead of computing it from q's shape.
        self.scale = 1.0 / math.sqrt(cfg.embed_dim // cfg.n_heads)
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.resid_drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                query: slice | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with ``query``, only those tokens' outputs, (B, Tq, D)
        (``attn_mask`` then holds just their rows). Keys and values always come from every token.
        ``attn_mask`` None: plain causal."""
        d = x.shape[2]  # (B, T, D), T = 3K tokens
        if query is None:
            q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, T, D)
        else:  # queries of the selected tokens only: the rows of qkv's weight that make q
            q = F.linear(x[:, query], self.qkv.weight[:d], self.qkv.bias[:d])  # (B, Tq, D)
            k, v = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).split(d, dim=2)
        q, k, v = (self.split_heads(z) for z in (q, k, v))  # (B, H, Tq or T, D/H)
        y = attention(q, k, v, attn_mask, is_causal=attn_mask is None and query is None,
                      scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(self.merge_heads(y)))  # (B, H, Tq, D/H) -> (B, Tq, D)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, D/H). With one head (the DT paper's) an unsqueeze: the same
        values, and no shape arithmetic in an exported graph."""
        if self.n_heads == 1:
            return x.unsqueeze(1)
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D/H) -> (B, T, D), the inverse of ``split_heads``."""
        if self.n_heads == 1:
            return y.squeeze(1)
        return y.transpose(1, 2).flatten(2)


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
        width, logits = action_outputs(action_space)
        self.cfg, self.observation_space, self.action_space = cfg, observation_space, action_space
        self.returns_tokens = cfg.architecture != "transformer-bc"
        self.tokens_per_step = 3 if self.returns_tokens else 2  # (R, s, a) or (s, a)
        d = cfg.embed_dim
        self.embed_timestep = nn.Embedding(cfg.max_ep_len, d)
        if self.returns_tokens:
            self.embed_return = nn.Linear(1, d)
        self._image = isinstance(observation_space, ImageObservations)
        if not self._image:
            self.embed_state = nn.Linear(observation_space.dim, d)
        self.embed_action = nn.Embedding(width, d) if logits else nn.Linear(width, d)
        self.embed_ln = nn.LayerNorm(d)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.predict_action = action_head(cfg.policy, d, action_space)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections (Radford et al. 2019, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if self._image:  # after the init above, as the DT Atari model builds its state_encoder
            self.embed_state = ImageEncoder(observation_space, d)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's init (as the DT code's GPT2Model): N(0, 0.02) weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

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

    def predict_last(self, observations, actions, returns_to_go, timesteps,
                     masks: torch.Tensor | None = None) -> torch.Tensor:
        """The last step's action only, (B, K, .) -> (B, A): equal to ``forward(...)[:, -1]``,
        with the last block and the head computing s_K's output alone (a rollout's step)."""
        s_last = self.tokens_per_step * observations.shape[1] - 2  # token index of s_K
        return self._readout(observations, actions, returns_to_go, timesteps, masks,
                             slice(s_last, s_last + 1))[:, 0]  # (B, A)

    def _readout(self, observations, actions, returns_to_go, timesteps, masks,
                 query: slice) -> torch.Tensor:
        """Actions predicted from the state tokens ``query`` selects: (B, Tq, A).

        Only those tokens' outputs are read, so the last block computes only them (its keys and
        values still come from every token): exact, and it skips the last block's attention
        output, projection and MLP for every other token (2/3 of them in training, all but one
        in rollouts).
        """
        b, k = observations.shape[:2]
        n = self.tokens_per_step
        x = self.embed(observations, actions, returns_to_go, timesteps)  # (B, 3K, D)
        attn_mask = None if masks is None else self.attention_mask(masks, n)  # (B, 1, 3K, 3K)
        for block in self.blocks[:-1]:
            x = block(x, attn_mask)  # (B, 3K, D)
        if attn_mask is None:  # all real: plain causal rows for the selected queries
            pos = torch.arange(n * k, device=x.device)  # (3K,)
            row_mask = (pos[None, :] <= pos[query][:, None]).expand(b, 1, -1, -1)  # (B, 1, Tq, 3K)
        else:
            row_mask = attn_mask[:, :, query]  # (B, 1, Tq, 3K)
        x = self.blocks[-1](x, row_mask, query=query)  # (B, Tq, D)
        return self.predict_action(self.ln_f(x))  # (B, Tq, A)

    def embed(self, observations, actions, returns_to_go, timesteps) -> torch.Tensor:
        """Interleaved token embeddings (R_1, s_1, a_1, R_2, ...): (B, K, .) -> (B, 3K, D); without
        return tokens (s_1, a_1, s_2, ...): (B, 2K, D).

        Timesteps at or beyond ``max_ep_len`` have no embedding: ConfigError, never clamped.
        """
        b, k = observations.shape[:2]
        self.check_timesteps(timesteps)
        time = self.embed_timestep(timesteps)  # (B, K, D)
        s = self.embed_states(observations) + time  # (B, K, D)
        a = self.embed_action(actions) + time  # (B, K, D)
        if self.returns_tokens:
            r = self.embed_return(returns_to_go) + time  # (B, K, D)
            x = torch.stack((r, s, a), dim=2).reshape(b, 3 * k, -1)  # (B, K, 3, D) -> (B, 3K, D)
        else:
            x = torch.stack((s, a), dim=2).reshape(b, 2 * k, -1)  # (B, K, 2, D) -> (B, 2K, D)
        return self.drop(self.embed_ln(x))

    def embed_states(self, observations: torch.Tensor) -> torch.Tensor:
        """State embeddings without the timestep: (B, K, obs_dim) vectors or (B, K, stack, H, W)
        frames -> (B, K, D); (B, K, D) frames already encoded (``encode_observations``) as they
        are."""
        encoded = self._image and observations.dim() == 3  # (B, K, D) from encode_observations
        return observations if encoded else self.embed_state(observations)

    def encode_observations(self, frames: torch.Tensor) -> torch.Tensor:
        """Image models: frame stacks (..., stack, H, W) in [0, 1] -> their state embeddings
        (..., D), the ``ImageEncoder``'s output. Every method that takes observations also takes
        these in place of the frames, (B, K, D): a rollout encodes each step's frames once and
        keeps the encodings (exact: a step's embedding depends on its own frames only)."""
        return self.embed_state(frames)

    def check_timesteps(self, timesteps: torch.Tensor) -> None:
        """ConfigError when a timestep is at or beyond ``max_ep_len`` (it has no embedding).

        Checked on the CPU only: on an accelerator the callers check on the host (DTPolicy's step
        counts, training's episode lengths) so that no forward waits on the device, and an index
        past the table is a device-side error there, never a clamp."""
        latest = int(timesteps.max()) if timesteps.numel() and not timesteps.is_cuda else 0
        if latest >= self.cfg.max_ep_len:
            raise ConfigError(
                f"timestep {latest} is beyond the model's max_ep_len={self.cfg.max_ep_len} (it "
                f"embeds timesteps 0 to {self.cfg.max_ep_len - 1}); cap episodes at "
                f"{self.cfg.max_ep_len} steps with max_steps")

    @staticmethod
    def attention_mask(masks: torch.Tensor, tokens_per_step: int = 3) -> torch.Tensor:
        """Causal mask with padded keys removed; (B, K) bool -> (B, 1, 3K, 3K) bool (True: attend)
        (2K with ``tokens_per_step`` 2: no return tokens).

        Every token may attend to itself, so the rows of padded queries are never empty (an
        all-masked row would give NaN, and NaN values poison real rows through 0 * NaN).
        """
        b, k = masks.shape
        n = tokens_per_step * k
        keys = masks.repeat_interleave(tokens_per_step, dim=1)  # (B, 3K): each step's 3 tokens
        causal = torch.ones(n, n, dtype=torch.bool, device=masks.device).tril()  # (3K, 3K)
        eye = torch.eye(n, dtype=torch.bool, device=masks.device)  # (3K, 3K)
        return ((causal & keys[:, None, :]) | eye)[:, None]  # (B, 1, 3K, 3K)
