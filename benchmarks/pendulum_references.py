"""The Pendulum-v1 reference returns, quality table and collection timings quoted in dtlab.

    python benchmarks/pendulum_references.py

Prints: the mean return of the random policy and of the scripted controller over 100 episodes
(seed 0; ``PENDULUM_RANDOM_RETURN`` / ``PENDULUM_SCRIPTED_RETURN`` in src/dtlab/envs.py); the
return of ``PendulumSwingUp`` at qualities 0, 0.1, ..., 1 over 50 episodes (its docstring); the
quickstart dataset's return spread per 200-wide bin (``pendulum_mixed_dataset``'s docstring); and
the time to collect 20,000 random Hopper-v5 steps.
"""

from __future__ import annotations

import time

import numpy as np

from dtlab.behaviour.policies import RandomPolicy
from dtlab.behaviour.scripted import PendulumSwingUp, pendulum_mixed_dataset
from dtlab.collect import collect_episodes

PENDULUM = "Pendulum-v1"


def references() -> None:
    for label, policy in (("random", RandomPolicy.for_env(PENDULUM)),
                          ("scripted quality=1", PendulumSwingUp(1.0))):
        ret = collect_episodes(PENDULUM, policy, num_episodes=100, seed=0).episode_returns
        print(f"{PENDULUM} {label:>18}: mean {ret.mean():8.1f}  std {ret.std():6.1f}  "
              f"(100 episodes, seed 0)")


def quality_table() -> None:
    print("\nquality -> episode return over 50 episodes (seed 0)")
    print(f"{'quality':>8} {'mean':>8} {'std':>7} {'min':>8} {'max':>8}")
    for quality in np.linspace(0.0, 1.0, 11):
        policy = PendulumSwingUp(float(quality))
        ret = collect_episodes(PENDULUM, policy, num_episodes=50, seed=0).episode_returns
        print(f"{quality:8.1f} {ret.mean():8.1f} {ret.std():7.1f} {ret.min():8.1f} "
              f"{ret.max():8.1f}")


def mixed_dataset() -> None:
    start = time.perf_counter()
    mixed = pendulum_mixed_dataset()
    seconds = time.perf_counter() - start
    ret = mixed.episode_returns
    print(f"\npendulum_mixed_dataset(): {mixed.num_episodes} episodes, {mixed.num_transitions} "
          f"steps in {seconds:.2f} s; return mean {ret.mean():.1f} std {ret.std():.1f} "
          f"min {ret.min():.1f} max {ret.max():.1f}")
    counts, edges = np.histogram(ret, bins=np.arange(-2000.0, 1.0, 200.0))
    print("  episodes per return bin: "
          + "  ".join(f"[{lo:.0f},{lo + 200:.0f}):{c}" for lo, c in zip(edges, counts)))


def hopper_timing() -> None:
    policy = RandomPolicy.for_env("Hopper-v5")
    start = time.perf_counter()
    data = collect_episodes("Hopper-v5", lambda i: policy, num_transitions=20000, seed=0)
    seconds = time.perf_counter() - start
    print(f"\nHopper-v5 random, 20000 steps: {data.num_episodes} episodes in {seconds:.2f} s; "
          f"return mean {data.episode_returns.mean():.1f}")


if __name__ == "__main__":
    references()
    quality_table()
    mixed_dataset()
    hopper_timing()
