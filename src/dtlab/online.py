"""The online loop of ``dtlab finetune`` (dtlab.finetune sets it up): each iteration the
exploration rollouts (one per process), the replay they join, the gradient steps on it, an
evaluation and a checkpoint when due; and what it saves and returns (``OnlineProgress`` in the
replay file, ``FinetuneResult``). The paper, the streams and torchrun: dtlab.finetune's
docstring."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtlab import distributed
from dtlab.checkpoint import PolicyInfo
from dtlab.config import OptimConfig
from dtlab.data.replay import Trajectory, TrajectoryReplay
from dtlab.envs import make_env
from dtlab.errors import DtlabWarning, TrainingError
from dtlab.losses import Tally
from dtlab.metrics import Evaluation, training_record
from dtlab.policy import DTPolicy
from dtlab.rollout import Evaluator
from dtlab.rundir import RunDirectory
from dtlab.trainer import Trainer

REPLAY_FILE = "replay.safetensors"
LEARNING_CURVE = "online_learning_curve.png"

# The finetuning's streams: SeedSequence([seed, this]) for the windows (under torchrun rank r's
# with spawn_key (r,)), [seed, this, k] for rollout k, [s, rank, step] with s drawn from
# [seed, this] after a resume with another number of processes (the offline run's are [seed],
# [seed, rank] and [seed, rank, step]: distinct streams).
FINETUNE_STREAM = 0x0D7


@dataclass
class FinetuneResult:
    """What a finetuning (``dtlab.finetune.finetune``) returns: where it ended."""

    checkpoint: Path  # the latest checkpoint, step_XXXXXXXX named by its gradient step
    gradient_step: int  # the offline run's steps plus the finetuning's
    env_steps: int  # online env steps (all ranks' rollouts)
    rollouts: int
    evaluations: list[Evaluation] = field(default_factory=list)  # those made by this call
    interrupted: bool = False
    already_done: bool = False  # resumed at or past --online-steps: nothing ran, nothing written


@dataclass
class OnlineProgress:
    """Where a finetuning stands (saved with each checkpoint, in the replay file)."""

    env_steps: int = 0  # all ranks' exploration env steps
    rollouts: int = 0  # all ranks' exploration rollouts
    next_eval: int = 0  # env steps at which the next evaluation is due

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.env_steps, self.rollouts, self.next_eval], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "OnlineProgress":
        return cls(*(int(v) for v in t.tolist()))


class OnlineLoop:
    """The online loop's state and steps (one object, so the loop reads on one screen). ``cfg`` is
    the finetuning's ``dtlab.finetune.FinetuneConfig`` (not imported here: that module imports
    this one)."""

    def __init__(self, cfg: Any, trainer: Trainer, optim: OptimConfig,
                 info: PolicyInfo, run: RunDirectory, replay: TrajectoryReplay,
                 progress: OnlineProgress, evaluator: Evaluator, explore: float, limit: int,
                 echo: bool, resumed_from: Path | None) -> None:
        self.cfg, self.trainer, self.info, self.run = cfg, trainer, info, run
        self.optim = optim  # the offline run's (batch size, clipping, ...)
        self.replay, self.progress, self.evaluator = replay, progress, evaluator
        self.explore, self.limit, self.echo = explore, limit, echo
        self.world = trainer.world
        self.evaluations: list[Evaluation] = []
        # The latest checkpoint, known alike on every rank (never read back from the file
        # system, which another node may not share): the one resumed from, then each saved.
        self.checkpoint = resumed_from

    def execute(self, should_stop: Callable[[], bool]) -> FinetuneResult:
        """Iterations until --online-steps (or a stop): W rollouts (one per rank, W = 1 without
        torchrun) into the replay, the updates, an evaluation when due, a checkpoint when due."""
        cfg, p, trainer = self.cfg, self.progress, self.trainer
        saved_at, last_saved = time.monotonic(), p.rollouts
        stop = False
        if p.env_steps == 0 and p.rollouts == 0 and p.next_eval == 0:
            self._evaluate()  # the offline policy: the "before" of the learning curve
            p.next_eval = cfg.eval_every or cfg.online_steps
        while p.env_steps < cfg.online_steps and not stop:
            # Rank r's rollout is number rollouts + r; every rank adds all W in rank order.
            trajectories = distributed.all_gather(self.world, self._explore(p.rollouts +
                                                                            self.world.rank))
            for trajectory in trajectories:
                self.replay.add(trajectory)
            p.env_steps += sum(len(t) for t in trajectories)
            p.rollouts += len(trajectories)
            self._update(trajectories)
            due = p.env_steps >= p.next_eval or p.env_steps >= cfg.online_steps
            if due:
                self._evaluate()
                while p.next_eval <= p.env_steps:
                    p.next_eval += cfg.eval_every or cfg.online_steps
            minutes = cfg.checkpoint_every_minutes
            # Every rank stops and saves together: the ranks agree on the signal and the clock.
            stop, time_due = distributed.any_rank(
                self.world, [should_stop(), bool(minutes) and
                             time.monotonic() - saved_at >= 60 * minutes], trainer.device)
            if due or stop or time_due or p.rollouts - last_saved >= cfg.checkpoint_every or \
                    p.env_steps >= cfg.online_steps:
                self._save()
                saved_at, last_saved = time.monotonic(), p.rollouts
        if last_saved != p.rollouts or self.checkpoint is None:  # every rank alike: a collective
            self._save()
        assert self.checkpoint is not None
        return FinetuneResult(self.checkpoint, trainer.state.step, p.env_steps, p.rollouts,
                              self.evaluations, p.env_steps < cfg.online_steps)

    def _update(self, trajectories: list[Trajectory]) -> None:
        """``updates_per_rollout`` gradient steps on the replay (DistributedDataParallel steps
        under torchrun), then one metrics record: the rollout's return and length (under
        torchrun the means over the round's rollouts, one per rank)."""
        trainer, p = self.trainer, self.progress
        trainer.use_episodes(self.replay.episodes(self.info.observation_space,
                                                  self.info.action_space))
        trainer.model.train()
        tally = Tally(trainer.device, trainer.state.step)
        started = time.perf_counter()
        for _ in range(self.cfg.updates_per_rollout):
            tally.add(*trainer.step(self.optim))
        loss, skipped, bad = tally.read(self.world)
        if skipped and not self.optim.skip_nonfinite:
            raise TrainingError(f"non-finite loss or gradient at step {bad}; last good "
                                f"checkpoint: {self.run.latest_checkpoint() or 'none'}")
        rate = self.cfg.updates_per_rollout / max(time.perf_counter() - started, 1e-9)
        alpha = float(trainer.temperature.alpha) if trainer.temperature is not None else None
        self.run.metrics.write({
            **training_record(trainer.state.step, loss, trainer.applied_lr, rate),
            "env_steps": p.env_steps,
            "rollout_return": float(np.mean([t.episode_return for t in trajectories])),
            # An int for one rollout (one process), the mean of the round's under torchrun.
            "rollout_length": len(trajectories[0]) if len(trajectories) == 1 else
            float(np.mean([len(t) for t in trajectories])),
            "temperature": alpha})

    def _explore(self, number: int) -> Trajectory:
        """Exploration rollout ``number`` (counted over all ranks): actions sampled from the
        policy (temperature 1) conditioned on the exploration target; its env seed
        ``SeedSequence([seed, FINETUNE_STREAM, number]).generate_state(1)[0]`` and its
        sampling stream key ``number`` (DTPolicy.reset's ``streams``)."""
        policy = DTPolicy(self.trainer.model, self.info, self.trainer.device,
                          precision=self.trainer.precision, temperature=1.0, seed=self.cfg.seed)
        env_seed = int(np.random.SeedSequence([self.cfg.seed, FINETUNE_STREAM, number])
                       .generate_state(1)[0])
        env = make_env(self.cfg.env)
        observations, actions, rewards = [], [], []
        terminated = False
        try:
            obs, _ = env.reset(seed=env_seed)
            with warnings.catch_warnings():  # asking beyond the data is the point here
                warnings.simplefilter("ignore", DtlabWarning)
                policy.reset(np.array([self.explore]), streams=np.array([number]))
            reward = None
            for _ in range(self.limit):
                action = policy.act(np.asarray(obs, np.float32)[None],
                                    None if reward is None else np.array([reward]))[0]
                observations.append(np.asarray(obs, np.float32))
                actions.append(action)
                obs, reward, terminated, truncated, _ = env.step(action)
                rewards.append(float(reward))
                if terminated or truncated:
                    break
        finally:
            env.close()
        return Trajectory(np.stack(observations), np.stack(actions),
                          np.asarray(rewards, np.float32), bool(terminated))

    def _evaluate(self) -> None:
        """Evaluate the mean action at the targets (rank 0; the other ranks wait); recorded
        with step = online env steps. The weights a checkpoint holds are evaluated: their
        average when the offline run kept one (``optim.ema_decay``), as ``dtlab train`` does;
        the rollouts explore with the weights being trained."""
        if self.world.is_main:
            policy = DTPolicy(self.trainer.policy_model, self.info, self.trainer.device,
                              precision=self.trainer.precision)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DtlabWarning)
                report = self.evaluator(policy)
            self.trainer.model.train()
            evaluation = Evaluation(self.progress.env_steps, tuple(report.results),
                                    "average" if self.trainer.ema is not None else "raw",
                                    {**report.timing(),
                                     "gradient_step": self.trainer.state.step})
            self.run.record_evaluation(evaluation)
            self.evaluations.append(evaluation)
            if self.echo:
                print(evaluation.line().replace("eval step", "eval at online env step", 1),
                      flush=True)
        distributed.barrier(self.world)

    def _save(self) -> None:
        """A checkpoint with the replay and the progress (rank 0 writes; every rank calls it:
        each rank's random streams are gathered into it)."""
        arrays = {k: torch.from_numpy(np.ascontiguousarray(v))
                  for k, v in self.replay.to_arrays().items()}
        arrays["progress"] = self.progress.to_tensor()
        self.trainer.save(self.run.path, self.info, self.cfg.keep_checkpoints,
                          extra={REPLAY_FILE: arrays})
        self.checkpoint = self.run.path / f"step_{self.trainer.state.step:08d}"  # Trainer.save's


def console_curve(evaluations: list[Evaluation]) -> str:
    """The learning curve as text: one line per evaluation, online env steps and the mean
    return (normalized score where known) at each target."""
    lines = ["online learning curve (env steps: mean return per target)"]
    for e in evaluations:
        parts = [f"{r.target:g} -> {r.mean:.1f}" + (f" ({r.normalized_mean:.1f})"
                                                    if r.normalized_mean is not None else "")
                 for r in e.results]
        lines.append(f"  {e.step:>9d}: " + "; ".join(parts))
    return "\n".join(lines)


def draw_learning_curve(run: RunDirectory, targets: tuple[float, ...], title: str) -> None:
    """``LEARNING_CURVE`` in the run directory: mean return (± std over episodes) per target
    against online env steps, from its evaluations."""
    from dtlab.plots import score_curves

    evaluations = run.evaluations()
    curves = []
    for target in targets:
        rows = [(e.step, r) for e in evaluations for r in e.results if r.target == target]
        if rows:
            curves.append((f"target {target:g}", [s for s, _ in rows], [r.mean for _, r in rows],
                           [r.std for _, r in rows]))
    score_curves(curves, run.path / LEARNING_CURVE, ylabel="mean return (sum of rewards)",
                 title=title, xlabel="online env steps")
