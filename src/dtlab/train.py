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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dtlab import checkpoint, distributed, runtime
from dtlab.checkpoint import PolicyInfo
from dtlab.config import OptimConfig, TrainConfig
from dtlab.data.episodes import EpisodeSet
from dtlab.data.sampling import Batch, SequenceSampler
from dtlab.distributed import World
from dtlab.envs import env_info
from dtlab.errors import CheckpointError, DtlabWarning, TrainingError
from dtlab.metrics import MetricsLog, Progress, evaluation_record, training_record
from dtlab.model import DecisionTransformer, build_model
from dtlab.normalizer import Normalizer
from dtlab.policy import DTPolicy
# Preparing a run (everything checked before output is written) lives in dtlab.prepare.
from dtlab.prepare import (TRAIN_CONFIG_FILE, RunFiles, check_resume_config, one_writer,
                           prepare, resume_point)
from dtlab.rollout import Evaluator
from dtlab.spaces import ImageObservations, VectorObservations

__all__ = ["train", "train_step", "TrainConfig", "TrainResult", "Trainer", "TrainerState",
           "prepare", "resume_point", "check_resume_config", "action_loss", "param_groups"]


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
    """Weight decay on matmul weights (Linear, and the image encoder's Conv2d) only, which
    includes the state, return and continuous-action embeddings (Linear maps); never on biases,
    LayerNorms or Embedding tables (timesteps, discrete actions). The minGPT/nanoGPT convention,
    used by the DT's Atari code, whose whitelist is Linear and Conv2d
    (atari/mingpt/model_atari.py configure_optimizers); its gym code decayed all parameters."""
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


# ---- one step -------------------------------------------------------------------------------------
def train_step(model: DecisionTransformer, optimizer: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], *, grad_clip: float,
               precision: runtime.Precision = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """One gradient step on ``batch`` (``to_tensors`` of a sampled Batch): forward (under the
    precision's autocast), masked action loss in fp32, backward, global-norm clipping
    (``grad_clip`` 0: none), and the optimizer step, which is skipped when the gradient norm is
    non-finite (by a fused optimizer inside its kernel, the gradients staying until the next
    step's ``zero_grad``; otherwise by not calling it, the gradients cleared). The scheduler is
    the caller's.

    Returns (loss, grad_norm), both detached 0-d tensors on the model's device; the step was
    applied iff ``grad_norm`` is finite. With a fused optimizer (dtlab's, on the CPU and CUDA) a
    non-finite step is skipped inside the kernel (the ``found_inf`` protocol that
    ``torch.amp.GradScaler`` uses with fused optimizers), so the step never waits for the device;
    otherwise deciding it is the step's one host sync.

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
    if all(group.get("fused") for group in optimizer.param_groups):
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
        # The saved groups carry the saving run's implementation choice (fused or not: older
        # runs and other devices differ); the state is the same either way, so this run's wins.
        for group in optimizer.param_groups:
            for key in ("fused", "foreach"):
                group[key] = optimizer.defaults.get(key)
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
    # optim.ema_decay > 0: the weights' exponential moving average, evaluated and saved as the
    # checkpoint's model; ``model`` (the raw weights) is what is trained and resumed.
    ema: AveragedModel | None = None
    applied_lr: float = float("nan")  # the learning rate of the last step taken

    @property
    def policy_model(self) -> DecisionTransformer:
        """The weights that are evaluated and saved: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model

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
        # A deep copy: draws no random numbers, so the raw weights train exactly as without it.
        ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay))
               if cfg.optim.ema_decay else None)
        return cls(model, optimizer, scheduler, sampler, state, device, world, ddp,
                   device_sampler, cfg.optim.seed, ema)

    def resume(self, path: Path) -> None:
        """Continue from checkpoint ``path``: weights, optimizer, schedule, RNG streams, step."""
        weights, _ = checkpoint.load(path, self.device)
        saved = checkpoint.load_trainer_state(path)
        try:
            if self.ema is not None:  # the checkpoint's model is the average
                self.ema.module.load_state_dict(weights.state_dict())
                self.ema.n_averaged.fill_(int(saved["ema_n_averaged"]))
                self.model.load_state_dict(saved["raw_weights"])
            else:
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
        self.applied_lr = self.optimizer.param_groups[0]["lr"]  # before the schedule advances
        loss, grad_norm = train_step(self.ddp or self.model, self.optimizer, batch,
                                     grad_clip=optim.grad_clip, precision=optim.precision)
        if self.ema is not None:  # a skipped step left the weights as they were: averaged again
            self.ema.update_parameters(self.model)
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
        state = self.state.to_dict(self.optimizer, self.scheduler, self.device, ranks)
        if self.ema is not None:
            state["raw_weights"] = {k: v.detach().to("cpu") for k, v in
                                    self.model.state_dict().items()}
            state["ema_n_averaged"] = int(self.ema.n_averaged)
        path = checkpoint.save(out, f"step_{at:08d}", self.policy_model,
                               dataclasses.replace(info, step=at), state, keep=keep)
        distributed.barrier(self.world)  # the checkpoint exists when any rank goes on
        return path


def _device_side(device: torch.device) -> bool:
    """Whether training keeps its per-step work on ``device`` without host syncs: windows gathered
    there (DeviceSampler), the loss and skip counts read at log points only. True for CUDA; the
    CPU path syncs every step at no cost."""
    return device.type == "cuda"


def make_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, with PyTorch's fused kernel on the CPU and CUDA (one kernel
    over all parameters that also skips a non-finite step itself, see ``train_step``): on the CPU
    3-5x faster than the per-parameter loop, which was 7% of the quickstart model's step
    (docs/benchmarks.md). Other devices get the default implementation."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                             betas=optim.betas, fused=device.type in ("cpu", "cuda") or None)


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
    Raises DtlabError subclasses for bad input, a non-finite step (unless ``skip_nonfinite``), a
    run in which most steps were skipped, or a run directory that another process is training in
    (dtlab.prepare.one_writer); a run that fails before its first checkpoint leaves nothing it
    created behind.

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
    with one_writer(out, main=world.is_main):  # what the directory holds is read under the lock
        start_from = resume_point(out, cfg)
        trainer = Trainer.create(cfg, episodes, info, device, world)
        if start_from is not None:
            trainer.resume(start_from)
        if evaluator is None and cfg.evaluation.eval_episodes:
            evaluator = default_evaluator(cfg)
        if should_stop():  # stopped while loading (e.g. Ctrl-C during a download): nothing written
            raise KeyboardInterrupt
        distributed.barrier(world)  # every rank has read the run directory before rank 0 writes
        created = RunFiles(out, main=world.is_main)
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
                lr = trainer.applied_lr
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
    policy = DTPolicy(trainer.policy_model, dataclasses.replace(info, step=step), trainer.device,
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
