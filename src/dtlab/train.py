"""Training: the run around the gradient step (dtlab.trainer: losses, ``train_step``,
``Trainer``): prepare (everything that can fail on bad input, before any output), set up or
resume a ``Trainer``, step, log, evaluate through a callable it is handed, checkpoint, resume.

Under ``torchrun`` (dtlab.distributed) every process runs this loop on its own windows with the
model wrapped in DistributedDataParallel; rank 0 alone logs, evaluates and writes checkpoints
(holding every rank's random streams). On CUDA the windows are gathered on the device and the
loop reads the device only at log, checkpoint and evaluation points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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

from dtlab import checkpoint, distributed, runtime
from dtlab.checkpoint import PolicyInfo
from dtlab.config import TrainConfig
from dtlab.data.diagnostics import return_scale_is_fitted
from dtlab.data.episodes import EpisodeSet
from dtlab.distributed import World
from dtlab.errors import ConfigError, DtlabWarning, TrainingError
from dtlab.metrics import METRICS_FILE, Evaluation, Progress, on_terminal, training_record
from dtlab.policy import DTPolicy
# Preparing a run (everything checked before output is written) lives in dtlab.prepare.
from dtlab.prepare import check_same_data, prepare, recorded_absolute
from dtlab.data.records import ReturnStats
from dtlab.rollout import Evaluator, default_targets
from dtlab import rundir
from dtlab.rundir import RunDirectory
from dtlab.spaces import DiscreteActions, ImageObservations
from dtlab.losses import Tally
# The step and its state; re-exported in __all__, the training API's names.
from dtlab.trainer import (EntropyTemperature, Trainer, TrainerState, action_loss,
                           param_groups, stochastic_action_loss, train_step, unit_scaler)

__all__ = ["train", "train_step", "TrainConfig", "TrainResult", "Trainer", "TrainerState",
           "prepare", "action_loss", "param_groups", "unit_scaler", "stochastic_action_loss",
           "EntropyTemperature"]


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
        loaded = episodes is None
        episodes, info = prepare(cfg, episodes)
        if loaded:
            cfg, info = recorded_absolute(cfg, info)
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
        start_from = run.resume_point(cfg, str(episodes.source))
        if start_from is not None:
            info = check_same_data(start_from, info)
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
            print(_start_line(cfg, trainer, episodes, info, auto_precision, start_from), flush=True)
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


def _start_line(cfg: TrainConfig, trainer: "Trainer", episodes: EpisodeSet, info: PolicyInfo,
                auto: bool, resumed: Path | None) -> str:
    """What a run starts with, in one line: the model and its size, the device, threads and the
    precision (and whether auto chose it), the data (and its return scale, when fitted to it:
    an env dtlab knows none for), the length, and where it resumed from."""
    m = cfg.model
    params = sum(p.numel() for p in trainer.model.parameters())
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n > 1 else ''}" if trainer.device.type == "cpu" else ""
    where = (f"resumed from step {trainer.state.step} ({resumed})" if resumed is not None
             else "from step 0")
    ema = f", weight average {cfg.optim.ema_decay:g}" if cfg.optim.ema_decay else ""
    scale = ""
    if cfg.data.return_scale is None and return_scale_is_fitted(cfg.data.env):
        scale = (f"; return scale {info.normalizer.return_scale:g} (fitted to the data: "
                 f"dtlab knows none for {cfg.data.env}; --return-scale sets it)")
    return (f"train {m.architecture}: {params / 1e6:.2f}M parameters (embed {m.embed_dim}, "
            f"{m.n_layers} layer{'s' if m.n_layers > 1 else ''}, K {m.context_len}"
            f"{', stochastic head' if m.policy == 'stochastic' else ''}) on "
            f"{trainer.device}{threads}, precision "
            f"{trainer.precision}{' (auto)' if auto else ''}; data {Path(str(episodes.source)).name}: "
            f"{episodes.num_episodes} episodes, {episodes.num_transitions} transitions, returns "
            f"{episodes.return_stats.min:.1f} to {episodes.return_stats.max:.1f}{scale}; "
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


# Under torchrun the ranks agree every this many steps whether to stop (a signal reached one of
# them) or to write a time-based checkpoint: one small collective, a host sync on CUDA.
SYNC_EVERY = 10


def _loop(cfg: TrainConfig, trainer: Trainer, info: PolicyInfo, run: RunDirectory,
          evaluator: Evaluate | None, should_stop: Callable[[], bool]) -> TrainResult:
    state, world, steps = trainer.state, trainer.world, cfg.run.steps
    tally = Tally(trainer.device, state.step)
    evaluations: list[Evaluation] = []
    last_loss, tick, tick_step = float("nan"), time.perf_counter(), state.step
    last_saved, saved_at = (state.step if cfg.run.resume else -1), time.monotonic()
    bar = cfg.run.progress and on_terminal()  # else plain lines (a log file, a pipe)
    progress = Progress(steps, state.step, enabled=bar and world.is_main)
    report = _LineReport(enabled=world.is_main and not bar)
    poll_every = SYNC_EVERY if world.distributed else 1  # one process polls every step
    stop = False
    trainer.model.train()
    settle = functools.partial(_settle, trainer, tally, cfg, run, info)
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
                _save(trainer, run, info, cfg.run.keep_checkpoints)
                last_saved, saved_at = step, time.monotonic()
    finally:
        progress.close()
    interrupted = state.step < steps
    if last_saved != state.step:
        last_loss = settle() if tally.taken else last_loss
        _save(trainer, run, info, cfg.run.keep_checkpoints)
    if evaluator is not None and not interrupted:
        if world.is_main:
            evaluations.append(_evaluate(evaluator, trainer, info, run))
        distributed.barrier(world)
    return TrainResult(checkpoint.resolve(run.path), state.step, last_loss, evaluations,
                       interrupted, state.skipped_nonfinite)


def _settle(trainer: Trainer, tally: Tally, cfg: TrainConfig, run: RunDirectory,
            info: PolicyInfo) -> float:
    """The mean loss since the last read of the tally; TrainingError on a non-finite step
    unless --skip-nonfinite (then counted), or when too few steps were applied."""
    state = trainer.state
    loss, skipped, bad = tally.read(trainer.world)
    if skipped and not cfg.optim.skip_nonfinite:
        good = run.latest_checkpoint()
        raise TrainingError(
            f"non-finite loss or gradient at step {bad} ({skipped} of the steps up to "
            f"{state.step}); last good checkpoint: {good or 'none'}; --skip-nonfinite skips "
            "such steps" + _likely_cause(trainer.sampler.episodes, info))
    state.skipped_nonfinite += skipped
    _check_enough_steps_applied(trainer, cfg, trainer.sampler.episodes, info)
    return loss


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


def _save(trainer: Trainer, run: RunDirectory, info: PolicyInfo, keep: int) -> None:
    """A checkpoint of this step in the run directory (``keep``: --keep-checkpoints), unless
    the directory went away."""
    run.check_present()
    trainer.save(run.path, info, keep)


def _evaluate(evaluator: Evaluate, trainer: Trainer, info: PolicyInfo,
              run: RunDirectory) -> Evaluation:
    """Evaluate the weights a checkpoint of this step would hold (the average when there is
    one); record it in the run directory and print its line."""
    step = trainer.state.step
    policy = DTPolicy(trainer.policy_model, dataclasses.replace(info, step=step), trainer.device,
                      precision=trainer.precision)
    report = evaluator(policy)
    run.check_present()
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
