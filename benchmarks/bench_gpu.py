"""GPU goals of the performance issue, in one command for a session that has a GPU.

    python benchmarks/bench_gpu.py [--device cuda] [--train-steps 100000] [--json out.json]
    python benchmarks/bench_gpu.py --device cpu --quick     # smoke test of this script on a CPU

1. Training step, paper configuration (batch 64, K=20, embed 128, 3 layers), dtlab vs Hugging Face
   `DecisionTransformerModel` on the same device, on the same pre-built windows, A/B alternated;
   fp32 and bf16 autocast for both (goal: dtlab >= 5x HF).
2. `dtlab.train.train` itself (sampling, logging and checkpoints included) for --train-steps
   steps on the synthetic Hopper-shaped dataset (goal: 100k steps in under 3 minutes); with
   --train-steps below 100k the 100k time is projected from the measured rate.
3. Evaluation: 200 Hopper-v5 episodes (2 targets x 100) with `dtlab.evaluate.rollout`, an
   untrained paper-configuration policy, exact / bf16 / kv-cache (goal: under 60 s; the exact path
   is the one that counts, kv-cache is approximate).
Every timed region ends with a device synchronize. Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtlab  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads)
import torch  # noqa: E402

import harness  # noqa: E402
from bench_train import B, DtlabTrainer, HFTrainer, hf_batch_from  # noqa: E402
from synthetic_hopper import ENV_ID, synthetic_episodes, untrained_policy  # noqa: E402

from dtlab.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from dtlab.rollout import rollout  # noqa: E402
from dtlab.policy import DTPolicy  # noqa: E402
from dtlab.train import train  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rates(device: torch.device, reps: int, steps: int, seed: int) -> tuple[dict, list]:
    episodes, blog = synthetic_episodes(seed=seed)
    dt = DtlabTrainer(seed, episodes, device)
    hf = HFTrainer(seed, blog, device=device)
    pool = [dt.batch() for _ in range(8)]  # the same windows for every case
    hf_pool = [hf_batch_from(b) for b in pool]

    def timed(step):
        def run():
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                step(i)
            sync(device)
            return float(steps * B), time.perf_counter() - t0, {}
        return run

    cases = {
        "dtlab_step": timed(lambda i: dt.step(pool[i % 8])),
        "hf_step": timed(lambda i: hf.step(hf_pool[i % 8])),
        "dtlab_step_bf16": timed(lambda i: dt.step(pool[i % 8], bf16=True)),
        "hf_step_bf16": timed(lambda i: hf.step(hf_pool[i % 8], bf16=True)),
        "dtlab_e2e": timed(lambda i: dt.step(dt.batch())),
    }
    for case in cases.values():  # warm-up: kernels, allocator, autotuning
        case()
    results = harness.alternate(cases, reps, {name: "samples/s" for name in cases})
    table = harness.Ratios()
    table.add("step dtlab/HF, fp32", results["dtlab_step"], results["hf_step"], ">= 5")
    table.add("step dtlab/HF, both bf16 autocast", results["dtlab_step_bf16"],
              results["hf_step_bf16"], ">= 5")
    table.add("step dtlab bf16/HF fp32", results["dtlab_step_bf16"], results["hf_step"], "")
    return results, table.rows


def full_training(device: torch.device, steps: int, precision: str, seed: int) -> dict:
    episodes, _ = synthetic_episodes(seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=DataConfig("<memory>", ENV_ID), model=ModelConfig(),
            optim=OptimConfig(precision=precision, seed=seed),
            run=RunConfig(out=str(Path(tmp) / "run"), steps=steps, device=str(device),
                          progress=False, tensorboard=False, checkpoint_every=max(steps // 4, 1)))
        sync(device)
        t0 = time.perf_counter()
        result = train(cfg, episodes)
        sync(device)
        seconds = time.perf_counter() - t0
    return {"steps": result.steps, "precision": precision, "seconds": seconds,
            "steps_per_s": result.steps / seconds,
            "projected_100k_s": 100_000 * seconds / result.steps}


def evaluation(device: torch.device, episodes: int, seed: int) -> list[dict]:
    base = untrained_policy(seed)
    out = []
    for label, precision, kv in (("exact fp32", "fp32", False), ("exact bf16", "bf16", False),
                                 ("kv-cache fp32", "fp32", True), ("kv-cache bf16", "bf16", True)):
        policy = DTPolicy(base.model, base.info, device, precision=precision, kv_cache=kv)
        sync(device)
        t0 = time.perf_counter()
        stats = rollout(policy, ENV_ID, (3600.0, 1800.0), episodes, seed=seed).timing()
        sync(device)
        seconds = time.perf_counter() - t0
        out.append({"rollout": label, "episodes": 2 * episodes, "seconds": seconds,
                    "env_steps": stats["env_steps"], "env_steps_per_s": stats["env_steps"] / seconds})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true",
                    help="2 reps x 3 steps, 20 training steps, 2 x 2 episodes (a smoke test)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per measurement")
    ap.add_argument("--train-steps", type=int, default=100_000)
    ap.add_argument("--episodes", type=int, default=100, help="per target (2 targets)")
    harness.add_run_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.reps, args.steps, args.train_steps, args.episodes = 2, 3, 20, 2
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    harness.seed_everything(args.seed)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    log(f"training step: {args.reps} reps x {args.steps} steps on {device}")
    rates, ratio_rows = step_rates(device, args.reps, args.steps, args.seed)
    log(f"dtlab.train: {args.train_steps} steps")
    runs = [full_training(device, args.train_steps, p, args.seed) for p in ("fp32", "bf16")]
    log(f"evaluation: 2 x {args.episodes} Hopper-v5 episodes")
    evals = evaluation(device, args.episodes, args.seed)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    train_rows = ["| precision | steps | seconds | steps/s | projected 100k steps |",
                  "|---|---:|---:|---:|---:|"]
    train_rows += [f"| {r['precision']} | {r['steps']} | {r['seconds']:.1f} | {r['steps_per_s']:.1f} "
                   f"| {r['projected_100k_s']:.0f} s |" for r in runs]
    eval_rows = ["| rollout | episodes | seconds | env steps/s |", "|---|---:|---:|---:|"]
    eval_rows += [f"| {e['rollout']} | {e['episodes']} | {e['seconds']:.1f} | "
                  f"{e['env_steps_per_s']:.0f} |" for e in evals]
    payload = {"device": device_name, "machine": harness.machine_info(),
               "step_rates": {k: v.summary() for k, v in rates.items()},
               "ratios": [{"ratio": name, **r, "goal": goal} for name, r, goal in ratio_rows],
               "training": runs, "evaluation": evals}
    harness.report("bench_gpu", payload,
                   [harness.markdown_table({str(device): rates}, {}),
                    harness.ratio_table(ratio_rows), "\n".join(train_rows), "\n".join(eval_rows)],
                   args.json)


if __name__ == "__main__":
    main()
