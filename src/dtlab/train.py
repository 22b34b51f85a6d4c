"""Training: masked action loss (MSE, or cross entropy for discrete actions), AdamW with warm-up,
clipping, checkpoints, resume.

``train_step`` is one gradient step (the benchmarks time exactly this function); ``train`` is the
loop around it: prepare (everything that can fail on bad input, before any output), set up or
resume a ``Trainer``, step, log, evaluate through a callable it is handed, checkpoint.

Under ``torchrun`` (dtlab.distributed) every process runs this loop on its own windows with the
model wrapped in DistributedDataParallel; rank 0 alone logs, evaluates and writes checkpoints
(holding every rank's random streams). On CUDA the windows are gathered on the device and the
loop reads the device only at log, checkpoint and evaluation points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dtlab import checkpoint, distributed, runtime
from dtlab.atomic import dumps_json, write_text_atomic
from dtlab.checkpoint import PolicyInfo
from dtlab.config import OptimConfig, TrainConfig
from dtlab.data.diagnostics import warn_findings
from dtlab.data.episodes import EpisodeSet
from dtlab.data.sampling import Batch, SequenceSampler
from dtlab.distributed import World
from dtlab.envs import actions_outside_bounds, describe_space, env_info, make_env, reference_scores
from dtlab.errors import (CheckpointError, ConfigError, DatasetError, DtlabWarning, EnvError,
                          TrainingError)
from dtlab.metrics import METRICS_FILE, MetricsLog, evaluation_record, training_record
from dtlab.model import DecisionTransformer, build_model
from dtlab.normalizer import Normalizer
from dtlab.policy import DTPolicy
from dtlab.rollout import Evaluator, episode_limit
from dtlab.spaces import (ContinuousActions, DictObservations, ImageObservations,
                          VectorObservations, action_space_from_gym, check_against_env)

TRAIN_CONFIG_FILE = "train_config.json"


# ---- pieces ---------------------------------------------------------------------------------------
def action_loss(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over every real (unpadded) position of every window of the squared error (continuous:
    pred, target (B, K, A)) or the cross entropy (discrete: logits (B, K, n), indices (B, K)).

    masks: (B, K) bool.
    """
    if target.dtype == torch.long:  # discrete
        per_step = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # (B, K)
    else:
        per_step = (pred - target).pow(2).mean(-1)  # (B, K)
    m = masks.to(per_step.dtype)
    return (per_step * m).sum() / m.sum()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matmul weights (Linear, and the image encoder's Conv2d) only; never on
    biases, LayerNorms or embeddings (the minGPT/nanoGPT convention, used by the DT's Atari code,
    whose whitelist is Linear and Conv2d: atari/mingpt/model_atari.py configure_optimizers; its
    gym code decayed all parameters)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            matmul = isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight"
            (decay if matmul else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate multiplier at a step: linear warm-up to the peak, then constant (DT paper)
    or cosine decay to 10% at ``total_steps``. A picklable callable for ``LambdaLR``."""

    warmup_steps: int
    schedule: str  # "constant" or "cosine"
    total_steps: int

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def to_tensors(batch: Batch, device: torch.device,
               normalizer: Normalizer | None = None) -> dict[str, torch.Tensor]:
    """The batch on ``device``. uint8 frame stacks travel as uint8 and are scaled there by
    ``normalizer`` (required for them), to float32 in [0, 1]."""
    obs = torch.from_numpy(batch.observations).to(device, non_blocking=True)
    if obs.dtype == torch.uint8:  # (B, K, stack, H, W) -> float32, converted on the device
        obs = normalizer.converted(lambda a: torch.tensor(a, device=device)
                                   ).normalize_observations_(obs.to(torch.float32))
    return {
        "observations": obs,
        "actions": torch.from_numpy(batch.actions).to(device, non_blocking=True),
        "returns_to_go": torch.from_numpy(batch.returns_to_go).to(device, non_blocking=True),
        "timesteps": torch.from_numpy(batch.timesteps).to(device, non_blocking=True),
        "masks": torch.from_numpy(batch.masks).to(device, non_blocking=True),
    }


class DeviceSampler:
    """``SequenceSampler``'s windows gathered by torch indexing of the sampler's arrays, copied
    once to ``device`` (for CUDA: no per-step host gather or copy of windows, only the B window
    ends drawn on the host). It draws the window ends from the same numpy stream with the same
    call, so its batches equal ``to_tensors(sampler.sample(...))`` exactly."""

    def __init__(self, sampler: SequenceSampler, device: torch.device) -> None:
        obs, act, rtg, start_of = sampler.flat_arrays()
        self.sampler, self.device = sampler, device
        # Copies (torch.tensor): the sampler's arrays may be read-only views of the episodes.
        self._obs = torch.tensor(obs, device=device)  # (N, obs_dim) normalized
        self._act = torch.tensor(act, device=device)  # (N, act_dim) model space, or (N,) indices
        self._rtg = torch.tensor(rtg, device=device)  # (N,) scaled
        self._start_of = torch.tensor(start_of, device=device)  # (N,) episode start
        k = sampler.context_len
        self._offsets = torch.arange(-k + 1, 1, device=device)  # (K,)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A batch as ``to_tensors`` gives it, on the device. (B, K, ...) tensors."""
        ends = torch.from_numpy(self.sampler.window_ends(batch_size, rng))  # (B,) int64
        if self.device.type == "cuda":  # pinned: an asynchronous copy, no host wait
            ends = ends.pin_memory()
        ends = ends.to(self.device, non_blocking=True)
        starts = self._start_of[ends]  # (B,)
        idx = ends[:, None] + self._offsets  # (B, K) flat indices, may reach before start
        masks = idx >= starts[:, None]  # (B, K)
        idx = torch.where(masks, idx, ends[:, None])  # any valid index; zeroed below
        pad = ~masks
        obs = self._obs[idx].masked_fill_(pad[..., None], 0.0)  # (B, K, obs_dim)
        act = self._act[idx]  # (B, K, act_dim), or (B, K) indices
        act = act.masked_fill_(pad[..., None] if act.dim() == 3 else pad, 0)
        rtg = self._rtg[idx].masked_fill_(pad, 0.0)  # (B, K)
        timesteps = torch.where(masks, idx - starts[:, None], 0)  # (B, K)
        return {"observations": obs, "actions": act, "returns_to_go": rtg[..., None],
                "timesteps": timesteps, "masks": masks}


def select_observations(episodes: EpisodeSet, obs_keys: tuple[str, ...]) -> EpisodeSet:
    """Dict observations: the ``obs_keys`` columns, in that order (``select_observation_keys``).
    ConfigError naming the dataset when a Dict dataset comes without ``obs_keys`` (listing its
    keys), when a key is not there, or when ``obs_keys`` is given for other observations."""
    spec = episodes.observation_space
    if isinstance(spec, DictObservations) and not obs_keys:
        raise ConfigError(f"obs_keys: {episodes.source} has Dict observations; choose the keys "
                          f"to train on with obs_keys (available keys: {', '.join(spec.keys)})")
    return episodes.select_observation_keys(obs_keys) if obs_keys else episodes


def check_action_bounds(episodes: EpisodeSet, env, *, strict: bool) -> None:
    """Warn (or, strict, fail) when dataset actions lie outside the env's action bounds. (Action
    indices outside the space are caught by check_against_env: they cannot be clipped.)"""
    if not isinstance(episodes.action_space, ContinuousActions):
        return
    outside = actions_outside_bounds(episodes.actions, env.action_space)  # (N,)
    if outside.any():
        first = int(np.argmax(outside))
        msg = (f"{episodes.source}: {int(outside.sum())} of {episodes.num_transitions} actions lie "
               f"outside the action bounds of {env.spec.id if env.spec else 'the env'} (first at "
               f"transition {first}: {episodes.actions[first].tolist()})")
        if strict:
            raise DatasetError(msg)
        warnings.warn(msg + "; they are clipped for training", DtlabWarning, stacklevel=3)


def _return_scale(cfg: TrainConfig) -> float:
    """The configured return scale, else the env registry's (1000 for MuJoCo locomotion)."""
    scale = cfg.data.return_scale
    return float(scale if scale is not None else env_info(cfg.data.env).return_scale)


def policy_info_for(cfg: TrainConfig, episodes: EpisodeSet, env) -> PolicyInfo:
    """Everything derived from data and env that the checkpoint must carry."""
    # The env's action space: its bounds for continuous actions, all of its n actions for indices.
    actions = action_space_from_gym(env.action_space)
    if isinstance(actions, ContinuousActions) and actions.low is None:
        raise EnvError(f"{cfg.data.env}: action space {describe_space(env.action_space)} is "
                       "unbounded; dtlab's tanh action head needs finite bounds")
    meta = episodes.metadata
    recorded = episodes.provenance
    ref_min, ref_max = reference_scores(cfg.data.env, recorded.ref_min_score, recorded.ref_max_score)
    return_scale = _return_scale(cfg)
    return PolicyInfo(
        model=cfg.model, observation_space=episodes.observation_space, action_space=actions,
        normalizer=Normalizer.from_episodes(episodes, return_scale, actions),
        env_id=cfg.data.env, ref_min_score=ref_min, ref_max_score=ref_max,
        dataset={"path": str(episodes.source), **episodes.summary(),
                 "metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}},
    )


# ---- preparing a run ------------------------------------------------------------------------------
def prepare(cfg: TrainConfig, episodes: EpisodeSet | None = None) -> tuple[EpisodeSet, PolicyInfo]:
    """Load and check everything that can fail on bad input, before any output is written."""
    if cfg.evaluation.eval_episodes and not (cfg.evaluation.eval_targets
                                             or env_info(cfg.data.env).targets):
        raise ConfigError(f"evaluation.eval_episodes given but no eval_targets, and dtlab knows no "
                          f"default targets for {cfg.data.env}")
    if episodes is None:
        from dtlab.data.formats import load_episodes  # (imports h5py and minari)

        episodes = load_episodes(cfg.data.dataset)
    episodes = select_observations(episodes, cfg.data.obs_keys)
    return_scale = _return_scale(cfg)
    # Valid-but-suspicious data, one warning line each; constant observation dimensions are
    # warned where the Normalizer is built (policy_info_for), which says how it treats them.
    warn_findings(episodes, env_id=cfg.data.env, return_scale=return_scale,
                  skip=("constant_observations",))
    longest = int(episodes.episode_lengths.max())
    if longest > cfg.model.max_ep_len:
        if cfg.data.truncate_long_episodes:
            episodes = episodes.truncate_episodes(cfg.model.max_ep_len)
        else:
            ep = int(np.argmax(episodes.episode_lengths))
            raise DatasetError(f"{episodes.source}: episode {ep} has {longest} steps, more than "
                               f"model.max_ep_len={cfg.model.max_ep_len}; raise model.max_ep_len "
                               "or set truncate_long_episodes")
    env = make_env(cfg.data.env)
    check_against_env(env, episodes.observation_space, episodes.action_space,
                      what=f"dataset {episodes.source}", exact_n=False)
    check_action_bounds(episodes, env, strict=cfg.data.strict)
    if cfg.optim.warmup_steps >= cfg.run.steps:
        warnings.warn(f"warmup_steps ({cfg.optim.warmup_steps}) >= steps ({cfg.run.steps}): the "
                      f"learning rate never reaches lr ({cfg.optim.lr:g}); it ends at "
                      f"{cfg.optim.lr * cfg.run.steps / max(cfg.optim.warmup_steps, 1):.3g}",
                      DtlabWarning, stacklevel=3)
    if cfg.evaluation.eval_episodes:  # refuse now what the first evaluation would refuse
        episode_limit(env, cfg.data.env, None, cfg.model.max_ep_len)
    info = policy_info_for(cfg, episodes, env)
    env.close()
    if cfg.data.top_fraction is not None:  # Percentile BC; normalization from all data (DT code)
        episodes = episodes.top_fraction(cfg.data.top_fraction)
        info = dataclasses.replace(info, dataset={**info.dataset, "top_fraction": {
            "fraction": cfg.data.top_fraction, "episodes": episodes.num_episodes,
            "transitions": episodes.num_transitions,
            "min_episode_return": float(episodes.episode_returns.min())}})
    return episodes, info


def check_resume_config(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with settings that change the sequence of updates
    (``TrainConfig.resume_groups``: data, model, optim, and steps for a cosine schedule)."""
    path = out / TRAIN_CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the run's configuration to resume: {exc}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: cannot read the run's configuration to resume: not an object")
    differ = []
    groups = cfg.resume_groups()
    saved_optim = saved.get("optim") if isinstance(saved.get("optim"), dict) else saved
    if groups["optim"].precision == "auto" and saved_optim.get("precision") in ("fp32", "bf16"):
        # auto resumes at the precision the run resolved it to (train() does the same).
        groups["optim"] = dataclasses.replace(groups["optim"], precision=saved_optim["precision"])
    for group, value in _jsonable({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                   for k, v in groups.items()}).items():
        if isinstance(value, dict):
            old = saved.get(group)
            old = old if isinstance(old, dict) else saved  # runs before issue 9 saved flat keys
            # A field added since the run was saved (e.g. model.architecture) had its default.
            defaults = _jsonable({f.name: f.default for f in dataclasses.fields(groups[group])
                                  if f.default is not dataclasses.MISSING})
            differ += [(f"{group}.{k}", old.get(k), v) for k, v in value.items()
                       if old.get(k, defaults.get(k)) != v
                       and f"{group}.{k}" not in TrainConfig.RESUME_MAY_CHANGE]
        else:
            old = saved.get("run", {}).get(group) if isinstance(saved.get("run"), dict) \
                else saved.get(group)
            if old != value:
                differ.append((group, old, value))
    if differ:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ)
        raise ConfigError(f"{path}: resume with different settings than the run ({shown}); "
                          "resume with the same settings, or start a new run")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as saved


def resume_point(out: Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint a run continues from, or None to start at step 0.

    Without ``resume`` the run directory must not hold a checkpoint. With it: a directory with a
    checkpoint resumes from it; one with this run's settings but no checkpoint yet (a job killed
    before its first save) starts from step 0 with a one-line note; anything else is an error.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file; out must be a run directory")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{out}: {parent} is a file; out must be a run directory")
    has_checkpoint = (out / checkpoint.LATEST_FILE).is_file()
    if not cfg.run.resume:
        if (out / checkpoint.LATEST_FILE).exists():
            raise ConfigError(f"{out}: run directory already holds a run; set resume to continue it, or "
                              "choose another out")
        return None
    if has_checkpoint:
        check_resume_config(out, cfg)
        return checkpoint.resolve(out)
    if (out / TRAIN_CONFIG_FILE).is_file():
        check_resume_config(out, cfg)
        warnings.warn(f"{out}: resume found the run's settings but no checkpoint yet; starting "
                      "from step 0", DtlabWarning, stacklevel=3)
        return None
    raise ConfigError(f"{out}: resume is set but the run directory has no checkpoint")


# ---- one step -------------------------------------------------------------------------------------
def train_step(model: DecisionTransformer, optimizer: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], *, grad_clip: float,
               precision: runtime.Precision = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """One gradient step on ``batch`` (``to_tensors`` of a sampled Batch): forward (under the
    precision's autocast), masked action loss in fp32, backward, global-norm clipping
    (``grad_clip`` 0: none), and the optimizer step, which is skipped when the gradient norm is
    non-finite (the gradients are then cleared). The scheduler is the caller's.

    Returns (loss, grad_norm), both detached 0-d tensors on the model's device; the step was
    applied iff ``grad_norm`` is finite. With a fused optimizer (dtlab's on CUDA) a non-finite
    step is skipped on the device (the ``found_inf`` protocol that ``torch.amp.GradScaler`` uses
    with fused optimizers), so the step never waits for the device; otherwise deciding it is the
    step's one host sync.

    ``model`` may be a ``DistributedDataParallel`` wrapper (torchrun): its gradient is then the
    one a single process would compute on all processes' windows together (see below); the
    returned loss is this process's.
    """
    device = batch["observations"].device
    with runtime.autocast(device, precision):
        pred = model(batch["observations"], batch["actions"], batch["returns_to_go"],
                     batch["timesteps"], batch["masks"])
    loss = action_loss(pred.float(), batch["actions"], batch["masks"])
    objective = loss
    if isinstance(model, DistributedDataParallel):
        # DDP averages the W processes' gradients. Weighting each process's mean by W x (its real
        # positions) / (all processes' real positions) makes that average the gradient of the
        # mean over every real position of all windows, as on the concatenated batch (windows
        # near an episode start are padded, so the processes' counts differ).
        real = batch["masks"].sum().to(loss.dtype)
        total = real.detach().clone()
        dist.all_reduce(total)  # asynchronous to the host on CUDA
        objective = loss * (real * dist.get_world_size(model.process_group) / total)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    # The global gradient norm is non-finite iff the loss or any gradient is; with clipping off it
    # is computed without clipping (max_norm=inf).
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               grad_clip if grad_clip > 0 else float("inf"))
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~torch.isfinite(grad_norm)).float()  # 1: the kernel skips the step
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif bool(torch.isfinite(grad_norm)):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm.detach()


# ---- the trainer ----------------------------------------------------------------------------------
@dataclass
class TrainerState:
    """Where a run stands: saved with every checkpoint (trainer_state.pt, loaded with
    ``weights_only=True``) so that a resumed run continues bit for bit.

    Under torchrun the file also holds ``world_size`` and ``ranks``: every rank's random streams
    (``random_streams``), rank r's at index r; the top-level streams are rank 0's.
    """

    step: int
    skipped_nonfinite: int
    rng: np.random.Generator  # window sampling

    def random_streams(self, device: torch.device) -> dict[str, Any]:
        """This process's random streams: window sampling, torch's (dropout), and CUDA's."""
        streams = {"numpy_rng": checkpoint.numpy_rng_state(self.rng),
                   "torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            streams["cuda_rng"] = torch.cuda.get_rng_state(device)
        return streams

    def to_dict(self, optimizer, scheduler, device: torch.device,
                ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The state to save; ``ranks``: every rank's ``random_streams`` (torchrun)."""
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "numpy_rng": checkpoint.numpy_rng_state(self.rng),
                 "torch_rng": torch.get_rng_state(), "step": self.step,
                 "skipped_nonfinite": self.skipped_nonfinite}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        if ranks is not None:
            state["world_size"] = len(ranks)
            state["ranks"] = ranks
        return state

    @classmethod
    def restore(cls, saved: dict[str, Any], optimizer, scheduler, device: torch.device,
                world: World = World(), seed: int = 0) -> "TrainerState":
        """Optimizer, schedule, step and this rank's random streams from ``saved``. A run saved
        with another number of processes (``world_size``, 1 when absent) continues from its
        weights, optimizer and step, with every rank's streams drawn afresh from (seed, rank,
        step) and a one-line note (on rank 0)."""
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step = int(saved["step"])
        saved_size = int(saved.get("world_size", 1))
        if saved_size == world.size:
            own = saved["ranks"][world.rank] if world.distributed else saved
            torch.set_rng_state(own["torch_rng"])
            if device.type == "cuda" and "cuda_rng" in own:
                torch.cuda.set_rng_state(own["cuda_rng"], device)
            rng = checkpoint.restore_numpy_rng(own["numpy_rng"])
        else:
            if world.is_main:
                warnings.warn(f"resuming a run of {saved_size} process(es) with {world.size}: "
                              f"weights, optimizer and step {step} continue, the sampling and "
                              f"dropout streams restart from (seed {seed}, rank, step {step})",
                              DtlabWarning, stacklevel=3)
            rng = np.random.default_rng(np.random.SeedSequence([seed, world.rank, step]))
            torch.manual_seed(distributed.rank_torch_seed(seed, world, step))
        return cls(step, int(saved.get("skipped_nonfinite", 0)), rng)


@dataclass
class Trainer:
    """The model, its optimizer and schedule, the sampler and the run's state; under torchrun
    also the process's place (``world``) and the model's DistributedDataParallel wrapper."""

    model: DecisionTransformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: SequenceSampler
    state: TrainerState
    device: torch.device
    world: World = World()
    ddp: DistributedDataParallel | None = None  # steps go through it when set
    device_sampler: DeviceSampler | None = None  # CUDA: windows gathered on the device
    seed: int = 0

    @classmethod
    def create(cls, cfg: TrainConfig, episodes: EpisodeSet, info: PolicyInfo,
               device: torch.device, world: World = World()) -> "Trainer":
        """A fresh trainer; ``world`` (torchrun, with its process group started): the model is
        wrapped in DistributedDataParallel (same initial weights on every rank, from the seed),
        and sampling and dropout draw from streams derived from (seed, rank)."""
        torch.manual_seed(cfg.optim.seed)
        model = build_model(cfg.model, info.observation_space, info.action_space).to(device)
        optimizer = make_optimizer(model, cfg.optim, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, LRSchedule(cfg.optim.warmup_steps, cfg.optim.schedule, cfg.run.steps))
        sampler = SequenceSampler(episodes, cfg.model.context_len, info.normalizer)
        state = TrainerState(0, 0, distributed.sampling_rng(cfg.optim.seed, world))
        ddp = None
        if world.distributed:
            torch.manual_seed(distributed.rank_torch_seed(cfg.optim.seed, world))
            ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                          else None)
        # Flat vector observations gather on the device; image frame stacks (issue 12) keep the
        # sampler's by-index stacking on the host and are converted on the device (to_tensors).
        vectors = isinstance(episodes.observation_space, VectorObservations)
        device_sampler = DeviceSampler(sampler, device) if _device_side(device) and vectors else None
        return cls(model, optimizer, scheduler, sampler, state, device, world, ddp,
                   device_sampler, cfg.optim.seed)

    def resume(self, path: Path) -> None:
        """Continue from checkpoint ``path``: weights, optimizer, schedule, RNG streams, step."""
        weights, _ = checkpoint.load(path, self.device)
        saved = checkpoint.load_trainer_state(path)
        try:
            self.model.load_state_dict(weights.state_dict())
            self.state = TrainerState.restore(saved, self.optimizer, self.scheduler, self.device,
                                              self.world, self.seed)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot resume from this checkpoint (it does not match "
                                  f"the run's model or optimizer): {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def step(self, batch_size: int, optim: OptimConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a batch, take one ``train_step``, advance the schedule; (loss, grad_norm) as
        ``train_step`` returns them (the step was applied iff grad_norm is finite)."""
        if self.device_sampler is not None:
            batch = self.device_sampler.sample(batch_size, self.state.rng)
        else:
            batch = to_tensors(self.sampler.sample(batch_size, self.state.rng), self.device,
                               self.sampler.normalizer)
        loss, grad_norm = train_step(self.ddp or self.model, self.optimizer, batch,
                                     grad_clip=optim.grad_clip, precision=optim.precision)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                    category=UserWarning)
            self.scheduler.step()
        self.state.step += 1
        return loss, grad_norm

    def save(self, out: Path, info: PolicyInfo, keep: int) -> Path | None:
        """Write a checkpoint (rank 0; every rank must call it: its random streams are gathered
        there). Returns its directory, None on the other ranks."""
        at = self.state.step
        ranks = None
        if self.world.distributed:
            ranks = distributed.gather_to_main(self.world, self.state.random_streams(self.device))
            if not self.world.is_main:
                distributed.barrier(self.world)
                return None
        path = checkpoint.save(out, f"step_{at:08d}", self.model,
                               dataclasses.replace(info, step=at),
                               self.state.to_dict(self.optimizer, self.scheduler, self.device,
                                                  ranks),
                               keep=keep)
        distributed.barrier(self.world)  # the checkpoint exists when any rank goes on
        return path


def _device_side(device: torch.device) -> bool:
    """Whether training keeps its per-step work on ``device`` without host syncs: windows gathered
    there (DeviceSampler), fused AdamW skipping non-finite steps itself, the loss and skip counts
    read at log points only. True for CUDA; the CPU path syncs every step at no cost."""
    return device.type == "cuda"


def make_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (fused kernels on CUDA)."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                             betas=optim.betas, fused=_device_side(device))


# ---- the loop -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    checkpoint: Path  # the final checkpoint directory
    steps: int
    final_loss: float
    evaluations: list[dict] = field(default_factory=list)
    interrupted: bool = False  # stopped early by ``should_stop`` (the CLI: SIGINT/SIGTERM)
    skipped_nonfinite: int = 0


Evaluate = Callable[[DTPolicy], Any]  # a policy in, a RolloutReport-like result out


def train(cfg: TrainConfig, episodes: EpisodeSet | None = None, *,
          evaluator: Evaluate | None = None,
          should_stop: Callable[[], bool] = lambda: False) -> TrainResult:
    """Train a Decision Transformer as configured; returns where the final checkpoint is.

    ``episodes``: train on these instead of loading ``cfg.data.dataset``. ``evaluator``: called
    with a DTPolicy every ``eval_every`` steps and at the end when ``eval_episodes`` > 0 (default:
    ``dtlab.rollout.Evaluator`` over the configured targets). ``should_stop``: polled every step;
    True ends the run early with a checkpoint (the CLI wires SIGINT/SIGTERM to it).
    Raises DtlabError subclasses for bad input, a non-finite step (unless ``skip_nonfinite``), or
    a run in which most steps were skipped; a run that fails before its first checkpoint leaves
    nothing it created behind.

    Under torchrun (``WORLD_SIZE`` etc. in the environment, dtlab.distributed) this is one of the
    processes of a DistributedDataParallel run: rank 0 logs, evaluates and checkpoints, the others
    return a TrainResult without evaluations; ``should_stop`` is agreed between the ranks every
    ``SYNC_EVERY`` steps. A worker restarted by torchrun (``--max-restarts``) resumes the run from
    its latest checkpoint.
    """
    world = World.current()
    # Rank 0 owns the output: the other ranks' warnings would repeat its own.
    with warnings.catch_warnings() if not world.is_main else contextlib.nullcontext():
        if not world.is_main:
            warnings.simplefilter("ignore", DtlabWarning)
        episodes, info = prepare(cfg, episodes)
        device = runtime.resolve_device(cfg.run.device)
        device = distributed.process_device(world, device)
        if device.type == "cpu":  # the node's cores are shared by its processes
            runtime.set_threads(cfg.run.threads, default=max(1, (os.cpu_count() or 1)
                                                             // world.local_size))
        out = Path(cfg.run.out)
        cfg = _resolved(cfg, device, world, out)
        created_group = distributed.start(world, device)
        try:
            return _train(cfg, episodes, info, device, world, evaluator, should_stop)
        finally:
            distributed.finish(created_group)


def _resolved(cfg: TrainConfig, device: torch.device, world: World, out: Path) -> TrainConfig:
    """``cfg`` with its precision resolved for ``device`` (``auto``: the hardware's choice, or on
    resume the run's own) and, in a worker that torchrun restarted, ``resume`` set when the run
    directory holds this run."""
    run = cfg.run
    if world.restart > 0 and not run.resume and (out / TRAIN_CONFIG_FILE).is_file():
        if world.is_main:
            warnings.warn(f"{out}: torchrun restarted the workers (restart {world.restart}); "
                          "resuming the run from its latest checkpoint", DtlabWarning, stacklevel=3)
        run = dataclasses.replace(run, resume=True)
    choice = cfg.optim.precision
    if choice == "auto" and run.resume:
        saved = _saved_precision(out)
        choice = saved if saved is not None else choice
    precision = runtime.resolve_precision(choice, device)
    return dataclasses.replace(cfg, run=run, optim=dataclasses.replace(cfg.optim,
                                                                       precision=precision))


def _saved_precision(out: Path) -> str | None:
    """The precision a run directory's train_config.json records (fp32 or bf16), else None."""
    try:
        saved = json.loads((out / TRAIN_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    optim = saved.get("optim") if isinstance(saved, dict) else None
    value = optim.get("precision") if isinstance(optim, dict) else None
    return value if value in ("fp32", "bf16") else None


def _train(cfg: TrainConfig, episodes: EpisodeSet, info: PolicyInfo, device: torch.device,
           world: World, evaluator: Evaluate | None, should_stop: Callable[[], bool]
           ) -> TrainResult:
    out = Path(cfg.run.out)
    start_from = resume_point(out, cfg)
    trainer = Trainer.create(cfg, episodes, info, device, world)
    if start_from is not None:
        trainer.resume(start_from)
    if evaluator is None and cfg.evaluation.eval_episodes:
        evaluator = default_evaluator(cfg)
    if should_stop():  # stopped while loading (e.g. Ctrl-C during a download): nothing written
        raise KeyboardInterrupt
    distributed.barrier(world)  # every rank has read the run directory before rank 0 writes
    created = _RunFiles(out, _first_missing(out), main=world.is_main)
    try:
        created.start(cfg, resume_from=trainer.state.step if cfg.run.resume else None)
        result = _loop(cfg, trainer, info, created.metrics, evaluator, should_stop)
    except BaseException:
        created.discard_if_no_checkpoint()
        raise
    created.metrics.close()
    if not result.interrupted:
        _check_enough_steps_applied(trainer, cfg, episodes, info, final=True)
        if world.is_main:
            from dtlab.plots import learning_curve

            learning_curve(created.metrics.path, out / "learning_curve.png")
    distributed.barrier(world)  # the run's files are complete when any rank returns
    return result


# Under torchrun the ranks agree every this many steps whether to stop (a signal reached one of
# them) or to write a time-based checkpoint: one small collective, a host sync on CUDA.
SYNC_EVERY = 10


@dataclass
class _Tally:
    """Loss and applied steps since the last log point. On the CPU the step has already read the
    gradient norm, so each step is settled at once (the loop raises at the bad step); on CUDA the
    sums stay on the device and are read at log, checkpoint and evaluation points only."""

    loss_sum: torch.Tensor  # sum of the applied steps' losses
    applied: torch.Tensor  # number of applied steps (CUDA)
    taken: int = 0  # steps taken since the last read (CUDA)

    @classmethod
    def zeros(cls, device: torch.device) -> "_Tally":
        return cls(torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device))

    def add_on_device(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        finite = torch.isfinite(grad_norm)
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.applied += finite
        self.taken += 1

    def settle(self) -> int:
        """(CUDA) The number of skipped steps since the last settle (reads the device)."""
        skipped = self.taken - int(self.applied)
        self.taken = 0
        return skipped


def _loop(cfg: TrainConfig, trainer: Trainer, info: PolicyInfo, metrics: MetricsLog,
          evaluator: Evaluate | None, should_stop: Callable[[], bool]) -> TrainResult:
    out, state, world = Path(cfg.run.out), trainer.state, trainer.world
    on_device = _device_side(trainer.device)
    evaluations: list[dict] = []
    tally = _Tally.zeros(trainer.device)
    loss_sum = tally.loss_sum
    loss_count, last_loss = 0, float("nan")
    tick, tick_step = time.perf_counter(), state.step
    last_saved, saved_at = (state.step if cfg.run.resume else -1), time.monotonic()
    progress = Progress(cfg.run.steps, state.step, enabled=cfg.run.progress and world.is_main)
    stop = False  # torchrun: agreed between the ranks
    trainer.model.train()

    def settle() -> None:  # device side: read the tally; the CPU path settles every step
        nonlocal loss_count
        if not on_device:
            return
        skipped = tally.settle()
        loss_count = int(tally.applied)
        if skipped and not cfg.optim.skip_nonfinite:
            good = checkpoint.resolve(out) if (out / checkpoint.LATEST_FILE).exists() else None
            raise TrainingError(
                f"non-finite loss or gradient in {skipped} of the steps up to {state.step}; last "
                f"good checkpoint: {good or 'none'}; skip_nonfinite skips such steps"
                + _likely_cause(trainer.sampler.episodes, info))
        state.skipped_nonfinite += skipped

    try:
        while state.step < cfg.run.steps and not (stop if world.distributed else should_stop()):
            loss, grad_norm = trainer.step(cfg.optim.batch_size, cfg.optim)
            if on_device:
                tally.add_on_device(loss, grad_norm)
            elif bool(torch.isfinite(grad_norm)):
                loss_sum += loss
                loss_count += 1
            elif not cfg.optim.skip_nonfinite:
                good = checkpoint.resolve(out) if (out / checkpoint.LATEST_FILE).exists() else None
                raise TrainingError(
                    f"non-finite loss or gradient at step {state.step} (loss {loss.item():g}); "
                    f"last good checkpoint: {good or 'none'}; skip_nonfinite skips such steps"
                    + _likely_cause(trainer.sampler.episodes, info))
            else:
                state.skipped_nonfinite += 1
            step = state.step
            minutes = cfg.run.checkpoint_every_minutes
            agreed_time_due = False
            if world.distributed and (step % SYNC_EVERY == 0 or step == cfg.run.steps):
                # Every rank must stop and save at the same steps: rank clocks and signals differ.
                stop, agreed_time_due = distributed.any_rank(
                    world, [should_stop(), bool(minutes and time.monotonic() - saved_at
                                                >= 60 * minutes)], trainer.device)
            if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                settle()
                last_loss = _mean_loss(world, loss_sum, loss_count)
                now = time.perf_counter()
                rate = (step - tick_step) / max(now - tick, 1e-9)
                lr = trainer.scheduler.get_last_lr()[0]
                metrics.write(training_record(step, last_loss, lr, rate, state.skipped_nonfinite
                                              if cfg.optim.skip_nonfinite else None))
                progress.update(step, last_loss, lr, rate)
                _check_enough_steps_applied(trainer, cfg, trainer.sampler.episodes, info)
                loss_sum.zero_()
                tally.applied.zero_()
                loss_count, tick, tick_step = 0, now, step
            if (evaluator is not None and cfg.evaluation.eval_every
                    and step % cfg.evaluation.eval_every == 0 and step < cfg.run.steps):
                settle()
                if world.is_main:
                    evaluations.append(_evaluate(evaluator, trainer, info, metrics,
                                                 cfg.optim.precision))
                distributed.barrier(world)  # the other ranks wait for rank 0's evaluation
            if (step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps or agreed_time_due
                    or (not world.distributed and minutes
                        and time.monotonic() - saved_at >= 60 * minutes)):
                settle()
                trainer.save(out, info, cfg.run.keep_checkpoints)
                last_saved, saved_at = step, time.monotonic()
    finally:
        progress.close()
    interrupted = state.step < cfg.run.steps
    if last_saved != state.step:
        settle()
        trainer.save(out, info, cfg.run.keep_checkpoints)
    if evaluator is not None and not interrupted:
        if world.is_main:
            evaluations.append(_evaluate(evaluator, trainer, info, metrics, cfg.optim.precision))
        distributed.barrier(world)
    settle()
    if loss_count:
        last_loss = _mean_loss(world, loss_sum, loss_count)
    return TrainResult(checkpoint.resolve(out), state.step, last_loss, evaluations, interrupted,
                       state.skipped_nonfinite)


def _mean_loss(world: World, loss_sum: torch.Tensor, count: int) -> float:
    """Mean loss of the applied steps since the last log point; under torchrun averaged over the
    ranks (a collective: every rank logs at the same steps)."""
    if world.distributed:
        both = distributed.all_sum(world, torch.stack([loss_sum, loss_sum.new_tensor(count)]))
        return float(both[0]) / float(both[1]) if float(both[1]) else float("nan")
    return float(loss_sum) / count if count else float("nan")


def default_evaluator(cfg: TrainConfig) -> Evaluate:
    """Evaluation during training over ``eval_targets`` (default: the env registry's)."""
    targets = tuple(cfg.evaluation.eval_targets) or env_info(cfg.data.env).targets
    return Evaluator(cfg.data.env, targets, cfg.evaluation.eval_episodes, seed=cfg.optim.seed,
                     workers=cfg.evaluation.eval_workers)


def _evaluate(evaluator: Evaluate, trainer: Trainer, info: PolicyInfo, metrics: MetricsLog,
              precision: runtime.Precision) -> dict:
    step = trainer.state.step
    policy = DTPolicy(trainer.model, dataclasses.replace(info, step=step), trainer.device,
                      precision=precision)
    report = evaluator(policy)
    trainer.model.train()
    metrics.write(evaluation_record(step, report.results))
    return {"step": step, "results": [dataclasses.asdict(r) for r in report.results],
            "timing": report.timing()}


def _check_enough_steps_applied(trainer: Trainer, cfg: TrainConfig, episodes: EpisodeSet,
                                info: PolicyInfo, final: bool = False) -> None:
    """A run never reports success when its numbers went bad: with ``skip_nonfinite``, fail once
    more than half of the steps taken so far (at least 10, or all at the end) were skipped."""
    done, skipped = trainer.state.step, trainer.state.skipped_nonfinite
    if skipped and (done >= 10 or final) and skipped > done / 2:
        raise TrainingError(
            f"{skipped} of {done} steps were skipped as non-finite; the run is not usable"
            + _likely_cause(episodes, info))


def _likely_cause(episodes: EpisodeSet, info: PolicyInfo) -> str:
    """A hint from the data for a run whose numbers went bad ('' when nothing stands out)."""
    scale = info.normalizer.return_scale
    scaled = float(np.abs(episodes.returns_to_go).max()) / scale
    if scaled > 1e3:
        return (f"; likely cause: returns-to-go reach {scaled:.3g} times the return scale "
                f"({scale:g}): set return_scale near the largest episode return")
    if isinstance(episodes.observation_space, ImageObservations):
        return ""  # frames are scaled to [0, 1]
    obs = info.normalizer.normalize_observations(episodes.observations)
    if float(np.abs(obs).max()) > 1e4:
        return (f"; likely cause: normalized observations reach {float(np.abs(obs).max()):.3g} "
                "(a near-constant observation dimension?)")
    return ""


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what ``mkdir(parents=True)``
    would create first), or None when ``path`` exists."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


@dataclass
class _RunFiles:
    """What a run writes before its first checkpoint, so that a failure can take it back."""

    out: Path
    created: Path | None  # the outermost directory this run created (None: ``out`` existed)
    metrics: MetricsLog | None = None
    existed: frozenset = frozenset()  # the run files that were there before (a resumed run's)
    main: bool = True  # False: a torchrun rank other than 0, which writes none of these

    def __post_init__(self) -> None:
        self.existed = frozenset(name for name in (TRAIN_CONFIG_FILE, METRICS_FILE, "tb")
                                 if (self.out / name).exists())

    def start(self, cfg: TrainConfig, resume_from: int | None) -> None:
        if not self.main:
            self.metrics = _NoMetrics()
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / TRAIN_CONFIG_FILE, dumps_json(dataclasses.asdict(cfg)))
        self.metrics = MetricsLog(self.out, resume_from=resume_from,
                                  tensorboard=cfg.run.tensorboard)

    def discard_if_no_checkpoint(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if not self.main or (self.out / checkpoint.LATEST_FILE).exists():
            return
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for name in {TRAIN_CONFIG_FILE, METRICS_FILE} - self.existed:
            (self.out / name).unlink(missing_ok=True)
        if "tb" not in self.existed:
            shutil.rmtree(self.out / "tb", ignore_errors=True)


class _NoMetrics:
    """The metrics log of a torchrun rank other than 0: rank 0 writes the run's metrics."""

    path = None

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """A rich progress bar with loss, lr, steps/s and ETA (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                           "{task.fields[rate]:.1f} steps/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start,
                                            loss=float("nan"), lr=0.0, rate=0.0)

    def update(self, step: int, loss: float, lr: float, rate: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, lr=lr, rate=rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
