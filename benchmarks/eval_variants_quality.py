"""Score impact of the approximate/low-precision rollout options on a trained model.

    python benchmarks/eval_variants_quality.py CKPT_DIR [--episodes 20] [--targets ...]

Evaluates the checkpoint at its targets with exact fp32 rollouts, --precision bf16, --kv-cache and
both, on the same start states, and prints mean achieved return per target and the largest
per-episode return difference from exact, as JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import dtlab  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--targets", type=float, nargs="+")
    args = parser.parse_args()
    import torch

    from dtlab.envs import env_info
    from dtlab.rollout import rollout
    from dtlab.policy import DTPolicy

    torch.set_num_threads(1)
    base = DTPolicy.from_checkpoint(args.checkpoint)
    env_id = base.info.env_id
    targets = args.targets or list(env_info(env_id).targets)
    summary, exact = {"env": env_id, "targets": targets, "episodes": args.episodes}, None
    for name, kw in (("exact_fp32", {}), ("bf16", {"precision": "bf16"}), ("kv_cache", {"kv_cache": True}),
                     ("kv_cache_bf16", {"precision": "bf16", "kv_cache": True})):
        policy = DTPolicy(base.model, base.info, precision=kw.get("precision", "fp32"),
                          kv_cache=kw.get("kv_cache", False))
        report = rollout(policy, env_id, targets, args.episodes, seed=1000)
        results, stats = report.results, report.timing()
        returns = np.array([r.returns for r in results])  # (targets, episodes)
        exact = returns if exact is None else exact
        summary[name] = {"mean": [round(float(m), 1) for m in returns.mean(1)],
                        "std": [round(float(s), 1) for s in returns.std(1)],
                        "max_abs_episode_diff_vs_exact": round(float(np.abs(returns - exact).max()), 2),
                        "env_steps_per_s": round(stats["env_steps_per_s"], 1)}
        print(name, json.dumps(summary[name]), flush=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
