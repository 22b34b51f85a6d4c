"""Does bf16 autocast train as well as fp32? Loss curves and return conditioning on real data.

    python benchmarks/bf16_quality.py [--steps 3000] [--seeds 0 1]

Trains the quickstart model on the quickstart's Pendulum-v1 dataset with fp32 and with bf16, for
each seed, and prints the loss at every 500 steps, the steps/s ratio, and the achieved return at the
quickstart's targets (evaluated in fp32 and in bf16), as JSON. "Within noise" means the fp32-bf16
difference is no larger than the difference between seeds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from dtlab.behaviour.scripted import pendulum_mixed_dataset
    from dtlab.config import DataConfig, OptimConfig, RunConfig, TrainConfig
    from dtlab.rollout import rollout
    from dtlab.policy import DTPolicy
    from dtlab.quickstart import MODEL
    from dtlab.train import train

    data = pendulum_mixed_dataset(num_episodes=300, seed=0)
    targets = [round(float(q), -1) + 0.0 for q in np.percentile(data.episode_returns, [10, 40, 70, 100])]
    report = {"targets": targets, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for precision in ("fp32", "bf16"):
                out = f"{tmp}/{precision}-{seed}"
                cfg = TrainConfig(
                    data=DataConfig("<memory>", "Pendulum-v1", return_scale=100.0), model=MODEL,
                    optim=OptimConfig(batch_size=64, lr=1e-3, warmup_steps=300, schedule="cosine",
                                      seed=seed, precision=precision),
                    run=RunConfig(out=out, steps=args.steps, log_every=500,
                                  checkpoint_every=args.steps, progress=False, tensorboard=False,
                                  threads=args.threads))
                t0 = time.perf_counter()
                result = train(cfg, data)
                seconds = time.perf_counter() - t0
                losses = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
                run = {"seed": seed, "precision": precision, "train_seconds": round(seconds, 1),
                       "loss": {r["step"]: round(r["loss"], 5) for r in losses if "loss" in r}}
                for eval_precision in ("fp32", "bf16"):
                    policy = DTPolicy.from_checkpoint(result.checkpoint, precision=eval_precision)
                    results = rollout(policy, "Pendulum-v1", targets, 10, seed=10_000).results
                    run[f"achieved_{eval_precision}_eval"] = [round(r.mean, 1) for r in results]
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
