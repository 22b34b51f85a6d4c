"""Frozen configuration dataclasses. Each field's docstring is its ``--help`` text.

Values derived from data (observation/action dims, normalization statistics, reference scores)
live in the checkpoint, never here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro


@dataclass(frozen=True)
class ModelConfig:
    """Decision Transformer hyperparameters (defaults: the DT paper's gym configuration)."""

    embed_dim: int = 128
    """Width of every token embedding and of the transformer."""
    n_layers: int = 3
    """Number of transformer blocks."""
    n_heads: int = 1
    """Attention heads per block (embed_dim must be divisible by it)."""
    mlp_ratio: int = 4
    """Hidden width of each block's MLP, as a multiple of embed_dim."""
    dropout: float = 0.1
    """Dropout on embeddings, attention weights and residual branches."""
    context_len: int = 20
    """K: number of (return-to-go, state, action) steps the model sees."""
    max_ep_len: int = 1000
    """Size of the learned timestep embedding: episodes may run timesteps 0 to max_ep_len - 1.
    Longer training episodes are refused (or cut, --truncate-long-episodes); an evaluation episode
    that reaches it stops with an error, never a clamped timestep: cap it with --max-steps."""
    activation: Literal["relu", "gelu"] = "relu"
    """MLP activation (the DT gym code's default, --activation_function, is relu)."""

    def __post_init__(self) -> None:
        from dtlab.errors import ConfigError

        if self.embed_dim % self.n_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by n_heads {self.n_heads}")
        for name in ("embed_dim", "n_layers", "n_heads", "mlp_ratio", "context_len", "max_ep_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """Training run: data, optimization, logging, checkpoints (defaults: the DT paper's gym run)."""

    dataset: str
    """Dataset: a D4RL-layout or dtlab native HDF5 file, or minari:<dataset id> (loaded from
    MINARI_DATASETS_PATH, downloaded by Minari when not local)."""
    env: str
    """Gymnasium environment id used for evaluation and space checks, e.g. Hopper-v5."""
    out: str = "runs/dt"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard logs."""
    steps: int = 100_000
    """Number of gradient steps."""
    batch_size: int = 64
    """Windows per gradient step."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay, applied to matmul weights only (not biases, LayerNorms, embeddings)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 10_000
    """Linear learning-rate warm-up from 0 over this many steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate after warm-up: constant (the DT paper) or cosine decay to 10% at the end."""
    grad_clip: float = 0.25
    """Clip the global gradient norm to this value (0 disables)."""
    return_scale: float | None = None
    """Divide returns-to-go by this; default from the env registry (1000 for MuJoCo locomotion)."""
    seed: int = 0
    """Seed of model init, dropout and window sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    eval_every: int = 0
    """Evaluate in the env every this many steps (0: only at the end if eval_episodes > 0)."""
    eval_episodes: int = 0
    """Episodes per target for periodic/final evaluation (0 disables evaluation during training)."""
    eval_targets: tuple[float, ...] = ()
    """Target returns for evaluation during training; default from the env registry."""
    checkpoint_every: int = 10_000
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 3
    """How many step checkpoints to keep in the run directory (the newest ones)."""
    log_every: int = 100
    """Write metrics (loss, lr, steps/s) every this many steps."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint (bit-for-bit on CPU)."""
    skip_nonfinite: bool = False
    """Skip (do not apply) steps whose loss or gradient is NaN/inf, counting them in the metrics,
    instead of stopping the run."""
    strict: bool = False
    """Refuse datasets with actions outside the env's action bounds (default: warn and clip)."""
    truncate_long_episodes: bool = False
    """Cut episodes longer than model.max_ep_len to that length (default: refuse the dataset)."""
    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    threads: int | None = None
    """CPU threads for torch (default: OMP_NUM_THREADS if set, else the number of cores)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Matmul precision: fp32, or bf16 autocast (weights, optimizer and loss stay fp32; on CPUs
    with AVX-512-BF16 or AMX, and on GPUs, about 1.5x faster; see docs/benchmarks.md)."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = True
    """Also write metrics as TensorBoard events under OUT/tb."""


@dataclass(frozen=True)
class EvalConfig:
    """Return-conditioned evaluation of a checkpoint in its Gymnasium environment."""

    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT_DIR")]
    """Checkpoint directory (a run directory resolves to its latest checkpoint)."""
    targets: tuple[float, ...] = ()
    """Target returns to condition on; default from the env registry."""
    episodes: int = 10
    """Episodes per target."""
    seed: int = 0
    """Episode i of every target resets its env with seed + i (same starts for every target)."""
    env: str | None = None
    """Override the checkpoint's env id (must have the same spaces)."""
    out: str | None = None
    """Write results as JSON to this file."""
    sweep: bool = False
    """Evaluate a range of targets (from the dataset's lowest episode return to 20% of the return
    range past its highest) and draw achieved vs target return."""
    sweep_points: int = 8
    """Number of targets in --sweep."""
    plot: str | None = None
    """PNG path for the achieved-vs-target plot (drawn when given, or with --sweep: default next to
    --out, else sweep.png)."""
    max_steps: int | None = None
    """Cut episodes at this many steps (default: the env's time limit)."""
    device: str = "auto"
    """torch device: auto, cpu, cuda, ..."""
    threads: int | None = None
    """CPU threads for torch (default: OMP_NUM_THREADS if set, else 1 for rollouts)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Model precision in rollouts: fp32 (exact), or bf16 autocast (faster on CPUs with
    AVX-512-BF16/AMX and on GPUs; actions differ by ~1e-3)."""
    kv_cache: bool = False
    """Approximate, faster rollouts: feed only each step's new tokens and reuse cached keys and
    values. Exact for the first K steps; afterwards older tokens keep keys/values computed with
    context that has left the window (measured score impact: docs/benchmarks.md)."""


@dataclass(frozen=True)
class CollectConfig:
    """Roll out a behaviour policy in a Gymnasium env and write a D4RL-style dataset file."""

    out: str
    """Dataset file to write (HDF5), or minari:<id> for a Minari dataset."""
    env: str | None = None
    """Gymnasium environment id, e.g. Hopper-v5 (implied by --preset)."""
    preset: str | None = None
    """Regenerate a D4RL-style reference dataset, 1M transitions by default, deterministically:
    <hopper|halfcheetah|walker2d>-<random|medium|expert|medium-expert|medium-replay>-v5. random
    needs nothing; medium/expert use behaviour-policy weights under src/dtlab/presets/<env>/
    (made with dtlab train-behaviour --export; committed: hopper-v5, halfcheetah-v5, walker2d-v5)."""
    policy: str = "random"
    """Behaviour policy: random (uniform over a Box, or over a Discrete's actions); actor:PATH
    (SAC actor weights, safetensors); sb3:PATH (a Stable-Baselines3 zip: SAC/TD3/PPO/... for Box
    actions, PPO/DQN/A2C for Discrete ones; needs --trust-pickle); pendulum-swingup (scripted,
    Pendulum-v1; --quality degrades it); pendulum-mixed (the quickstart's mixed-quality data)."""
    deterministic: bool = False
    """Act with the policy's mean action instead of sampling (D4RL sampled)."""
    trust_pickle: bool = False
    """Allow loading an sb3:PATH zip or a --behaviour-run replay buffer: they contain pickles,
    which can run code when loaded."""
    behaviour_run: str | None = None
    """Run directory of dtlab train-behaviour (for the medium-replay preset: its replay buffer,
    a pickle, so it also needs --trust-pickle)."""
    quality: float = 1.0
    """Quality in [0, 1] of the scripted pendulum-swingup policy."""
    episodes: int | None = None
    """Collect this many complete episodes."""
    transitions: int | None = None
    """Or collect this many transitions (the last episode is cut there and marked truncated);
    presets default to D4RL's 1M."""
    seed: int = 0
    """Seed of the env resets and of the policy's randomness."""
    format: Literal["d4rl", "native", "minari"] | None = None
    """File layout: D4RL's HDF5 keys, dtlab's native HDF5, or a Minari dataset (default: minari
    for --out minari:<id>, else d4rl)."""


@dataclass(frozen=True)
class BehaviourConfig:
    """Train a SAC behaviour agent (Stable-Baselines3) with periodic evaluation and snapshots."""

    env: str
    """Gymnasium environment id, e.g. Hopper-v5."""
    out: str
    """Run directory: snapshots/, replay_buffer.pkl, manifest.json."""
    steps: int = 1_000_000
    """Total environment steps (D4RL trained its SAC agents for 1M steps)."""
    eval_every: int = 20_000
    """Evaluate and snapshot every this many steps."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per snapshot."""
    learning_starts: int = 10_000
    """Random-action steps before learning starts (SB3 zoo's MuJoCo setting)."""
    buffer_size: int = 1_000_000
    """Replay buffer capacity (SB3's default; medium-replay needs it to hold the whole run)."""
    seed: int = 0
    """Seed of SAC, the env and evaluation."""
    threads: int = 1
    """torch CPU threads for SAC updates."""
