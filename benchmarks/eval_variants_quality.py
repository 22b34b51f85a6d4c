"""Score impact of the approximate/low-precision rollout options on a trained model.

    python benchmarks/eval_variants_quality.py CKPT_DIR [--episodes 20] [--targets ...] [--max-steps N]

First an exact fp32 rollout, the reference; then, each in its own rollout from the same start
states, exact fp32 again, --precision bf16, --kv-cache and both. Prints each variant's mean
achieved return per target and its largest per-episode return difference from the reference, as
JSON. The second exact rollout's difference is 0 when rollouts are reproducible; with --max-steps
at most the model's context_len, the kv-cache rollouts' are float rounding only (its cache holds
the whole episode, so it computes what the exact rollout does).
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
    parser.add_argument("--max-steps", type=int, help="cap on steps per episode (default: the env's)")
    args = parser.parse_args()
    import torch

    from dtlab.envs import env_info
    from dtlab.rollout import rollout
    from dtlab.policy import DTPolicy

    torch.set_num_threads(1)
    base = DTPolicy.from_checkpoint(args.checkpoint)
    env_id = base.info.env_id
    targets = args.targets or list(env_info(env_id).targets)
    summary = {"env": env_id, "targets": targets, "episodes": args.episodes,
               "max_steps": args.max_steps, "context_len": base.context_len}

    def returns_of(precision: str, kv_cache: bool) -> tuple[np.ndarray, dict]:
        """One rollout of its own: returns (targets, episodes) and its timing."""
        policy = DTPolicy(base.model, base.info, precision=precision, kv_cache=kv_cache)
        report = rollout(policy, env_id, targets, args.episodes, seed=1000, max_steps=args.max_steps)
        return np.array([r.returns for r in report.results]), report.timing()

    reference, _ = returns_of("fp32", False)  # the exact rollout every variant is compared with
    for name, precision, kv_cache in (("exact_fp32", "fp32", False), ("bf16", "bf16", False),
                                      ("kv_cache", "fp32", True), ("kv_cache_bf16", "bf16", True)):
        returns, stats = returns_of(precision, kv_cache)
        summary[name] = {"mean": [round(float(m), 1) for m in returns.mean(1)],
                        "std": [round(float(s), 1) for s in returns.std(1)],
                        "max_abs_episode_diff_vs_exact": float(np.abs(returns - reference).max()),
                        "env_steps_per_s": round(stats["env_steps_per_s"], 1)}
        print(name, json.dumps(summary[name]), flush=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
