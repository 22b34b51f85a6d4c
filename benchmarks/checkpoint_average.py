"""Stochastic weight averaging after the fact: the raw weights of a run's checkpoints from step
``--from-step`` on, averaged with equal weights (torch.optim.swa_utils.AveragedModel's default
running mean; Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better
Generalization", average at a constant learning rate), evaluated as training evaluates, beside
the same runs' raw weights and their exponential moving average.

    python benchmarks/checkpoint_average.py bench/stability-hmr/seed0 bench/stability-hmr/seed1 \
        --from-step 7500 --out bench/swa-hmr.json

Each RUN is a ``benchmarks/stability.py`` run (trained with ``--ema-decay``, every checkpoint
kept, its raw weights evaluated: RUN/raw_evaluations.json). At every evaluation step t from
``--from-step`` on, the average is of the raw weights of the checkpoints at the evaluation steps
from ``--from-step`` to t, so the score at t uses nothing trained after t; the curve a user of
such averaging would see is the raw weights' before ``--from-step`` and the average's from it.
Its evaluations use the run's targets, episodes and env seeds and are cached in
RUN/swa_from<STEP>_evaluations.json. The report: per run and as IQM [95% CI] over the runs,
stability.py's last, final, best, swing, late swing and best-minus-last gap of the three
curves. A run that lacks a checkpoint or a raw evaluation at one of the steps is refused in one
line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from dtlab.errors import DtlabError
from dtlab.policy import DTPolicy
from dtlab.rollout import Evaluator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stability import (KEYS, Refused, at_evaluations, average_curve,  # noqa: E402
                       cached_evaluations, raw_model, scores, summary)


def eval_steps(settings: dict, from_step: int) -> list[int]:
    """The evaluation steps a run of ``settings`` (its train_config.json) made from
    ``from_step`` on: multiples of eval_every, and the last step."""
    every, steps = settings["evaluation"]["eval_every"], settings["run"]["steps"]
    return sorted({s for s in range(every, steps + 1, every) if s >= from_step} | {steps})


def averaged(run: Path, steps: list[int]):
    """For each step t of ``steps``: (t, the equal-weight average of the raw weights of the
    checkpoints at ``steps`` up to t, as a model, and the checkpoint's PolicyInfo)."""
    average = None
    for step in steps:
        path = run / f"step_{step:08d}"
        if not path.is_dir():
            raise Refused(f"{path}: missing; the average needs the checkpoint of every evaluation"
                          f" step from --from-step {steps[0]}")
        model, info = raw_model(path)
        if average is None:  # a copy; its first update_parameters sets it to the model
            average = AveragedModel(model)
        average.update_parameters(model)  # the running mean of the models it is given
        yield step, average.module.eval(), info


def swa_curve(run: Path, settings: dict, raw: dict[int, dict[str, float]],
              from_step: int) -> dict[int, dict[str, float]]:
    """The equal-weight average of the raw weights at the evaluation steps from ``from_step``
    to t, evaluated at each such t (cached in RUN/swa_from<from_step>_evaluations.json); at
    ``from_step`` itself, the average of one, the raw weights' evaluation ``raw``."""
    cache_file = run / f"swa_from{from_step}_evaluations.json"
    cache = cached_evaluations(cache_file)
    if from_step not in cache and from_step in raw:
        cache[from_step] = raw[from_step]
    ev = settings["evaluation"]
    evaluator = Evaluator(settings["data"]["env"], tuple(ev["eval_targets"]),
                          ev["eval_episodes"], seed=settings["optim"]["seed"])
    for step, model, info in averaged(run, eval_steps(settings, from_step)):
        if step not in cache:
            cache[step] = scores(evaluator(DTPolicy(model, info)))
            cache_file.write_text(json.dumps(cache, indent=1))
    return cache


def curves(run: Path, from_step: int) -> dict[str, dict[int, dict[str, float]]]:
    """The run's three curves at its evaluation steps: raw weights, their moving average (as
    evaluated during training) and the raw weights before ``from_step`` joined to the
    checkpoint average from it."""
    settings = json.loads((run / "train_config.json").read_text())
    every, steps = settings["evaluation"]["eval_every"], settings["run"]["steps"]
    raw_file = run / "raw_evaluations.json"
    if not raw_file.exists():
        raise Refused(f"{raw_file}: missing; run benchmarks/stability.py on this run first")
    raw = at_evaluations(cached_evaluations(raw_file), every, steps)
    ema = at_evaluations(average_curve(run), every, steps)
    swa = swa_curve(run, settings, raw, from_step)
    if set(raw) != set(ema) or not set(swa) <= set(raw):
        raise Refused(f"{run}: the raw weights were evaluated at {sorted(raw)}, the average at "
                      f"{sorted(ema)}; finish the run with benchmarks/stability.py first")
    joined = {s: (swa[s] if s >= from_step else raw[s]) for s in raw}
    return {"raw": raw, "ema": ema, "swa": joined}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--from-step", type=int, default=7_500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--out", type=Path, help="write the report here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        per_run = [curves(run, args.from_step) for run in args.runs]
    except (Refused, DtlabError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = max(max(c["raw"]) for c in per_run)
    targets = sorted(per_run[0]["raw"][steps], key=float)
    report = {"runs": [str(r) for r in args.runs], "from_step": args.from_step, "targets": {}}
    for target in targets:
        rows = {name: summary([c[name] for c in per_run], target, args.reps, steps)
                for name in ("raw", "ema", "swa")}
        rows["curves"] = {name: [{str(k): v[target] for k, v in sorted(c[name].items())}
                                 for c in per_run] for name in ("raw", "ema", "swa")}
        report["targets"][target] = rows
        print(f"target {target}: weights | " + " | ".join(KEYS))
        for name in ("raw", "ema", "swa"):
            cells = ["-" if rows[name][k]["iqm"] is None else
                     f"{rows[name][k]['iqm']:.1f} [{rows[name][k]['ci'][0]:.1f}, "
                     f"{rows[name][k]['ci'][1]:.1f}] ("
                     + ", ".join("-" if v is None else f"{v:.1f}"
                                 for v in rows[name][k]["per_seed"]) + ")" for k in KEYS]
            print(f"  {name} | " + " | ".join(cells))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
