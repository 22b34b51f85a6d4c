"""One gradient step and the state around it: the optimizer and its schedule, batches on the
device, ``train_step`` (over the losses of dtlab.losses), the ``Trainer`` that holds model,
optimizer, sampler, weight average and random streams and saves and resumes them (the loops
add each step's loss to a ``dtlab.losses.Tally``).

``train_step`` is one gradient step (the benchmarks time exactly this function); the loop around
it, ``dtlab.train.train``, logs, evaluates and checkpoints. Under ``torchrun``
(dtlab.distributed) every process steps on its own windows with the model wrapped in
DistributedDataParallel.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dtlab import checkpoint, distributed, runtime
from dtlab.checkpoint import PolicyInfo
from dtlab.config import OptimConfig, TrainConfig
from dtlab.data.episodes import EpisodeSet
from dtlab.data.sampling import Batch, SequenceSampler
from dtlab.distributed import World
from dtlab.errors import CheckpointError, ConfigError, DtlabWarning
from dtlab.baselines import build_model
from dtlab.losses import EntropyTemperature, action_loss, stochastic_action_loss
from dtlab.model import DecisionTransformer, StochasticActionHead
from dtlab.normalizer import Normalizer
from dtlab.spaces import VectorObservations



# ---- pieces ---------------------------------------------------------------------------------------
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
def unit_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` kept at scale 1 (``train_step`` resets it after each step):
    multiplying by 1 changes no number; it is here for its non-finite check, which skips the
    optimizer step when a gradient is NaN/inf (inside a fused optimizer's kernel, without a host
    sync)."""
    return torch.amp.GradScaler(device.type, init_scale=1.0)


def train_step(model: DecisionTransformer, optimizer: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], *, grad_clip: float,
               precision: runtime.Precision = "fp32",
               scaler: torch.amp.GradScaler | None = None,
               temperature: EntropyTemperature | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One gradient step on ``batch`` (``to_tensors`` of a sampled Batch): forward (under the
    precision's autocast), masked action loss in fp32, backward, global-norm clipping
    (``grad_clip`` 0: none), and the optimizer step, skipped when any gradient is non-finite
    (``scaler``, a ``unit_scaler``, decides it; with dtlab's fused optimizers inside the kernel,
    so the step never waits for the device). The scheduler is the caller's.

    Returns (loss, grad_norm), both detached 0-d tensors on the model's device; the step was
    applied iff ``grad_norm`` is finite.

    A model with a ``StochasticActionHead`` (``model.policy`` stochastic) needs ``temperature``:
    its loss is ``stochastic_action_loss`` at the temperature's lambda, and after the weights'
    step the temperature takes its own (on the batch's mean entropy, averaged over the processes
    under torchrun). The deterministic path is unchanged.

    ``model`` may be a ``DistributedDataParallel`` wrapper (torchrun): its gradient is then the
    one a single process would compute on all processes' windows together (see below); the
    returned loss is this process's.
    """
    device = batch["observations"].device
    scaler = scaler if scaler is not None else unit_scaler(device)
    with runtime.autocast(device, precision):
        pred = model(batch["observations"], batch["actions"], batch["returns_to_go"],
                     batch["timesteps"], batch["masks"])
    head = (model.module if isinstance(model, DistributedDataParallel) else model).predict_action
    entropy = None
    if isinstance(head, StochasticActionHead):
        if temperature is None:
            raise ConfigError("a stochastic policy head trains with an EntropyTemperature "
                              "(train_step's temperature argument)")
        loss, entropy = stochastic_action_loss(head, pred.float(), batch["actions"],
                                               batch["masks"], temperature.alpha)
    else:
        loss = action_loss(pred.float(), batch["actions"], batch["masks"])
    objective = _ddp_objective(model, loss, batch["masks"])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(objective).backward()
    scaler.unscale_(optimizer)  # records whether any gradient is non-finite
    # The global gradient norm is non-finite iff the loss or any gradient is; with clipping off it
    # is computed without clipping (max_norm=inf).
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)  # skipped when a gradient was non-finite
    if entropy is not None:  # the same temperature on every process: the ranks' mean entropy
        temperature.step(_mean_over_ranks(model, entropy.detach()), scaler)
    scaler.update(1.0)  # back to scale 1 (a skipped step would otherwise halve it)
    return loss.detach(), grad_norm.detach()


def _ddp_objective(model, loss: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """What a process backpropagates: ``loss`` itself, or under DistributedDataParallel the loss
    weighted so that DDP's average of the W processes' gradients is the gradient of the mean
    over every real position of all windows, as on the concatenated batch: W x (this process's
    real positions) / (all processes' real positions) (windows near an episode start are padded,
    so the processes' counts differ)."""
    if not isinstance(model, DistributedDataParallel):
        return loss
    real = masks.sum().to(loss.dtype)
    total = real.detach().clone()
    dist.all_reduce(total)  # asynchronous to the host on CUDA
    return loss * (real * dist.get_world_size(model.process_group) / total)


def _mean_over_ranks(model, value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the DistributedDataParallel processes (itself for one process)."""
    if not isinstance(model, DistributedDataParallel):
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size(model.process_group)


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
    precision: runtime.Precision = "fp32"  # resolved (never "auto")
    applied_lr: float = float("nan")  # the learning rate of the last step taken
    scaler: torch.amp.GradScaler | None = None  # train_step's non-finite check (unit_scaler)
    temperature: EntropyTemperature | None = None  # model.policy stochastic: the ODT's lambda

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
        temperature = (EntropyTemperature(info.action_space, device)
                       if cfg.model.policy == "stochastic" else None)
        return cls(model, optimizer, scheduler, sampler, state, device, world, ddp,
                   device_sampler, cfg.optim.seed, ema, cfg.optim.precision,
                   scaler=unit_scaler(device), temperature=temperature)

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
            if self.temperature is not None:
                self.temperature.load_state_dict(saved["temperature"])
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot resume from this checkpoint (it does not match "
                                  f"the run's model or optimizer): {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def use_episodes(self, episodes: EpisodeSet) -> None:
        """Draw the next windows from ``episodes`` (same spaces, the run's normalizer): online
        finetuning's replay, rebuilt after each rollout. The sampling stream continues."""
        self.sampler = SequenceSampler(episodes, self.sampler.context_len, self.sampler.normalizer)
        if self.device_sampler is not None:
            self.device_sampler = DeviceSampler(self.sampler, self.device)

    def step(self, optim: OptimConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a batch, take one ``train_step``, advance the schedule; (loss, grad_norm) as
        ``train_step`` returns them (the step was applied iff grad_norm is finite)."""
        if self.device_sampler is not None:
            batch = self.device_sampler.sample(optim.batch_size, self.state.rng)
        else:
            batch = to_tensors(self.sampler.sample(optim.batch_size, self.state.rng), self.device,
                               self.sampler.normalizer)
        self.applied_lr = self.optimizer.param_groups[0]["lr"]  # before the schedule advances
        loss, grad_norm = train_step(self.ddp or self.model, self.optimizer, batch,
                                     grad_clip=optim.grad_clip, precision=self.precision,
                                     scaler=self.scaler, temperature=self.temperature)
        if self.ema is not None:  # a skipped step left the weights as they were: averaged again
            self.ema.update_parameters(self.model)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                    category=UserWarning)
            self.scheduler.step()
        self.state.step += 1
        return loss, grad_norm

    def save(self, out: Path, info: PolicyInfo, keep: int,
             extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path | None:
        """Write a checkpoint (rank 0; every rank must call it: its random streams are gathered
        there), with ``extra`` safetensors files in it (``checkpoint.save``). Returns its
        directory, None on the other ranks."""
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
        if self.temperature is not None:
            state["temperature"] = self.temperature.state_dict()
        path = checkpoint.save(out, f"step_{at:08d}", self.policy_model,
                               dataclasses.replace(info, step=at), state, keep=keep,
                               extra=extra)
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
