"""Training: masked action loss (MSE, or cross entropy for discrete actions), AdamW with warm-up,
clipping, metrics, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtlab import checkpoint
from dtlab.atomic import write_text_atomic
from dtlab.checkpoint import PolicyInfo
from dtlab.config import TrainConfig
from dtlab.data.episodes import EpisodeSet
from dtlab.data.sampling import Batch, SequenceSampler
from dtlab.envs import actions_outside_bounds, describe_space, env_info, make_env
from dtlab.errors import ConfigError, DatasetError, DtlabWarning, EnvError, TrainingError
from dtlab.model import DecisionTransformer
from dtlab.normalizer import Normalizer
from dtlab.spaces import ContinuousActions, action_space_from_gym, check_against_env

METRICS_FILE = "metrics.jsonl"
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
    """Weight decay on matmul weights (Linear) only; never on biases, LayerNorms or embeddings
    (the minGPT/nanoGPT convention, used by the DT's Atari code; its gym code decayed all
    parameters)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to the peak lr, then constant (DT paper) or cosine to 10% at the last step."""
    def f(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device '{name}': {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return device


def set_threads(threads: int | None, default: int) -> int:
    """Pick torch's CPU thread count deliberately: explicit option, else OMP_NUM_THREADS, else
    ``default``. (With more threads than free cores, torch's spinning threads collapse throughput.)"""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        threads = int(env) if env and env.isdigit() and int(env) > 0 else default
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def to_tensors(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "observations": torch.from_numpy(batch.observations).to(device, non_blocking=True),
        "actions": torch.from_numpy(batch.actions).to(device, non_blocking=True),
        "returns_to_go": torch.from_numpy(batch.returns_to_go).to(device, non_blocking=True),
        "timesteps": torch.from_numpy(batch.timesteps).to(device, non_blocking=True),
        "masks": torch.from_numpy(batch.masks).to(device, non_blocking=True),
    }


def load_dataset(path: str) -> EpisodeSet:
    from dtlab.data.formats import load_episodes

    return load_episodes(path)


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


def _reference(registry: float | None, meta: dict, key: str) -> float | None:
    """Reference score for normalization: the env registry's (D4RL's constants) when it has one,
    else one recorded with the dataset (dtlab's presets, Minari's metadata), if numeric."""
    if registry is not None:
        return registry
    for name in (f"dtlab_{key}", f"minari_{key}", key):
        value = meta.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            return float(value)
    return None


def policy_info_for(cfg: TrainConfig, episodes: EpisodeSet, env) -> PolicyInfo:
    """Everything derived from data and env that the checkpoint must carry."""
    info = env_info(cfg.env)
    # The env's action space: its bounds for continuous actions, all of its n actions for indices.
    actions = action_space_from_gym(env.action_space)
    if isinstance(actions, ContinuousActions) and actions.low is None:
        raise EnvError(f"{cfg.env}: action space {describe_space(env.action_space)} is unbounded; "
                       "dtlab's tanh action head needs finite bounds")
    return_scale = float(cfg.return_scale if cfg.return_scale is not None else info.return_scale)
    meta = episodes.metadata
    return PolicyInfo(
        model=cfg.model, observation_space=episodes.observation_space, action_space=actions,
        normalizer=Normalizer.from_episodes(episodes, return_scale, actions),
        env_id=cfg.env, ref_min_score=_reference(info.ref_min_score, meta, "ref_min_score"),
        ref_max_score=_reference(info.ref_max_score, meta, "ref_max_score"),
        dataset={"path": str(episodes.source), **episodes.summary(),
                 "metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}},
    )


# Settings that shape the sequence of updates: a resumed run must use the same ones to continue
# bit for bit (steps matters too for the cosine schedule, whose length it sets).
_RESUME_KEYS = ("dataset", "env", "batch_size", "lr", "weight_decay", "betas", "warmup_steps",
                "schedule", "grad_clip", "return_scale", "seed", "model", "precision",
                "truncate_long_episodes", "skip_nonfinite")


def check_resume_config(out: Path, cfg: TrainConfig) -> None:
    path = out / TRAIN_CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the run's configuration to resume: {exc}") from None
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as saved
    keys = _RESUME_KEYS + (("steps",) if cfg.schedule == "cosine" else ())
    differ = [k for k in keys if saved.get(k) != now.get(k)]
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ConfigError(f"{path}: --resume with different settings than the run ({shown}); "
                          "resume with the same settings, or start a new run")


# ---- the loop -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    checkpoint: Path  # the final checkpoint directory
    steps: int
    final_loss: float
    evaluations: list[dict]
    interrupted: bool = False
    signal: int | None = None  # the signal that interrupted the run (SIGINT, SIGTERM)
    skipped_nonfinite: int = 0


def prepare(cfg: TrainConfig, episodes: EpisodeSet | None = None):
    """Load and check everything that can fail on bad input, before any output is written."""
    for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_every", "eval_episodes", "warmup_steps", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.return_scale is not None and not cfg.return_scale > 0:
        raise ConfigError(f"--return-scale must be > 0, got {cfg.return_scale}")
    if cfg.eval_episodes and not (cfg.eval_targets or env_info(cfg.env).targets):
        raise ConfigError(f"--eval-episodes given but no --eval-targets, and dtlab knows no default "
                          f"targets for {cfg.env}")
    episodes = episodes if episodes is not None else load_dataset(cfg.dataset)
    longest = int(episodes.episode_lengths.max())
    if longest > cfg.model.max_ep_len:
        if cfg.truncate_long_episodes:
            episodes = episodes.truncate_episodes(cfg.model.max_ep_len)
        else:
            ep = int(np.argmax(episodes.episode_lengths))
            raise DatasetError(f"{episodes.source}: episode {ep} has {longest} steps, more than "
                               f"model.max_ep_len={cfg.model.max_ep_len}; raise --model.max-ep-len "
                               "or pass --truncate-long-episodes")
    env = make_env(cfg.env)
    check_against_env(env, episodes.observation_space, episodes.action_space,
                      what=f"dataset {episodes.source}", exact_n=False)
    check_action_bounds(episodes, env, strict=cfg.strict)
    limit = env.spec.max_episode_steps if env.spec else None
    if cfg.eval_episodes and limit and limit > cfg.model.max_ep_len:
        # Evaluation episodes would reach timesteps the model has no embedding for (an error,
        # never clamped): refuse now rather than at the first evaluation.
        raise ConfigError(f"--eval-episodes: {cfg.env} episodes run up to {limit} steps, beyond "
                          f"model.max_ep_len={cfg.model.max_ep_len}; raise --model.max-ep-len to "
                          f"{limit} or evaluate afterwards with dtlab evaluate --max-steps")
    info = policy_info_for(cfg, episodes, env)
    env.close()
    return episodes, info


def train(cfg: TrainConfig, episodes: EpisodeSet | None = None) -> TrainResult:
    """Train a Decision Transformer as configured; returns where the final checkpoint is."""
    episodes, info = prepare(cfg, episodes)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        set_threads(cfg.threads, default=os.cpu_count() or 1)
    out = Path(cfg.out)
    resume_state = None
    if cfg.resume:
        if not (out / checkpoint.LATEST_FILE).is_file():
            raise ConfigError(f"{out}: --resume given but the run directory has no checkpoint")
        resume_path, saved_info = checkpoint.load_info(out)
        check_resume_config(out, cfg)
        resume_state = checkpoint.load_trainer_state(resume_path)
    elif (out / checkpoint.LATEST_FILE).exists():
        raise ConfigError(f"{out}: run directory already holds a run; pass --resume or another --out")

    torch.manual_seed(cfg.seed)
    model = DecisionTransformer(cfg.model, info.observation_space, info.action_space).to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=cfg.betas, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    rng = np.random.default_rng(cfg.seed)
    sampler = SequenceSampler(episodes, cfg.model.context_len, info.normalizer)
    step = 0
    if resume_state is not None:
        model_w, _ = checkpoint.load(out, device)
        model.load_state_dict(model_w.state_dict())
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        rng = checkpoint.restore_numpy_rng(resume_state["numpy_rng"])
        torch.set_rng_state(resume_state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in resume_state:
            torch.cuda.set_rng_state(resume_state["cuda_rng"], device)
        step = int(resume_state["step"])

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / TRAIN_CONFIG_FILE, json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics = MetricsLog(out, resume_from=step if cfg.resume else None, tensorboard=cfg.tensorboard)
    eval_targets = tuple(cfg.eval_targets) or env_info(cfg.env).targets

    def save(at_step: int) -> Path:
        state = {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "numpy_rng": checkpoint.numpy_rng_state(rng), "torch_rng": torch.get_rng_state(),
            "step": at_step, "skipped_nonfinite": skipped,
        }
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        return checkpoint.save(out, f"step_{at_step:08d}", model,
                               dataclasses.replace(info, step=at_step), state, keep=cfg.keep_checkpoints)

    def evaluate_now(at_step: int) -> dict:
        from dtlab.evaluate import rollout
        from dtlab.policy import DTPolicy

        policy = DTPolicy(model, dataclasses.replace(info, step=at_step), device,
                          precision=cfg.precision)
        results, stats = rollout(policy, cfg.env, eval_targets, cfg.eval_episodes, seed=cfg.seed)
        model.train()
        record = {"step": at_step}
        for r in results:
            record[f"eval/return_{r.target:g}"] = r.mean
            if r.normalized_mean is not None:
                record[f"eval/normalized_{r.target:g}"] = r.normalized_mean
        metrics.write(record)
        return {"step": at_step, "results": [dataclasses.asdict(r) for r in results], "timing": stats}

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
        if _main_thread() else {}
    bf16 = cfg.precision == "bf16"
    model.train()
    evaluations: list[dict] = []
    loss_sum = torch.zeros((), device=device)
    loss_count, last_loss = 0, float("nan")
    skipped = int(resume_state.get("skipped_nonfinite", 0)) if resume_state else 0
    tick, tick_step = time.perf_counter(), step
    progress = Progress(cfg.steps, step, enabled=cfg.progress)
    last_saved = step if cfg.resume else -1
    try:
        while step < cfg.steps and stop["signal"] is None:
            batch = to_tensors(sampler.sample(cfg.batch_size, rng), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                pred = model(batch["observations"], batch["actions"], batch["returns_to_go"],
                             batch["timesteps"], batch["masks"])
            loss = action_loss(pred.float(), batch["actions"], batch["masks"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # The global gradient norm is non-finite iff the loss or any gradient is; with
            # clipping off it is computed without clipping (max_norm=inf).
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if not bool(torch.isfinite(grad_norm)):
                if not cfg.skip_nonfinite:
                    good = checkpoint.resolve(out) if (out / checkpoint.LATEST_FILE).exists() else None
                    raise TrainingError(
                        f"non-finite loss or gradient at step {step + 1} (loss {loss.item():g}); "
                        f"last good checkpoint: {good or 'none'}; --skip-nonfinite skips such steps")
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
            else:
                optimizer.step()
                loss_sum += loss.detach()
                loss_count += 1
            scheduler.step()
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                last_loss = float(loss_sum) / loss_count if loss_count else float("nan")
                now = time.perf_counter()
                rate = (step - tick_step) / max(now - tick, 1e-9)
                record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          "steps_per_s": rate}
                if cfg.skip_nonfinite:
                    record["skipped_nonfinite"] = skipped
                metrics.write(record)
                progress.update(step, last_loss, scheduler.get_last_lr()[0], rate)
                loss_sum.zero_()
                loss_count, tick, tick_step = 0, now, step
            if cfg.eval_every and cfg.eval_episodes and step % cfg.eval_every == 0 and step < cfg.steps:
                evaluations.append(evaluate_now(step))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save(step)
                last_saved = step
    finally:
        progress.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    interrupted = stop["signal"] is not None
    if last_saved != step:
        save(step)
    if cfg.eval_episodes and not interrupted:
        evaluations.append(evaluate_now(step))
    metrics.close()
    if not interrupted:
        from dtlab.plots import learning_curve

        learning_curve(out / METRICS_FILE, out / "learning_curve.png")
    if loss_count:
        last_loss = float(loss_sum) / loss_count
    return TrainResult(checkpoint.resolve(out), step, last_loss, evaluations, interrupted,
                       stop["signal"], skipped)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---- logging --------------------------------------------------------------------------------------
def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank or partly written one (a crash mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class MetricsLog:
    """Appends JSON lines to OUT/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path, resume_from: int | None, tensorboard: bool) -> None:
        self.path = out / METRICS_FILE
        if resume_from is not None and self.path.exists():
            # Drop records written after the checkpoint we resume from (they will be redone).
            keep = [line for line in self.path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_from]
            write_text_atomic(self.path, "".join(line + "\n" for line in keep))
        elif resume_from is None:
            self.path.write_text("")
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tb"), purge_step=resume_from)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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
