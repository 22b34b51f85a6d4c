"""Atari-sized inputs (issue 12): peak memory of training on a 500k-transition dataset, the
sampler's share of a training step, and batched image rollouts.

    python benchmarks/atari.py memory [--transitions 500000] [--steps 3] [--from-file PATH]
    python benchmarks/atari.py sampler [--transitions 50000] [--steps 5]
    python benchmarks/atari.py rollout [--episodes 8]

memory   builds a synthetic dataset of 84 x 84 frames (stack 4; moving blocks on a gradient, so
         that gzip has something to find), trains `--steps` steps of the DT paper's Atari model
         (--preset atari: 6 layers, 8 heads, embed 128, K 30, batch 128) and reports peak RSS
         (benchmarks/memory.py's RssMonitor, sampled every 0.25 s, and the kernel's VmHWM).
         --from-file writes the frames to a native HDF5 file first (chunked, gzip) and trains
         from the file, as `dtlab train --dataset FILE` would; each case runs in its own process.
sampler  times SequenceSampler.sample, to_tensors (uint8 -> [0, 1] floats) and train_step of the
         same model, batch 128 x K 30 x 4 frames, and reports the sampler's share of a step.
rollout  evaluates an (untrained) image checkpoint on ALE/Breakout-v5 at 2 targets x N episodes,
         all episodes in one batched forward per step, vs one episode at a time.
Prints JSON. Measured numbers: docs/results.md ("Atari and PointMaze").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtlab  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from memory import RssMonitor  # noqa: E402

ENV_ID = "ALE/Breakout-v5"
EPISODE_LEN = 1000  # synthetic episodes: all this long (DQN-replay Breakout episodes: ~1-3k steps)


def preset_configs(steps: int, out: str, dataset: str = "<memory>"):
    """The TrainConfig `dtlab train --preset atari` gives (parsed from the same flags)."""
    import tyro

    from dtlab.config import TrainConfig, train_preset

    args = ["--dataset", dataset, "--env", ENV_ID, "--steps", str(steps), "--out", out,
            "--no-progress", "--no-tensorboard", "--log-every", "1", "--threads", "1",
            "--checkpoint-every-minutes", "0"]
    return tyro.cli(TrainConfig, args=args, default=train_preset("atari"))


def synthetic_frames(n: int, seed: int = 0):
    """(n, 84, 84) uint8 frames: a fixed gradient with 3 moving 8 x 8 blocks, and an EpisodeSet of
    episodes of EPISODE_LEN steps (random actions of 4, rewards 0/1)."""
    from dtlab.data import EpisodeSet
    from dtlab.spaces import ImageObservations

    rng = np.random.default_rng(seed)
    frames = np.empty((n, 84, 84), dtype=np.uint8)
    background = np.add.outer(np.arange(84), np.arange(84)).astype(np.uint8)  # (84, 84)
    for t in range(n):
        frame = frames[t]
        frame[:] = background
        for k in range(3):
            x, y = (t * (k + 2) + 17 * k) % 76, (t * (3 - k) + 29 * k) % 76
            frame[y:y + 8, x:x + 8] = 200 + 20 * k
    term = np.zeros(n, bool)
    term[EPISODE_LEN - 1::EPISODE_LEN] = True
    return EpisodeSet.from_flags(frames, rng.integers(0, 4, n), rng.integers(0, 2, n), term,
                                 np.zeros(n, bool), source="<synthetic atari>",
                                 observation_space=ImageObservations((84, 84), 4))


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_case(transitions: int, steps: int, from_file: str | None) -> dict:
    from dtlab.train import train

    torch.set_num_threads(1)
    report: dict = {"transitions": transitions, "frame_bytes": transitions * 84 * 84}
    with tempfile.TemporaryDirectory() as tmp, RssMonitor() as mon:
        t0 = time.perf_counter()
        episodes = synthetic_frames(transitions)
        report["build_seconds"] = round(time.perf_counter() - t0, 1)
        dataset = "<memory>"
        if from_file:
            from dtlab.data.formats import write_native

            t0 = time.perf_counter()
            write_native(episodes, from_file)
            report["write_seconds"] = round(time.perf_counter() - t0, 1)
            report["file_mib"] = round(os.path.getsize(from_file) / 2**20, 1)
            del episodes
            episodes, dataset = None, from_file
        cfg = preset_configs(steps, f"{tmp}/run", dataset)
        t0 = time.perf_counter()
        result = train(cfg, episodes)
        report["train_seconds"] = round(time.perf_counter() - t0, 1)
        report["final_loss"] = result.final_loss
    report.update(mon.summary())
    report["vm_hwm_mib"] = round(vm_hwm_mib(), 1)
    return report


def sampler_case(transitions: int, steps: int) -> dict:
    from dtlab.baselines import build_model
    from dtlab.normalizer import Normalizer
    from dtlab.data.sampling import SequenceSampler
    from dtlab.spaces import DiscreteActions
    from dtlab.trainer import make_optimizer, to_tensors, train_step

    torch.set_num_threads(1)
    cfg = preset_configs(steps, "unused")
    episodes = synthetic_frames(transitions)
    norm = Normalizer.for_images(1.0)
    sampler = SequenceSampler(episodes, cfg.model.context_len, norm)
    torch.manual_seed(0)
    model = build_model(cfg.model, episodes.observation_space, DiscreteActions(4))
    optimizer = make_optimizer(model, cfg.optim, torch.device("cpu"))
    rng = np.random.default_rng(0)
    times = {"sample": [], "to_tensors": [], "train_step": []}
    model.train()
    for i in range(steps + 1):  # the first step warms up (allocations), not timed
        t0 = time.perf_counter()
        batch = sampler.sample(cfg.optim.batch_size, rng)
        t1 = time.perf_counter()
        tensors = to_tensors(batch, torch.device("cpu"), norm)
        t2 = time.perf_counter()
        train_step(model, optimizer, tensors, grad_clip=cfg.optim.grad_clip)
        t3 = time.perf_counter()
        if i:
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[name].append(dt)
    mean = {k: float(np.mean(v)) for k, v in times.items()}
    total = sum(mean.values())
    return {"transitions": transitions, "batch": cfg.optim.batch_size,
            "context_len": cfg.model.context_len, "frames_per_batch":
            cfg.optim.batch_size * cfg.model.context_len * 4,
            "batch_mib": round(batch.observations.nbytes / 2**20, 1), "steps": steps,
            "seconds": {k: round(v, 4) for k, v in mean.items()},
            "sampler_share": round(mean["sample"] / total, 4),
            "sampler_and_transfer_share": round((mean["sample"] + mean["to_tensors"]) / total, 4),
            "threads": torch.get_num_threads()}


def rollout_case(episodes: int) -> dict:
    from dtlab import checkpoint
    from dtlab.checkpoint import PolicyInfo
    from dtlab.config import ModelConfig
    from dtlab.baselines import build_model
    from dtlab.normalizer import Normalizer
    from dtlab.policy import DTPolicy
    from dtlab.rollout import rollout
    from dtlab.spaces import DiscreteActions, ImageObservations

    torch.set_num_threads(1)
    spec = ImageObservations((84, 84), 4)
    cfg = ModelConfig(embed_dim=128, n_layers=6, n_heads=8, context_len=30, max_ep_len=27_000,
                      activation="gelu", dropout=0.1)
    torch.manual_seed(0)
    info = PolicyInfo(model=cfg, observation_space=spec, action_space=DiscreteActions(4),
                      normalizer=Normalizer.for_images(1.0), env_id=ENV_ID)
    report = {"targets": [90.0, 30.0], "episodes_per_target": episodes, "max_steps": 200}
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(tmp, "step_00000000", build_model(cfg, spec, DiscreteActions(4)),
                               info)
        for name, parallel, kv in (("batched", 256, False), ("one_at_a_time", 1, False),
                                   ("batched_kv_cache", 256, True)):
            policy = DTPolicy.from_checkpoint(path, kv_cache=kv)
            r = rollout(policy, ENV_ID, report["targets"], episodes, max_steps=200,
                        max_parallel=parallel)
            report[name] = {**{k: round(v, 2) for k, v in r.timing().items()},
                            "mean_returns": [round(t.mean, 2) for t in r.results]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["memory", "sampler", "rollout"])
    parser.add_argument("--transitions", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--from-file", default=None)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case == "memory":
        if not args.in_process:  # a fresh process per case: its peak RSS is the case's alone
            cmd = [sys.executable, __file__, "memory", "--in-process",
                   "--transitions", str(args.transitions or 500_000), "--steps",
                   str(args.steps or 3)] + (["--from-file", args.from_file] if args.from_file else [])
            sys.exit(subprocess.call(cmd))
        report = memory_case(args.transitions, args.steps, args.from_file)
    elif args.case == "sampler":
        report = sampler_case(args.transitions or 50_000, args.steps or 5)
    else:
        report = rollout_case(args.episodes)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
