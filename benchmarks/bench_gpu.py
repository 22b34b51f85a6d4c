"""GPU goals of the performance issues (4 and 13), in one command for a session that has a GPU.

    python benchmarks/bench_gpu.py [--device cuda] [--json out.json]      # under 10 minutes
    python benchmarks/bench_gpu.py --device cpu --quick     # smoke test of this script on a CPU

1. Training step, paper configuration (batch 64, K=20, embed 128, 3 layers), dtlab vs Hugging Face
   `DecisionTransformerModel` on the same device, on the same pre-built windows, A/B alternated;
   fp32 and bf16 autocast for both (goal: dtlab >= 5x HF); plus dtlab end to end with the windows
   gathered on the device (DeviceSampler), and the host syncs per training step counted with
   `torch.cuda.set_sync_debug_mode` (goal: none).
2. `dtlab.train.train` itself (sampling, logging and checkpoints included) for --train-steps
   steps at --precision (default auto) on the synthetic Hopper-shaped dataset (goal: 100k steps in
   under 3 minutes); if 100k steps would take more than --train-budget-s (300), fewer are run and
   the 100k time is projected from the measured rate.
3. Evaluation: 2 targets x --episodes Hopper-v5 episodes with `dtlab.rollout.rollout`, an untrained
   paper-configuration policy, exact at the resolved precision (goal: 200 episodes in under 60 s)
   with the envs in this process and in each --eval-workers count of worker processes, plus
   kv-cache (approximate). Untrained episodes end early (about 110 steps), so the cost of one
   batched step with all 200 episodes running is also measured and projected to 1000 steps (a
   trained policy's episodes run to Hopper's limit).
4. The paper protocol (100k steps, evaluation every 10k at 2 targets x 100 episodes), projected
   from 2 and 3: training time + 10 full-length evaluations (goal: under 15 minutes).
5. With more than one GPU: `torchrun --nproc_per_node N -m dtlab train` for --ddp-steps steps
   (batch 64 per process), steps/s against one process.
Every timed region ends with a device synchronize. Prints JSON and markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
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

from dtlab import runtime  # noqa: E402
from dtlab.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from dtlab.rollout import rollout  # noqa: E402
from dtlab.policy import DTPolicy  # noqa: E402
from dtlab.train import train  # noqa: E402
from dtlab.trainer import DeviceSampler, train_step  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rates(device: torch.device, reps: int, steps: int, seed: int) -> tuple[dict, list]:
    episodes, blog = synthetic_episodes(seed=seed)
    dt = DtlabTrainer(seed, episodes, device)
    try:
        hf = HFTrainer(seed, blog, device=device)
    except ImportError:  # the peer is optional (pip install -e '.[bench]')
        print("transformers is not installed: no HF peer cases", file=sys.stderr)
        hf = None
    pool = [dt.batch() for _ in range(8)]  # the same windows for every case
    hf_pool = [hf_batch_from(b) for b in pool] if hf else []

    def timed(step):
        def run():
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                step(i)
            sync(device)
            return float(steps * B), time.perf_counter() - t0, {}
        return run

    gather = DeviceSampler(dt.sampler, device)
    cases = {
        "dtlab_step": timed(lambda i: dt.step(pool[i % 8])),
        "hf_step": timed(lambda i: hf.step(hf_pool[i % 8])),
        "dtlab_step_bf16": timed(lambda i: dt.step(pool[i % 8], bf16=True)),
        "hf_step_bf16": timed(lambda i: hf.step(hf_pool[i % 8], bf16=True)),
        "dtlab_e2e": timed(lambda i: dt.step(dt.batch())),
        "dtlab_e2e_device_gather": timed(lambda i: dt.step(gather.sample(B, dt.rng))),
    }
    if hf is None:
        cases = {k: v for k, v in cases.items() if not k.startswith("hf_")}
    for case in cases.values():  # warm-up: kernels, allocator, autotuning
        case()
    results = harness.alternate(cases, reps, {name: "samples/s" for name in cases})
    table = harness.Ratios()
    if hf is not None:
        table.add("step dtlab/HF, fp32", results["dtlab_step"], results["hf_step"], ">= 5")
        table.add("step dtlab/HF, both bf16 autocast", results["dtlab_step_bf16"],
                  results["hf_step_bf16"], ">= 5")
        table.add("step dtlab bf16/HF fp32", results["dtlab_step_bf16"], results["hf_step"], "")
    table.add("dtlab end to end, device gather / host gather", results["dtlab_e2e_device_gather"],
              results["dtlab_e2e"], "")
    return results, table.rows


def host_syncs_per_step(device: torch.device, seed: int, steps: int = 20) -> dict:
    """Host synchronizations in ``steps`` dtlab training steps (device gather, fused AdamW), as
    torch.cuda.set_sync_debug_mode("warn") reports them, with where each came from."""
    import warnings

    if device.type != "cuda":
        return {"skipped": "not CUDA"}
    episodes, _ = synthetic_episodes(seed=seed)
    dt = DtlabTrainer(seed, episodes, device)
    gather = DeviceSampler(dt.sampler, device)
    dt.step(gather.sample(B, dt.rng))  # warm-up: allocations, lazy init
    torch.cuda.synchronize(device)
    sources: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                loss, _ = train_step(dt.model, dt.opt, gather.sample(B, dt.rng), grad_clip=0.25)
                dt.sched.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            sources[where] = sources.get(where, 0) + 1
    return {"steps": steps, "syncs": sum(sources.values()), "per_step": sum(sources.values()) / steps,
            "where": sources}


def full_training(device: torch.device, steps: int, precision: str, seed: int) -> dict:
    """``dtlab.train.train`` for ``steps`` steps (precision as a user gives it: auto resolves)."""
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
    return {"steps": result.steps, "precision": precision,
            "resolved_precision": runtime.resolve_precision(precision, device), "seconds": seconds,
            "steps_per_s": result.steps / seconds,
            "projected_100k_s": 100_000 * seconds / result.steps}


def evaluation(device: torch.device, episodes: int, seed: int, workers: list[int]) -> list[dict]:
    """200 (2 x episodes) Hopper-v5 episodes, exact at the resolved auto precision with the envs
    here and in worker processes, and kv-cache (approximate)."""
    base = untrained_policy(seed)
    precision = runtime.resolve_precision("auto", device)
    out = []
    variants = [(f"exact {precision}", precision, False, 0)]
    variants += [(f"exact {precision}, {n} env workers", precision, False, n) for n in workers if n]
    variants += [("exact fp32", "fp32", False, 0), (f"kv-cache {precision}", precision, True, 0)]
    for label, prec, kv, n in variants:
        policy = DTPolicy(base.model, base.info, device, precision=prec, kv_cache=kv)
        sync(device)
        t0 = time.perf_counter()
        report = rollout(policy, ENV_ID, (3600.0, 1800.0), episodes, seed=seed, workers=n)
        sync(device)
        seconds = time.perf_counter() - t0
        stats = report.timing()
        out.append({"rollout": label, "episodes": 2 * episodes, "seconds": seconds,
                    "seconds_after_env_start": stats["seconds"],  # without env/worker start
                    "env_steps": stats["env_steps"], "env_steps_per_s": stats["env_steps"] / seconds,
                    "model_share": stats["model_seconds"] / stats["seconds"]})
    return out


def full_length_step(device: torch.device, episodes: int, seed: int, steps: int = 50) -> dict:
    """Seconds per batched step with all 2 x ``episodes`` Hopper-v5 episodes running (one
    DTPolicy.act at the resolved precision and one env step each, episodes that end are reset):
    x 1000 bounds an exact evaluation whose episodes reach Hopper's 1000-step limit."""
    import gymnasium as gym
    import numpy as np

    policy = untrained_policy(seed)
    policy = DTPolicy(policy.model, policy.info, device,
                      precision=runtime.resolve_precision("auto", device))
    n = 2 * episodes
    envs = [gym.make(ENV_ID) for _ in range(n)]
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    policy.reset(np.full(n, 3600.0, np.float32))
    rewards = np.zeros(n, np.float32)
    for t in range(policy.context_len + steps):  # the first K steps fill the windows
        if t == policy.context_len:
            sync(device)
            t0 = time.perf_counter()
        actions = policy.act(obs, rewards)
        for i, env in enumerate(envs):
            obs[i], rewards[i], terminated, truncated, _ = env.step(actions[i])
            if terminated or truncated:
                obs[i], _ = env.reset()
    sync(device)
    per_step = (time.perf_counter() - t0) / steps
    return {"episodes": n, "seconds_per_step": per_step, "projected_1000_steps_s": 1000 * per_step}


def ddp_training(steps: int, seed: int, gpus: int) -> list[dict]:
    """``torchrun --nproc_per_node N -m dtlab train`` on the synthetic dataset for N = 1 and
    ``gpus``: wall time and steps/s (batch 64 per process)."""
    import os
    import subprocess

    from dtlab.data.formats import save_episodes

    episodes, _ = synthetic_episodes(seed=seed)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic.hdf5"
        save_episodes(episodes, data)
        for n in sorted({1, gpus}):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(n), "-m", "dtlab", "train", "--dataset", str(data),
                   "--env", ENV_ID, "--out", str(Path(tmp) / f"run{n}"), "--steps", str(steps),
                   "--no-progress", "--no-tensorboard", "--seed", str(seed),
                   "--checkpoint-every", str(steps), "--log-every", str(max(steps // 10, 1))]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            seconds = time.perf_counter() - t0
            # Rank 0's logged rates after the first interval (start-up and warm-up excluded).
            metrics = Path(tmp) / f"run{n}" / "metrics.jsonl"
            rates = [r["steps_per_s"] for r in map(json.loads, metrics.read_text().splitlines())
                     if "steps_per_s" in r][1:] if metrics.is_file() else []
            rate = statistics.median(rates) if rates else float("nan")
            out.append({"processes": n, "steps": steps, "seconds_incl_startup": seconds,
                        "returncode": proc.returncode, "stderr_tail": proc.stderr[-500:]
                        if proc.returncode else "", "steps_per_s": rate,
                        "samples_per_s": rate * 64 * n})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true",
                    help="2 reps x 3 steps, 20 training steps, 2 x 2 episodes (a smoke test)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per measurement")
    ap.add_argument("--train-steps", type=int, default=100_000)
    ap.add_argument("--train-budget-s", type=float, default=300,
                    help="train fewer than --train-steps steps if they would take longer (the "
                         "100k time is then projected)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="precision of the dtlab.train run (auto: bf16 on GPUs that compute it)")
    ap.add_argument("--episodes", type=int, default=100, help="per target (2 targets)")
    ap.add_argument("--eval-workers", type=int, nargs="*", default=[8],
                    help="also evaluate with the envs in this many worker processes")
    ap.add_argument("--ddp-steps", type=int, default=2000,
                    help="steps of the torchrun runs (only with more than one GPU; 0: skip)")
    harness.add_run_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.reps, args.steps, args.train_steps, args.episodes = 2, 3, 20, 2
        args.eval_workers, args.ddp_steps = [2], min(args.ddp_steps, 20)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    harness.seed_everything(args.seed)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()

    log(f"training step: {args.reps} reps x {args.steps} steps on {device}")
    rates, ratio_rows = step_rates(device, args.reps, args.steps, args.seed)
    syncs = host_syncs_per_step(device, args.seed)
    # Keep the whole script within 10 minutes: if 100k steps would take more than 5, train for
    # 5 minutes' worth (from the end-to-end rate just measured) and project.
    rate = rates["dtlab_e2e_device_gather"].summary()["median"] / B  # steps/s
    train_steps = min(args.train_steps, max(20, int(rate * args.train_budget_s)))
    log(f"dtlab.train: {train_steps} steps at precision {args.precision} (step rate {rate:.0f}/s)")
    runs = [full_training(device, train_steps, args.precision, args.seed)]
    log(f"evaluation: 2 x {args.episodes} Hopper-v5 episodes")
    evals = evaluation(device, args.episodes, args.seed, args.eval_workers)
    full_step = full_length_step(device, args.episodes, args.seed)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    ddp = ddp_training(args.ddp_steps, args.seed, gpus) if gpus > 1 and args.ddp_steps else []

    train_100k = runs[0]["projected_100k_s"]
    eval_full = max(full_step["projected_1000_steps_s"], evals[0]["seconds"])
    protocol = {"train_100k_s": train_100k, "one_evaluation_s": eval_full,
                "evaluations": 10, "projected_total_s": train_100k + 10 * eval_full,
                "goal_s": 15 * 60}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    train_rows = ["| precision (resolved) | steps | seconds | steps/s | projected 100k steps |",
                  "|---|---:|---:|---:|---:|"]
    train_rows += [f"| {r['precision']} ({r['resolved_precision']}) | {r['steps']} | "
                   f"{r['seconds']:.1f} | {r['steps_per_s']:.1f} | {r['projected_100k_s']:.0f} s |"
                   for r in runs]
    eval_rows = ["| rollout | episodes | seconds (after env start) | env steps/s | model share |",
                 "|---|---:|---:|---:|---:|"]
    eval_rows += [f"| {e['rollout']} | {e['episodes']} | {e['seconds']:.1f} "
                  f"({e['seconds_after_env_start']:.1f}) | {e['env_steps_per_s']:.0f} | "
                  f"{e['model_share']:.0%} |" for e in evals]
    eval_rows.append(f"| one batched step, {full_step['episodes']} episodes running | | "
                     f"{full_step['seconds_per_step'] * 1e3:.1f} ms | | |")
    other = [f"host syncs per training step: {syncs}",
             f"paper protocol projection: {protocol}",
             f"torchrun runs: {ddp or 'skipped (one GPU)'}",
             f"total time of this script: {time.perf_counter() - started:.0f} s"]
    payload = {"device": device_name, "machine": harness.machine_info(),
               "step_rates": {k: v.summary() for k, v in rates.items()},
               "ratios": [{"ratio": name, **r, "goal": goal} for name, r, goal in ratio_rows],
               "host_syncs": syncs, "training": runs, "evaluation": evals,
               "full_length_step": full_step, "paper_protocol": protocol, "torchrun": ddp,
               "seconds": time.perf_counter() - started}
    harness.report("bench_gpu", payload,
                   [harness.markdown_table({str(device): rates}, {}),
                    harness.ratio_table(ratio_rows), "\n".join(train_rows), "\n".join(eval_rows),
                    "\n".join(other)],
                   args.json)


if __name__ == "__main__":
    main()
