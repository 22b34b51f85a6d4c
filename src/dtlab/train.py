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
from dtlab.errors import CheckpointError, ConfigError, DtlabWarning, TrainingError
from dtlab.metrics import METRICS_FILE, Evaluation, Progress, training_record
from dtlab.baselines import build_model
from dtlab.model import DecisionTransformer, StochasticActionHead
from dtlab.normalizer import Normalizer
from dtlab.policy import DTPolicy
# Preparing a run (everything checked before output is written) lives in dtlab.prepare.
from dtlab.prepare import prepare
from dtlab.data.records import ReturnStats
from dtlab.rollout import Evaluator, default_targets
from dtlab import rundir
from dtlab.rundir import RunDirectory
from dtlab.spaces import ActionSpec, DiscreteActions, ImageObservations, VectorObservations

__all__ = ["train", "train_step", "TrainConfig", "TrainResult", "Trainer", "TrainerState",
           "prepare", "action_loss", "param_groups", "unit_scaler", "stochastic_action_loss",
           "EntropyTemperature"]


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


def stochastic_action_loss(head: StochasticActionHead, out: torch.Tensor, actions: torch.Tensor,
                           masks: torch.Tensor, alpha: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ODT's policy objective (Zheng et al. 2022, section 3.2, Eq. 5): the mean negative
    log-likelihood of the data's actions minus ``alpha`` times the mean entropy, both over every
    real position of every window (the paper's 1/K sum over a window's steps, averaged over the
    batch). ``out``: the stochastic head's output (B, K, 2A) or logits (B, K, n); ``actions``
    (B, K, A) in [-1, 1] or (B, K) indices; ``masks`` (B, K) bool; ``alpha`` a 0-d tensor, held
    constant here. The entropy's Monte-Carlo noise is drawn from torch's generator on the
    device (``StochasticActionHead.entropy``).

    Returns (objective, mean entropy), 0-d tensors; the entropy still carries its gradient."""
    nll = -head.log_likelihood(out, actions)  # (B, K)
    noise = None if head.logits else torch.randn_like(out[..., :head.width])  # (B, K, A)
    entropy = head.entropy(out, noise)  # (B, K)
    m = masks.to(nll.dtype)
    real = m.sum()
    nll_mean, entropy_mean = (nll * m).sum() / real, (entropy * m).sum() / real
    return nll_mean - alpha * entropy_mean, entropy_mean


# The ODT's temperature (Zheng et al. 2022, section 3.2; the values as recalled from its appendix,
# not yet checked against it, docs/results.md): initial value 0.1,
# optimized in log space by Adam at learning rate 1e-4, betas (0.9, 0.999), toward the target
# entropy -act_dim (SAC's heuristic, Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and
# Applications", section 5). Discrete actions (not in the paper): half the uniform policy's
# entropy, 0.5 log n, dtlab's choice (any fixed target below log n keeps exploring without
# pushing the policy to uniform; SAC-discrete's 0.98 log n does the latter).
INITIAL_TEMPERATURE = 0.1
TEMPERATURE_LR = 1e-4
TEMPERATURE_BETAS = (0.9, 0.999)


def target_entropy(action_space: ActionSpec) -> float:
    """-act_dim for continuous actions; 0.5 log n for ``DiscreteActions(n)`` (see above)."""
    if isinstance(action_space, DiscreteActions):
        return 0.5 * math.log(action_space.n)
    return -float(action_space.dim)


class EntropyTemperature:
    """The ODT's learned entropy temperature lambda (the policy loss weighs the entropy by it), as
    the dual variable of the constraint entropy >= target (Zheng et al. 2022, Eq. 4 and 6):
    log lambda is a (1,) tensor with its own Adam optimizer, stepped on
    lambda x (mean entropy - target) with the entropy held constant, so lambda grows while the
    entropy is below the target and shrinks while above."""

    def __init__(self, action_space: ActionSpec, device: torch.device,
                 initial: float = INITIAL_TEMPERATURE) -> None:
        self.target = target_entropy(action_space)
        self.log_alpha = torch.full((1,), math.log(initial), device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_alpha], lr=TEMPERATURE_LR,
                                          betas=TEMPERATURE_BETAS,
                                          fused=device.type in ("cpu", "cuda") or None)

    @property
    def alpha(self) -> torch.Tensor:
        """lambda, 0-d, without gradient."""
        return self.log_alpha.detach().exp()[0]

    def step(self, entropy: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        """One Adam step of log lambda on ``entropy`` (the batch's mean entropy, 0-d), skipped
        (by ``scaler``, without a host sync) when it is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale((self.log_alpha.exp() * (entropy.detach() - self.target)).sum()).backward()
        scaler.unscale_(self.optimizer)
        scaler.step(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"log_alpha": self.log_alpha.detach().cpu().clone(),
                "optimizer": self.optimizer.state_dict(), "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this device's implementation (as AdamW's)
            group["fused"] = self.optimizer.defaults.get("fused")


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
    scaler.scale(objective).backward()
    scaler.unscale_(optimizer)  # records whether any gradient is non-finite
    # The global gradient norm is non-finite iff the loss or any gradient is; with clipping off it
    # is computed without clipping (max_norm=inf).
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)  # skipped when a gradient was non-finite
    if entropy is not None:
        entropy = entropy.detach()
        if isinstance(model, DistributedDataParallel):  # one lambda on every process
            entropy = entropy.clone()
            dist.all_reduce(entropy)
            entropy /= dist.get_world_size(model.process_group)
        temperature.step(entropy, scaler)
    scaler.update(1.0)  # back to scale 1 (a skipped step would otherwise halve it)
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


# ---- the loop -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    checkpoint: Path  # the final checkpoint directory
    steps: int
    final_loss: float  # mean loss of the last log interval (nan: none this call)
    evaluations: list[Evaluation] = field(default_factory=list)  # those made by this call
    interrupted: bool = False  # stopped early by ``should_stop`` (the CLI: SIGINT/SIGTERM)
    skipped_nonfinite: int = 0
    already_done: bool = False  # --resume of a run already at --steps: nothing was written


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
    (dtlab.rundir.RunDirectory.hold); a run that fails before its first checkpoint leaves nothing it
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
        auto = cfg.optim.precision == "auto"
        cfg = _resolved(cfg, device, world, RunDirectory(cfg.run.out))
        created_group = distributed.start(world, device)
        try:
            return _train(cfg, episodes, info, device, world, evaluator, should_stop, auto)
        finally:
            distributed.finish(created_group)


def _resolved(cfg: TrainConfig, device: torch.device, world: World, run: RunDirectory
              ) -> TrainConfig:
    """``cfg`` with its precision resolved for ``device`` (``auto``: the hardware's choice, or on
    resume the run's own) and, in a worker that torchrun restarted, ``resume`` set when the run
    directory holds this run."""
    run_cfg = cfg.run
    if world.restart > 0 and not run_cfg.resume and run.is_run():
        if world.is_main:
            warnings.warn(f"{run.path}: torchrun restarted the workers (restart {world.restart}); "
                          "resuming the run from its latest checkpoint", DtlabWarning, stacklevel=3)
        run_cfg = dataclasses.replace(run_cfg, resume=True)
    choice = cfg.optim.precision
    if choice == "auto" and run_cfg.resume:
        choice = run.saved_precision() or choice
    precision = runtime.resolve_precision(choice, device)
    return dataclasses.replace(cfg, run=run_cfg, optim=dataclasses.replace(cfg.optim,
                                                                           precision=precision))


def _train(cfg: TrainConfig, episodes: EpisodeSet, info: PolicyInfo, device: torch.device,
           world: World, evaluator: Evaluate | None, should_stop: Callable[[], bool],
           auto_precision: bool = False) -> TrainResult:
    run = RunDirectory(cfg.run.out, main=world.is_main)
    with run.hold():  # what the directory holds is read under the lock
        start_from = run.resume_point(cfg)
        if start_from is not None:
            check_same_data(start_from, info)
        trainer = Trainer.create(cfg, episodes, info, device, world)
        if start_from is not None:
            trainer.resume(start_from)
            if trainer.state.step > cfg.run.steps:
                raise ConfigError(f"{run.path}: the run is at step {trainer.state.step}, past "
                                  f"--steps {cfg.run.steps}; nothing was changed (raise --steps "
                                  "to continue it)")
            if trainer.state.step == cfg.run.steps:
                return _finish_evaluation(cfg, trainer, info, run, start_from, evaluator)
        if world.is_main:
            print(_start_line(cfg, trainer, episodes, auto_precision, start_from), flush=True)
        if evaluator is None and cfg.evaluation.eval_episodes:
            evaluator = default_evaluator(cfg, info)
        if should_stop():  # stopped while loading (e.g. Ctrl-C during a download): nothing written
            raise KeyboardInterrupt
        distributed.barrier(world)  # every rank has read the run directory before rank 0 writes
        try:
            run.start(cfg, resume_from=trainer.state.step if cfg.run.resume else None)
            result = _loop(cfg, trainer, info, run, evaluator, should_stop)
        except BaseException:
            run.discard_if_no_checkpoint()
            raise
        finally:
            if hasattr(evaluator, "close"):  # env worker processes kept across evaluations
                evaluator.close()
        run.close()
        if not result.interrupted:
            _check_enough_steps_applied(trainer, cfg, episodes, info, final=True)
        if world.is_main:  # also when stopped: the curve as far as the run got
            _draw_learning_curve(run, cfg, info)
    distributed.barrier(world)  # the run's files are complete when any rank returns
    return result


def _finish_evaluation(cfg: TrainConfig, trainer: "Trainer", info: PolicyInfo,
                       run: RunDirectory, at: Path, evaluator: Evaluate | None) -> TrainResult:
    """``--resume`` of a run already at ``--steps``: nothing to train. Its final evaluation is
    made if the run was stopped before recording it (killed during it); else nothing is written."""
    step = trainer.state.step
    recorded = any(e.step == step for e in run.evaluations())
    if not cfg.evaluation.eval_episodes or recorded or not trainer.world.is_main:
        return TrainResult(at, step, float("nan"), [], already_done=True)
    evaluator = evaluator or default_evaluator(cfg, info)
    try:
        evaluation = _evaluate(evaluator, trainer, info, run)
    finally:
        if hasattr(evaluator, "close"):
            evaluator.close()
    _draw_learning_curve(run, cfg, info)
    return TrainResult(at, step, float("nan"), [evaluation])


def _start_line(cfg: TrainConfig, trainer: "Trainer", episodes: EpisodeSet, auto: bool,
                resumed: Path | None) -> str:
    """What a run starts with, in one line: the model and its size, the device, threads and the
    precision (and whether auto chose it), the data, the length, and where it resumed from."""
    m = cfg.model
    params = sum(p.numel() for p in trainer.model.parameters())
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n > 1 else ''}" if trainer.device.type == "cpu" else ""
    where = (f"resumed from step {trainer.state.step} ({resumed})" if resumed is not None
             else "from step 0")
    ema = f", weight average {cfg.optim.ema_decay:g}" if cfg.optim.ema_decay else ""
    return (f"train {m.architecture}: {params / 1e6:.2f}M parameters (embed {m.embed_dim}, "
            f"{m.n_layers} layer{'s' if m.n_layers > 1 else ''}, K {m.context_len}) on "
            f"{trainer.device}{threads}, precision "
            f"{trainer.precision}{' (auto)' if auto else ''}; data {Path(str(episodes.source)).name}: "
            f"{episodes.num_episodes} episodes, {episodes.num_transitions} transitions, returns "
            f"{episodes.return_stats.min:.1f} to {episodes.return_stats.max:.1f}; "
            f"{cfg.run.steps} steps{ema}, {where}")


def _draw_learning_curve(run: RunDirectory, cfg: TrainConfig, info: PolicyInfo) -> None:
    from dtlab.metrics import read_metrics
    from dtlab.plots import learning_curve

    discrete = isinstance(info.action_space, DiscreteActions)
    learning_curve(read_metrics(run.path / METRICS_FILE), run.evaluations(),
                   run.path / "learning_curve.png",
                   title=f"{run.path.name}: {cfg.model.architecture} on "
                         f"{Path(str(info.dataset.get('path'))).name}, {cfg.data.env}",
                   loss_name="cross entropy" if discrete else "MSE")


def check_same_data(resume_from: Path, info: PolicyInfo) -> None:
    """A resumed run continues on the data it started on: ConfigError naming what changed when
    the dataset's content fingerprint (or, for checkpoints before fingerprints, its size and
    return statistics) differs from what the checkpoint recorded. Its normalization statistics
    would otherwise be recomputed from other data and written into the next checkpoint."""
    _, saved = checkpoint.load_info(resume_from)
    before, now = saved.dataset, info.dataset
    keys = ("fingerprint",) if before.get("fingerprint") else ("episodes", "transitions",
                                                                "episode_return")
    changed = [k for k in keys if before.get(k) != now.get(k)]
    if changed:
        shown = ", ".join(f"{k} {_short(before.get(k))} -> {_short(now.get(k))}" for k in changed)
        raise ConfigError(f"{now.get('path')}: the dataset is not the one the run in "
                          f"{resume_from.parent} trained on ({shown}); --resume continues only on "
                          "the same data: restore the file, or start a new run with another --out")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


# Under torchrun the ranks agree every this many steps whether to stop (a signal reached one of
# them) or to write a time-based checkpoint: one small collective, a host sync on CUDA.
SYNC_EVERY = 10


class _Tally:
    """Loss and non-finite steps since the last read, kept on the device: the loop adds each
    step without a host sync and reads the tally at log, evaluation and checkpoint points
    (the same on the CPU, on CUDA and under torchrun)."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.loss_sum = torch.zeros((), device=device)  # the applied steps' losses
        self.applied = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 1-based; 0: none
        self.taken, self.since = 0, step

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        finite = torch.isfinite(grad_norm)
        self.taken += 1
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.applied += finite
        self.first_bad = torch.where(~finite & (self.first_bad == 0), self.taken, self.first_bad)

    def read(self, world: World) -> tuple[float, int, int | None]:
        """(mean loss of the applied steps, or nan; steps skipped; the first bad step or None)
        since the last read, then starts afresh. Under torchrun the loss is averaged over the
        ranks (a collective: every rank reads at the same steps)."""
        both = distributed.all_sum(world, torch.stack([self.loss_sum,
                                                       self.applied.to(self.loss_sum.dtype)]))
        loss_sum, count = float(both[0]), float(both[1])
        applied, first = int(self.applied), int(self.first_bad)
        skipped = self.taken - applied
        bad = self.since + first if first else None
        self.loss_sum.zero_()
        self.applied.zero_()
        self.first_bad.zero_()
        self.since += self.taken
        self.taken = 0
        return (loss_sum / count if count else float("nan")), skipped, bad


def _loop(cfg: TrainConfig, trainer: Trainer, info: PolicyInfo, run: RunDirectory,
          evaluator: Evaluate | None, should_stop: Callable[[], bool]) -> TrainResult:
    state, world, steps = trainer.state, trainer.world, cfg.run.steps
    tally = _Tally(trainer.device, state.step)
    evaluations: list[Evaluation] = []
    last_loss, tick, tick_step = float("nan"), time.perf_counter(), state.step
    last_saved, saved_at = (state.step if cfg.run.resume else -1), time.monotonic()
    progress = Progress(steps, state.step, enabled=cfg.run.progress and world.is_main)
    report = _LineReport(enabled=world.is_main and not cfg.run.progress)
    poll_every = SYNC_EVERY if world.distributed else 1  # one process polls every step
    stop = False
    trainer.model.train()

    def settle() -> float:  # read the tally; stop on a non-finite step unless skipping them
        loss, skipped, bad = tally.read(world)
        if skipped and not cfg.optim.skip_nonfinite:
            good = run.latest_checkpoint()
            raise TrainingError(
                f"non-finite loss or gradient at step {bad} ({skipped} of the steps up to "
                f"{state.step}); last good checkpoint: {good or 'none'}; --skip-nonfinite skips "
                "such steps" + _likely_cause(trainer.sampler.episodes, info))
        state.skipped_nonfinite += skipped
        _check_enough_steps_applied(trainer, cfg, trainer.sampler.episodes, info)
        return loss

    try:
        while state.step < steps and not stop:
            loss, grad_norm = trainer.step(cfg.optim)
            tally.add(loss, grad_norm)
            step = state.step
            progress.advance(step)
            minutes = cfg.run.checkpoint_every_minutes
            time_due = False
            if step % poll_every == 0 or step == steps:  # every rank stops and saves together
                stop, time_due = distributed.any_rank(
                    world, [should_stop(), bool(minutes) and time.monotonic() - saved_at
                            >= 60 * minutes], trainer.device)
            if step % cfg.run.log_every == 0 or step == steps:
                last_loss = settle()
                now = time.perf_counter()
                rate = (step - tick_step) / max(now - tick, 1e-9)
                run.metrics.write(training_record(step, last_loss, trainer.applied_lr, rate,
                                                  state.skipped_nonfinite
                                                  if cfg.optim.skip_nonfinite else None))
                progress.update(step, last_loss, trainer.applied_lr, rate)
                report.training(step, steps, last_loss, rate)
                tick, tick_step = now, step
            if (evaluator is not None and cfg.evaluation.eval_every
                    and step % cfg.evaluation.eval_every == 0 and step < steps):
                if world.is_main:
                    evaluations.append(_evaluate(evaluator, trainer, info, run))
                    _draw_learning_curve(run, cfg, info)  # the curve so far, while it runs
                distributed.barrier(world)  # the other ranks wait for rank 0's evaluation
            if step % cfg.run.checkpoint_every == 0 or step == steps or time_due:
                last_loss = settle() if tally.taken else last_loss
                trainer.save(run.path, info, cfg.run.keep_checkpoints)
                last_saved, saved_at = step, time.monotonic()
    finally:
        progress.close()
    interrupted = state.step < steps
    if last_saved != state.step:
        last_loss = settle() if tally.taken else last_loss
        trainer.save(run.path, info, cfg.run.keep_checkpoints)
    if evaluator is not None and not interrupted:
        if world.is_main:
            evaluations.append(_evaluate(evaluator, trainer, info, run))
        distributed.barrier(world)
    return TrainResult(checkpoint.resolve(run.path), state.step, last_loss, evaluations,
                       interrupted, state.skipped_nonfinite)


class _LineReport:
    """Progress as plain lines for logs (``--no-progress``): one line per log point, at most one
    every ``every_s`` seconds, so a batch job's log shows the run moving."""

    def __init__(self, enabled: bool, every_s: float = 30.0) -> None:
        self.enabled, self.every_s, self._last = enabled, every_s, time.monotonic()

    def training(self, step: int, steps: int, loss: float, rate: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.every_s and step != steps):
            return
        self._last = now
        left = (steps - step) / rate if rate > 0 else float("nan")
        eta = f"{left / 60:.0f} min" if math.isfinite(left) else "?"
        print(f"step {step}/{steps}: loss {loss:.5f}, {rate:.1f} steps/s, ETA {eta}", flush=True)


def default_evaluator(cfg: TrainConfig, info: PolicyInfo) -> Evaluate:
    """Evaluation during training over ``--eval-targets``, by default ``default_targets`` (the
    DT paper's for the env, or targets fitted to the data when those lie far beyond it; the
    choice is printed)."""
    targets = tuple(cfg.evaluation.eval_targets)
    if not targets:
        targets, why = default_targets(cfg.data.env,
                                       ReturnStats.from_json(info.dataset.get("episode_return")))
        if not targets:
            raise ConfigError(f"{why}: give --eval-targets")
        if World.current().is_main:
            print(f"evaluation during training at "
                  f"{why.replace('--targets', '--eval-targets')}", flush=True)
    seed = cfg.evaluation.eval_seed if cfg.evaluation.eval_seed is not None else cfg.optim.seed
    return Evaluator(cfg.data.env, targets, cfg.evaluation.eval_episodes, seed=seed,
                     workers=cfg.evaluation.eval_workers)


def _evaluate(evaluator: Evaluate, trainer: Trainer, info: PolicyInfo,
              run: RunDirectory) -> Evaluation:
    """Evaluate the weights a checkpoint of this step would hold (the average when there is
    one); record it in the run directory and print its line."""
    step = trainer.state.step
    policy = DTPolicy(trainer.policy_model, dataclasses.replace(info, step=step), trainer.device,
                      precision=trainer.precision)
    report = evaluator(policy)
    trainer.model.train()
    evaluation = Evaluation(step, tuple(report.results),
                            "average" if trainer.ema is not None else "raw", report.timing())
    best = max((e.mean_score() for e in run.evaluations()), default=-math.inf)
    run.record_evaluation(evaluation)
    print(evaluation.line(), flush=True)
    if evaluation.mean_score() > best:  # kept beside the latest: the best evaluated weights
        checkpoint.save(run.path, rundir.BEST_CHECKPOINT, trainer.policy_model,
                        dataclasses.replace(info, step=step), latest=False)
    return evaluation



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
