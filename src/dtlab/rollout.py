"""Return-conditioned rollouts: every episode of every target advances together.

One batched forward pass per environment step serves all unfinished episodes of all targets.
Episode i of every target starts from the same state (env seed ``seed + i``), so targets are
compared on paired starts. Sampled (temperature > 0) episodes draw from their own stream, keyed by
(env seed, target): an episode's result does not depend on the other episodes or targets run.
Used by evaluation (dtlab.evaluate) and by evaluation during training (``Evaluator``), so that
neither loop imports the other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dtlab.config import MAX_SEED, check_number, check_targets
from dtlab.data.records import ReturnStats, round_target
from dtlab.data.returns import normalized_score
from dtlab.env_workers import EnvWorkers, LocalEnvs
from dtlab.envs import env_advice, env_info, episode_limit, make_env, reference_scores
from dtlab.errors import ConfigError
from dtlab.metrics import TargetResult
from dtlab.policy import DTPolicy
from dtlab.spaces import check_against_env


@dataclass(frozen=True)
class RolloutReport:
    """What a rollout produced: per-target results, how episodes were limited, and timing."""

    results: list[TargetResult]
    max_steps: int  # episodes were cut at this many steps
    standard_time_limit: int | None  # the env's standard limit (None: unknown)
    comparable: bool  # normalized scores are reported only when episodes ran to that limit
    env_steps: int
    seconds: float
    model_seconds: float  # time inside the policy (forward passes)
    videos: tuple[str, ...] = ()  # recorded mp4 files, one per target (rollout's video=)

    @property
    def env_steps_per_s(self) -> float:
        return self.env_steps / max(self.seconds, 1e-9)

    def timing(self) -> dict[str, float]:
        return {"env_steps": self.env_steps, "seconds": self.seconds,
                "env_steps_per_s": self.env_steps_per_s, "model_seconds": self.model_seconds}


def default_targets(env_id: str, dataset_return: ReturnStats | None,
                    reliable_max: float | None = None) -> tuple[tuple[float, ...], str]:
    """The targets to evaluate at when none are given, and a line saying why (for the console).

    The env's registered targets (``dtlab.envs.env_info``: the DT paper's for MuJoCo and Atari,
    dtlab's own for Pendulum and CartPole, as ``targets_from`` says), unless one lies beyond what
    the data supports (``ReturnStats.supports``): then targets fitted to the data, the calibrated
    ``reliable_max`` when there is one, else the data's best episode return, and half of it
    (when positive), rounded to 3 significant digits (never up, for the reliable maximum). ()
    when the env has no paper targets and nothing is known of the data."""
    info = env_info(env_id)
    paper = tuple(info.targets)
    if paper and (dataset_return is None or dataset_return.fitted_target(paper) is None):
        return paper, f"targets {_fmt(paper)}: {info.targets_from} for {env_id}"
    if dataset_return is None:
        return (), f"no default targets for {env_id}"
    best = reliable_max if reliable_max is not None else dataset_return.max
    what = "calibrated reliable maximum" if reliable_max is not None else "best episode return"
    # Rounding never lifts a target above the calibrated maximum (-300.3 stays, not -300).
    fitted = tuple(dict.fromkeys(min(round_target(t), t) if reliable_max is not None
                                 else round_target(t)
                                 for t in ((best, best / 2) if best > 0 else (best,))))
    why = (f"{info.targets_from} {_fmt(paper)} lie beyond the data's best return "
           f"{dataset_return.max:g}" if paper else f"dtlab knows no paper targets for {env_id}")
    return fitted, (f"targets {_fmt(fitted)}: fitted to the data (its {what} is {best:g}; "
                    f"{why}); choose others with --targets")


def _fmt(targets: Sequence[float]) -> str:
    return ", ".join(f"{t:g}" for t in targets)


@dataclass(frozen=True)
class EpisodeLimit:
    """How long an env's episodes run (``dtlab.envs.episode_limit``), once it was checked."""

    steps: int  # episodes are cut at this many steps
    standard: int | None  # the env's standard time limit (None: unknown)

    def __iter__(self):
        return iter((self.steps, self.standard))


def check_env(env_id: str, info, max_steps: int | None = None, *,
              what: str = "the checkpoint", advice: str | None = None) -> EpisodeLimit:
    """Make ``env_id`` once and check it against a checkpoint's ``info`` (PolicyInfo): its spaces
    (EnvError when they differ, ending in ``advice``, by default ``env_advice``'s --env) and how
    long its episodes run against the model's max_ep_len (ConfigError). EnvError for an unknown
    env. The one check before rollouts; its result goes to ``rollout(checked=...)``."""
    probe = make_env(env_id)
    try:
        check_against_env(probe, info.observation_space, info.action_space, what=what,
                          exact_n=True, advice=advice or env_advice(info.env_id, env_id,
                                                                    "it was trained on"))
        return EpisodeLimit(*episode_limit(probe, env_id, max_steps, info.model.max_ep_len))
    finally:
        probe.close()


MAX_PARALLEL = 256  # episodes stepped at once by default (more run in waves)


def rollout(policy: DTPolicy, env_id: str, targets: Sequence[float], episodes: int, *,
            seed: int = 0, max_steps: int | None = None, max_parallel: int = MAX_PARALLEL,
            workers: int = 0, video: str | None = None,
            checked: "EpisodeLimit | None" = None,
            pool: "EnvWorkers | None" = None) -> RolloutReport:
    """Run ``episodes`` episodes per target in ``env_id`` and report their returns.

    Up to ``max_parallel`` episodes run at once (each in its own env, stepped in lockstep, one
    batched forward per step); more run in successive waves that reuse the same envs. ``workers``
    > 0: the envs live in that many worker processes (dtlab.env_workers) while the policy acts
    here; the results are identical. ``video``: a directory; the first episode of each target is
    recorded with Gymnasium's ``RecordVideo`` to ``<video>/target-<target>.mp4`` (its reset frame
    and one frame per step; episodes in this process only, ``workers`` 0), the files listed in the
    report's ``videos``; they appear only once every episode has ended. Raises ConfigError for no
    targets/episodes, non-finite targets, episodes longer than the model's max_ep_len, a negative
    ``seed`` or ``workers``, ``max_steps`` / ``max_parallel`` below 1, ``video`` with workers or
    without moviepy, or two targets that name the same video; EnvError for an unknown env, when
    the env's spaces differ from the checkpoint's, a worker fails, or frames cannot be rendered.
    ``checked``: what ``check_env`` already returned for this env, policy and ``max_steps`` (the
    env is then not made again to check it). ``pool``: open ``EnvWorkers`` of ``env_id`` with
    ``min(episodes x targets, max_parallel)`` envs over ``workers`` processes to use instead of
    starting new ones (the caller closes it; ``Evaluator`` keeps one across evaluations).
    """
    _check_counts(episodes, seed, max_steps, max_parallel, workers)
    n = len(targets) * episodes
    if n == 0:
        raise ConfigError("rollout needs at least one target and one episode")
    # Before any env or worker starts.
    check_targets("rollout's targets", tuple(float(t) for t in targets))
    target_of = np.repeat(np.asarray(targets, dtype=np.float32), episodes)  # (n,)
    names = {i * episodes: video_name(t) for i, t in enumerate(targets)} if video else {}
    if video:
        _check_video(video, workers, names)
    # Episode j runs target j // episodes from start state seed + j % episodes.
    start_seed = seed + np.arange(n) % episodes  # (n,)
    slots = min(n, max_parallel)
    limit, standard = checked or check_env(env_id, policy.info, max_steps)
    staging = None
    if video:  # RecordVideo writes here; finished files are moved up, the rest removed
        Path(video).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".recording-", dir=video))
    try:
        returns, lengths, env_steps, model_time, elapsed = _run_episodes(
            policy, env_id, slots, workers, target_of, start_seed, limit, names,
            None if staging is None else str(staging), pool)
        videos = []
        for name in names.values():  # whole episodes only: moved once every one has ended
            videos.append(str(Path(video) / f"{name}.mp4"))
            os.replace(staging / name / f"{name}-episode-0.mp4", videos[-1])
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    comparable = standard is not None and limit == standard
    refs = reference_scores(env_id, policy.info.ref_min_score, policy.info.ref_max_score)
    results = _target_results(targets, episodes, returns, lengths,
                              refs if comparable and refs[0] is not None else None)
    return RolloutReport(results, limit, standard, comparable, int(env_steps), elapsed, model_time,
                         tuple(videos))


def _check_counts(episodes: int, seed: int, max_steps: int | None, max_parallel: int,
                  workers: int) -> None:
    """ConfigError naming rollout's argument that is not an integer in its range."""
    check_number("rollout's episodes", episodes, minimum=1, integer=True)
    check_number("rollout's seed", seed, minimum=0, maximum=MAX_SEED, integer=True)
    check_number("rollout's max_steps", max_steps, minimum=1, integer=True)
    check_number("rollout's max_parallel", max_parallel, minimum=1, integer=True)
    check_number("rollout's workers", workers, minimum=0, integer=True)


def _target_results(targets: Sequence[float], episodes: int, returns: np.ndarray,
                    lengths: np.ndarray, refs: tuple[float, float] | None) -> list[TargetResult]:
    """One TargetResult per target from the (targets x episodes,) returns and lengths, episode j
    of target i at i * episodes + j; normalized with ``refs`` (min, max) when given."""
    results = []
    for i, target in enumerate(targets):
        ret = returns[i * episodes:(i + 1) * episodes]
        norm = normalized_score(ret, *refs) if refs is not None else None
        results.append(TargetResult(
            target=float(target), returns=ret.tolist(),
            lengths=lengths[i * episodes:(i + 1) * episodes].tolist(),
            mean=float(ret.mean()), std=float(ret.std()),
            normalized_mean=None if norm is None else float(norm.mean()),
            normalized_std=None if norm is None else float(norm.std()),
        ))
    return results


def video_name(target: float) -> str:
    """A target's video file stem: ``target-3600``, ``target--150.5`` (12 significant digits)."""
    return f"target-{target:.12g}"


def _check_video(video: str, workers: int, names: dict[int, str]) -> None:
    """ConfigError unless ``video`` can hold one recording per target, made in this process."""
    if workers > 0:
        raise ConfigError("--video records episodes in this process: drop --eval-workers")
    if len(set(names.values())) < len(names):
        raise ConfigError(f"--video: two targets would write the same file ("
                          f"{', '.join(names.values())}); give distinct --targets")
    try:
        import moviepy  # noqa: F401  (RecordVideo writes mp4 through it)
    except ImportError:
        raise ConfigError("--video needs moviepy: pip install 'dtlab[video]'") from None
    if Path(video).exists() and not Path(video).is_dir():
        raise ConfigError(f"{video}: is not a directory; give --video a directory")


def _run_episodes(policy: DTPolicy, env_id: str, slots: int, workers: int, target_of: np.ndarray,
                  start_seed: np.ndarray, limit: int, names: dict[int, str],
                  video_folder: str | None, pool: "EnvWorkers | None" = None):
    """Run the n = ``target_of.size`` episodes in waves of ``slots`` envs; episode j in ``names``
    is recorded to ``video_folder`` under that name. (returns (n,), lengths (n,), env steps, model
    seconds, seconds)."""
    n = target_of.size
    owned = pool is None or workers == 0
    envs = (pool if not owned else EnvWorkers(env_id, slots, workers) if workers > 0
            else LocalEnvs(env_id, slots, video_folder))
    try:
        returns = np.zeros(n)
        lengths = np.zeros(n, dtype=np.int64)
        env_steps, model_time, started = 0, 0.0, time.perf_counter()
        for first in range(0, n, slots):
            wave = np.arange(first, min(n, first + slots))  # episode ids of this wave
            for slot, j in enumerate(wave):
                if j in names:
                    envs.record(slot, names[j])
            steps, seconds = _run_wave(policy, envs, wave, target_of, start_seed, limit, returns,
                                       lengths)
            env_steps += steps
            model_time += seconds
        elapsed = time.perf_counter() - started
    finally:
        if owned:
            envs.close()  # writes the recordings still open
    return returns, lengths, env_steps, model_time, elapsed


def _run_wave(policy: DTPolicy, envs: LocalEnvs | EnvWorkers, wave: np.ndarray,
              target_of: np.ndarray, start_seed: np.ndarray, limit: int, returns: np.ndarray,
              lengths: np.ndarray) -> tuple[int, float]:
    """Run episodes ``wave`` (slot i of the wave in env slot i) to the end; fills returns/lengths."""
    m = wave.size
    obs = np.stack(envs.reset(np.arange(m), start_seed[wave]))  # (m, S)
    policy.reset(target_of[wave], streams=start_seed[wave])  # sampling: one stream per episode
    rewards = np.zeros(m, dtype=np.float32)
    active = np.arange(m)  # wave slots still running
    env_steps, model_time = 0, 0.0
    for _ in range(limit):
        if active.size == 0:
            break
        t0 = time.perf_counter()
        actions = policy.act(obs[active], rewards[active], index=active)  # (a, A)
        model_time += time.perf_counter() - t0
        still = []
        step_obs, step_rewards, terminated, truncated = envs.step(active, actions)
        for row, i in enumerate(active):
            r = step_rewards[row]
            obs[i], rewards[i] = step_obs[row], r
            returns[wave[i]] += r
            lengths[wave[i]] += 1
            if not (terminated[row] or truncated[row]):
                still.append(i)
        env_steps += active.size
        active = np.asarray(still, dtype=np.int64)
    return env_steps, model_time


@dataclass
class Evaluator:
    """Evaluation during training, as a callable the training loop is handed:
    ``evaluator(policy) -> RolloutReport``."""

    env_id: str
    targets: tuple[float, ...]
    episodes: int
    seed: int = 0
    max_steps: int | None = None
    workers: int = 0  # env worker processes (0: in this process)
    _checked: EpisodeLimit | None = field(default=None, init=False, repr=False, compare=False)
    _pool: EnvWorkers | None = field(default=None, init=False, repr=False, compare=False)

    def __call__(self, policy: DTPolicy) -> RolloutReport:
        if self._checked is None:  # the env is checked at the first evaluation only
            self._checked = check_env(self.env_id, policy.info, self.max_steps)
        if self.workers and self._pool is None:  # started once, kept across evaluations
            slots = min(len(self.targets) * self.episodes, MAX_PARALLEL)
            self._pool = EnvWorkers(self.env_id, slots, self.workers)
        return rollout(policy, self.env_id, self.targets, self.episodes, seed=self.seed,
                       max_steps=self.max_steps, workers=self.workers, checked=self._checked,
                       pool=self._pool)

    def close(self) -> None:
        """Stop the env worker processes, if any were started."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
