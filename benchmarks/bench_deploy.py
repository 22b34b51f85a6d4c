"""Deploy artifact speed: onnxruntime (dtlab.deploy) vs DTPolicy, per step, on the CPU.

    python benchmarks/bench_deploy.py [RUN] [--steps 300] [--repeats 3]
        [--interleave step|episode] [--json out.json]

RUN is a dtlab run or checkpoint directory (default: a model of the DT paper's gym size, embed
128, 3 layers, K = 20, random weights, saved to a temporary directory); it is exported to a
temporary artifact first. Both policies run at one thread (torch.set_num_threads(1);
onnxruntime intra_op_num_threads=1) in the same process, in lockstep (both act on each step's
observation, the order alternating step by step), over the same observations (Hopper-v5 dataset
observations, datasets/hopper-medium-replay-v5.hdf5, in their order, with their rewards), each
episode --steps long so that most steps have a full window:

  latency_b1   per-step latency of act() at batch 1 (the robot's case): p50 and p99 over
               --steps steps x --repeats episodes, in microseconds
  steps_b64    env steps per second at batch 64 (64 episodes advancing together; policy time
               only, no simulator): 64 x steps / time, best of --repeats

--interleave step (default) interleaves the two policies step by step; --interleave episode runs
each policy's episode whole, the order flipped from one repeat to the next (see run_episodes).

The goal (issue 24): the artifact's p50 at batch 1 at most half of DTPolicy's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets" / "hopper-medium-replay-v5.hdf5"


def paper_size_run(tmp: Path) -> Path:
    """A Hopper-v5 checkpoint of the DT paper's gym size with random weights."""
    from dtlab import checkpoint
    from dtlab.checkpoint import PolicyInfo
    from dtlab.config import ModelConfig
    from dtlab.baselines import build_model
    from dtlab.normalizer import Normalizer
    from dtlab.spaces import ContinuousActions, VectorObservations

    cfg = ModelConfig()  # embed 128, 3 layers, 1 head, K = 20, max_ep_len 1000
    obs, act = VectorObservations(11), ContinuousActions(3, (-1.0,) * 3, (1.0,) * 3)
    info = PolicyInfo(cfg, obs, act, Normalizer([0.0] * 11, [1.0] * 11, 1000.0, act.low, act.high),
                      "Hopper-v5")
    checkpoint.save(tmp / "run", "step_00000000", build_model(cfg, obs, act), info)
    return tmp / "run"


def episode_inputs(steps: int, batch: int):
    """(steps, batch, 11) observations and (steps, batch) rewards from the dataset: episode i of
    the batch reads the transitions from offset i * steps on."""
    import h5py

    with h5py.File(DATA) as f:
        obs = f["observations"][: steps * batch].astype(np.float32)
        rew = f["rewards"][: steps * batch].astype(np.float32)
    return (obs.reshape(batch, steps, -1).transpose(1, 0, 2).copy(),
            rew.reshape(batch, steps).T.copy())


def run_episodes(policies: dict, obs, rew, targets, times: dict | None = None,
                 interleave: str = "step", flip: bool = False) -> dict:
    """One episode of every policy. ``interleave="step"``: in lockstep, at each step every policy
    acts on the same observation, the order alternating step by step, so that all see the same
    machine conditions (other jobs on the machine move single-step times by 2-3x), at the price
    of each evicting the other's weights from the caches between two of its steps.
    ``interleave="episode"``: one whole episode per policy, one after the other (the order
    reversed with ``flip``), as each would run alone. Returns each policy's total seconds;
    ``times`` collects each step's seconds per policy."""
    total = {name: 0.0 for name in policies}
    for policy in policies.values():
        policy.reset(targets)
    names = list(policies)[::-1] if flip else list(policies)
    if interleave == "episode":
        order = [(name, t) for name in names for t in range(obs.shape[0])]
    else:
        order = [(name, t) for t in range(obs.shape[0])
                 for name in (names if t % 2 == 0 else names[::-1])]
    for name, t in order:
        start = time.perf_counter()
        policies[name].act(obs[t], None if t == 0 else rew[t - 1])
        elapsed = time.perf_counter() - start
        total[name] += elapsed
        if times is not None:
            times[name].append(elapsed)
    return total


def measure(policies: dict, results: dict, steps: int, repeats: int, interleave: str) -> None:
    """Per-step latency p50/p99 at batch 1 and the best steps/s at batch 64 into ``results``."""
    obs1, rew1 = episode_inputs(steps, 1)
    latency = {name: [] for name in policies}
    run_episodes(policies, obs1[:20], rew1[:20], [3600.0])  # warm-up
    for i in range(repeats):
        run_episodes(policies, obs1, rew1, [3600.0], latency, interleave, i % 2 == 1)
    for name, times in latency.items():
        us = np.asarray(times) * 1e6
        results[name]["latency_b1_p50_us"] = float(np.percentile(us, 50))
        results[name]["latency_b1_p99_us"] = float(np.percentile(us, 99))

    obs64, rew64 = episode_inputs(steps, 64)
    targets = list(np.linspace(300.0, 3600.0, 64))
    run_episodes(policies, obs64[:5], rew64[:5], targets)  # warm-up
    best = {name: 0.0 for name in policies}
    for i in range(repeats):
        for name, seconds in run_episodes(policies, obs64, rew64, targets, None, interleave,
                                          i % 2 == 1).items():
            best[name] = max(best[name], 64 * steps / seconds)
    for name, rate in best.items():
        results[name]["steps_b64_per_s"] = rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interleave", choices=("step", "episode"), default="step",
                        help="interleave the policies step by step (default) or episode by "
                             "episode (see run_episodes)")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from dtlab.deploy import DeployedPolicy
    from dtlab.export import export_run
    from dtlab.policy import DTPolicy

    tmp = Path(tempfile.mkdtemp(prefix="bench_deploy."))
    run = Path(args.run) if args.run else paper_size_run(tmp)
    artifact = export_run(run, tmp / "artifact")
    policies = {"DTPolicy": DTPolicy.from_checkpoint(run), "artifact": DeployedPolicy(artifact)}
    model = policies["DTPolicy"].info.model
    print(f"model: embed {model.embed_dim}, {model.n_layers} layers, K={model.context_len}; "
          f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}")
    results: dict[str, dict[str, float]] = {name: {} for name in policies}

    measure(policies, results, args.steps, args.repeats, args.interleave)
    a, d = results["artifact"], results["DTPolicy"]
    print(f"{'':10} {'p50 b1 (us)':>12} {'p99 b1 (us)':>12} {'steps/s b64':>12}")
    for name, r in results.items():
        print(f"{name:10} {r['latency_b1_p50_us']:12.0f} {r['latency_b1_p99_us']:12.0f} "
              f"{r['steps_b64_per_s']:12.0f}")
    ratio = a["latency_b1_p50_us"] / d["latency_b1_p50_us"]
    print(f"artifact / DTPolicy p50 at batch 1: {ratio:.2f} (goal <= 0.5); steps/s at batch 64: "
          f"{a['steps_b64_per_s'] / d['steps_b64_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "p50_ratio": ratio,
                                               "steps": args.steps, "repeats": args.repeats,
                                               "interleave": args.interleave},
                                              indent=2))


if __name__ == "__main__":
    sys.exit(main())
