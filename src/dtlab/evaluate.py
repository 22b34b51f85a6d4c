"""Return-conditioned rollouts: every episode of every target advances together.

One batched forward pass per environment step serves all unfinished episodes of all targets.
Episode i of every target starts from the same state (env seed ``seed + i``), so targets are
compared on paired starts.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dtlab.data.returns import normalized_score
from dtlab.envs import env_info, make_env
from dtlab.errors import ConfigError
from dtlab.policy import DTPolicy
from dtlab.spaces import check_against_env


@dataclass(frozen=True)
class TargetResult:
    """Outcome of all episodes conditioned on one target return."""

    target: float
    returns: list[float]
    lengths: list[int]
    mean: float
    std: float
    normalized_mean: float | None  # D4RL normalized score of the mean return, when defined
    normalized_std: float | None


def rollout(policy: DTPolicy, env_id: str, targets: Sequence[float], episodes: int, *,
            seed: int = 0, max_steps: int | None = None, max_parallel: int = 256
            ) -> tuple[list[TargetResult], dict]:
    """Run ``episodes`` episodes per target; returns per-target results and timing stats.

    Up to ``max_parallel`` episodes run at once (each in its own env, stepped in lockstep, one
    batched forward per step); more run in successive waves that reuse the same envs.
    """
    n = len(targets) * episodes
    if n == 0:
        raise ConfigError("rollout needs at least one target and one episode")
    # Episode j runs target j // episodes from start state seed + j % episodes.
    target_of = np.repeat(np.asarray(targets, dtype=np.float32), episodes)  # (n,)
    start_seed = seed + np.arange(n) % episodes  # (n,)
    envs = [make_env(env_id) for _ in range(min(n, max_parallel))]
    check_against_env(envs[0], policy.info.observation_space, policy.info.action_space,
                      what="the checkpoint", exact_n=True)
    limit = max_steps if max_steps is not None else (
        (envs[0].spec.max_episode_steps if envs[0].spec else None) or 1000)
    returns = np.zeros(n)
    lengths = np.zeros(n, dtype=np.int64)
    env_steps, model_time, started = 0, 0.0, time.perf_counter()
    for first in range(0, n, len(envs)):
        wave = np.arange(first, min(n, first + len(envs)))  # episode ids of this wave
        steps, seconds = _run_wave(policy, envs, wave, target_of, start_seed, limit, returns, lengths)
        env_steps += steps
        model_time += seconds
    for env in envs:
        env.close()
    elapsed = time.perf_counter() - started
    info = env_info(env_id)
    ref_min = policy.info.ref_min_score if policy.info.ref_min_score is not None else info.ref_min_score
    ref_max = policy.info.ref_max_score if policy.info.ref_max_score is not None else info.ref_max_score
    results = []
    for i, target in enumerate(targets):
        ret = returns[i * episodes:(i + 1) * episodes]
        norm = None if ref_min is None else normalized_score(ret, ref_min, ref_max)
        results.append(TargetResult(
            target=float(target), returns=ret.tolist(),
            lengths=lengths[i * episodes:(i + 1) * episodes].tolist(),
            mean=float(ret.mean()), std=float(ret.std()),
            normalized_mean=None if norm is None else float(norm.mean()),
            normalized_std=None if norm is None else float(norm.std()),
        ))
    stats = {"env_steps": int(env_steps), "seconds": elapsed,
             "env_steps_per_s": env_steps / max(elapsed, 1e-9), "model_seconds": model_time}
    return results, stats


def _run_wave(policy: DTPolicy, envs: list, wave: np.ndarray, target_of: np.ndarray,
              start_seed: np.ndarray, limit: int, returns: np.ndarray, lengths: np.ndarray
              ) -> tuple[int, float]:
    """Run episodes ``wave`` (slot i of the wave in envs[i]) to the end; fills returns/lengths."""
    m = wave.size
    obs = np.stack([envs[i].reset(seed=int(start_seed[j]))[0] for i, j in enumerate(wave)])  # (m, S)
    for i, j in enumerate(wave):
        envs[i].action_space.seed(int(start_seed[j]))
    policy.reset(target_of[wave])
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
        for row, i in enumerate(active):
            o, r, terminated, truncated, _ = envs[i].step(actions[row])
            obs[i], rewards[i] = o, r
            returns[wave[i]] += r
            lengths[wave[i]] += 1
            if not (terminated or truncated):
                still.append(i)
        env_steps += active.size
        active = np.asarray(still, dtype=np.int64)
    return env_steps, model_time


def sweep_targets(dataset_stats: dict, points: int) -> list[float]:
    """Targets from the dataset's lowest episode return to 1.2x past its highest."""
    lo, hi = dataset_stats["min"], dataset_stats["max"]
    return np.linspace(lo, hi + 0.2 * abs(hi - lo), points).round(1).tolist()


def results_json(results: list[TargetResult], stats: dict, *, checkpoint: str, env_id: str,
                 episodes: int, seed: int, dataset: dict) -> dict:
    return {
        "checkpoint": checkpoint, "env": env_id, "episodes_per_target": episodes, "seed": seed,
        "dataset_return": dataset.get("episode_return"),
        "results": [asdict(r) for r in results], "timing": stats,
    }


def write_json_atomic(path: str | Path, data: dict) -> None:
    from dtlab.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2))


def print_table(results: list[TargetResult], *, title: str, dataset_return: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("target", justify="right")
    table.add_column("achieved (mean ± std)", justify="right")
    table.add_column("normalized", justify="right")
    table.add_column("episodes", justify="right")
    for r in results:
        norm = "-" if r.normalized_mean is None else f"{r.normalized_mean:.1f} ± {r.normalized_std:.1f}"
        table.add_row(f"{r.target:g}", f"{r.mean:.1f} ± {r.std:.1f}", norm, str(len(r.returns)))
    console = Console()
    console.print(table)
    if dataset_return:
        console.print(f"dataset episode return: mean {dataset_return['mean']:.1f}, "
                      f"max {dataset_return['max']:.1f}")


def evaluate_checkpoint(cfg, echo: bool = False) -> dict:
    """Evaluate ``cfg.checkpoint`` (an EvalConfig) and write JSON/plot; returns the results dict."""
    from dtlab import checkpoint
    from dtlab.atomic import check_writable
    from dtlab.train import resolve_device, set_threads

    if cfg.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {cfg.episodes}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {cfg.max_steps}")
    if cfg.sweep and cfg.sweep_points < 2:
        raise ConfigError(f"--sweep-points must be >= 2, got {cfg.sweep_points}")
    for out_path in (cfg.out, cfg.plot):
        if out_path:
            check_writable(out_path)
    path, info = checkpoint.load_info(cfg.checkpoint)
    env_id = cfg.env or info.env_id
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        # Rollouts alternate small forwards with env steps on one core; one thread avoids
        # spin-waiting threads fighting the simulator for the CPU.
        set_threads(cfg.threads, default=1)
    # Check the env before loading weights, so an unknown env id fails fast.
    env = make_env(env_id)
    check_against_env(env, info.observation_space, info.action_space, what=f"checkpoint {path}",
                      exact_n=True)
    env.close()
    dataset_return = info.dataset.get("episode_return")
    if cfg.sweep:
        if not dataset_return:
            raise ConfigError(f"{path}: checkpoint has no dataset return statistics for --sweep")
        targets = sweep_targets(dataset_return, cfg.sweep_points)
    else:
        targets = list(cfg.targets) or list(env_info(env_id).targets)
    if not targets:
        raise ConfigError(f"no --targets given and no default targets known for {env_id}")
    policy = DTPolicy.from_checkpoint(path, device=str(device), precision=cfg.precision,
                                      kv_cache=cfg.kv_cache)
    results, stats = rollout(policy, env_id, targets, cfg.episodes, seed=cfg.seed,
                             max_steps=cfg.max_steps)
    data = results_json(results, stats, checkpoint=str(path), env_id=env_id,
                        episodes=cfg.episodes, seed=cfg.seed, dataset=info.dataset)
    if echo:
        print_table(results, title=f"{env_id}, {cfg.episodes} episodes per target "
                                   f"({stats['env_steps_per_s']:.0f} env steps/s)",
                    dataset_return=dataset_return)
    if cfg.out:
        write_json_atomic(cfg.out, data)
    plot = cfg.plot or (str(Path(cfg.out).with_suffix(".png")) if cfg.out and cfg.sweep else None)
    if cfg.sweep and plot is None:
        plot = "sweep.png"
    if plot:
        from dtlab.plots import achieved_vs_target

        achieved_vs_target(results, plot, title=f"{env_id}: achieved vs target return",
                           dataset_return=dataset_return)
        data["plot"] = plot
    if echo and (cfg.out or plot):
        print("wrote " + ", ".join(p for p in (cfg.out, plot) if p))
    return data
