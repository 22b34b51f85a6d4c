"""Frozen configuration dataclasses. Each field's docstring is its ``--help`` text.

Every config validates itself in ``__post_init__`` and names the offending field (``lr``,
``model.context_len``), never a CLI flag. Values derived from data (observation/action specs,
normalization statistics, reference scores) live in the checkpoint, never here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from dtlab.checks import check_number, flag  # check_number: re-exported, the one check
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
    """Raise ConfigError naming the flag of ``name`` (``dtlab.checks.flag``) unless ``value`` is
    one of ``choices`` (Literal fields are not checked at run time by Python itself)."""
    if value not in choices:
        raise ConfigError(f"{flag(name)} must be one of {', '.join(map(str, choices))}; got {value!r}")


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
    policy: Literal["deterministic", "stochastic"] = "deterministic"
    """The action head: deterministic (the DT's: tanh actions trained by squared error, or logits
    by cross entropy) or stochastic (the Online Decision Transformer's: a tanh-squashed Gaussian,
    or a categorical for discrete actions, trained by negative log-likelihood minus a learned
    temperature times its entropy; needed by dtlab finetune). Evaluation acts with the mean
    action either way."""

    def __post_init__(self) -> None:
        if self.architecture == "mlp-bc" and self.context_len != 1:
            raise ConfigError(f"--model.context-len must be 1 for --model.architecture mlp-bc (it sees "
                              f"one state), got {self.context_len}")
        if self.n_heads >= 1 and self.embed_dim % self.n_heads:
            raise ConfigError(f"--model.embed-dim {self.embed_dim} is not divisible by --model.n-heads "
                              f"{self.n_heads}")
        for name in ("embed_dim", "n_layers", "n_heads", "mlp_ratio", "context_len", "max_ep_len"):
            check_number(f"model.{name}", getattr(self, name), minimum=1, integer=True)
        check_number("model.dropout", self.dropout, minimum=0.0, below=1.0)
        check_choice("model.activation", self.activation, ("relu", "gelu"))
        check_choice("model.policy", self.policy, ("deterministic", "stochastic"))
        if self.embed_dim % self.n_heads:
            raise ConfigError(f"--model.embed-dim {self.embed_dim} is not divisible by --model.n-heads "
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
    """Divide returns-to-go by this; default from the env registry (1000 for MuJoCo locomotion),
    and for an env it has none for, the power of ten at or below the data's largest
    |return-to-go| (said in the run's first line)."""
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
            raise ConfigError(f"--obs-keys must be distinct non-empty names, got {self.obs_keys!r}")
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
            raise ConfigError(f"--betas must be two numbers, got {self.betas!r}")
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
    """Show a progress bar (on a terminal; elsewhere, as with --no-progress, a line at most every
    30 seconds)."""
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

@dataclass(frozen=True)
class TrainConfig:
    """Training run (defaults: the DT paper's gym run), in groups: what to train on (data), the
    network (model), the updates (optim), the run's length, outputs and hardware (run), and
    evaluation during training. A resumed run must keep data, model and optim unchanged.
    --preset cpu (the measured CPU recipe: 15k steps, 1k warm-up, evaluation every 2,500 steps,
    weights averaged at decay 0.999), atari or atari-pong (the DT paper's Atari settings): start
    from these values, which any other flag given overrides (docs/usage.md). --config FILE:
    start from a saved train_config.json (or a run directory's). --resume with --out RUN:
    continue RUN with its own saved settings."""

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
    # data.dataset: where the file is may change (moved, or named from another directory); that
    # its content is the run's is checked by its fingerprint (dtlab.prepare.check_same_data).
    RESUME_MAY_CHANGE = frozenset({"optim.skip_nonfinite", "data.dataset"})

    def resume_groups(self) -> dict:
        """What a resumed run must share with the original to continue bit for bit: the data,
        model and optimization groups (less ``RESUME_MAY_CHANGE``), and the length of a cosine
        schedule."""
        groups = {"data": self.data, "model": self.model, "optim": self.optim}
        if self.optim.schedule == "cosine":
            groups["steps"] = self.run.steps
        return groups


# The DT paper's Atari settings (``dtlab train --preset atari``: its values are the defaults that the
# command line's own flags override). Sources, github.com/kzl/decision-
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
def _atari(context_len: int, batch_size: int, warmup_steps: int) -> "TrainConfig":
    return TrainConfig(
        data=DataConfig(tyro.MISSING, tyro.MISSING),
        model=ModelConfig(n_layers=6, n_heads=8, embed_dim=128, activation="gelu",
                          max_ep_len=27_000, context_len=context_len),
        optim=OptimConfig(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0,
                          schedule="cosine", batch_size=batch_size, warmup_steps=warmup_steps))


# "cpu": the CPU recipe measured in docs/results.md ("A CPU recipe for hopper-medium-replay"):
# the paper's model and optimizer, 15,000 steps with a 1,000-step warm-up instead of 100,000 with
# 10,000, evaluation every 2,500 steps (10 episodes per target) with a checkpoint at each, and
# the weights averaged (EMA decay 0.999, evaluated and saved; docs/results.md "Stable scores
# (issue 22)": chosen on hopper-medium-replay, seeds 0-1, where it cut the swing between
# evaluations 4x and ended each run at its best evaluation).
CPU_PRESET_STEPS = 15_000
CPU_PRESET_EMA_DECAY = 0.999


def _cpu() -> "TrainConfig":
    return TrainConfig(
        data=DataConfig(tyro.MISSING, tyro.MISSING),
        optim=OptimConfig(warmup_steps=1_000, ema_decay=CPU_PRESET_EMA_DECAY),
        run=RunConfig(steps=CPU_PRESET_STEPS, checkpoint_every=2_500),
        evaluation=EvalDuringTraining(eval_every=2_500, eval_episodes=10))


def train_preset(name: str) -> "TrainConfig":
    """The TrainConfig of ``dtlab train --preset NAME`` (its dataset and env still to give):
    ``cpu`` (the measured CPU recipe), ``atari`` or ``atari-pong`` (the DT paper's Atari
    settings). ConfigError naming ``--preset`` for an unknown name."""
    presets = {"cpu": _cpu, "atari": lambda: _atari(30, 128, 3),
               "atari-pong": lambda: _atari(50, 512, 1)}
    if name not in presets:
        raise ConfigError(f"unknown --preset {name!r} ({', '.join(presets)})")
    return presets[name]()


TRAIN_PRESETS = ("cpu", "atari", "atari-pong")
