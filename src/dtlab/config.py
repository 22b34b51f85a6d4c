"""Frozen configuration dataclasses. Each field's docstring is its ``--help`` text.

Every config validates itself in ``__post_init__`` and names the offending field (``lr``,
``model.context_len``), never a CLI flag. Values derived from data (observation/action specs,
normalization statistics, reference scores) live in the checkpoint, never here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from dtlab.checks import check_number, is_number  # noqa: F401  (check_number: re-exported)
from dtlab.errors import ConfigError


PRECISIONS = ("auto", "fp32", "bf16")  # auto: resolved by dtlab.runtime.resolve_precision
MAX_SEED = 2**63 - 1  # torch.manual_seed's largest seed; numpy's generators take any of these


def setting_differences(saved: Mapping[str, Any], now: Mapping[str, Any], *,
                        defaults: Mapping[str, Mapping[str, Any]] | None = None,
                        exempt: frozenset[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """(name, saved value, current value) for every setting in ``now`` that ``saved`` records
    differently. Both are JSON-like; groups (dicts) are compared field by field and named
    ``group.field``. A field missing from a saved group counts as ``defaults[group][field]`` (it
    was added since, with that default); names in ``exempt`` are not compared."""
    differ = []
    for key, value in now.items():
        old = saved.get(key)
        if isinstance(value, Mapping):
            old = old if isinstance(old, Mapping) else {}
            fallback = (defaults or {}).get(key, {})
            differ += [(f"{key}.{f}", old.get(f), v) for f, v in value.items()
                       if old.get(f, fallback.get(f)) != v and f"{key}.{f}" not in exempt]
        elif old != value:
            differ.append((key, old, value))
    return differ


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """The config dataclass ``cls`` from its ``dataclasses.asdict`` form as JSON stores it
    (groups as objects, tuples as lists). Fields absent from ``data`` keep their defaults (a
    field added since the file was written); keys ``cls`` does not have are ignored. The
    dataclass validates itself (ConfigError); TypeError for a missing required field."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{name: _from_json_value(hints[name], value) for name, value in data.items()
                  if name in known})


def _from_json_value(tp: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return from_dict(tp, value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None) and (dataclasses.is_dataclass(arg)
                                          or typing.get_origin(arg) is tuple):
                return _from_json_value(arg, value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is one of ``choices`` (Literal fields
    are not checked at run time by Python itself)."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_targets(name: str, targets: tuple[float, ...], *, limit: float = 1e9) -> None:
    """Target returns must be finite and within +-``limit`` (a return of 1e30 cannot be asked of
    any task dtlab knows; its returns-to-go overflow float32 arithmetic in the model)."""
    for t in targets:
        check_number(name, t, minimum=-limit, maximum=limit)


@dataclass(frozen=True)
class ModelConfig:
    """Decision Transformer hyperparameters (defaults: the DT paper's gym configuration, as its code
    sets them: github.com/kzl/decision-transformer gym/experiment.py argument defaults embed_dim
    128, n_layer 3, n_head 1, n_inner 4 x embed_dim, activation_function relu, dropout 0.1, K 20,
    max_ep_len 1000)."""

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
    """Size of the learned timestep embedding: episodes may have at most this many steps (longer
    ones are refused in training and evaluation, never clamped)."""
    activation: Literal["relu", "gelu"] = "relu"
    """MLP activation (the DT gym code's default, --activation_function, is relu)."""
    architecture: Literal["decision-transformer", "transformer-bc", "mlp-bc"] = "decision-transformer"
    """What predicts the actions: decision-transformer (return-conditioned); transformer-bc, the
    same transformer without return-to-go tokens (s_1, a_1, s_2, a_2, ...), a behaviour-cloning
    baseline; mlp-bc, an MLP on the current state alone (model.n_layers hidden layers of
    model.embed_dim units with model.activation and model.dropout, the DT code's MLPBCModel;
    needs model.context_len 1). Both baselines ignore the target return."""

    def __post_init__(self) -> None:
        if self.architecture == "mlp-bc" and self.context_len != 1:
            raise ConfigError(f"model.context_len must be 1 for model.architecture mlp-bc (it sees "
                              f"one state), got {self.context_len}")
        if self.n_heads >= 1 and self.embed_dim % self.n_heads:
            raise ConfigError(f"model.embed_dim {self.embed_dim} is not divisible by model.n_heads "
                              f"{self.n_heads}")
        for name in ("embed_dim", "n_layers", "n_heads", "mlp_ratio", "context_len", "max_ep_len"):
            check_number(f"model.{name}", getattr(self, name), minimum=1, integer=True)
        check_number("model.dropout", self.dropout, minimum=0.0, below=1.0)
        check_choice("model.activation", self.activation, ("relu", "gelu"))
        if self.embed_dim % self.n_heads:
            raise ConfigError(f"model.embed_dim {self.embed_dim} is not divisible by model.n_heads "
                              f"{self.n_heads}")


@dataclass(frozen=True)
class DataConfig:
    """What to train on."""

    dataset: str
    """Dataset: a D4RL-layout or dtlab native HDF5 file, minari:<dataset id> (loaded from
    MINARI_DATASETS_PATH, downloaded by Minari when not local), or
    dqn-replay:DIR[:buffers=A-B][:transitions=N] (Dopamine replay logs, e.g. the DQN Replay
    Dataset's <game>/<run>/replay_logs; docs/datasets.md)."""
    env: str
    """Gymnasium environment id used for evaluation and space checks, e.g. Hopper-v5."""
    return_scale: float | None = None
    """Divide returns-to-go by this; default from the env registry (1000 for MuJoCo locomotion)."""
    strict: bool = False
    """Refuse datasets with actions outside the env's action bounds (default: warn and clip)."""
    truncate_long_episodes: bool = False
    """Cut episodes longer than model.max_ep_len to that length (default: refuse the dataset)."""
    top_fraction: float | None = None
    """Train only on the highest-return episodes, taken from the best down while they hold at most
    this fraction of the transitions (at least one episode): the DT paper's Percentile BC
    (section 5.3, 0.1 for 10%BC). Observation statistics still come from the whole dataset, as
    in the DT code."""
    obs_keys: tuple[str, ...] = ()
    """Dict observations: the keys to train on, flattened in this order into one vector and
    recorded in the checkpoint, e.g. observation,desired_goal (required for Dict observations;
    commas or spaces separate them)."""

    def __post_init__(self) -> None:
        check_number("return_scale", self.return_scale, above=0)
        check_number("top_fraction", self.top_fraction, above=0, maximum=1)
        keys = tuple(k.strip() for item in self.obs_keys for k in str(item).split(","))
        if any(not k for k in keys) or len(set(keys)) != len(keys):
            raise ConfigError(f"obs_keys must be distinct non-empty names, got {self.obs_keys!r}")
        object.__setattr__(self, "obs_keys", keys)


@dataclass(frozen=True)
class OptimConfig:
    """How the weights are updated (defaults: the DT paper's gym run, as its code sets them:
    gym/experiment.py batch_size 64, learning_rate 1e-4, weight_decay 1e-4, warmup_steps 10000
    then constant; gym/decision_transformer/training/seq_trainer.py clips gradients at 0.25).
    A resumed run must keep all of these to continue bit for bit."""

    batch_size: int = 64
    """Windows per gradient step, per process: under torchrun with N processes a step averages
    the gradient over N x batch_size windows."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay on the weight matrices of Linear and Conv2d layers: attention, MLP,
    action head, image encoder and the state, return and continuous-action embeddings (Linear
    maps); not on biases, LayerNorms, the timestep embedding or the discrete-action embedding
    (Embedding tables)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 10_000
    """Linear learning-rate warm-up from 0 over this many steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate after warm-up: constant (the DT paper) or cosine decay to 10% at the end."""
    grad_clip: float = 0.25
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 0
    """Seed of model init, dropout and window sampling (under torchrun, rank r samples and draws
    dropout from streams derived from (seed, r))."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Matmul precision: auto (bf16 where the hardware computes it natively: CPUs with
    AVX-512-BF16 or AMX, GPUs of compute capability 8.0+; else fp32), fp32, or bf16 autocast
    (weights, optimizer and loss stay fp32). The run records what auto chose, and a resumed run
    keeps it. bf16 on a CPU without native bf16 is 2-31x slower (docs/benchmarks.md)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay per step (0: none;
    e.g. 0.999 averages over about the last 1,000 steps): the averaged weights are what is
    evaluated and saved as the checkpoint's model, the raw ones what is trained and resumed
    (torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn)."""
    skip_nonfinite: bool = False
    """Skip (do not apply) steps whose loss or gradient is NaN/inf, counting them in the metrics,
    instead of stopping the run (a run in which almost no step was applied still fails)."""

    def __post_init__(self) -> None:
        check_number("batch_size", self.batch_size, minimum=1, integer=True)
        check_number("lr", self.lr, above=0)
        check_number("weight_decay", self.weight_decay, minimum=0)
        check_number("warmup_steps", self.warmup_steps, minimum=0, integer=True)
        check_number("grad_clip", self.grad_clip, minimum=0)
        check_number("ema_decay", self.ema_decay, minimum=0, below=1)
        check_number("seed", self.seed, minimum=0, maximum=MAX_SEED, integer=True)
        check_choice("schedule", self.schedule, ("constant", "cosine"))
        check_choice("precision", self.precision, PRECISIONS)
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas!r}")
        for beta in self.betas:
            check_number("betas", beta, minimum=0, below=1)


@dataclass(frozen=True)
class RunConfig:
    """How long to train, where to write, on what hardware."""

    out: str = "runs/dt"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard logs."""
    steps: int = 100_000
    """Number of gradient steps."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint (bit-for-bit on CPU); a run directory
    with this run's settings but no checkpoint yet starts from step 0."""
    checkpoint_every: int = 10_000
    """Write a checkpoint every this many steps (and always at the end)."""
    checkpoint_every_minutes: float = 10.0
    """Also write one when this many minutes have passed since the last (0 disables), so a killed
    run loses at most that much work."""
    keep_checkpoints: int = 3
    """How many step checkpoints to keep in the run directory (the newest ones)."""
    log_every: int = 100
    """Write metrics (loss, lr, steps/s) every this many steps."""
    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ... (under torchrun
    with several processes on a node: auto or cuda, each process takes cuda:LOCAL_RANK)."""
    threads: int | None = None
    """CPU threads for torch (default: OMP_NUM_THREADS if set, else the number of cores divided
    by the processes torchrun starts on the node)."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = True
    """Also write metrics as TensorBoard events under OUT/tb."""
    wandb: bool = False
    """Also log the training metrics and evaluations to Weights & Biases (pip install
    'dtlab[wandb]'; files under OUT/wandb; WANDB_MODE=offline logs without an account)."""
    wandb_project: str = "dtlab"
    """W&B project for --wandb (the run is named after --out's last directory)."""

    def __post_init__(self) -> None:
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        check_number("checkpoint_every_minutes", self.checkpoint_every_minutes, minimum=0)
        check_number("threads", self.threads, minimum=1, integer=True)


@dataclass(frozen=True)
class EvalDuringTraining:
    """Evaluation in the env while training."""

    eval_every: int = 0
    """Evaluate in the env every this many steps (0: only at the end if eval_episodes > 0)."""
    eval_episodes: int = 0
    """Episodes per target for periodic/final evaluation (0 disables evaluation during training)."""
    eval_targets: tuple[float, ...] = ()
    """Target returns for evaluation during training; default from the env registry."""
    eval_workers: int = 0
    """Step the evaluation environments in this many worker processes while the model acts in the
    training process (0: in the training process). Returns are identical either way."""
    eval_seed: int | None = None
    """Episode i of every target resets its env with eval_seed + i (default: --seed), the same
    starts at every evaluation."""

    def __post_init__(self) -> None:
        check_number("eval_every", self.eval_every, minimum=0, integer=True)
        check_number("eval_episodes", self.eval_episodes, minimum=0, integer=True)
        check_targets("eval_targets", self.eval_targets)
        check_number("eval_workers", self.eval_workers, minimum=0, integer=True)
        check_number("eval_seed", self.eval_seed, minimum=0, maximum=MAX_SEED, integer=True)
        if self.eval_every and not self.eval_episodes:
            raise ConfigError(f"--eval-every {self.eval_every} evaluates nothing without "
                              "--eval-episodes N (episodes per target; 0 turns evaluation off)")


_FLAT = tyro.conf.arg(name="")  # the group's fields keep their flat flags: --lr, --steps, --out

# The DT paper's Atari settings as ``dtlab train`` flags: ``dtlab train --preset NAME`` puts these
# before the command line's own flags, which override them. Sources, github.com/kzl/decision-
# transformer: atari/run_dt_atari.py (n_layer 6, n_head 8, n_embd 128, --context_length 30,
# --batch_size 128, learning_rate 6e-4, lr_decay: warm-up then cosine decay), atari/run.sh
# (Pong: block_size 150 = 3 x K, i.e. K 50, and batch_size 512), atari/mingpt/trainer_atari.py
# (betas (0.9, 0.95), grad_norm_clip 1.0, weight_decay 0.1 on matmul weights, warm-up over
# warmup_tokens = 512 * 20 target actions: 10,240 / (128 x 30 per step) = 2.7 -> 3 steps,
# 10,240 / (512 x 50) -> 1 step) and atari/mingpt/model_atari.py (GELU, 4 x n_embd MLPs, dropout
# 0.1: dtlab's defaults but the activation). max_ep_len 27,000: the ALE's episode cap (108,000
# frames at frame skip 4; dtlab.envs.ATARI_MAX_STEPS; the DT code sizes its timestep table by
# the data's longest episode). Deviations: dtlab's cosine decays to 10% at --steps (DT: at
# final_tokens = 2 x 500,000 x 3K target actions, floor 10%), and the DT code trains 5 epochs
# (about 19,500 steps on 500,000 transitions at batch 128), which --steps leaves to the user.
_ATARI_FLAGS = ("--model.n-layers", "6", "--model.n-heads", "8", "--model.embed-dim", "128",
                "--model.activation", "gelu", "--model.max-ep-len", "27000", "--lr", "6e-4",
                "--betas", "0.9", "0.95", "--weight-decay", "0.1", "--grad-clip", "1.0",
                "--schedule", "cosine")
TRAIN_PRESETS: dict[str, tuple[str, ...]] = {
    "atari": _ATARI_FLAGS + ("--model.context-len", "30", "--batch-size", "128",
                             "--warmup-steps", "3"),
    "atari-pong": _ATARI_FLAGS + ("--model.context-len", "50", "--batch-size", "512",
                                  "--warmup-steps", "1"),
}


def expand_train_preset(args: list[str]) -> list[str]:
    """``dtlab train`` arguments with ``--preset NAME`` (or ``--preset=NAME``) replaced by the
    flags of ``TRAIN_PRESETS[NAME]``, placed first so that the command line's own flags win.
    ConfigError for an unknown name or a missing one."""
    out, preset = [], None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--preset" or arg.startswith("--preset="):
            if arg == "--preset":
                if i + 1 >= len(args):
                    raise ConfigError(f"preset needs a name ({', '.join(TRAIN_PRESETS)})")
                name, i = args[i + 1], i + 2
            else:
                name, i = arg.split("=", 1)[1], i + 1
            if name not in TRAIN_PRESETS:
                raise ConfigError(f"unknown preset {name!r} ({', '.join(TRAIN_PRESETS)})")
            preset = name
            continue
        out.append(arg)
        i += 1
    return list(TRAIN_PRESETS[preset]) + out if preset else out


@dataclass(frozen=True)
class TrainConfig:
    """Training run (defaults: the DT paper's gym run), in groups: what to train on (data), the
    network (model), the updates (optim), the run's length, outputs and hardware (run), and
    evaluation during training. A resumed run must keep data, model and optim unchanged.
    --preset atari (or atari-pong): start from the DT paper's Atari settings, which any other
    flag given overrides (docs/usage.md, "Atari")."""

    data: Annotated[DataConfig, _FLAT]
    """What to train on."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    optim: Annotated[OptimConfig, _FLAT] = field(default_factory=OptimConfig)
    """Optimization."""
    run: Annotated[RunConfig, _FLAT] = field(default_factory=RunConfig)
    """Run length, outputs, hardware."""
    evaluation: Annotated[EvalDuringTraining, _FLAT] = field(default_factory=EvalDuringTraining)
    """Evaluation during training."""

    # Fields of those groups a resumed run may change: skip_nonfinite only decides what a
    # non-finite step does, so a run stopped by one resumes from its last good checkpoint with it
    # set (what the error message advises).
    RESUME_MAY_CHANGE = frozenset({"optim.skip_nonfinite"})

    def resume_groups(self) -> dict:
        """What a resumed run must share with the original to continue bit for bit: the data,
        model and optimization groups (less ``RESUME_MAY_CHANGE``), and the length of a cosine
        schedule."""
        groups = {"data": self.data, "model": self.model, "optim": self.optim}
        if self.optim.schedule == "cosine":
            groups["steps"] = self.run.steps
        return groups


@dataclass(frozen=True)
class EvalConfig:
    """Return-conditioned evaluation of a checkpoint in its Gymnasium environment."""

    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT_DIR")]
    """Checkpoint directory (a run directory resolves to its latest checkpoint)."""
    targets: tuple[float, ...] = ()
    """Target returns to condition on; default from the env registry (not with --sweep, which
    picks its own)."""
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
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Model precision in rollouts: auto (bf16 where the hardware computes it natively: CPUs with
    AVX-512-BF16 or AMX, GPUs of compute capability 8.0+; else fp32), fp32 (exact), or bf16
    autocast (actions differ by ~1e-3; 2-31x slower on CPUs without native bf16)."""
    eval_workers: int = 0
    """Step the environments in this many worker processes while the model acts in this one
    (0: all in this process). Returns are identical either way; it pays when the simulator's share
    of the time is large (MuJoCo) and cores are free."""
    kv_cache: bool = False
    """Approximate, faster rollouts: feed only each step's new tokens and reuse cached keys and
    values. Exact for the first K steps; afterwards older tokens keep keys/values computed with
    context that has left the window (measured score impact: docs/benchmarks.md)."""
    temperature: float = 0.0
    """Discrete actions: 0 takes the most likely action; above 0 samples from softmax(logits /
    temperature), each episode from its own stream keyed by (--seed, its env seed, its target),
    so its result does not depend on the other episodes or targets (the DT Atari code samples at
    1.0)."""

    offline: bool = False
    """Evaluate without an environment, on --dataset's windows: action error per return-to-go
    bucket, and how much the predicted actions change when the return-to-go is swapped (no env is
    made)."""
    dataset: str | None = None
    """Dataset for --offline: a D4RL or native HDF5 file, or minari:<id> (default: the file the
    checkpoint was trained on, if its content is unchanged)."""
    buckets: int = 4
    """--offline: number of return-to-go buckets (quantiles of the windows' returns-to-go)."""
    windows: int = 10_000
    """--offline: evaluate this many windows, drawn without replacement with --seed (0: all)."""
    swap_quantiles: tuple[float, float] = (0.1, 0.9)
    """--offline: the low and high quantiles of the dataset's returns-to-go whose values replace
    each window's return-to-go in the swap test."""

    def __post_init__(self) -> None:
        check_targets("targets", self.targets)
        check_choice("precision", self.precision, PRECISIONS)
        check_number("episodes", self.episodes, minimum=1, integer=True)
        check_number("seed", self.seed, minimum=0, maximum=MAX_SEED, integer=True)
        check_number("temperature", self.temperature, minimum=0)
        check_number("sweep_points", self.sweep_points, minimum=2, integer=True)
        check_number("buckets", self.buckets, minimum=1, integer=True)
        check_number("windows", self.windows, minimum=0, integer=True)
        if len(self.swap_quantiles) != 2 or not self.swap_quantiles[0] < self.swap_quantiles[1]:
            raise ConfigError(f"swap_quantiles must be two increasing quantiles, got "
                              f"{self.swap_quantiles!r}")
        for q in self.swap_quantiles:
            check_number("swap_quantiles", q, minimum=0, maximum=1)
        if self.sweep and self.targets:
            raise ConfigError(f"--sweep picks its own targets (the dataset's return range); drop "
                              f"--targets {' '.join(f'{t:g}' for t in self.targets)}, or --sweep "
                              "to evaluate at them")
        check_number("max_steps", self.max_steps, minimum=1, integer=True)
        check_number("threads", self.threads, minimum=1, integer=True)
        check_number("eval_workers", self.eval_workers, minimum=0, integer=True)


# Dataset ids written with ``--out minari:<id>``: dtlab.data.formats.MINARI_PREFIX (the data
# layer sits above this leaf module, so the prefix is repeated; tests/test_collect.py pins both).
_MINARI_PREFIX = "minari:"
_POLICY_CHOICES = ("random, actor:PATH, sb3:PATH, pendulum-swingup, pendulum-mixed, "
                   "pointmaze-goal")


@dataclass(frozen=True)
class PolicySpec:
    """A parsed ``CollectConfig.policy``: which behaviour policy, and its file for actor/sb3."""

    kind: Literal["random", "actor", "sb3", "pendulum-swingup", "pendulum-mixed",
                  "pointmaze-goal"]
    path: str | None = None  # the weights file of actor:PATH (safetensors) and sb3:PATH (zip)


def parse_policy(text: str) -> PolicySpec:
    """``random``, ``actor:PATH``, ``sb3:PATH``, ``pendulum-swingup``, ``pendulum-mixed`` or
    ``pointmaze-goal`` -> PolicySpec; ConfigError naming the ``policy`` field for anything else."""
    from dtlab.errors import ConfigError

    if text in ("random", "pendulum-swingup", "pendulum-mixed", "pointmaze-goal"):
        return PolicySpec(text)
    kind, sep, path = text.partition(":")
    if sep and kind in ("actor", "sb3"):
        if not path:
            raise ConfigError(f"policy {text} needs a file: {kind}:PATH")
        return PolicySpec(kind, path)
    raise ConfigError(f"unknown policy '{text}' ({_POLICY_CHOICES})")


@dataclass(frozen=True)
class CalibrateConfig:
    """Return-conditioning calibration of a checkpoint: sweep targets over the data's returns, find
    where the achieved return stops rising with the target, and store that reliable maximum
    target in the checkpoint (calibration.json), so that asking for more warns."""

    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT_DIR")]
    """Checkpoint directory (a run directory resolves to its latest checkpoint)."""
    points: int = 10
    """Targets in the sweep: evenly spaced from the data's lowest episode return to 50% of the
    return range past its best (1.5x the best when the lowest return is 0)."""
    episodes: int = 10
    """Episodes per target, at least 2 (the noise margin uses their standard error, and shrinks
    with 1/sqrt(episodes))."""
    z: float = 2.0
    """Noise margin in standard errors: achieved return "rises" from one target to a higher one
    when the difference of their means exceeds z times its standard error."""
    seed: int = 0
    """Episode i of every target resets its env with seed + i."""
    dataset: str | None = None
    """Dataset whose episode returns are drawn behind the curve (default: the checkpoint's
    training dataset when its file is still there)."""
    plot: str | None = None
    """PNG path of the calibration plot (default: calibration.png in the checkpoint directory)."""
    max_steps: int | None = None
    """Cut episodes at this many steps (default: the env's time limit)."""
    device: str = "auto"
    """torch device: auto, cpu, cuda, ..."""
    threads: int | None = None
    """CPU threads for torch (default: OMP_NUM_THREADS if set, else 1 for rollouts)."""

    def __post_init__(self) -> None:
        check_number("points", self.points, minimum=2, integer=True)
        check_number("episodes", self.episodes, minimum=2, integer=True)  # a standard error
        check_number("z", self.z, minimum=0)
        check_number("seed", self.seed, minimum=0, maximum=MAX_SEED, integer=True)
        check_number("max_steps", self.max_steps, minimum=1, integer=True)
        check_number("threads", self.threads, minimum=1, integer=True)


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
    actions, PPO/DQN/A2C for Discrete ones, also on ALE/<Game>-v5; needs --trust-pickle);
    pendulum-swingup (scripted, Pendulum-v1; --quality degrades it); pendulum-mixed (the
    quickstart's mixed-quality data); pointmaze-goal (scripted: straight at the goal, stalling at
    walls; PointMaze envs of gymnasium-robotics; --quality degrades it)."""
    deterministic: bool = False
    """Act with the policy's mean action instead of sampling (D4RL sampled)."""
    trust_pickle: bool = False
    """Allow loading an sb3:PATH zip or a --behaviour-run replay buffer: they contain pickles,
    which can run code when loaded."""
    vecnormalize: str | None = None
    """sb3:PATH only: Stable-Baselines3 VecNormalize statistics (VecNormalize.save, a pickle: needs
    --trust-pickle) the agent was trained with; it acts on normalized observations, the dataset
    records raw ones. Default: vecnormalize.pkl beside the zip, when there is one."""
    behaviour_run: str | None = None
    """Run directory of dtlab train-behaviour (for the medium-replay preset: its replay buffer,
    a pickle, so it also needs --trust-pickle)."""
    quality: float = 1.0
    """Quality in [0, 1] of the scripted pendulum-swingup and pointmaze-goal policies."""
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

    def __post_init__(self) -> None:
        """Refuse conflicting or meaningless options before anything is collected (ConfigError).
        The preset's own env is checked by the caller (dtlab.presets.parse_preset)."""
        from dtlab.errors import ConfigError

        for name in ("episodes", "transitions"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        check_number("quality", self.quality, minimum=0, maximum=1)
        check_number("seed", self.seed, minimum=0, maximum=MAX_SEED, integer=True)
        to_minari = self.out.startswith(_MINARI_PREFIX)
        if to_minari and self.out_format != "minari":
            raise ConfigError(f"out {self.out} is a Minari dataset, but format is {self.out_format}")
        if self.out_format == "minari" and not to_minari:
            raise ConfigError(f"format minari writes a Minari dataset: give out {_MINARI_PREFIX}<id>, "
                              f"not {self.out}")
        kind = parse_policy(self.policy).kind
        if self.vecnormalize is not None and kind != "sb3":
            raise ConfigError(f"--vecnormalize is for --policy sb3:PATH, not {kind}")
        if self.preset:
            if self.episodes is not None:
                raise ConfigError("presets are sized by transitions (D4RL's 1M by default), not "
                                  "episodes")
            return
        if kind == "pendulum-mixed" and self.transitions is not None:
            raise ConfigError("policy pendulum-mixed collects whole episodes: give episodes, not "
                              "transitions")
        if self.env is None:
            raise ConfigError("give env (or preset)")
        if kind in ("pendulum-mixed", "pendulum-swingup") and self.env != "Pendulum-v1":
            raise ConfigError(f"policy {kind} is for Pendulum-v1")
        if kind != "pendulum-mixed" and (self.episodes is None) == (self.transitions is None):
            raise ConfigError("give episodes or transitions" if self.episodes is None else
                              "give episodes or transitions, not both")

    @property
    def policy_spec(self) -> PolicySpec:
        """``policy`` parsed (it was validated when the config was made)."""
        return parse_policy(self.policy)

    @property
    def out_format(self) -> Literal["d4rl", "native", "minari"]:
        """``format``, or its default for ``out``: minari for minari:<id>, else d4rl."""
        return self.format or ("minari" if self.out.startswith(_MINARI_PREFIX) else "d4rl")


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

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "eval_episodes", "buffer_size", "threads"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        check_number("learning_starts", self.learning_starts, minimum=0, integer=True)
        check_number("seed", self.seed, minimum=0, maximum=MAX_SEED, integer=True)
