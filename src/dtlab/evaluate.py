"""Evaluate a checkpoint (``dtlab evaluate``): batched return-conditioned rollouts (dtlab.rollout)
at chosen targets or a sweep, a results table, strict-JSON results and an achieved-vs-target
plot. Calibration lives in ``dtlab.calibrate``, evaluation without an env (``--offline``) in
``dtlab.offline_eval``."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

from dtlab import checkpoint, runtime
from dtlab.atomic import check_writable, write_json
from dtlab.config import MAX_SEED, PRECISIONS, check_choice, check_number, check_targets
from dtlab.data.records import Provenance, ReturnStats
from dtlab.envs import check_same_env, env_info
from dtlab.errors import ConfigError
from dtlab.metrics import TargetResult
from dtlab.offline_eval import offline_evaluation, print_offline
from dtlab.policy import DTPolicy
from dtlab.rollout import RolloutReport, check_env, default_targets, rollout

# ---- the command's config -----------------------------------------------------------------------
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
    range past its highest, no higher than the most the env can return where it is bounded)
    and draw achieved vs target return."""
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


__all__ = ["EvalConfig", "evaluate_checkpoint", "rollout", "sweep_targets", "results_json",
           "TargetResult", "RolloutReport"]


def sweep_targets(dataset_return: ReturnStats, points: int, *, past: float = 0.2,
                  ceiling: float | None = None) -> list[float]:
    """``points`` targets evenly spaced from the dataset's lowest episode return to ``past``
    times its return range past its highest (all episodes alike: that times max(|best|, 1)),
    and no higher than ``ceiling``, the most the env can return where it is bounded
    (``EnvInfo.max_return``); rounded to 0.1, duplicates dropped."""
    lo, hi = dataset_return.min, dataset_return.max
    span = hi - lo if hi > lo else max(abs(hi), 1.0)  # all episodes alike: spread around them
    top = hi + past * span if ceiling is None else max(hi, min(hi + past * span, ceiling))
    return np.unique(np.linspace(lo, top, points).round(1)).tolist()


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
                                  f"episode{'s' * (cfg.episodes != 1)} per target "
                                  f"({report.env_steps_per_s:.0f} env steps/s)",
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
        return sweep_targets(dataset_return, cfg.sweep_points,
                             ceiling=env_info(env_id).max_return)
    if cfg.targets:
        return list(cfg.targets)
    chosen, why = default_targets(env_id, dataset_return, checkpoint.reliable_max_target(path))
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


def evaluate_offline(cfg: EvalConfig, echo: bool = False) -> dict:
    """``dtlab evaluate CKPT --offline [--dataset FILE]``: ``offline_evaluation`` with JSON out and
    a table, on ``--dataset`` or by default the checkpoint's own training file (refused when its
    content changed since). Raises CheckpointError, ConfigError (data recorded in another env,
    changed training data) or DatasetError before anything is written."""
    from dtlab.data.formats import load_episodes, missing_file

    path, info = checkpoint.load_info(cfg.checkpoint)
    trained_on = info.dataset.get("path")
    if cfg.dataset is None:  # the training data, and only if it is still the same
        if not isinstance(trained_on, str) or trained_on.startswith("<"):
            raise ConfigError(f"{path}: the checkpoint records no dataset file; pass --dataset")
        if (missing := missing_file(trained_on)) is not None:
            raise ConfigError(f"{path}: the dataset it was trained on, {missing}, is not there; "
                              "pass --dataset PATH where it is now")
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
        print_offline(data)
    if cfg.out:
        write_json(cfg.out, data)
        if echo:
            print(f"wrote {cfg.out}")
    return data
