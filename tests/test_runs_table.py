"""dtlab runs DIR: every run under DIR in one table / JSON (step, data, env, last and best
evaluation) and one comparison figure."""

import json
import shutil

import matplotlib.pyplot as plt

from dtlab.cli import main
from dtlab.metrics import Evaluation, TargetResult
from dtlab.rundir import RunDirectory


def _result(target, mean):
    return TargetResult(target=target, returns=[mean, mean], lengths=[5, 5], mean=mean, std=0.0,
                        normalized_mean=None, normalized_std=None)


def _runs(tmp_path, tiny_checkpoint):
    """runs/a: evaluated at steps 2 (best -300 at target -100) and 4; runs/b/seed0: never
    evaluated; runs/c: started, no checkpoint yet."""
    root = tmp_path / "runs"
    shutil.copytree(tiny_checkpoint, root / "a")
    shutil.copytree(tiny_checkpoint, root / "b" / "seed0")
    (root / "c").mkdir()
    shutil.copy(root / "a" / "train_config.json", root / "c" / "train_config.json")
    run = RunDirectory(root / "a")
    run.record_evaluation(Evaluation(step=2, results=(_result(-100.0, -300.0), _result(-500.0, -700.0))))
    run.record_evaluation(Evaluation(step=4, results=(_result(-100.0, -450.0), _result(-500.0, -650.0))))
    return root


def test_runs_json_and_table(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    root = _runs(tmp_path, tiny_checkpoint)
    assert main(["runs", str(root), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == ["a", "b/seed0", "c"]
    a = rows["a"]
    assert (a["step"], a["steps"], a["env"], a["dataset"]) == (4, 4, "Pendulum-v1", "<memory>")
    assert a["last_evaluation"] == {"step": 4, "scores": {"-100": -450.0, "-500": -650.0},
                                    "unit": "return"}
    assert a["best_evaluation"] == {"score": -300.0, "unit": "return", "target": -100.0, "step": 2}
    assert rows["b/seed0"]["best_evaluation"] is None and rows["c"]["step"] is None
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["runs", str(root)]) == 0
    out = capsys.readouterr().out
    row_a = next(line for line in out.splitlines() if line.startswith("│ a "))
    assert "4/4" in row_a and "step 4: -100: -450.0, -500: -650.0" in row_a
    assert "-300.0 @ -100, step 2" in row_a
    assert "│ c " in out and "-/4" in out


def test_runs_plot(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    root = _runs(tmp_path, tiny_checkpoint)
    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    png = tmp_path / "runs.png"
    assert main(["runs", str(root), "--plot", str(png)]) == 0
    [fig] = [plt.figure(n) for n in plt.get_fignums()]
    ax = fig.axes[0]
    assert str(root) in ax.get_title() and ax.get_xlabel() == "gradient step"
    assert ax.get_ylabel() == "mean return (sum of rewards per episode)"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["a, target -100"].get_ydata()) == [-300.0, -450.0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"a, target -100", "a, target -500"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.undo()
    plt.close("all")


def test_runs_refuses_a_directory_without_runs(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 2
    assert "no dtlab runs here" in capsys.readouterr().err
