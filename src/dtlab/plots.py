"""Matplotlib figures: achieved vs target return (the DT paper's Figure 4), calibration, learning
curves, run comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from dtlab.atomic import atomic_path  # noqa: E402
from dtlab.data.records import ReturnStats  # noqa: E402
from dtlab.metrics import Evaluation, evaluation_curves, loss_curve  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


RETURN_UNITS = "return (sum of rewards per episode)"


def _legend_outside(ax, handles=None, labels=None) -> None:
    """The legend to the right of the axes, where it covers no curve or reference line."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, handlelength=3.5)  # long enough to show a dashed style


def achieved_vs_target(results: Sequence, path: str | Path, *, title: str = "",
                       dataset_return: ReturnStats | None = None) -> Path:
    """Mean ± 1 std (population, over the episodes) achieved return per target, with the y = x
    line and the dataset's best and mean episode return for reference; the legend sits outside
    the axes and says what the error bars are. ``results``: TargetResult-like objects or dicts
    (target, mean, std, returns); ``title``: what was evaluated (run, step, env, dataset)."""
    rows = [r if isinstance(r, dict) else r.__dict__ for r in results]
    rows = sorted(rows, key=lambda r: r["target"])
    x = [r["target"] for r in rows]
    y = [r["mean"] for r in rows]
    e = [r["std"] for r in rows]
    episodes = sorted({len(r["returns"]) for r in rows if "returns" in r})
    over = f" over {'/'.join(map(str, episodes))} episodes" if episodes else ""
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120, layout="constrained")
    lo, hi = min(x + y), max(x + y)
    if dataset_return:  # reference lines first, under the curve
        ax.axhline(dataset_return.max, color="tab:green", ls="--", lw=1, label="best in dataset")
        ax.axhline(dataset_return.mean, color="tab:gray", ls="--", lw=1, label="dataset mean")
    ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="oracle (achieved = target)")
    ax.errorbar(x, y, yerr=e, marker="o", capsize=3,
                label=f"Decision Transformer\n(mean ± 1 std{over})")
    ax.set_xlabel(f"target {RETURN_UNITS}")
    ax.set_ylabel(f"achieved {RETURN_UNITS}")
    ax.set_title(title or "Return conditioning", fontsize=9)
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def learning_curve(records: list[dict], evaluations: Sequence[Evaluation], path: str | Path, *,
                   title: str, loss_name: str) -> Path | None:
    """Training loss against step (left; ``records`` as dtlab.metrics.read_metrics gives them)
    and, when the run evaluated, each target's evaluation score against step (right: the D4RL
    normalized score where the env has reference returns, else the mean return). ``title``
    names the run, env and dataset; ``loss_name`` the loss ("MSE" or "cross entropy"). None when
    there is no finite loss yet."""
    loss = loss_curve(records)
    if not loss:
        return None
    normalized = bool(evaluations) and all(r.normalized_mean is not None
                                           for e in evaluations for r in e.results)
    evals = evaluation_curves(list(evaluations), normalized=normalized)
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5.5, 4.0), dpi=120,
                             squeeze=False)
    ax = axes[0, 0]
    ax.plot(*zip(*loss))
    values = [v for _, v in loss]
    log = min(values) > 0 and max(values) / min(values) >= 10  # a log axis spans a decade or more
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.set_xlabel("gradient step")
    ax.set_ylabel(f"training loss ({loss_name}{', log scale' if log else ''})")
    ax.set_title("training loss")
    if evals:
        ax = axes[0, 1]
        styles = ("-", "--", ":", "-.")
        markers = ("o", "s", "^", "D", "v")
        for i, (target, pts) in enumerate(sorted(evals.items())):
            ax.plot(*zip(*pts), ls=styles[i % len(styles)], marker=markers[i % len(markers)],
                    label=f"target {target:g}")
        averaged = any(e.weights == "average" for e in evaluations)
        episodes = len(evaluations[-1].results[0].returns)
        ax.set_xlabel("gradient step")
        ax.set_ylabel("D4RL normalized score\n(0 = random, 100 = expert)" if normalized
                      else "return (mean over episodes)")
        ax.set_title(f"evaluation: mean of {episodes} episode{'s' if episodes > 1 else ''} per "
                     f"target{', averaged weights' if averaged else ''}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def calibration_plot(curves: Sequence[tuple[str, dict]], path: str | Path, *,
                     episode_returns: Sequence[float] | None = None, title: str = "") -> Path:
    """Achieved vs target return (mean ± 1 std over each record's ``episodes``) with the y = x
    line, over a histogram of the data's episode returns (right axis); each curve's reliable
    maximum target is a dashed vertical line in the curve's colour (so drawn in the legend too)
    and its rising range shaded. The legend sits below the axes. ``curves``: (label,
    calibration record with targets, means, achieved_std, reliable_max_target, rising_range and
    optionally episodes); ``title``: what was calibrated (run, step, env, dataset)."""
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120, layout="constrained")
    hist = None
    if episode_returns is not None and len(episode_returns):
        hist = ax.twinx()
        hist.hist(episode_returns, bins=30, color="0.85", label="dataset episode returns")
        hist.set_ylabel("episodes in the dataset")
        ax.set_zorder(hist.get_zorder() + 1)  # the curves in front of the histogram
        ax.patch.set_visible(False)
    values = [v for _, c in curves for v in c["targets"] + c["means"]]
    lo, hi = min(values), max(values)
    ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="achieved = target")
    for i, (label, c) in enumerate(curves):
        color = f"C{i % 10}"
        over = f" over {c['episodes']} episodes" if c.get("episodes") else ""
        ax.errorbar(c["targets"], c["means"], yerr=c.get("achieved_std"), marker="o", ms=3,
                    capsize=2, color=color, label=f"{label} (mean ± 1 std{over})")
        ax.axvline(c["reliable_max_target"], color=color, ls="--", lw=1,
                   label=f"{label}: reliable maximum target {c['reliable_max_target']:g}")
        if c.get("rising_range"):
            ax.axvspan(*c["rising_range"], color=color, alpha=0.08)
    ax.set_xlabel(f"target {RETURN_UNITS}")
    ax.set_ylabel(f"achieved {RETURN_UNITS}")
    ax.set_title(title or "Return-conditioning calibration", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    if hist is not None:
        h2, l2 = hist.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=2)  # below the axes
    ax.grid(alpha=0.3)
    return _save(fig, path)


def score_curves(curves: Sequence[tuple[str, Sequence[int], Sequence[float], Sequence[float]]],
                 path: str | Path, *, title: str = "", ylabel: str = "score",
                 reference: tuple[str, float] | None = None,
                 band: str = "± 1 std", xlabel: str = "training step") -> Path:
    """Learning curves: mean score against training step with a shaded band (mean ± the given
    spread), one line per (label, steps, means, spreads); each line has its own colour, line style
    and marker, so curves that coincide stay visible. ``band`` says in the legend what the bands
    are; ``reference`` draws a labelled horizontal line (e.g. the behaviour policy's score)."""
    styles, markers = ("-", "--", "-.", ":"), ("o", "s", "^", "D", "v", "x")
    fig, ax = plt.subplots(figsize=(9.0, 4.4), dpi=120)
    for i, (label, steps, means, stds) in enumerate(curves):
        color = f"C{i % 10}"
        ax.plot(steps, means, ls=styles[i % len(styles)], marker=markers[i % len(markers)],
                ms=4 + 1.5 * (i % 3), mfc="none", lw=1.5, color=color, label=label)
        lower = [m - s for m, s in zip(means, stds)]
        upper = [m + s for m, s in zip(means, stds)]
        ax.fill_between(steps, lower, upper, color=color, alpha=0.12)
    if reference is not None:
        ax.axhline(reference[1], color="0.4", ls="--", lw=1, label=reference[0])
    if curves:
        ax.fill_between([], [], [], color="0.6", alpha=0.3, label=f"shaded: {band}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on, the data
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def compare_runs(curves: dict[str, list[dict]], path: str | Path, *, title: str) -> Path:
    """Evaluation curves of several runs: per run (one colour) and target (one line style), the
    score against gradient step. ``curves``: run name -> its evaluations as
    ``{"step", "scores": {target: score}, "unit": "normalized" | "return"}`` (dtlab.runs_table);
    the y axis is the D4RL normalized score when every evaluation has one, else mean return."""
    normalized = all(e["unit"] == "normalized" for evals in curves.values() for e in evals)
    styles = ("-", "--", ":", "-.")
    fig, ax = plt.subplots(figsize=(8.0, 4.4), dpi=120, layout="constrained")
    for i, (name, evals) in enumerate(curves.items()):
        targets = sorted({t for e in evals for t in e["scores"]}, key=float)
        for j, target in enumerate(targets):
            points = [(e["step"], e["scores"][target]) for e in evals if target in e["scores"]]
            ax.plot(*zip(*points), color=f"C{i % 10}", ls=styles[j % len(styles)], marker="o",
                    ms=3, label=f"{name}, target {target}")
    ax.set_xlabel("gradient step")
    ax.set_ylabel("D4RL normalized score (0 = random, 100 = expert)" if normalized
                  else f"mean {RETURN_UNITS}")
    ax.set_title(title, fontsize=9)
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)
