"""The command line: bad input gives one line naming the file and the problem, exit 2, no output."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from dtlab.behaviour.policies import RandomPolicy
from dtlab.cli import main
from dtlab.collect import collect_episodes
from dtlab.data.formats import write_d4rl
from dtlab.envs import make_env


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    """A small D4RL-layout Hopper-v5 file collected with dtlab's own collector."""
    space = make_env("Hopper-v5").action_space
    episodes = collect_episodes("Hopper-v5", lambda i: RandomPolicy(space), num_transitions=600, seed=0)
    path = tmp_path_factory.mktemp("data") / "hopper-random.hdf5"
    write_d4rl(episodes, path)
    return path


def d4rl_file(path, n=50, obs_dim=11, act_dim=3, **overrides):
    arrays = {"observations": np.zeros((n, obs_dim), np.float32),
              "actions": np.zeros((n, act_dim), np.float32), "rewards": np.ones(n, np.float32),
              "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool)}
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f[key] = value
    return path


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def bad_inputs(tmp):
    nan_obs = np.zeros((50, 11), np.float32)
    nan_obs[7, 2] = np.nan
    (tmp / "notes.hdf5").write_text("this is not HDF5")
    return {
        "missing file": (tmp / "nope.hdf5", "Hopper-v5", "file not found"),
        "not HDF5": (tmp / "notes.hdf5", "Hopper-v5", "not an HDF5 file"),
        "missing key": (d4rl_file(tmp / "nokey.hdf5", rewards=None), "Hopper-v5", "missing key 'rewards'"),
        "length mismatch": (d4rl_file(tmp / "len.hdf5", rewards=np.ones(49, np.float32)), "Hopper-v5",
                            "'rewards' has 49 entries"),
        "NaN": (d4rl_file(tmp / "nan.hdf5", observations=nan_obs), "Hopper-v5", "NaN or inf"),
        "unknown env": (d4rl_file(tmp / "ok.hdf5"), "NoSuchEnv-v0", "unknown environment 'NoSuchEnv-v0'"),
        "shape mismatch": (d4rl_file(tmp / "ok2.hdf5", obs_dim=5), "Hopper-v5",
                           "ok2.hdf5 has observations (5,) and actions (3,), but Hopper-v5 has "
                           "observations (11,) and actions (3,); pass --env the env the data was "
                           "recorded in"),
    }


@pytest.mark.parametrize("case", ["missing file", "not HDF5", "missing key", "length mismatch", "NaN",
                                  "unknown env", "shape mismatch"])
def test_train_bad_input(tmp_path, capsys, case):
    dataset, env, message = bad_inputs(tmp_path)[case]
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "train", "--dataset", dataset, "--env", env, "--out", out,
                                   "--steps", 2, "--no-progress")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtlab: error:") and message in lines[0], stderr
    if case not in ("unknown env",):
        assert dataset.name in lines[0]
    assert not out.exists()  # no partial output


def test_train_and_evaluate_hopper_d4rl_file(tmp_path, capsys, hopper_file):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "data", "info", hopper_file, "--json")
    assert code == 0 and json.loads(stdout)["obs_dim"] == 11
    code, stdout, stderr = run_cli(
        capsys, "train", "--dataset", hopper_file, "--env", "Hopper-v5", "--out", out, "--steps", 6,
        "--batch-size", 4, "--warmup-steps", 2, "--log-every", 2, "--no-progress", "--no-tensorboard",
        "--model.embed-dim", 16, "--model.n-layers", 1, "--model.context-len", 4)
    assert code == 0, stderr
    assert "6 steps" in stdout
    results = tmp_path / "results.json"
    code, stdout, stderr = run_cli(capsys, "evaluate", out, "--targets", 3600, 1800, "--episodes", 2,
                                   "--max-steps", 20, "--out", results)
    assert code == 0, stderr
    data = json.loads(results.read_text())
    assert [r["target"] for r in data["results"]] == [3600.0, 1800.0]
    # Cut at 20 of Hopper's 1000 steps: no normalized scores (not comparable with D4RL's).
    assert all(len(r["returns"]) == 2 and r["normalized_mean"] is None for r in data["results"])
    assert data["normalized_scores_comparable"] is False
    assert "3600" in stdout and "2 episodes per target" in stdout  # the table


def test_evaluate_bad_input(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "r.json"
    cases = [
        ((tmp_path / "missing",), "checkpoint directory not found"),
        ((tiny_checkpoint, "--env", "NoSuchEnv-v0"), "unknown environment"),
        ((tiny_checkpoint, "--env", "Hopper-v5"), "but Hopper-v5 has observations (11,)",
         "; pass --env Pendulum-v1"),
    ]
    for args, *messages in cases:
        code, _, stderr = run_cli(capsys, "evaluate", *args, "--episodes", 1, "--out", out)
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert all(message in stderr for message in messages), stderr
        assert not out.exists()


def test_sweep_writes_plot(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "sweep.json"
    code, stdout, stderr = run_cli(capsys, "evaluate", tiny_checkpoint, "--sweep", "--sweep-points", 3,
                                   "--episodes", 1, "--max-steps", 5, "--out", out)
    assert code == 0, stderr
    assert "1 episode per target" in stdout  # the table's title, singular
    data = json.loads(out.read_text())
    assert len(data["results"]) == 3
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_exit_code_and_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "dtlab.cli", "data", "info", str(tmp_path / "x.hdf5")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"dtlab: error: {tmp_path / 'x.hdf5'}: file not found"
    assert "Traceback" not in proc.stderr


def test_evaluate_fast_options(tmp_path, capsys, tiny_checkpoint):
    """--kv-cache and --precision bf16 run through the CLI and report the same fields."""
    outs = {}
    for name, flags in (("exact", []), ("fast", ["--kv-cache", "--precision", "bf16"])):
        out = tmp_path / f"{name}.json"
        code, _, stderr = run_cli(capsys, "evaluate", tiny_checkpoint, "--targets", -200, "--episodes", 2,
                                  "--max-steps", 8, "--out", out, *flags)
        assert code == 0, stderr
        outs[name] = json.loads(out.read_text())["results"][0]
    assert outs["fast"]["lengths"] == outs["exact"]["lengths"] == [8, 8]
    # The tiny checkpoint's context is 4 steps: the first 4 actions are exact in kv-cache mode, so
    # returns stay close; bf16 perturbs actions by ~1e-3.
    np.testing.assert_allclose(outs["fast"]["returns"], outs["exact"]["returns"], rtol=0.05)
