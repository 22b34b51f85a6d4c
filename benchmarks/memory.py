"""Resident memory (RSS) over a long tiny training run and over thousands of evaluation episodes.

    python benchmarks/memory.py [--train-steps 20000] [--eval-episodes 2000]

Prints start, peak and end RSS (MiB) of each phase as JSON. A flat profile means nothing grows with
the number of steps or episodes (logging, contexts, autograd graphs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class RssMonitor:
    """Samples RSS every ``interval`` seconds in a background thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - t0, rss_mib()))
            time.sleep(interval)

    def __enter__(self) -> "RssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, rss_mib()))

    def summary(self) -> dict:
        values = [v for _, v in self.samples]
        tenth = max(1, len(values) // 10)
        return {"start_mib": round(values[0], 1), "peak_mib": round(max(values), 1),
                "end_mib": round(values[-1], 1),
                "first_10pct_mean_mib": round(sum(values[:tenth]) / tenth, 1),
                "last_10pct_mean_mib": round(sum(values[-tenth:]) / tenth, 1),
                "samples": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-steps", type=int, default=20_000)
    parser.add_argument("--eval-episodes", type=int, default=2_000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from dtlab.behaviour.scripted import pendulum_mixed_dataset
    from dtlab.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
    from dtlab.rollout import rollout
    from dtlab.policy import DTPolicy
    from dtlab.train import train

    episodes = pendulum_mixed_dataset(num_episodes=100, seed=0)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=DataConfig("<memory>", "Pendulum-v1", return_scale=100.0),
            model=ModelConfig(embed_dim=32, n_layers=1, context_len=10, max_ep_len=200),
            optim=OptimConfig(batch_size=16, warmup_steps=100),
            run=RunConfig(out=f"{tmp}/run", steps=args.train_steps, log_every=50,
                          checkpoint_every=5000, progress=False, tensorboard=True, threads=1))
        t0 = time.perf_counter()
        with RssMonitor() as mon:
            result = train(cfg, episodes)
        report["train"] = {"steps": result.steps, "seconds": round(time.perf_counter() - t0, 1),
                           **mon.summary()}
        policy = DTPolicy.from_checkpoint(result.checkpoint)
        t0 = time.perf_counter()
        with RssMonitor() as mon:
            # 2 targets x N/2 episodes, in waves of 256 parallel envs.
            report = rollout(policy, "Pendulum-v1", [-150.0, -700.0], args.eval_episodes // 2)
            results, stats = report.results, report.timing()
        report["evaluate"] = {"episodes": sum(len(r.returns) for r in results),
                              "env_steps": stats["env_steps"],
                              "seconds": round(time.perf_counter() - t0, 1), **mon.summary()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
