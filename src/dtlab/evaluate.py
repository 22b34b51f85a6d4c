"""Evaluate a checkpoint: batched return-conditioned rollouts (dtlab.rollout) at chosen targets
or a sweep, a results table, strict-JSON results and an achieved-vs-target plot; calibration of
the return conditioning (``calibrate_checkpoint``); and evaluation without an environment on a
dataset's windows (``offline_evaluation``)."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, Sequence

import numpy as np
import tyro

from dtlab import checkpoint, runtime
from dtlab.atomic import check_writable, write_json
from dtlab.config import MAX_SEED, PRECISIONS, check_choice, check_number, check_targets
from dtlab.data.episodes import EpisodeSet
from dtlab.data.records import Provenance, ReturnStats
from dtlab.envs import check_same_env
from dtlab.errors import ConfigError, DatasetError, DtlabWarning
from dtlab.policy import DTPolicy
from dtlab.rundir import one_writer
from dtlab.metrics import TargetResult
from dtlab.rollout import RolloutReport, check_env, default_targets, rollout
from dtlab.spaces import (ContinuousActions, DictObservations, DiscreteActions, describe_observations)

# ---- the commands' configs ----------------------------------------------------------------------
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
    video: str | None = None
    """Directory to record the first episode of each target to, as DIR/target-<target>.mp4
    (Gymnasium's RecordVideo: the reset frame and one per step; needs moviepy: pip install
    'dtlab[video]'; MuJoCo without a display renders with MUJOCO_GL=egl, set when unset). Not with
    --eval-workers."""
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
        if self.video is not None and self.offline:
            raise ConfigError("--video records episodes in the env; --offline runs none: drop one")


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


__all__ = ["evaluate_checkpoint", "rollout", "sweep_targets", "results_json", "TargetResult",
           "RolloutReport", "Calibration", "reliable_maximum", "calibrate_checkpoint",
           "calibration_summary",
           "offline_evaluation"]


def sweep_targets(dataset_return: ReturnStats, points: int) -> list[float]:
    """Targets from the dataset's lowest episode return to 20% of its return range past its
    highest."""
    lo, hi = dataset_return.min, dataset_return.max
    span = hi - lo if hi > lo else max(abs(hi), 1.0)  # all episodes alike: spread around them
    return np.unique(np.linspace(lo, hi + 0.2 * span, points).round(1)).tolist()


def results_json(report: RolloutReport, *, checkpoint: str, env_id: str, episodes: int, seed: int,
                 dataset: dict, precision: str | None = None) -> dict:
    """The results file's content (strict JSON once written by ``atomic.write_json``);
    ``precision``: the one the rollouts ran at (recorded when given)."""
    return {
        "checkpoint": checkpoint, "env": env_id, "episodes_per_target": episodes, "seed": seed,
        **({"precision": precision} if precision is not None else {}),
        "max_steps": report.max_steps, "standard_time_limit": report.standard_time_limit,
        "normalized_scores_comparable": report.comparable,
        "dataset_return": dataset.get("episode_return"),
        "results": [asdict(r) for r in report.results], "timing": report.timing(),
    }


def run_label(path: Path, info) -> str:
    """``<run> step <n>``: the run directory's name for a checkpoint inside one (a directory with
    a ``latest`` file), else the checkpoint directory's, and the step its weights were saved at;
    what the evaluate table and the figures name the evaluated weights by."""
    named = path.parent if (path.parent / checkpoint.LATEST_FILE).is_file() else path
    return f"{named.name} step {info.step}"


def dataset_label(info) -> str:
    """The file name of the checkpoint's training data (or its recorded source, e.g. <memory>)."""
    source = info.dataset.get("path")
    return Path(source).name if isinstance(source, str) and source else "dataset not recorded"


def print_table(report: RolloutReport, *, title: str,
                dataset_return: ReturnStats | None = None) -> None:
    """The per-target results as a rich table: achieved return (mean ± population std over the
    episodes), D4RL normalized score when comparable, episodes, and mean episode length (steps)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("target", justify="right")
    table.add_column("achieved (mean ± std)", justify="right")
    table.add_column("normalized", justify="right")
    table.add_column("episodes", justify="right")
    table.add_column("mean length (steps)", justify="right")
    for r in report.results:
        norm = "-" if r.normalized_mean is None else f"{r.normalized_mean:.1f} ± {r.normalized_std:.1f}"
        table.add_row(f"{r.target:g}", f"{r.mean:.1f} ± {r.std:.1f}", norm, str(len(r.returns)),
                      f"{np.mean(r.lengths):.1f}")
    console = Console()
    console.print(table)
    if not report.comparable and report.standard_time_limit is not None:
        console.print(f"episodes cut at {report.max_steps} steps, not the env's standard "
                      f"{report.standard_time_limit}: no normalized scores")
    if dataset_return:
        console.print(f"dataset episode return: mean {dataset_return.mean:.1f}, "
                      f"max {dataset_return.max:.1f}")


def evaluate_checkpoint(cfg: EvalConfig, echo: bool = False) -> dict:
    """Evaluate ``cfg.checkpoint`` and write JSON/plot; returns the results dict.

    Raises CheckpointError (unreadable checkpoint), EnvError (unknown env, spaces differ) or
    ConfigError (no targets, episodes longer than the model's max_ep_len, unwritable outputs)
    before any rollout runs.
    """
    for out_path in (cfg.out, cfg.plot):
        if out_path:
            check_writable(out_path)
    if cfg.offline:
        return evaluate_offline(cfg, echo=echo)
    path, info = checkpoint.load_info(cfg.checkpoint)
    env_id = cfg.env or info.env_id
    # Rollouts alternate small forwards with env steps on one core; one thread avoids spin-waiting
    # threads fighting the simulator for the CPU.
    device = runtime.setup(cfg.device, cfg.threads, default_threads=1)
    # Check the env before loading weights, so an unknown env id fails fast.
    checked = check_env(env_id, info, cfg.max_steps, what=f"checkpoint {path}")
    check_paired_envs(path, info, env_id)
    dataset_return = ReturnStats.from_json(info.dataset.get("episode_return"))
    targets = _targets(cfg, path, env_id, dataset_return, echo)
    precision = runtime.resolve_precision(cfg.precision, device)
    policy = DTPolicy.from_checkpoint(path, device=str(device), precision=precision,
                                      kv_cache=cfg.kv_cache, temperature=cfg.temperature,
                                      seed=cfg.seed, info=info)
    report = rollout(policy, env_id, targets, cfg.episodes, seed=cfg.seed, max_steps=cfg.max_steps,
                     workers=cfg.eval_workers, video=cfg.video, checked=checked)
    data = results_json(report, checkpoint=str(path), env_id=env_id, episodes=cfg.episodes,
                        seed=cfg.seed, dataset=info.dataset, precision=precision)
    data["checkpoint_step"] = info.step
    if cfg.video:
        data["videos"] = list(report.videos)  # target i's first episode: videos[i]
    if echo:
        print_table(report, title=f"{run_label(path, info)} ({path}), {env_id}, {cfg.episodes} "
                                  f"episodes per target ({report.env_steps_per_s:.0f} env steps/s)",
                    dataset_return=dataset_return)
    plot = cfg.plot or (str(Path(cfg.out).with_suffix(".png")) if cfg.out and cfg.sweep else None)
    if cfg.sweep and plot is None:
        plot = "sweep.png"
    if plot:
        from dtlab.plots import achieved_vs_target

        achieved_vs_target(report.results, plot, title=f"{run_label(path, info)}: achieved vs "
                           f"target return\n{env_id}, trained on {dataset_label(info)}",
                           dataset_return=dataset_return)
        data["plot"] = plot
    if cfg.out:
        write_json(cfg.out, data)
    written = [p for p in (cfg.out, plot, *report.videos) if p]
    if echo and written:
        print("wrote " + ", ".join(written))
    return data


def _targets(cfg: EvalConfig, path: Path, env_id: str, dataset_return: ReturnStats | None,
             echo: bool) -> list[float]:
    """The targets ``dtlab evaluate`` runs: the sweep's, ``--targets``, or ``default_targets``
    (the calibrated maximum taken into account; the choice printed with ``echo``)."""
    if cfg.sweep:
        if not dataset_return:
            raise ConfigError(f"{path}: checkpoint has no dataset return statistics for sweep")
        return sweep_targets(dataset_return, cfg.sweep_points)
    if cfg.targets:
        return list(cfg.targets)
    calibration = checkpoint.load_calibration(path)
    chosen, why = default_targets(env_id, dataset_return, calibration
                                  and float(calibration["reliable_max_target"]))
    if not chosen:
        raise ConfigError(f"{path}: {why}; give --targets")
    if echo:
        print(f"evaluating at {why}")
    return list(chosen)


def check_paired_envs(path: Path, info, env_id: str) -> None:
    """ConfigError when ``env_id`` is another task than the checkpoint was trained for, or than
    its training data was recorded in (checkpoints trained before dtlab compared the two)."""
    check_same_env(info.env_id, env_id, what=str(path), noun="the checkpoint was trained for",
                   advice=f"evaluate it with --env {info.env_id}")
    metadata = info.dataset.get("metadata") if isinstance(info.dataset, dict) else None
    recorded = Provenance.from_metadata(metadata).env_id if isinstance(metadata, dict) else None
    check_same_env(recorded, env_id,
                   what=f"{path} (trained on {info.dataset.get('path')})",
                   advice=f"evaluate it with --env {recorded}")


# ---- calibration of the return conditioning ------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Where the achieved return rises with the target, and where it stops.

    With standard errors ``se`` of the mean achieved returns ``y`` at increasing targets ``x``, the
    noise margin between targets i and j is ``m(i, j) = z * sqrt(se_i**2 + se_j**2)`` (z standard
    errors of the difference of two independent means; z = 2 is about a 95% two-sided test).

    - ``rises[i]``: y[i+1] - y[i] > m(i, i+1): one step up raises the achieved return.
    - reliable maximum: the lowest target x[j] above which no target achieves significantly more
      (y[i] - y[j] <= m(i, j) for every i > j). Asking for more than x[j] is not rewarded.
    - rising range: from x[a] to x[j], where x[a] is the highest target up to x[j] that achieves
      significantly more than no lower target (the top of the flat start, usually x[0]); None
      when a == j, i.e. the achieved return never rises with the target.
    - ``saturated``: a higher target in the sweep achieved no more (False: the curve still rises
      at the top of the sweep, so the reliable maximum is only a lower bound).
    """

    targets: list[float]  # (n,) increasing
    means: list[float]  # (n,) mean achieved return per target
    standard_errors: list[float]  # (n,)
    z: float
    rises: list[bool]  # (n - 1,)
    reliable_max_target: float
    achieved_at_reliable_max: float
    rising_range: tuple[float, float] | None
    saturated: bool


def reliable_maximum(targets: Sequence[float], means: Sequence[float],
                     standard_errors: Sequence[float], z: float = 2.0) -> Calibration:
    """Calibration of an achieved-vs-target curve (see ``Calibration`` for the definitions).

    Raises ConfigError unless the targets are strictly increasing and the three sequences have the
    same length (at least 2), finite values, and standard errors >= 0.
    """
    x, y, se = (np.asarray(v, dtype=np.float64) for v in (targets, means, standard_errors))
    n = x.size
    if n < 2 or y.shape != (n,) or se.shape != (n,):
        raise ConfigError(f"calibration needs at least 2 targets with one mean and one standard "
                          f"error each, got {x.size}, {y.size}, {se.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and np.isfinite(se).all()) \
            or (se < 0).any() or not (np.diff(x) > 0).all():
        raise ConfigError("calibration needs strictly increasing finite targets, finite means and "
                          "standard errors >= 0")
    margin = z * np.sqrt(se[:, None] ** 2 + se[None, :] ** 2)  # (n, n)
    above = (y[:, None] - y[None, :]) > margin  # (n, n): above[i, j] = i significantly above j
    j = next(j for j in range(n) if not above[j + 1:, j].any())  # the last j always qualifies
    a = max(i for i in range(j + 1) if not above[i, :i].any())  # i = 0 always qualifies
    return Calibration(
        targets=x.tolist(), means=y.tolist(), standard_errors=se.tolist(), z=float(z),
        rises=[bool(above[i + 1, i]) for i in range(n - 1)],
        reliable_max_target=float(x[j]), achieved_at_reliable_max=float(y[j]),
        rising_range=(float(x[a]), float(x[j])) if a < j else None, saturated=j < n - 1)


def calibration_targets(dataset_return: ReturnStats, points: int) -> list[float]:
    """``points`` targets from the data's lowest episode return to 50% of its return range past
    the best (1.5x the best when the lowest return is 0), rounded to 0.1."""
    lo, hi = dataset_return.min, dataset_return.max
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return np.unique(np.linspace(lo, hi + 0.5 * span, points).round(1)).tolist()


def calibrate_checkpoint(cfg: CalibrateConfig, *, echo: bool = False,
                         episodes: EpisodeSet | None = None) -> dict:
    """Sweep the targets of ``calibration_targets``, find the reliable maximum target
    (``reliable_maximum``), store it in the checkpoint (calibration.json, read by
    ``DTPolicy.from_checkpoint``) and draw achieved vs target over the data's episode returns.

    ``episodes``: the training data, for the histogram behind the curve (default: ``cfg.dataset``,
    else the checkpoint's dataset file when it is still there). Returns the calibration record.
    Raises CheckpointError, EnvError, or ConfigError (not a decision-transformer checkpoint, no
    dataset return statistics, a run directory that another process holds) before any rollout
    runs.

    A checkpoint in a run directory (one with a ``latest`` file) is calibrated while this process
    holds the directory (``dtlab.rundir.RunDirectory.hold``), from the first read to the last write: a
    live training run would prune the checkpoint, or replace it, under the calibration, and a
    ``dtlab train`` started meanwhile is refused, naming this process.
    """
    run = checkpoint.resolve(cfg.checkpoint).resolve().parent  # also for "." or a link
    if not (run / checkpoint.LATEST_FILE).is_file():
        return _calibrate(cfg, echo, episodes)
    with one_writer(run, activity="calibrating", advice="calibrate after it finishes, or copy "
                    "the checkpoint out of the run directory to calibrate it now"):
        return _calibrate(cfg, echo, episodes)  # resolves `latest` again, under the lock


def _calibrate(cfg: CalibrateConfig, echo: bool, episodes: EpisodeSet | None) -> dict:
    path, info = checkpoint.load_info(cfg.checkpoint)
    if info.model.architecture != "decision-transformer":
        raise ConfigError(f"{path}: calibration measures return conditioning; a "
                          f"{info.model.architecture} checkpoint ignores the target")
    dataset_return = ReturnStats.from_json(info.dataset.get("episode_return"))
    if not dataset_return:
        raise ConfigError(f"{path}: checkpoint has no dataset return statistics to calibrate over")
    if cfg.plot:
        check_writable(cfg.plot)
    if episodes is None and cfg.dataset is not None:
        from dtlab.data.formats import load_episodes

        episodes = load_episodes(cfg.dataset)
    device = runtime.setup(cfg.device, cfg.threads, default_threads=1)
    checked = check_env(info.env_id, info, cfg.max_steps, what=f"checkpoint {path}")
    episode_returns = (episodes.episode_returns.tolist() if episodes is not None
                       else _recorded_episode_returns(info.dataset.get("path")))
    targets = calibration_targets(dataset_return, cfg.points)
    policy = DTPolicy.from_checkpoint(path, device=str(device), info=info)
    policy.reliable_max_target = None  # the sweep asks for more on purpose
    report = rollout(policy, info.env_id, targets, cfg.episodes, seed=cfg.seed,
                     max_steps=cfg.max_steps, checked=checked)
    se = [float(np.std(r.returns, ddof=1) / math.sqrt(len(r.returns))) if len(r.returns) > 1
          else 0.0 for r in report.results]
    cal = reliable_maximum(targets, [r.mean for r in report.results], se, z=cfg.z)
    record = {**asdict(cal), "achieved_std": [r.std for r in report.results],
              "normalized_mean": [r.normalized_mean for r in report.results],
              "episodes": cfg.episodes, "seed": cfg.seed, "max_steps": report.max_steps,
              "env": info.env_id, "checkpoint_step": info.step,
              "dataset_return": dataset_return.to_json()}
    checkpoint.save_calibration(path, record)
    from dtlab.plots import calibration_plot

    plot = cfg.plot or str(path / "calibration.png")
    calibration_plot([("Decision Transformer", record)], plot, episode_returns=episode_returns,
                     title=f"{run_label(path, info)}: return-conditioning calibration\n"
                           f"{info.env_id}, trained on {dataset_label(info)}")
    record["plot"] = plot
    if echo:
        _print_calibration(record, path)
    return record


def _recorded_episode_returns(dataset_path) -> list[float] | None:
    """Episode returns of the checkpoint's training file for the plot, or None (with a one-line
    warning) when the file cannot be read any more."""
    if not isinstance(dataset_path, str) or dataset_path.startswith("<"):
        return None
    from dtlab.data.formats import load_episodes
    from dtlab.errors import DtlabError

    try:
        return load_episodes(dataset_path).episode_returns.tolist()
    except DtlabError as exc:
        warnings.warn(f"{exc}; the calibration plot is drawn without the data's return "
                      "histogram (set dataset)", DtlabWarning, stacklevel=3)
        return None


def _print_calibration(record: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{path}: achieved return per target ({record['episodes']} episodes)")
    for name in ("target", "achieved (mean ± std)", "standard error", "rises to next"):
        table.add_column(name, justify="right")
    rises = record["rises"] + [None]
    for t, m, s, e, r in zip(record["targets"], record["means"], record["achieved_std"],
                             record["standard_errors"], rises):
        table.add_row(f"{t:g}", f"{m:.1f} ± {s:.1f}", f"{e:.1f}", "" if r is None else
                      ("yes" if r else "no"))
    console = Console()
    console.print(table)
    console.print(calibration_summary(record) + f"; stored in {path / checkpoint.CALIBRATION_FILE}")


def calibration_summary(record: dict) -> str:
    """One line saying what a calibration record (``calibrate_checkpoint``'s) measured.

    A curve that rises names its reliable maximum target and rising range. A flat one (no rising
    range) says so with the targets and the achieved returns measured: the target does not steer
    the checkpoint, and its reliable maximum (the lowest target) marks no point where a rise
    stopped.
    """
    rng = record["rising_range"]
    if rng is None:
        means = record["means"]
        return (f"achieved return does not rise with the target: targets {record['targets'][0]:g} "
                f"to {record['targets'][-1]:g} all achieve {min(means):.1f} to {max(means):.1f} "
                "(no rise beyond the noise margin), so the target does not steer this checkpoint; "
                f"reliable maximum target recorded as the lowest, "
                f"{record['reliable_max_target']:g}")
    return (f"reliable maximum target {record['reliable_max_target']:g} (achieved "
            f"{record['achieved_at_reliable_max']:.1f}); achieved return rises with the target "
            f"from {rng[0]:g} to {rng[1]:g}"
            + ("" if record["saturated"] else "; still rising at the top of the sweep"))


# ---- evaluation without an environment -----------------------------------------------------------
def offline_evaluation(model, info, episodes: EpisodeSet, *, buckets: int = 4, windows: int = 10_000,
                       seed: int = 0, swap_quantiles: tuple[float, float] = (0.1, 0.9),
                       batch_size: int = 256, device: str = "cpu") -> dict:
    """Action error and return sensitivity of ``model`` on ``episodes``' windows; no env is made.

    Windows are the training sampler's (K steps ending at a transition, left-padded), ending at
    ``windows`` transitions drawn without replacement with ``seed`` (0: every transition), on
    ``device`` (``dtlab.runtime.resolve_device``: ConfigError for one this machine lacks). Each is
    scored at its last step, the prediction a rollout acts on:

    - error: squared error of the predicted action in the model's [-1, 1] units, mean over action
      dimensions (continuous), or whether the most likely action is the dataset's (discrete:
      accuracy); overall and per return-to-go bucket (``buckets`` quantile bins of the windows'
      last returns-to-go, in the data's units);
    - swap: every window's returns-to-go shifted so that its last one equals the low, then the
      high ``swap_quantiles`` quantile of the windows' last returns-to-go (as
      ``DTPolicy.steer`` shifts a context); mean |action(high) - action(low)| in [-1, 1] units
      (continuous), or the fraction of windows whose most likely action changes (discrete).
      About 0: the policy ignores the return it is asked for.

    Raises DatasetError when the data does not fit the checkpoint (observation or action
    dimensions, kind of actions, episodes longer than the model's max_ep_len).
    """
    import torch

    from dtlab.data.sampling import SequenceSampler

    device = runtime.resolve_device(device)
    src = episodes.source
    if isinstance(episodes.observation_space, DictObservations) and \
            isinstance(info.observation_space, DictObservations):  # the checkpoint's keys
        episodes = episodes.select_observation_keys(info.observation_space.keys)
    data_actions, ckpt_actions = episodes.action_space, info.action_space
    fits = (episodes.observation_space == info.observation_space
            and type(data_actions) is type(ckpt_actions)
            and (data_actions.n <= ckpt_actions.n if isinstance(ckpt_actions, DiscreteActions)
                 else data_actions.dim == ckpt_actions.dim))
    if not fits:
        raise DatasetError(
            f"{src}: observations {describe_observations(episodes.observation_space)} and actions "
            f"{data_actions} do not fit the checkpoint's "
            f"{describe_observations(info.observation_space)} and {ckpt_actions}")
    longest = int(episodes.episode_lengths.max())
    if longest > info.model.max_ep_len:
        raise DatasetError(f"{src}: an episode has {longest} steps, more than the model's "
                           f"max_ep_len={info.model.max_ep_len}")
    k = info.model.context_len
    continuous = isinstance(ckpt_actions, ContinuousActions)
    sampler = SequenceSampler(episodes, k, info.normalizer)
    n_all = episodes.num_transitions
    if windows and windows < n_all:
        ends = np.sort(np.random.default_rng(seed).choice(n_all, size=windows, replace=False))
    else:
        ends = np.arange(n_all)
    rtg_last = episodes.returns_to_go[ends].astype(np.float64)  # (W,) in the data's units
    low, high = (float(q) for q in np.quantile(rtg_last, swap_quantiles))
    error = np.empty(ends.size)  # (W,) squared error, or 1.0 for a correct discrete action
    delta = np.empty(ends.size)  # (W,) |action(high) - action(low)|, or 1.0 if it changed
    model.eval()
    with torch.inference_mode():
        for first in range(0, ends.size, batch_size):
            batch = sampler.gather(ends[first:first + batch_size])
            t = {name: torch.from_numpy(getattr(batch, name)).to(device) for name in
                 ("observations", "actions", "returns_to_go", "timesteps", "masks")}
            if t["observations"].dtype == torch.uint8:  # frame stacks: scaled on the device
                t["observations"] = info.normalizer.converted(
                    lambda a: torch.tensor(a, device=device)).normalize_observations_(
                    t["observations"].to(torch.float32))
            args = (t["observations"], t["actions"])
            rest = (t["timesteps"], t["masks"])
            pred = model.predict_last(*args, t["returns_to_go"], *rest).float()  # (b, A)
            shifted = []
            for value in (low, high):
                rtg = t["returns_to_go"] - t["returns_to_go"][:, -1:] + value / info.normalizer.return_scale
                rtg = torch.where(t["masks"][..., None], rtg, 0.0)  # padding stays 0
                shifted.append(model.predict_last(*args, rtg, *rest).float())  # (b, A)
            rows = slice(first, first + pred.shape[0])
            target = t["actions"][:, -1]  # (b, A) in [-1, 1], or (b,) indices
            if continuous:
                error[rows] = (pred - target).pow(2).mean(-1).cpu().numpy()
                delta[rows] = (shifted[1] - shifted[0]).abs().mean(-1).cpu().numpy()
            else:
                error[rows] = (pred.argmax(-1) == target).double().cpu().numpy()
                delta[rows] = (shifted[1].argmax(-1) != shifted[0].argmax(-1)).double().cpu().numpy()
    edges = np.quantile(rtg_last, np.linspace(0.0, 1.0, buckets + 1))  # (buckets + 1,)
    bucket = np.clip(np.searchsorted(edges[1:-1], rtg_last, side="right"), 0, buckets - 1)
    metric = "mse" if continuous else "accuracy"
    rows = []
    for b in range(buckets):
        inside = bucket == b
        rows.append({"rtg_low": float(edges[b]), "rtg_high": float(edges[b + 1]),
                     "windows": int(inside.sum()),
                     metric: float(error[inside].mean()) if inside.any() else None})
    swap_metric = "mean_abs_delta" if continuous else "changed_fraction"
    return {"dataset": str(src), "windows": int(ends.size), "context_len": k,
            "architecture": info.model.architecture, "metric": metric,
            metric: float(error.mean()), "buckets": rows,
            "swap": {"low_quantile": float(swap_quantiles[0]),
                     "high_quantile": float(swap_quantiles[1]), "low_rtg": low, "high_rtg": high,
                     swap_metric: float(delta.mean())}}


def evaluate_offline(cfg: EvalConfig, echo: bool = False) -> dict:
    """``dtlab evaluate CKPT --offline [--dataset FILE]``: ``offline_evaluation`` with JSON out and
    a table, on ``--dataset`` or by default the checkpoint's own training file (refused when its
    content changed since). Raises CheckpointError, ConfigError (data recorded in another env,
    changed training data) or DatasetError before anything is written."""
    from dtlab.data.formats import load_episodes

    path, info = checkpoint.load_info(cfg.checkpoint)
    trained_on = info.dataset.get("path")
    if cfg.dataset is None:  # the training data, and only if it is still the same
        if not isinstance(trained_on, str) or trained_on.startswith("<"):
            raise ConfigError(f"{path}: the checkpoint records no dataset file; pass --dataset")
        episodes = load_episodes(trained_on)
        recorded = info.dataset.get("fingerprint")
        if recorded and episodes.fingerprint() != recorded:
            raise ConfigError(f"{trained_on}: not the data {path} was trained on (its content "
                              "changed since); pass --dataset to evaluate on it anyway")
    else:
        episodes = load_episodes(cfg.dataset)
        check_same_env(episodes.provenance.env_id, info.env_id, what=cfg.dataset,
                       advice=f"pass --dataset with data from {info.env_id}")
    device = runtime.setup(cfg.device, cfg.threads, default_threads=os.cpu_count() or 1)
    model = checkpoint.load_weights(path, info, device)
    data = {"checkpoint": str(path), "seed": cfg.seed, **offline_evaluation(
        model, info, episodes, buckets=cfg.buckets, windows=cfg.windows, seed=cfg.seed,
        swap_quantiles=cfg.swap_quantiles, device=str(device))}
    if echo:
        _print_offline(data)
    if cfg.out:
        write_json(cfg.out, data)
        if echo:
            print(f"wrote {cfg.out}")
    return data


def _print_offline(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = data["metric"]
    name = "action MSE ([-1, 1] units)" if metric == "mse" else "action accuracy"
    table = Table(title=f"{data['checkpoint']} on {data['dataset']}: {data['windows']} windows "
                        f"of {data['context_len']} steps, no env")
    table.add_column("return-to-go bucket", justify="right")
    table.add_column("windows", justify="right")
    table.add_column(name, justify="right")
    for row in data["buckets"]:
        value = "-" if row[metric] is None else f"{row[metric]:.4f}"
        table.add_row(f"{row['rtg_low']:.1f} .. {row['rtg_high']:.1f}", str(row["windows"]), value)
    table.add_row("all", str(data["windows"]), f"{data[metric]:.4f}")
    console = Console()
    console.print(table)
    swap = data["swap"]
    if metric == "mse":
        what = f"mean |delta action| {swap['mean_abs_delta']:.4f} ([-1, 1] units)"
    else:
        what = f"most likely action changes in {100 * swap['changed_fraction']:.1f}% of windows"
    console.print(f"return-to-go swapped from {swap['low_rtg']:.1f} (quantile "
                  f"{swap['low_quantile']:g}) to {swap['high_rtg']:.1f} (quantile "
                  f"{swap['high_quantile']:g}): {what}")
