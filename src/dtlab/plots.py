"""Matplotlib figures: achieved vs target return (the DT paper's Figure 4), learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from dtlab.atomic import atomic_path  # noqa: E402
from dtlab.metrics import evaluation_curves, loss_curve, read_metrics  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def achieved_vs_target(results: Sequence, path: str | Path, *, title: str = "",
                       dataset_return: dict | None = None) -> Path:
    """Mean +- std achieved return per target, with the y = x line and the dataset's best and
    mean episode return for reference. ``results``: TargetResult-like objects or dicts."""
    rows = [r if isinstance(r, dict) else r.__dict__ for r in results]
    rows = sorted(rows, key=lambda r: r["target"])
    x = [r["target"] for r in rows]
    y = [r["mean"] for r in rows]
    e = [r["std"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    lo, hi = min(x + y), max(x + y)
    ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="oracle (achieved = target)")
    ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label="Decision Transformer")
    if dataset_return:
        ax.axhline(dataset_return["max"], color="tab:green", ls="--", lw=1, label="best in dataset")
        ax.axhline(dataset_return["mean"], color="tab:gray", ls="--", lw=1, label="dataset mean")
    ax.set_xlabel("target return")
    ax.set_ylabel("achieved return")
    ax.set_title(title or "Return conditioning")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def learning_curve(metrics_file: str | Path, path: str | Path) -> Path | None:
    """Training loss (and evaluation returns, if logged) against step, from metrics.jsonl; None
    when the file holds no finite loss yet."""
    records = read_metrics(metrics_file)
    loss = loss_curve(records)
    if not loss:
        return None
    evals = evaluation_curves(records)
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.8), dpi=120,
                             squeeze=False)
    axes[0, 0].plot(*zip(*loss))
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_xlabel("step")
    axes[0, 0].set_ylabel("action loss (MSE, or cross entropy if discrete)")
    for target, pts in sorted(evals.items()):
        axes[0, 1].plot(*zip(*pts), marker="o", label=target)
    if evals:
        axes[0, 1].set_xlabel("step")
        axes[0, 1].set_ylabel("eval return")
        axes[0, 1].legend(title="target", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
