"""The benchmark's report: the finished cells' evaluation records -> results.json, results.md and
plots/.

Per dataset x algorithm x target, over seeds: the last score of each run, the mean of its last
``FINAL_EVALUATIONS`` (3) and its best, each as mean ± std and as the interquartile mean (IQM)
with a 95% stratified-bootstrap confidence interval (rliable: Agarwal et al. 2021, "Deep RL at
the edge of the statistical precipice"); the swing (the mean absolute difference between
consecutive evaluations of a run) and the last-vs-best gap (best minus last), IQM over seeds;
beside the behaviour policy's score (the dataset's mean episode return). Scores are D4RL
normalized scores when the env has reference returns (dtlab's env registry or the dataset's
metadata), else raw returns. The target-free baselines are evaluated once per evaluation and
reported with target None.

A cell is finished when its evaluations.jsonl holds the evaluation at its last step (the settings'
``steps``, benchmark.json); unfinished cells are left out, so the report can be built from
whatever finished, however the cells were run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from dtlab.atomic import write_json, write_text_atomic
from dtlab.benchmark.datasets import GIVEN, PAPER, RUNS_DIR
from dtlab.benchmark.plan import (ALGORITHMS, DATASET_FILE, PLOTS_DIR, RESULTS_JSON, RESULTS_MD,
                                  SETTINGS_FILE, TARGET_FREE, BenchmarkConfig, read_evaluations,
                                  read_json)
from dtlab.errors import ConfigError

BOOTSTRAP_SEED = 0  # the report's bootstrap is seeded: rebuilding it gives the same intervals
# "final": the mean of each run's last evaluations. On data where the policy swings between
# evaluations (hopper-medium-replay: 30-60 points 2,500 steps apart, docs/results.md) the last
# evaluation alone is one noisy sample of the curve.
FINAL_EVALUATIONS = 3
SCORE_LABEL = "D4RL normalized score (0 = random, 100 = expert)"


# ---- statistics -----------------------------------------------------------------------------------
def iqm_with_ci(scores: np.ndarray, reps: int) -> tuple[float, float, float]:
    """Interquartile mean of ``scores`` (runs, tasks) and its 95% stratified-bootstrap confidence
    interval (rliable's ``get_interval_estimates`` with ``metrics.aggregate_iqm``, percentile
    method, resampling runs within each task). rliable draws from numpy's global generator; it
    is seeded with BOOTSTRAP_SEED here and restored afterwards."""
    from rliable import library, metrics

    state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)
    try:
        point, interval = library.get_interval_estimates(
            {"scores": np.asarray(scores, dtype=np.float64)},
            lambda s: np.array([metrics.aggregate_iqm(s)]), reps=reps)
    finally:
        np.random.set_state(state)
    return float(point["scores"][0]), float(interval["scores"][0, 0]), float(interval["scores"][1, 0])


def _stats(per_run: np.ndarray, matrix: np.ndarray, reps: int) -> dict[str, Any] | None:
    """mean ± std (over runs, ddof 0) of the per-run scores, and the IQM of the (runs, tasks)
    matrix with its CI; None when a run has no value (a swing needs two evaluations)."""
    if not np.all(np.isfinite(per_run)):
        return None
    iqm, lo, hi = iqm_with_ci(matrix, reps)
    return {"per_seed": per_run.tolist(), "mean": float(per_run.mean()),
            "std": float(per_run.std()), "iqm": iqm, "ci95": [lo, hi]}


def run_measures(curve: list[tuple[int, float]]) -> dict[str, float]:
    """One run's numbers from its (step, score) evaluations: last, final (mean of the last
    FINAL_EVALUATIONS), best, swing (mean |score_i+1 - score_i| over consecutive evaluations; nan
    with one evaluation) and gap (best - last)."""
    values = np.array([v for _, v in curve], dtype=np.float64)  # (evaluations,)
    return {"last": float(values[-1]), "final": float(values[-FINAL_EVALUATIONS:].mean()),
            "best": float(values.max()),
            "swing": float(np.abs(np.diff(values)).mean()) if values.size > 1 else float("nan"),
            "gap": float(values.max() - values[-1])}


MEASURES = ("last", "final", "best", "swing", "gap")


# ---- records --------------------------------------------------------------------------------------
def finished_runs(out: Path, datasets: dict[str, dict], steps: int) -> list[dict]:
    """Every finished cell under ``out``: dataset, algorithm, seed, its run directory and its
    evaluations (``plan.read_evaluations``), in dataset, algorithm, seed order."""
    runs = []
    for directory in sorted(out.glob(f"{RUNS_DIR}/*/*/seed*")):
        name, algorithm, seed = directory.parts[-3], directory.parts[-2], directory.name[4:]
        if name not in datasets or not re.fullmatch(r"\d+", seed):
            continue
        targets = tuple(datasets[name]["targets"])
        evaluations = read_evaluations(directory, targets[:1] if algorithm in TARGET_FREE
                                       else targets)
        if not evaluations or evaluations[-1]["step"] != steps:
            continue
        runs.append({"dataset": name, "algorithm": algorithm, "seed": int(seed),
                     "dir": str(directory.relative_to(out)), "steps": steps,
                     "target_free": algorithm in TARGET_FREE, "evaluations": evaluations,
                     "calibration": _calibration(directory, algorithm)})
    runs.sort(key=lambda r: (r["dataset"], _algorithm_order(r["algorithm"]), r["seed"]))
    return runs


def _calibration(directory: Path, algorithm: str) -> dict | None:
    from dtlab.checkpoint import LATEST_FILE, load_calibration

    if algorithm != "decision-transformer" or not (directory / LATEST_FILE).is_file():
        return None
    return load_calibration(directory)


def run_curves(run: dict, kind: str) -> dict[float | None, list[tuple[int, float]]]:
    """Per target (None for a target-free run): the (step, score) of every evaluation; the score
    is the normalized mean return (kind "normalized") or the mean return."""
    curves: dict[float | None, list[tuple[int, float]]] = {}
    for evaluation in run["evaluations"]:
        for r in evaluation["results"]:
            key = None if run["target_free"] else float(r["target"])
            value = r["normalized_mean"] if kind == "normalized" else r["mean"]
            curves.setdefault(key, []).append(
                (int(evaluation["step"]), float("nan") if value is None else float(value)))
    return curves


def _algorithm_order(name: str) -> tuple[int, str]:
    return (ALGORITHMS.index(name) if name in ALGORITHMS else len(ALGORITHMS), name)


def target_kind(dataset: dict, target: float | None) -> str | None:
    """Where a dataset's target came from (datasets.PAPER, DATA_FITTED, GIVEN); None: target-free."""
    if target is None:
        return None
    kinds = dataset.get("target_kinds") or [PAPER] * len(dataset["targets"])  # older records
    return kinds[dataset["targets"].index(target)] if target in dataset["targets"] else GIVEN


# ---- the report -----------------------------------------------------------------------------------
def build_report(out: Path, cfg: BenchmarkConfig | None = None, *, expected: int | None = None,
                 echo: bool = False) -> dict:
    """results.json, results.md and plots/ from every finished cell under ``out`` (and the
    datasets' dataset.json); returns results.json's content. ConfigError when ``out`` holds no
    benchmark."""
    if not (out / SETTINGS_FILE).is_file():
        raise ConfigError(f"{out}: no benchmark here (no {SETTINGS_FILE}); nothing to report "
                          "(--out)")
    saved = read_json(out / SETTINGS_FILE)  # the settings the cells ran with, not this call's
    reps = cfg.bootstrap_reps if cfg is not None else 2000
    datasets = {d["name"]: d for d in map(read_json, sorted(out.glob(f"{RUNS_DIR}/*/{DATASET_FILE}")))}
    runs = finished_runs(out, datasets, int(saved["steps"]))
    # cells[(dataset, algorithm, target)][seed] = [(step, score), ...]
    cells: dict[tuple[str, str, float | None], dict[int, list[tuple[int, float]]]] = {}
    for run in runs:
        kind = datasets[run["dataset"]]["score"]
        for target, curve in run_curves(run, kind).items():
            cells.setdefault((run["dataset"], run["algorithm"], target), {})[run["seed"]] = curve
    results = []
    for (name, algorithm, target), by_seed in cells.items():
        seeds = sorted(by_seed)
        measures = [run_measures(by_seed[s]) for s in seeds]
        cell = {"dataset": name, "algorithm": algorithm, "target": target,
                "target_kind": target_kind(datasets[name], target), "seeds": seeds}
        for which in MEASURES:
            per_run = np.array([m[which] for m in measures])  # (seeds,)
            cell[which] = _stats(per_run, per_run[:, None], reps)
        results.append(cell)
    report = {
        "score": {name: d["score"] for name, d in datasets.items()},
        "settings": saved,
        "runs_finished": len(runs), "runs_expected": expected,
        "datasets": {name: {k: v for k, v in d.items() if k != "episode_returns"}
                     for name, d in datasets.items()},
        "results": results,
        "aggregate": _aggregate(results, datasets, reps),
        "calibration": [{"dataset": r["dataset"], "seed": r["seed"],
                         **{k: r["calibration"][k] for k in (
                             "reliable_max_target", "achieved_at_reliable_max", "rising_range",
                             "saturated", "z", "episodes")}}
                        for r in runs if r.get("calibration")],
        "runs": [{k: r[k] for k in ("dataset", "algorithm", "seed", "dir", "steps")}
                 for r in runs],
    }
    report["plots"] = _plots(out, cells, datasets, runs)
    write_json(out / RESULTS_JSON, report)
    text = results_markdown(report)
    write_text_atomic(out / RESULTS_MD, text)
    if echo:
        print(text)
        print(f"wrote {out / RESULTS_JSON}, {out / RESULTS_MD}, {out / PLOTS_DIR}/")
    return report


def _aggregate(results: list[dict], datasets: dict, reps: int) -> list[dict]:
    """Across datasets, per algorithm and target (a decision transformer's i-th target of each
    kind: the i-th paper target of each env, the data-fitted one; None for the target-free
    baselines): the IQM over the (seeds, datasets) matrix of the seeds finished on every
    dataset. Only with two or more datasets."""
    if len(datasets) < 2:
        return []
    by_key: dict[tuple[str, str | None, int | None], dict[str, dict]] = {}
    for cell in results:
        d, target = datasets[cell["dataset"]], cell["target"]
        kind = cell["target_kind"]
        rank = None
        if target is not None:
            same_kind = [t for t, k in zip(d["targets"], d.get("target_kinds")
                                           or [PAPER] * len(d["targets"])) if k == kind]
            rank = same_kind.index(target) if target in same_kind else -1
        by_key.setdefault((cell["algorithm"], kind, rank), {})[cell["dataset"]] = cell
    rows = []
    for (algorithm, kind, rank), per_dataset in sorted(
            by_key.items(), key=lambda kv: (_algorithm_order(kv[0][0]), kv[0][1] or "",
                                            kv[0][2] or 0)):
        if rank == -1 or set(per_dataset) != set(datasets):
            continue
        seeds = sorted(set.intersection(*(set(c["seeds"]) for c in per_dataset.values())))
        if not seeds:
            continue
        row = {"algorithm": algorithm, "target_kind": kind,
               "target_rank": None if rank is None else rank + 1, "seeds": seeds,
               "datasets": sorted(per_dataset)}
        for which in MEASURES:
            if any(c[which] is None for c in per_dataset.values()):
                row[which] = None
                continue
            matrix = np.array([[c[which]["per_seed"][c["seeds"].index(s)]
                                for c in (per_dataset[d] for d in row["datasets"])]
                               for s in seeds])  # (seeds, datasets)
            row[which] = _stats(matrix.mean(axis=1), matrix, reps)
        rows.append(row)
    return rows


def curve_label(algorithm: str, target: float | None, kind: str | None) -> str:
    """A learning curve's name: the algorithm alone when it is target-free, else with its target
    and where the target came from."""
    return algorithm if target is None else f"{algorithm} @ {target:g} ({kind})"


def _plots(out: Path, cells: dict, datasets: dict, runs: list[dict]) -> list[str]:
    """Learning curves per dataset (score against step, mean ± std over seeds) and, where DT runs
    were calibrated, a calibration plot per dataset (one curve per seed)."""
    from dtlab.plots import calibration_plot, score_curves

    written = []
    for name, d in datasets.items():
        curves = []
        for (dataset, algorithm, target), by_seed in cells.items():
            if dataset != name:
                continue
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in by_seed.values())))
            values = np.array([[dict(c)[s] for s in steps] for c in by_seed.values()])
            seeds = f"{len(by_seed)} seed{'s' if len(by_seed) != 1 else ''}"
            label = f"{curve_label(algorithm, target, target_kind(d, target))}, {seeds}"
            curves.append((label, steps, values.mean(0).tolist(), values.std(0).tolist()))
        normalized = d["score"] == "normalized"
        behaviour = d["behaviour"]["normalized" if normalized else "mean_return"]
        if curves:
            path = out / PLOTS_DIR / f"{name}-learning-curves.png"
            score_curves(curves, path, title=f"{name} ({d['env']}): score during training",
                         ylabel=SCORE_LABEL if normalized else "return",
                         reference=("behaviour policy (dataset mean)", behaviour),
                         band="± 1 std over seeds")
            written.append(str(path.relative_to(out)))
        calibrated = [(f"seed {r['seed']} (bars: ± std over {r['calibration']['episodes']} "
                       "episodes)", r["calibration"]) for r in runs
                      if r["dataset"] == name and r.get("calibration")]
        if calibrated:
            path = out / PLOTS_DIR / f"{name}-calibration.png"
            calibration_plot(calibrated, path, episode_returns=d.get("episode_returns"),
                             title=f"{name} ({d['env']}): achieved vs target return")
            written.append(str(path.relative_to(out)))
    return written


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _mean_std(stats: dict | None) -> str:
    return "–" if stats is None else f"{_fmt(stats['mean'])} ± {_fmt(stats['std'])}"


def _iqm(stats: dict | None) -> str:
    return ("–" if stats is None else
            f"{_fmt(stats['iqm'])} [{_fmt(stats['ci95'][0])}, {_fmt(stats['ci95'][1])}]")


def _row_numbers(row: dict) -> str:
    return " | ".join([_mean_std(row["last"]), _iqm(row["last"]), _mean_std(row["final"]),
                       _iqm(row["final"]), _mean_std(row["best"]), _iqm(row["best"]),
                       _iqm(row["swing"]), _iqm(row["gap"])])


_HEADER = ("last: mean ± std | last: IQM [95% CI] | final: mean ± std | final: IQM [95% CI] | "
           "best: mean ± std | best: IQM [95% CI] | swing: IQM [95% CI] | "
           "best − last: IQM [95% CI] |")


def results_markdown(report: dict) -> str:
    """results.md: the per-dataset table, the aggregate over datasets, the calibration table."""
    kinds = set(report["score"].values())
    score = ("normalized score, 100 * (return - random) / (expert - random) with the env's "
             "reference returns (D4RL's for MuJoCo)" if kinds == {"normalized"} else
             "normalized score where the env has reference returns, else the raw return (see "
             "results.json: score)")
    expected = report["runs_expected"]
    lines = ["# dtlab benchmark", "",
             f"Score: {score}. Cells finished: {report['runs_finished']}"
             + (f" of {expected}" if expected is not None else "") + ".",
             "last: the score at the final evaluation of each run; final: the mean of its last "
             f"{FINAL_EVALUATIONS} evaluations (less noisy where scores swing between "
             "evaluations); best: its highest score over all evaluations (optimistic); swing: the "
             "mean absolute difference between consecutive evaluations of a run; best − last: "
             "how far its last score lies below its best. mean ± std over seeds; IQM: "
             "interquartile mean over seeds with a 95% stratified-bootstrap confidence interval "
             "(rliable). Targets: (paper) the env's targets from the DT paper; (data-fitted) the "
             "dataset's best episode return, rounded, added where a paper target lies far beyond "
             "the data; (--eval-targets) given. Target-free baselines ignore the target return.",
             "", "| dataset | algorithm | target | seeds | " + _HEADER,
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        behaviour = d["behaviour"]["normalized" if d["score"] == "normalized" else "mean_return"]
        lines.append(f"| {name} | behaviour policy (dataset mean) | – | – | {_fmt(behaviour)} "
                     "| | | | | | | |")
        for cell in (c for c in report["results"] if c["dataset"] == name):
            target = ("target-free" if cell["target"] is None
                      else f"{cell['target']:g} ({cell['target_kind']})")
            lines.append(f"| {name} | {cell['algorithm']} | {target} | {len(cell['seeds'])} | "
                         + _row_numbers(cell) + " |")
    if report["aggregate"]:
        lines += ["", "## All datasets", "",
                  "Per run, the mean over datasets (mean ± std over seeds); the IQM over every "
                  "(seed, dataset) score. Target: each env's i-th target of that kind.", "",
                  "| algorithm | target | seeds | " + _HEADER,
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["aggregate"]:
            target = ("target-free" if row["target_rank"] is None
                      else f"{row['target_kind']} #{row['target_rank']}")
            lines.append(f"| {row['algorithm']} | {target} | {len(row['seeds'])} | "
                         + _row_numbers(row) + " |")
    if report["calibration"]:
        lines += ["", "## Return-conditioning calibration (decision-transformer)", "",
                  "| dataset | seed | reliable maximum target | achieved there | rises from .. to "
                  "| saturated |", "|---|---|---|---|---|---|"]
        for c in report["calibration"]:
            rng = c["rising_range"]
            lines.append(f"| {c['dataset']} | {c['seed']} | {c['reliable_max_target']:g} | "
                         f"{_fmt(c['achieved_at_reliable_max'])} | "
                         + ("does not rise" if not rng else f"{rng[0]:g} .. {rng[1]:g}")
                         + f" | {'yes' if c['saturated'] else 'no (still rising)'} |")
    if report["plots"]:
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"])]
    return "\n".join(lines) + "\n"
