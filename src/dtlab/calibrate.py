"""Calibration of a checkpoint's return conditioning (``dtlab calibrate``): sweep targets over the
data's episode returns, find the reliable maximum target (where the achieved return stops rising
with the target, beyond a noise margin), store it in the checkpoint (calibration.json, read by
``DTPolicy.from_checkpoint`` and the deploy runtime) and draw achieved vs target."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Sequence

import numpy as np
import tyro

from dtlab import checkpoint, runtime
from dtlab.atomic import check_writable
from dtlab.config import MAX_SEED, check_number
from dtlab.data.episodes import EpisodeSet
from dtlab.data.records import ReturnStats
from dtlab.errors import ConfigError, DtlabWarning
from dtlab.envs import env_info
from dtlab.evaluate import dataset_label, run_label, sweep_targets
from dtlab.policy import DTPolicy
from dtlab.rollout import check_env, rollout
from dtlab.rundir import one_writer

__all__ = ["CalibrateConfig", "Calibration", "reliable_maximum", "calibration_targets",
           "calibrate_checkpoint", "calibration_summary"]


@dataclass(frozen=True)
class CalibrateConfig:
    """Return-conditioning calibration of a checkpoint: sweep targets over the data's returns, find
    where the achieved return stops rising with the target, and store that reliable maximum
    target in the checkpoint (calibration.json), so that asking for more warns."""

    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT_DIR")]
    """Checkpoint directory (a run directory resolves to its latest checkpoint)."""
    points: int = 10
    """Targets in the sweep: evenly spaced from the data's lowest episode return to 50% of the
    return range past its best (1.5x the best when the lowest return is 0), and no higher than
    the most the env can return where it is bounded (Pendulum-v1: 0)."""
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


def calibration_targets(dataset_return: ReturnStats, points: int,
                        ceiling: float | None = None) -> list[float]:
    """``points`` targets from the data's lowest episode return to 50% of its return range past
    the best (1.5x the best when the lowest return is 0), no higher than ``ceiling`` (the most
    the env can return, where it is bounded), rounded to 0.1 (``sweep_targets``)."""
    return sweep_targets(dataset_return, points, past=0.5, ceiling=ceiling)


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
    checked = check_env(info.env_id, info, cfg.max_steps, what=f"checkpoint {path}",
                        advice=f"it was trained on {info.env_id} itself: another version of "
                        "Gymnasium or of the env's package; calibrate it with the versions it was "
                        "trained with")
    episode_returns = (episodes.episode_returns.tolist() if episodes is not None
                       else _recorded_episode_returns(info.dataset.get("path")))
    targets = calibration_targets(dataset_return, cfg.points, env_info(info.env_id).max_return)
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
