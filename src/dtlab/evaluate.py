"""Evaluate a checkpoint: batched return-conditioned rollouts (dtlab.rollout) at chosen targets
or a sweep, a results table, strict-JSON results and an achieved-vs-target plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from dtlab import checkpoint, runtime
from dtlab.atomic import check_writable, write_json
from dtlab.config import EvalConfig
from dtlab.envs import env_info, make_env
from dtlab.errors import ConfigError
from dtlab.policy import DTPolicy
from dtlab.rollout import RolloutReport, TargetResult, episode_limit, rollout
from dtlab.spaces import check_against_env

__all__ = ["evaluate_checkpoint", "rollout", "sweep_targets", "results_json", "TargetResult",
           "RolloutReport"]


def sweep_targets(dataset_stats: dict, points: int) -> list[float]:
    """Targets from the dataset's lowest episode return to 1.2x past its highest."""
    lo, hi = dataset_stats["min"], dataset_stats["max"]
    return np.linspace(lo, hi + 0.2 * abs(hi - lo), points).round(1).tolist()


def results_json(report: RolloutReport, *, checkpoint: str, env_id: str, episodes: int, seed: int,
                 dataset: dict) -> dict:
    """The results file's content (strict JSON once written by ``atomic.write_json``)."""
    return {
        "checkpoint": checkpoint, "env": env_id, "episodes_per_target": episodes, "seed": seed,
        "max_steps": report.max_steps, "standard_time_limit": report.standard_time_limit,
        "normalized_scores_comparable": report.comparable,
        "dataset_return": dataset.get("episode_return"),
        "results": [asdict(r) for r in report.results], "timing": report.timing(),
    }


def print_table(report: RolloutReport, *, title: str, dataset_return: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("target", justify="right")
    table.add_column("achieved (mean ± std)", justify="right")
    table.add_column("normalized", justify="right")
    table.add_column("episodes", justify="right")
    for r in report.results:
        norm = "-" if r.normalized_mean is None else f"{r.normalized_mean:.1f} ± {r.normalized_std:.1f}"
        table.add_row(f"{r.target:g}", f"{r.mean:.1f} ± {r.std:.1f}", norm, str(len(r.returns)))
    console = Console()
    console.print(table)
    if not report.comparable and report.standard_time_limit is not None:
        console.print(f"episodes cut at {report.max_steps} steps, not the env's standard "
                      f"{report.standard_time_limit}: no normalized scores")
    if dataset_return:
        console.print(f"dataset episode return: mean {dataset_return['mean']:.1f}, "
                      f"max {dataset_return['max']:.1f}")


def evaluate_checkpoint(cfg: EvalConfig, echo: bool = False) -> dict:
    """Evaluate ``cfg.checkpoint`` and write JSON/plot; returns the results dict.

    Raises CheckpointError (unreadable checkpoint), EnvError (unknown env, spaces differ) or
    ConfigError (no targets, episodes longer than the model's max_ep_len, unwritable outputs)
    before any rollout runs.
    """
    for out_path in (cfg.out, cfg.plot):
        if out_path:
            check_writable(out_path)
    path, info = checkpoint.load_info(cfg.checkpoint)
    env_id = cfg.env or info.env_id
    # Rollouts alternate small forwards with env steps on one core; one thread avoids spin-waiting
    # threads fighting the simulator for the CPU.
    device = runtime.setup(cfg.device, cfg.threads, default_threads=1)
    # Check the env before loading weights, so an unknown env id fails fast.
    env = make_env(env_id)
    try:
        check_against_env(env, info.observation_space, info.action_space,
                          what=f"checkpoint {path}", exact_n=True)
        episode_limit(env, env_id, cfg.max_steps, info.model.max_ep_len)
    finally:
        env.close()
    dataset_return = info.dataset.get("episode_return")
    if cfg.sweep:
        if not dataset_return:
            raise ConfigError(f"{path}: checkpoint has no dataset return statistics for sweep")
        targets = sweep_targets(dataset_return, cfg.sweep_points)
    else:
        targets = list(cfg.targets) or list(env_info(env_id).targets)
    if not targets:
        raise ConfigError(f"no targets given and no default targets known for {env_id}")
    policy = DTPolicy.from_checkpoint(path, device=str(device), precision=cfg.precision,
                                      kv_cache=cfg.kv_cache)
    report = rollout(policy, env_id, targets, cfg.episodes, seed=cfg.seed, max_steps=cfg.max_steps)
    data = results_json(report, checkpoint=str(path), env_id=env_id, episodes=cfg.episodes,
                        seed=cfg.seed, dataset=info.dataset)
    if echo:
        print_table(report, title=f"{env_id}, {cfg.episodes} episodes per target "
                                  f"({report.env_steps_per_s:.0f} env steps/s)",
                    dataset_return=dataset_return)
    if cfg.out:
        write_json(cfg.out, data)
    plot = cfg.plot or (str(Path(cfg.out).with_suffix(".png")) if cfg.out and cfg.sweep else None)
    if cfg.sweep and plot is None:
        plot = "sweep.png"
    if plot:
        from dtlab.plots import achieved_vs_target

        achieved_vs_target(report.results, plot, title=f"{env_id}: achieved vs target return",
                           dataset_return=dataset_return)
        data["plot"] = plot
    if echo and (cfg.out or plot):
        print("wrote " + ", ".join(p for p in (cfg.out, plot) if p))
    return data
