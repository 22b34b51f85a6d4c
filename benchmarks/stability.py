"""How much a Decision Transformer's score swings between evaluations, with and without an
exponential moving average of its weights, measured in the same training runs.

A run trained with ``--ema-decay d`` trains exactly the raw weights a run without it trains (the
average is a copy that draws no random numbers), and saves the raw weights beside the average in
every checkpoint. This script trains such runs (one per seed, resumable), evaluates the average
during training, then evaluates the raw weights of every checkpoint at the same targets on the
same env seeds, and reports per recipe: last, final (mean of the last 3), best, the swing (mean
absolute difference between consecutive evaluations), the late swing (the same over the second
half of training) and the last-vs-best gap, each as IQM with a 95% stratified-bootstrap CI over
seeds (dtlab.benchmark.report's statistics).

    python benchmarks/stability.py --dataset datasets/hopper-medium-replay-v5.hdf5 \
        --env Hopper-v5 --out bench/stability-hmr --seeds 0 1 2 --steps 15000 \
        --warmup-steps 1000 --eval-every 2500 --eval-episodes 10 --ema-decay 0.999 \
        --targets 3600 1800

Run it again with the same arguments to continue (finished evaluations are cached in
``raw_evaluations.json`` per run); ``--report-only`` prints the table from what exists.
``--include RECORD.json ...`` adds the seeds of earlier reports (this script's stability.json,
as committed under docs/results/) to the ones run here, after checking that they were run with
the same settings on the same data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dtlab import checkpoint
from dtlab.benchmark.report import iqm_with_ci
from dtlab.errors import CheckpointError, DtlabError
from dtlab.config import DataConfig, EvalDuringTraining, OptimConfig, RunConfig, TrainConfig
from dtlab.policy import DTPolicy
from dtlab.rollout import Evaluator
from dtlab.rundir import RunDirectory
from dtlab.train import train


def run_config(args, seed: int) -> TrainConfig:
    out = Path(args.out) / f"seed{seed}"
    return TrainConfig(
        data=DataConfig(args.dataset, env=args.env),
        optim=OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, seed=seed,
                          ema_decay=args.ema_decay, schedule=args.schedule,
                          precision=args.precision),
        run=RunConfig(out=str(out), steps=args.steps, resume=(out / "train_config.json").exists(),
                      checkpoint_every=args.eval_every, keep_checkpoints=10_000,
                      threads=args.threads, progress=False, tensorboard=False),
        evaluation=EvalDuringTraining(eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                                      eval_targets=tuple(args.targets)))


def scores(report) -> dict[str, float]:
    return {f"{r.target:g}": r.normalized_mean for r in report.results}


def average_curve(run: Path) -> dict[int, dict[str, float]]:
    """The evaluations during training (of the average): evaluations.jsonl, or the
    eval/normalized_<target> lines of metrics.jsonl that dtlab wrote before it."""
    curve = {e.step: {f"{r.target:g}": r.normalized_mean for r in e.results}
             for e in RunDirectory(run).evaluations()}
    if curve:
        return curve
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        found = {k.rsplit("_", 1)[1]: v for k, v in record.items()
                 if k.startswith("eval/normalized_")}
        if found:
            curve[record["step"]] = found
    return curve


def at_evaluations(curve: dict[int, dict[str, float]], every: int, last: int
                   ) -> dict[int, dict[str, float]]:
    """The points at evaluation steps (multiples of ``every``, and the last): time-based
    checkpoints in between are left out."""
    return {s: v for s, v in curve.items() if s % every == 0 or s == last}


def raw_model(path: Path):
    """(model, PolicyInfo) of checkpoint ``path`` with its raw weights (the trainer state's
    ``raw_weights``) in place of their average. CheckpointError for a checkpoint without them
    (a run trained without --ema-decay, whose model is its raw weights already) or whose raw
    weights do not fit its model (names or shapes)."""
    model, info = checkpoint.load(path)
    state = checkpoint.load_trainer_state(path)
    if "raw_weights" not in state:
        raise CheckpointError(
            f"{path}: no raw weights in its trainer state (a run trained without --ema-decay: "
            "its model is its raw weights already)")
    try:
        model.load_state_dict(state["raw_weights"])
    except (RuntimeError, TypeError, AttributeError) as e:  # not this model's, or no mapping
        # torch lists every mismatch over several lines: keep the first
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"{path}: its trainer state's raw weights do not fit its model "
                              f"({first}); was the checkpoint written by another dtlab?") from None
    return model, info


def cached_evaluations(file: Path) -> dict[int, dict[str, float]]:
    """An evaluation cache (step -> target -> normalized score), empty when the file is not
    there."""
    if not file.exists():
        return {}
    return {int(k): v for k, v in json.loads(file.read_text()).items()}


def raw_curve(run: Path, cfg: TrainConfig) -> dict[int, dict[str, float]]:
    """Every checkpoint's raw weights evaluated as training evaluates (same targets, episodes and
    env seeds, at the run's precision); cached in raw_evaluations.json."""
    cache_file = run / "raw_evaluations.json"
    cache = cached_evaluations(cache_file)
    precision = RunDirectory(run).saved_precision() or "fp32"  # as training evaluated
    evaluator = Evaluator(cfg.data.env, cfg.evaluation.eval_targets, cfg.evaluation.eval_episodes,
                          seed=cfg.optim.seed)
    for path in sorted(run.glob("step_*")):
        step = int(path.name[5:])
        if step in cache or (step % cfg.evaluation.eval_every and step != cfg.run.steps):
            continue
        cache[step] = scores(evaluator(DTPolicy(*raw_model(path), precision=precision)))
        cache_file.write_text(json.dumps(cache, indent=1))
    return cache


KEYS = ("last", "final", "best", "swing", "late_swing", "gap")


def summary(curves: list[dict[int, dict[str, float]]], target: str, reps: int,
            steps: int) -> dict:
    """Per seed and as IQM [95% CI] over seeds: last, final (mean of the last 3), best, swing
    (mean absolute difference of consecutive evaluations), late_swing (the same over the
    evaluations in the second half of training, from step steps/2 on: the early climb, which
    is learning and not oscillation, left out) and the last-vs-best gap. A swing needs two
    evaluations: a seed with fewer (a run stopped early) has None there, and the IQM is over the
    seeds that have one (None when none has)."""
    per_seed = []
    for curve in curves:
        values = [curve[s][target] for s in sorted(curve)]
        late = [curve[s][target] for s in sorted(curve) if s >= steps / 2]
        per_seed.append({"last": values[-1], "final": float(np.mean(values[-3:])),
                         "best": max(values), "swing": _swing(values),
                         "late_swing": _swing(late), "gap": max(values) - values[-1]})
    out = {}
    for key in KEYS:
        values = [p[key] for p in per_seed]
        x = np.array([v for v in values if v is not None])
        iqm, lo, hi = iqm_with_ci(x[:, None], reps) if x.size else (None, None, None)
        out[key] = {"iqm": iqm, "ci": [lo, hi], "per_seed": values}
    return out


def _swing(values: list[float]) -> float | None:
    """Mean absolute difference of consecutive values; None for fewer than two."""
    return float(np.mean(np.abs(np.diff(values)))) if len(values) > 1 else None


# The settings that must agree for seeds from two reports to be summarized together.
SAME = ("env", "steps", "warmup_steps", "eval_every", "eval_episodes", "ema_decay", "schedule",
        "targets", "lr", "precision")
# Settings added to the script later, with the values the reports written before them ran with
# (dtlab's default learning rate; fp32, on machines without native bf16). The precision is the
# one the runs resolved; "auto" (no run here to read it from) matches any.
ADDED_LATER = {"lr": 1e-4, "precision": "fp32"}


class Refused(Exception):
    """Bad input: one line naming the problem, the file and the flag (exit code 2)."""


def included(path: str, settings: dict) -> tuple[list[int], list[dict], list[dict]]:
    """The seeds of an earlier report and their curves (average, raw), keyed by step:
    ``(seeds, ema_curves, raw_curves)``.

    Raises Refused when the report is unreadable, was run with other settings (``SAME``, the
    dataset's file name, and its content fingerprint where both reports recorded one), or does
    not hold both curves for each of its seeds."""
    try:
        record = json.loads(Path(path).read_text())
        theirs, targets = record["settings"], record["targets"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Refused(f"--include {path}: not a stability.json report ({e})") from None
    mine = dict(settings, dataset=Path(settings["dataset"]).name,
                targets=[float(t) for t in settings["targets"]])
    theirs = {**ADDED_LATER, **theirs, "dataset": Path(str(theirs.get("dataset"))).name,
              "targets": [float(t) for t in theirs.get("targets", [])]}
    for key in ("dataset",) + SAME + ("dataset_fingerprint",) * bool(
            mine.get("dataset_fingerprint") and theirs.get("dataset_fingerprint")):
        if mine.get(key) != theirs.get(key) and not (key == "precision" and mine[key] == "auto"):
            raise Refused(f"--include {path}: its {key} is {theirs.get(key)!r}, this report's "
                          f"is {mine.get(key)!r}; include only reports run with the same "
                          "settings on the same data")
    seeds = list(theirs.get("seeds", []))
    ema, raw = [], []
    for target in (f"{t:g}" for t in mine["targets"]):
        curves = targets.get(target, {}).get("curves", {})
        if len(curves.get("ema", [])) != len(seeds) or len(curves.get("raw", [])) != len(seeds):
            raise Refused(f"--include {path}: it has no average and raw curve at target "
                          f"{target} for each of its seeds {seeds}; include a finished report")
    for i, seed in enumerate(seeds):
        ema.append(_merge(targets, "ema", i))
        raw.append(_merge(targets, "raw", i))
        if not ema[-1] or set(ema[-1]) != set(raw[-1]):
            raise Refused(f"--include {path}: seed {seed}'s average and raw weights were "
                          f"evaluated at different steps ({sorted(ema[-1])} and "
                          f"{sorted(raw[-1])}); include a report whose curves match")
    return seeds, ema, raw


def _merge(targets: dict, which: str, i: int) -> dict[int, dict[str, float]]:
    """Seed i's curve ``{step: {target: score}}`` from a report's per-target curves."""
    curve: dict[int, dict[str, float]] = {}
    for target, rows in targets.items():
        for step, value in rows["curves"][which][i].items():
            curve.setdefault(int(step), {})[target] = value
    return curve


def main(argv=None) -> int:
    try:
        return _main(argv)
    except (Refused, DtlabError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--env", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=15_000)
    p.add_argument("--warmup-steps", type=int, default=1_000)
    p.add_argument("--eval-every", type=int, default=2_500)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    p.add_argument("--lr", type=float, default=OptimConfig.lr, help="peak learning rate")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="matmul precision of training (dtlab train --precision)")
    p.add_argument("--targets", type=float, nargs="+", default=[3600, 1800])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--include", nargs="+", default=[], metavar="RECORD",
                   help="earlier stability.json reports whose seeds join this one's")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    averaged, raw, reported = [], [], []
    fingerprint, precisions = None, set()
    for seed in args.seeds:
        cfg = run_config(args, seed)
        run = Path(cfg.run.out)
        rundir = RunDirectory(run)
        if rundir.is_run():  # ConfigError naming what differs (another --lr, ...)
            rundir.check_resume_config(cfg)
            precisions.add(rundir.saved_precision() or "fp32")
        if not args.report_only and not _finished(run, args.steps):
            train(cfg)
        if not (run / "metrics.jsonl").exists():
            continue
        if not args.report_only:
            raw_curve(run, dataclasses.replace(cfg))
        ema_curve = at_evaluations(average_curve(run), args.eval_every, args.steps)
        raw_c = at_evaluations(cached_evaluations(run / "raw_evaluations.json"),
                               args.eval_every, args.steps)
        if not ema_curve or set(raw_c) != set(ema_curve):  # the same evaluations, or it waits
            print(f"seed {seed}: raw weights evaluated at {len(raw_c)} of the average's "
                  f"{len(ema_curve)} evaluations; left out (run without --report-only to "
                  "evaluate them)", file=sys.stderr)
            continue
        fingerprint = fingerprint or _fingerprint(run)
        reported.append(seed)
        averaged.append(ema_curve)
        raw.append(raw_c)
    if len(precisions) > 1:
        raise Refused(f"--out {args.out}: its runs trained at precisions {sorted(precisions)}; "
                      "report runs of one precision")
    settings = dict(vars(args), seeds=reported, dataset_fingerprint=fingerprint,
                    precision=next(iter(precisions), args.precision))
    for path in args.include:
        seeds, ema, raw_curves = included(path, settings)
        if set(seeds) & set(settings["seeds"]):
            raise Refused(f"--include {path}: seeds {sorted(set(seeds) & set(settings['seeds']))}"
                          " are reported twice; drop them from --seeds or the include")
        settings["seeds"] += seeds
        averaged += ema
        raw += raw_curves
    order = np.argsort(settings["seeds"], kind="stable")  # per-seed lists in seed order
    settings["seeds"] = [settings["seeds"][i] for i in order]
    averaged, raw = [averaged[i] for i in order], [raw[i] for i in order]
    report = {"settings": settings, "targets": {}}
    for target in (f"{t:g}" for t in args.targets):
        report["targets"][target] = {
            "ema": summary(averaged, target, args.reps, args.steps) if averaged else None,
            "raw": summary(raw, target, args.reps, args.steps) if raw else None,
            "curves": {"ema": [{str(k): v[target] for k, v in sorted(c.items())} for c in averaged],
                       "raw": [{str(k): v[target] for k, v in sorted(c.items())} for c in raw]}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "stability.json").write_text(json.dumps(report, indent=1))
    draw(report, Path(args.out, "stability.png"))
    for target, rows in report["targets"].items():
        print(f"target {target}: weights | last | final | best | swing | late swing | "
              "last-vs-best gap")
        for name in ("raw", "ema"):
            if rows[name]:
                cells = ["-" if rows[name][k]["iqm"] is None else
                         f"{rows[name][k]['iqm']:.1f} [{rows[name][k]['ci'][0]:.1f}, "
                         f"{rows[name][k]['ci'][1]:.1f}]" for k in KEYS]
                print(f"  {name} | " + " | ".join(cells))
    return 0


def draw(report: dict, path: Path) -> Path:
    """The learning curves of a report: one panel per target, one colour per seed, the raw
    weights dashed and their average solid (D4RL-normalized score against gradient step)."""
    from dtlab.plots import plt

    settings, targets = report["settings"], report["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(5.0 * len(targets), 3.8), dpi=120,
                             squeeze=False, layout="constrained")
    for ax, (target, rows) in zip(axes[0], targets.items()):
        for i, seed in enumerate(settings["seeds"]):
            for which, style, width, label in (("raw", "--", 1.0, "raw weights"),
                                               ("ema", "-", 2.0, "average")):
                if i < len(rows["curves"][which]):
                    curve = rows["curves"][which][i]
                    steps = sorted(curve, key=int)
                    ax.plot([int(s) for s in steps], [curve[s] for s in steps], ls=style,
                            lw=width, marker="o", ms=3, color=f"C{i % 10}",
                            label=f"seed {seed}, {label}")
        ax.set_title(f"{Path(settings['dataset']).stem}, target {target}", fontsize=9)
        ax.set_xlabel("gradient step")
        ax.set_ylabel("D4RL-normalized score")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.savefig(path)
    plt.close(fig)
    return path


def _fingerprint(run: Path) -> str | None:
    """The content fingerprint of the data a run trained on, as its checkpoint recorded it."""
    try:
        return checkpoint.load_info(run)[1].dataset.get("fingerprint")
    except Exception:
        return None


def _finished(run: Path, steps: int) -> bool:
    try:
        return checkpoint.load_info(run)[1].step >= steps
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
