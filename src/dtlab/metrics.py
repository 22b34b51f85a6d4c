"""Training metrics: the records' names are made and read here only.

A run writes one JSON object per line to ``OUT/metrics.jsonl`` (strict JSON: a non-finite value is
written as null) and mirrors the scalars to TensorBoard under ``OUT/tb``:

- training records: ``step``, ``loss`` (mean over the applied steps since the last record), ``lr``,
  ``steps_per_s``, and ``skipped_nonfinite`` when skipping is enabled;
- evaluation records: ``step``, ``eval/return_<target>`` (mean return) and
  ``eval/normalized_<target>`` (D4RL normalized score of the mean, when the env has references).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from dtlab.atomic import dumps_json, write_text_atomic

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


def evaluation_record(step: int, results: Iterable) -> dict[str, Any]:
    """One evaluation record from per-target results (objects with target, mean, normalized_mean)."""
    record: dict[str, Any] = {"step": step}
    for r in results:
        record[f"{EVAL_RETURN}{r.target:g}"] = r.mean
        if r.normalized_mean is not None:
            record[f"{EVAL_NORMALIZED}{r.target:g}"] = r.normalized_mean
    return record


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a partly written last line (a crash mid-write) is skipped."""
    return [r for r in map(_parse, Path(path).read_text().splitlines()) if r is not None]


def loss_curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of every training record with a finite loss."""
    return [(r["step"], r["loss"]) for r in records
            if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]


def evaluation_curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Per target (as written, e.g. "3600"): the (step, mean return) points of its evaluations."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith(EVAL_RETURN) and isinstance(value, (int, float)):
                curves.setdefault(key[len(EVAL_RETURN):], []).append((r["step"], value))
    return curves


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
        int(record["step"])
        return record
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class MetricsLog:
    """Appends records to OUT/metrics.jsonl and mirrors scalars to TensorBoard.

    ``resume_from``: the step of the checkpoint a resumed run continues from; records written after
    it are dropped (they will be redone). None starts a new file.
    """

    def __init__(self, out: Path, resume_from: int | None, tensorboard: bool) -> None:
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

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(dumps_json(record, indent=None) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A rich progress bar with loss, lr, steps/s and ETA (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                           "{task.fields[rate]:.1f} steps/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start,
                                            loss=float("nan"), lr=0.0, rate=0.0)

    def update(self, step: int, loss: float, lr: float, rate: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, lr=lr, rate=rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
