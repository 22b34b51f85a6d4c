"""Training metrics and the evaluation record: the records' names are made and read here only.

A run writes one JSON object per line to ``OUT/metrics.jsonl`` (strict JSON: a non-finite value is
written as null) and mirrors the scalars to TensorBoard under ``OUT/tb``: ``step``, ``loss`` (mean
over the applied steps since the last record), ``lr`` (the rate the last step applied),
``steps_per_s``, and ``skipped_nonfinite`` when skipping is enabled.

Evaluations are typed records (``Evaluation``: the step, which weights, and a ``TargetResult`` per
target), one a line in ``OUT/evaluations.jsonl`` (dtlab.rundir); the console line, TensorBoard's
``eval/return_<target>`` and ``eval/normalized_<target>`` scalars, the learning curve and the
benchmark report are all made from them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dtlab.atomic import dumps_json, write_text_atomic
from dtlab.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
EVAL_RETURN = "eval/return_"
EVAL_NORMALIZED = "eval/normalized_"


def training_record(step: int, loss: float, lr: float, steps_per_s: float,
                    skipped_nonfinite: int | None = None) -> dict[str, Any]:
    """One training record (``skipped_nonfinite`` only when the run skips bad steps)."""
    record = {"step": step, "loss": loss, "lr": lr, "steps_per_s": steps_per_s}
    if skipped_nonfinite is not None:
        record["skipped_nonfinite"] = skipped_nonfinite
    return record


@dataclass(frozen=True)
class TargetResult:
    """Outcome of all episodes conditioned on one target return (returns undiscounted, in the
    env's units)."""

    target: float
    returns: list[float]  # (episodes,)
    lengths: list[int]  # (episodes,) steps per episode
    mean: float
    std: float  # population std (ddof 0) of the returns
    normalized_mean: float | None  # D4RL normalized score of the mean return, when comparable
    normalized_std: float | None


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a policy at one or more targets (a line of evaluations.jsonl).

    ``weights``: which weights acted: "raw" (the trained ones) or "average" (the exponential
    moving average, ``optim.ema_decay``). ``timing``: env steps, seconds, env steps/s and the
    seconds inside the model (dtlab.rollout.RolloutReport.timing)."""

    step: int
    results: tuple[TargetResult, ...]
    weights: str = "raw"
    timing: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "weights": self.weights,
                "results": [asdict(r) for r in self.results], "timing": dict(self.timing)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Evaluation":
        """The record as ``to_json`` wrote it; KeyError/TypeError/ValueError when malformed."""
        names = {f.name for f in fields(TargetResult)}  # keys a later dtlab may add are skipped
        return cls(int(data["step"]), tuple(TargetResult(**{k: v for k, v in r.items()
                                                             if k in names})
                                             for r in data["results"]),
                   str(data.get("weights", "raw")), dict(data.get("timing") or {}))

    def score(self, target: float) -> float:
        """The normalized mean at ``target`` when known, else the mean return."""
        r = next(r for r in self.results if r.target == target)
        return r.normalized_mean if r.normalized_mean is not None else r.mean

    def mean_score(self) -> float:
        """The mean over targets of ``score``: how the run's best checkpoint is chosen."""
        return sum(self.score(r.target) for r in self.results) / len(self.results)

    def line(self) -> str:
        """One console line: 'eval step 2500: target 3600 -> 1234.5 (40.1 normalized), ...'."""
        parts = []
        for r in self.results:
            norm = f" ({r.normalized_mean:.1f} normalized)" if r.normalized_mean is not None else ""
            length = sum(r.lengths) / max(len(r.lengths), 1)
            parts.append(f"target {r.target:g} -> {r.mean:.1f}{norm}, length {length:.0f}")
        who = " (averaged weights)" if self.weights == "average" else ""
        return f"eval step {self.step}{who}: " + "; ".join(parts)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a partly written last line (a crash mid-write) is skipped."""
    return [r for r in map(_parse, Path(path).read_text().splitlines()) if r is not None]


def loss_curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of every training record with a finite loss."""
    return [(r["step"], r["loss"]) for r in records
            if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]


def evaluation_curves(evaluations: list[Evaluation], normalized: bool = False
                      ) -> dict[float, list[tuple[int, float]]]:
    """Per target: the (step, mean return) points of its evaluations (``normalized``: the D4RL
    normalized score of the mean, where known)."""
    curves: dict[float, list[tuple[int, float]]] = {}
    for e in evaluations:
        for r in e.results:
            value = r.normalized_mean if normalized else r.mean
            if value is not None:
                curves.setdefault(r.target, []).append((e.step, value))
    return curves


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
        int(record["step"])
        return record
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class MetricsLog:
    """Appends records to OUT/metrics.jsonl and mirrors scalars to TensorBoard and, with
    ``wandb_project``, to a Weights & Biases run of that project (``wandb.init(project=...,
    dir=OUT, name=OUT's name)``; WANDB_MODE=offline keeps it on disk).

    ``resume_from``: the step of the checkpoint a resumed run continues from; records written after
    it are dropped (they will be redone). None starts a new file.
    """

    def __init__(self, out: Path, resume_from: int | None, tensorboard: bool,
                 wandb_project: str | None = None, wandb_config: dict[str, Any] | None = None
                 ) -> None:
        self.path = out / METRICS_FILE
        if resume_from is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if (r := _parse(line)) is not None and int(r["step"]) <= resume_from]
            write_text_atomic(self.path, "".join(line + "\n" for line in keep))
        elif resume_from is None:
            self.path.write_text("")
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tb"), purge_step=resume_from)
        self._wandb = None
        if wandb_project is not None:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--wandb needs the wandb library: pip install 'dtlab[wandb]'") \
                    from None
            self._wandb = wandb.init(project=wandb_project, dir=str(out), name=out.name,
                                     config=wandb_config)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(dumps_json(record, indent=None) + "\n")
        self._file.flush()
        scalars = {key if "/" in key else f"train/{key}": value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float))}
        self._scalars(scalars, int(record["step"]))

    def write_evaluation(self, evaluation: Evaluation) -> None:
        """An evaluation's scalars to TensorBoard and W&B (the record itself is
        evaluations.jsonl's)."""
        scalars = {}
        for r in evaluation.results:
            scalars[f"{EVAL_RETURN}{r.target:g}"] = r.mean
            if r.normalized_mean is not None:
                scalars[f"{EVAL_NORMALIZED}{r.target:g}"] = r.normalized_mean
        self._scalars(scalars, evaluation.step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def on_terminal() -> bool:
    """Whether stdout shows a live progress bar: a terminal or a Jupyter notebook, as rich
    decides it (FORCE_TERMINAL respected). In a log file or a pipe a bar is
    cut to 80 columns ("1500/1..."), so callers print plain lines there instead."""
    from rich.console import Console

    console = Console()
    return console.is_terminal or console.is_jupyter


class Progress:
    """A rich progress bar with loss, lr, steps/s and ETA (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self._bar.start()
            # Until the first log point there is no loss to show: say so, not "loss nan".
            self._task = self._bar.add_task("train", total=total, completed=start,
                                            status="loss at the first log point")

    def advance(self, step: int) -> None:
        """The bar at ``step`` (every step: its count and ETA move between log points)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def update(self, step: int, loss: float, lr: float, rate: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step,
                             status=f"loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} steps/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
