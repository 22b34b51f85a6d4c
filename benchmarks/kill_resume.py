"""kill -9 a training run at random moments, resume it each time, compare with an uninterrupted run.

    python benchmarks/kill_resume.py [--kills 3] [--steps 3000] [--seed 0]

Prints, per kill, the moment (seconds after start), the step of the checkpoint that survived, and
finally whether the resumed run's final weights equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def train_cmd(data: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "dtlab.cli", "train", "--dataset", str(data), "--env", "Pendulum-v1",
            "--out", str(out), "--steps", str(steps), "--batch-size", "16", "--warmup-steps", "100",
            "--log-every", "50", "--checkpoint-every", "100", "--no-progress", "--no-tensorboard",
            "--model.embed-dim", "32", "--model.n-layers", "2", "--model.context-len", "10",
            "--model.max-ep-len", "200", "--threads", "1", "--seed", "1", "--return-scale", "100"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from safetensors.numpy import load_file

    from dtlab import checkpoint
    from dtlab.behaviour.scripted import pendulum_mixed_dataset
    from dtlab.data.formats import save_episodes

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data.hdf5"
        save_episodes(pendulum_mixed_dataset(num_episodes=50), data)
        t0 = time.perf_counter()
        subprocess.run(train_cmd(data, tmp / "full", args.steps), check=True, capture_output=True)
        full_seconds = time.perf_counter() - t0
        out = tmp / "killed"
        kills = []
        startup = 4.0  # seconds of imports and setup before the first step (measured roughly)
        for k in range(args.kills):
            done = checkpoint.load_info(out)[1].step if (out / "latest").exists() else 0
            cmd = train_cmd(data, out, args.steps) + (["--resume"] if done else [])
            # A random moment inside what is left of the run (each kill lands mid-run).
            remaining = (args.steps - done) / args.steps * (full_seconds - startup)
            moment = startup + float(rng.uniform(0.1, 0.9) * remaining)
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(moment)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _, info = checkpoint.load(out)
            kills.append({"resumed_from_step": done, "kill_after_s": round(moment, 2),
                          "surviving_checkpoint_step": info.step})
        subprocess.run(train_cmd(data, out, args.steps) + ["--resume"], check=True, capture_output=True)
        a = load_file(str(checkpoint.resolve(tmp / "full") / "model.safetensors"))
        b = load_file(str(checkpoint.resolve(out) / "model.safetensors"))
        equal = all(np.array_equal(a[key], b[key]) for key in a)
        print(json.dumps({"steps": args.steps, "uninterrupted_run_s": round(full_seconds, 1),
                          "kills": kills, "final_weights_bit_identical": equal}, indent=2))


if __name__ == "__main__":
    main()
