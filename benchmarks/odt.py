"""Online finetuning (the Online Decision Transformer) against its control, over seeds.

For each seed: (a) offline pretraining with the stochastic head (``dtlab train --model.policy
stochastic``), (b) ``dtlab finetune`` for --online-steps env steps, and (c) the control: the
same offline run continued offline for as many extra gradient steps as the finetuning took
(``dtlab train --resume --steps``). Reports the evaluation return (normalized score where known)
before (the offline run's last evaluation), after finetuning and for the control, as the IQM over
seeds with its 95% stratified-bootstrap CI (``dtlab.benchmark.report.iqm_with_ci``), one number
per seed averaged over the evaluation targets. Results as JSON (--out/odt.json), a table, and
the finetuning's learning curves (score against online env steps, one line per seed, the
control's IQM as a reference line) in --out/odt_curves.png.

Tiny end-to-end check (minutes on a busy CPU; docs/results.md):

    python benchmarks/odt.py --dataset pendulum.hdf5 --env Pendulum-v1 --seeds 0 1 \
        --offline-steps 300 --online-steps 1000 --updates-per-rollout 20 --tiny --out bench-odt

The real run (docs/usage.md, "Online finetuning"):

    dtlab collect --preset hopper-medium-v5 --out hopper-medium-v5.hdf5
    python benchmarks/odt.py --dataset hopper-medium-v5.hdf5 --env Hopper-v5 --seeds 0 1 2 \
        --offline-steps 15000 --online-steps 200000 --out bench-odt-hopper
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from dtlab import checkpoint
from dtlab.benchmark.report import iqm_with_ci
from dtlab.rundir import RunDirectory

TINY = ["--model.embed-dim", "32", "--model.n-layers", "1", "--model.context-len", "5",
        "--batch-size", "32"]


def dtlab(*args: str) -> None:
    print("$ dtlab " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dtlab", *args], check=True)


def score(run: Path) -> float:
    """Mean over targets of the last evaluation's normalized score (else its mean return)."""
    last = RunDirectory(run).evaluations()[-1]
    return float(np.mean([last.score(r.target) for r in last.results]))


def draw_curves(out: Path, seeds: list[int], control: float, env: str) -> Path:
    """odt_curves.png: each seed's finetuning evaluations (mean over targets of the score, the
    band the mean over targets of the episodes' std) against online env steps."""
    from dtlab.plots import score_curves

    curves = []
    for seed in seeds:
        evaluations = RunDirectory(out / f"seed{seed}" / "finetuned").evaluations()
        spread = [float(np.mean([r.normalized_std if r.normalized_std is not None else r.std
                                 for r in e.results])) for e in evaluations]
        curves.append((f"seed {seed}", [e.step for e in evaluations],
                       [e.mean_score() for e in evaluations], spread))
    return score_curves(curves, out / "odt_curves.png", xlabel="online env steps",
                        title=f"dtlab finetune on {env}: score (mean over targets) per seed",
                        reference=(f"control, IQM over seeds ({control:.1f})", control),
                        band="± 1 std over episodes",
                        ylabel="D4RL-normalized score (else return)")


def control(offline: Path, out: Path, steps: int) -> None:
    """The control: the offline run's directory copied to ``out``, then trained on offline to
    ``steps`` gradient steps (resumable: a copy made earlier is continued). The copy is made
    beside ``out`` and renamed to it when complete, so a copy cut short is made again, never
    taken for a run."""
    if not out.exists():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(offline, partial, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
        partial.rename(out)
    config = json.loads((out / "train_config.json").read_text())
    if config["run"]["out"] != str(out):
        config["run"]["out"] = str(out)
        (out / "train_config.json").write_text(json.dumps(config, indent=2))
    dtlab("train", "--out", str(out), "--resume", "--steps", str(steps), "--no-progress")


def main() -> None:
    # `kill PID` (SIGTERM) ends this script through SystemExit, so subprocess.run kills its dtlab
    # child rather than leaving it running; every phase resumes on the next invocation.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--env", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--offline-steps", type=int, default=15_000)
    p.add_argument("--online-steps", type=int, default=200_000)
    p.add_argument("--updates-per-rollout", type=int, default=300)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--eval-targets", type=float, nargs="*", default=[])
    p.add_argument("--tiny", action="store_true", help="a tiny model (the end-to-end check)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    targets = [str(t) for t in a.eval_targets]
    rows = []
    for seed in a.seeds:
        off, ft, ctl = (out / f"seed{seed}" / name for name in ("offline", "finetuned", "control"))
        common = ["--env", a.env, "--seed", str(seed), "--no-progress", "--no-tensorboard",
                  "--eval-episodes", str(a.eval_episodes),
                  *(["--eval-targets", *targets] if targets else [])]
        if not (off / "latest").exists():
            dtlab("train", "--dataset", a.dataset, "--out", str(off), "--steps",
                  str(a.offline_steps), "--warmup-steps", str(min(1000, a.offline_steps // 10)),
                  "--model.policy", "stochastic", *(TINY if a.tiny else []), *common)
        elif checkpoint.load_info(off)[1].step < a.offline_steps:  # stopped before its end
            dtlab("train", "--out", str(off), "--resume", "--no-progress")
        dtlab("finetune", str(off), "--env", a.env, "--online-steps", str(a.online_steps),
              "--out", str(ft), "--seed", str(seed), "--updates-per-rollout",
              str(a.updates_per_rollout), "--eval-every", str(max(a.online_steps // 5, 1)),
              "--eval-episodes", str(a.eval_episodes),
              *(["--eval-targets", *targets] if targets else []),
              *(["--resume"] if (ft / "latest").exists() else []))
        updates = RunDirectory(ft).evaluations()[-1].timing["gradient_step"] - a.offline_steps
        control(off, ctl, a.offline_steps + updates)
        rows.append({"seed": seed, "before": score(off), "after": score(ft),
                     "control": score(ctl), "extra_updates": int(updates)})
    summary = {}
    for key in ("before", "after", "control"):
        values = np.array([[r[key]] for r in rows])
        iqm, lo, hi = iqm_with_ci(values, reps=2000)
        summary[key] = {"iqm": iqm, "ci95": [lo, hi], "per_seed": values[:, 0].tolist()}
    result = {"dataset": a.dataset, "env": a.env, "offline_steps": a.offline_steps,
              "online_steps": a.online_steps, "updates_per_rollout": a.updates_per_rollout,
              "runs": rows, "summary": summary}
    (out / "odt.json").write_text(json.dumps(result, indent=2))
    draw_curves(out, a.seeds, summary["control"]["iqm"], a.env)
    for key, s in summary.items():
        print(f"{key:>8}: IQM {s['iqm']:.1f} [{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}] over seeds "
              f"{a.seeds}: {', '.join(f'{v:.1f}' for v in s['per_seed'])}")


if __name__ == "__main__":
    main()
