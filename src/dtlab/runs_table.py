"""``dtlab runs DIR``: every training run under a directory in one table (step, data, env, last
and best evaluation), as JSON, and one figure comparing their evaluation curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro

from dtlab import checkpoint
from dtlab.errors import ConfigError, DtlabError
from dtlab.metrics import Evaluation
from dtlab.rundir import TRAIN_CONFIG_FILE, RunDirectory


@dataclass(frozen=True)
class RunsConfig:
    """List the training runs under a directory (every directory holding a train_config.json):
    step, data, env, last and best evaluation; optionally one figure of their evaluation curves."""

    root: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="DIR")]
    """Directory to search, e.g. runs (a run directory itself lists that run)."""
    json: bool = False
    """Print machine-readable JSON instead of a table."""
    plot: str | None = None
    """PNG path for a figure comparing the runs' evaluation curves (score against step)."""


def find_runs(root: str | Path) -> list[RunDirectory]:
    """The run directories at or under ``root``, by path. ConfigError when ``root`` is not a
    directory."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory (give dtlab runs the directory holding the runs)")
    return [RunDirectory(p.parent) for p in sorted(root.rglob(TRAIN_CONFIG_FILE))]


def score(result) -> tuple[float, str]:
    """A target's result as (value, unit): the D4RL normalized score of its mean where known,
    else its mean return."""
    if result.normalized_mean is not None:
        return result.normalized_mean, "normalized"
    return result.mean, "return"


def _evaluation_json(e: Evaluation) -> dict[str, Any]:
    return {"step": e.step, "scores": {f"{r.target:g}": score(r)[0] for r in e.results},
            "unit": score(e.results[0])[1] if e.results else None}


def summarize(run: RunDirectory, root: Path) -> dict[str, Any]:
    """One run's row: name (its path under ``root``), step of the latest checkpoint (None: none
    yet), steps asked for, dataset file, env, last evaluation and best evaluation (the one with
    the highest mean score over targets, as RUN/best is chosen: its best target's score, the
    target and the step); ``error`` for a run whose
    files cannot be read."""
    name = str(run.path.relative_to(root)) if run.path != root else run.path.name
    try:
        saved = run.saved_config_json()
        latest = run.latest_checkpoint()
        step = checkpoint.load_info(latest)[1].step if latest is not None else None
        evaluations = [e for e in run.evaluations() if e.results]
    except DtlabError as exc:
        return {"name": name, "path": str(run.path), "error": str(exc)}
    best = None
    if evaluations:  # as RUN/best is chosen: the highest mean score over the targets
        top = max(evaluations, key=lambda e: e.mean_score())
        r = max(top.results, key=lambda r: score(r)[0])
        best = {"score": score(r)[0], "unit": score(r)[1], "target": r.target, "step": top.step}
    data, run_cfg = saved.get("data", {}), saved.get("run", {})
    return {"name": name, "path": str(run.path), "step": step, "steps": run_cfg.get("steps"),
            "dataset": data.get("dataset"), "env": data.get("env"),
            "evaluations": [_evaluation_json(e) for e in evaluations],
            "last_evaluation": _evaluation_json(evaluations[-1]) if evaluations else None,
            "best_evaluation": best}


def print_runs(rows: list[dict[str, Any]], root: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} run{'s' if len(rows) != 1 else ''} under {root} "
                        "(scores: D4RL normalized, 0 = random, 100 = expert, where the env has "
                        "reference returns; else mean return)")
    for column in ("run", "step", "dataset", "env", "last evaluation (target: score)",
                   "best (score @ target, step)"):
        table.add_column(column, justify="right" if column == "step" else "left")
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], "-", "-", "-", f"unreadable: {row['error']}", "-")
            continue
        step = "-" if row["step"] is None else str(row["step"])
        last, best = row["last_evaluation"], row["best_evaluation"]
        last_text = ("-" if last is None else f"step {last['step']}: " + ", ".join(
            f"{t}: {v:.1f}" for t, v in last["scores"].items()))
        best_text = ("-" if best is None else
                     f"{best['score']:.1f} @ {best['target']:g}, step {best['step']}")
        table.add_row(row["name"], f"{step}/{row['steps']}", Path(str(row["dataset"])).name,
                      str(row["env"]), last_text, best_text)
    Console().print(table)


def list_runs(cfg: RunsConfig, echo: bool = True) -> list[dict[str, Any]]:
    """The rows of every run under ``cfg.root`` (printed as a table or JSON when ``echo``), and
    the comparison figure at ``cfg.plot``. ConfigError when there is no run there, or nothing to
    plot."""
    from dtlab.atomic import check_writable, dumps_json

    root = Path(cfg.root)
    runs = find_runs(root)
    if not runs:
        raise ConfigError(f"{root}: no dtlab runs here (no {TRAIN_CONFIG_FILE} at or under it)")
    if cfg.plot:
        check_writable(cfg.plot)
    rows = [summarize(run, root) for run in runs]
    if cfg.plot:
        from dtlab.plots import compare_runs

        curves = {row["name"]: row["evaluations"] for row in rows if row.get("evaluations")}
        if not curves:
            raise ConfigError(f"{root}: no run has evaluated yet; nothing for --plot {cfg.plot} "
                              "(train with --eval-every and --eval-episodes)")
        compare_runs(curves, cfg.plot, title=f"evaluation curves of the runs under {root}")
    if echo:
        if cfg.json:
            print(dumps_json(rows))
        else:
            print_runs(rows, root)
            if cfg.plot:
                print(f"wrote {cfg.plot}")
    return rows
