"""The evaluate sweep and calibration figures: a title naming run, step, env and dataset, units on
the axes, a legend beside the lines (not on them) that says what the error bars are and draws the
reliable-maximum line as it is drawn in the axes."""

import shutil

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import same_color

from dtlab.cli import main


@pytest.fixture
def figures(monkeypatch):
    """The figures the command draws, kept open (plt.close does nothing) for inspection."""
    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    yield lambda: [plt.figure(n) for n in plt.get_fignums()]
    monkeypatch.undo()
    plt.close("all")


def _legend_texts(fig):
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1
    return legends[0], [t.get_text() for t in legends[0].get_texts()]


def _overlaps(fig, legend, ax):
    fig.canvas.draw()
    return legend.get_window_extent().overlaps(ax.get_window_extent())


def test_sweep_figure(tmp_path, capsys, figures, tiny_checkpoint):
    png = tmp_path / "sweep.png"
    assert main(["evaluate", tiny_checkpoint, "--sweep", "--sweep-points", "3", "--episodes", "2",
                 "--max-steps", "5", "--plot", str(png)]) == 0, capsys.readouterr().err
    [fig] = figures()
    ax = fig.axes[0]
    assert all(words in ax.get_title() for words in ("run step 4", "Pendulum-v1", "<memory>"))
    assert ax.get_xlabel() == "target return (sum of rewards per episode)"
    assert ax.get_ylabel() == "achieved return (sum of rewards per episode)"
    legend, texts = _legend_texts(fig)
    assert "best in dataset" in texts
    assert any("mean ± 1 std over 2 episodes" in t for t in texts)
    assert not _overlaps(fig, legend, ax)  # nowhere near the "best in dataset" line
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_calibration_figure(tmp_path, capsys, figures, tiny_checkpoint):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)  # calibration writes into the checkpoint
    png = tmp_path / "cal.png"
    assert main(["calibrate", str(run), "--points", "3", "--episodes", "2", "--max-steps", "5",
                 "--plot", str(png)]) == 0, capsys.readouterr().err
    [fig] = figures()
    ax = fig.axes[0]
    assert all(words in ax.get_title() for words in ("run step 4", "Pendulum-v1", "<memory>"))
    assert ax.get_xlabel() == "target return (sum of rewards per episode)"
    assert ax.get_ylabel() == "achieved return (sum of rewards per episode)"
    legend, texts = _legend_texts(fig)
    assert any("mean ± 1 std over 2 episodes" in t for t in texts)
    assert not any(_overlaps(fig, legend, a) for a in fig.axes)
    # The reliable maximum target's legend entry is drawn as its vertical line is.
    [entry] = [h for h, t in zip(legend.legend_handles, texts) if "reliable maximum target" in t]
    [vline] = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1]
    assert entry.get_linestyle() == vline.get_linestyle() == "--"
    assert same_color(entry.get_color(), vline.get_color())
