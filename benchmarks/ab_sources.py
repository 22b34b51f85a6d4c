"""Old code against new code: the dtlab cases of bench_train.py and bench_eval.py, each side in its
own process with its own ``src`` on PYTHONPATH, the sides alternated (old new, new old, ...).

    git worktree add /tmp/dtlab-old <commit>      # the old code
    python benchmarks/ab_sources.py /tmp/dtlab-old/src src [--rounds 6] [--json out.json]

Cases (1 torch thread; the benchmark scripts' own code, from this checkout's benchmarks/):
  dtlab_step        bench_train's dtlab_step: paper configuration, fp32, pre-built batches
  dtlab_e2e         bench_train's dtlab_e2e: sampling included
  dtlab_rollout     bench_eval's dtlab_rollout: untrained Hopper-v5 DT, exact, fp32
  dtlab_rollout_kv  the same with --kv-cache
  act_exact_b40     DTPolicy.act alone, 40 episodes, the window slid (step > K), exact
  act_kv_b40        the same with kv_cache
Each round runs both sides; a side's rate is the median of its --reps repetitions, and the
reported ratio new/old is the median over rounds of the per-round ratios (with their min-max).
Also checks that both sides dispatch the same aten operators (names, as a multiset) for one
training step, one exact act and one kv-cache act.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(steps: int, episodes: int, reps: int) -> None:
    """Measure the cases with whatever dtlab is on the path; print one JSON line."""
    sys.path.insert(0, str(HERE))
    import dtlab  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
    import numpy as np
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import bench_eval
    import bench_train
    import harness
    from synthetic_hopper import OBS_DIM, synthetic_episodes, untrained_policy

    torch.set_num_threads(1)
    harness.seed_everything(0)
    data, _ = synthetic_episodes(seed=0)
    dt = bench_train.DtlabTrainer(0, data)
    pool = [dt.batch() for _ in range(8)]
    policy = untrained_policy(0)
    policy_kv = type(policy)(policy.model, policy.info, kv_cache=True)
    obs = np.random.default_rng(0).normal(size=(40, OBS_DIM)).astype(np.float32)
    rewards = np.ones(40, np.float32)

    def slid(p):  # a policy whose 40 windows have slid past K
        p.reset(np.full(40, 3600.0, np.float32))
        for _ in range(p.context_len + 5):
            p.act(obs, rewards)

    def act_case(p, calls: int):
        def run():
            slid(p)
            t0 = time.perf_counter()
            for _ in range(calls):
                p.act(obs, rewards)
            return float(calls), time.perf_counter() - t0, {}
        return run

    cases = {
        "dtlab_step": lambda: bench_train.timed(lambda i: dt.step(pool[i % 8]), steps),
        "dtlab_e2e": lambda: bench_train.timed(lambda i: dt.step(dt.batch()), steps),
        "dtlab_rollout": bench_eval.dtlab_case(policy, episodes, 1000, 0),
        "dtlab_rollout_kv": bench_eval.dtlab_case(policy_kv, episodes, 1000, 0),
        "act_exact_b40": act_case(policy, 60),
        "act_kv_b40": act_case(policy_kv, 200),
    }
    for warm in (lambda: bench_train.timed(lambda i: dt.step(pool[i % 8]), 1),
                 bench_eval.dtlab_case(policy, 1, 30, 0), bench_eval.dtlab_case(policy_kv, 1, 30, 0)):
        warm()

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    ops = {}
    for name, run in (("train_step", lambda: dt.step(pool[0])),
                      ("act_exact", lambda: policy.act(obs, rewards)),
                      ("act_kv", lambda: policy_kv.act(obs, rewards))):
        if name != "train_step":
            slid(policy if name == "act_exact" else policy_kv)
        with Ops() as rec:
            run()
        ops[name] = sorted(rec.names)
    rates = harness.alternate(cases, reps, {name: "per s" for name in cases})
    print(json.dumps({"rates": {n: s.rates for n, s in rates.items()}, "ops": ops}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old_src", nargs="?", help="the old code's src directory")
    ap.add_argument("new_src", nargs="?", help="the new code's src directory")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every case per process")
    ap.add_argument("--steps", type=int, default=6, help="training steps per measurement")
    ap.add_argument("--episodes", type=int, default=10, help="rollout episodes per target")
    ap.add_argument("--json", help="also write every round's rates here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.steps, args.episodes, args.reps)
        return
    if not (args.old_src and args.new_src):
        ap.error("give the old and the new src directory")
    sides = {"old": str(Path(args.old_src).resolve()), "new": str(Path(args.new_src).resolve())}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            env = {**os.environ, "PYTHONPATH": sides[side], "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps),
                                   "--steps", str(args.steps), "--episodes", str(args.episodes)],
                                  env=env, capture_output=True, text=True, check=True)
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {side} load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    summary = {"same_ops": {n: runs["old"][0]["ops"][n] == runs["new"][0]["ops"][n]
                            for n in runs["old"][0]["ops"]}, "cases": {}}
    for name in runs["old"][0]["rates"]:
        old = [statistics.median(run["rates"][name]) for run in runs["old"]]
        new = [statistics.median(run["rates"][name]) for run in runs["new"]]
        ratios = [n / o for n, o in zip(new, old)]
        summary["cases"][name] = {"old": old, "new": new, "ratio_median": statistics.median(ratios),
                                  "ratio_min": min(ratios), "ratio_max": max(ratios)}
        print(f"{name:18s} new/old {statistics.median(ratios):.3f} ({min(ratios):.3f}-"
              f"{max(ratios):.3f}); old median {statistics.median(old):.1f}, new median "
              f"{statistics.median(new):.1f} per s")
    print("same aten operators:", summary["same_ops"])
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
