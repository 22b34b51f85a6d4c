"""The command line's surface: one-line parse errors with a suggestion, --version."""

import json

import pytest

from dtlab._version import __version__
from dtlab.cli import main


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, words", [
    (["train", "--step", "10"], "unrecognized option --step for dtlab train; did you mean --steps?"),
    (["train", "--datset", "x"], "unrecognized option --datset for dtlab train; did you mean --dataset?"),
    (["train", "--preest", "atari"], "did you mean --preset?"),  # handled before tyro, still listed
    (["evaluate", "run", "--sweep-point", "3"], "for dtlab evaluate; did you mean --sweep-points?"),
    (["data", "convert", "a", "b", "--formt", "x"], "for dtlab data convert; did you mean --format?"),
    (["trian"], "unrecognized command trian for dtlab; did you mean train?"),
    (["train", "--env", "Hopper-v5"], "missing required argument --dataset for dtlab train"),
    (["evaluate"], "missing required argument CKPT_DIR for dtlab evaluate"),
    (["evaluate", "run", "--precision", "fp23"], "'fp23' for --precision: expected one of auto, "
                                                 "fp32, bf16; did you mean fp32?"),
    (["train", "--dataset", "x", "--env", "y", "--steps", "abc"], "invalid value for --steps"),
    (["train", "--dataset", "x", "--env", "y", "--eval-targets", "high"],
     "['high'] (expected [FLOAT [FLOAT ...]])"),  # tyro's message alone names no type
    (["train", "--dataset", "x", "--env", "y", "--return-scale", "x"],
     "invalid value for --return-scale: no type matching {None}|FLOAT could be instantiated "
     "from ['x']"),  # tyro's lines per member of the union are left out
    (["data"], "dtlab data needs a command: info, validate, convert"),
])
def test_parse_errors_are_one_line(capsys, argv, words):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dtlab: error: "), err
    assert words in err


def test_a_suggestion_comes_from_the_subcommands_own_flags(capsys):
    # --sweep-points is evaluate's; train has no such flag and must not suggest one of evaluate's
    code, _, err = run_cli(capsys, "train", "--sweep-point", "3")
    assert code == 2 and "did you mean --sweep-points" not in err
    assert "unrecognized option --sweep-point for dtlab train" in err


def test_help_is_tyros(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--steps INT" in out and "--preset" in out and "--model.context-len" in out


def test_version(capsys):
    code, out, err = run_cli(capsys, "--version")
    assert (code, out, err) == (0, f"dtlab {__version__}\n", "")


def test_evaluate_table_names_the_step_and_the_mean_episode_length(tmp_path, capsys, monkeypatch,
                                                                   tiny_checkpoint):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "r.json"
    code, stdout, stderr = run_cli(capsys, "evaluate", tiny_checkpoint, "--targets", -200,
                                   "--episodes", 2, "--max-steps", 7, "--out", out)
    assert code == 0, stderr
    assert "run step 4" in stdout  # the tiny checkpoint: run directory "run", 4 training steps
    assert "mean length (steps)" in stdout
    # The table's row: the title names the checkpoint's path, which may hold "-200" too
    # (pytest's basetemp /tmp/pytest-of-root/pytest-200).
    row = next(line for line in stdout.splitlines() if line.startswith("│") and "-200" in line)
    assert row.split("│")[-2].strip() == "7.0"  # both episodes cut at --max-steps 7
    assert json.loads(out.read_text())["checkpoint_step"] == 4


def test_sweep_refuses_targets(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "r.json"
    code, stdout, stderr = run_cli(capsys, "evaluate", tiny_checkpoint, "--sweep", "--targets",
                                   100, 200, "--episodes", 1, "--out", out)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert "--sweep picks its own targets" in stderr and "--targets 100 200" in stderr
    assert not out.exists() and not (tmp_path / "r.png").exists()
