"""A run directory at the command line (issues 21 and 23): continued jobs check their inputs,
data is not paired with another env, `--resume` needs only the run's path, a finished run is not
rewritten, evaluation is visible, and errors name flags. Each runs `dtlab` in-process on tiny
Pendulum-shaped data."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from dtlab.cli import main
from dtlab.data.formats import save_episodes
from tests.configs import pendulum_like

HALFCHEETAH = Path(__file__).resolve().parents[1] / "datasets" / "halfcheetah-medium-replay-v5.hdf5"
TINY = ["--model.embed-dim", "16", "--model.n-layers", "1", "--model.context-len", "5",
        "--batch-size", "8", "--warmup-steps", "2", "--log-every", "5", "--no-tensorboard",
        "--threads", "1"]


def data_file(tmp_path, name="data.hdf5", seed=0, env_id="Pendulum-v1"):
    path = tmp_path / name
    episodes = pendulum_like(n_episodes=3, seed=seed).with_metadata({"env_id": env_id})
    save_episodes(episodes, path)
    return path


def train(data, out, *extra):
    return main(["train", "--dataset", str(data), "--env", "Pendulum-v1", "--out", str(out),
                 "--no-progress", *TINY, *extra])


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run directory (but its lock) by content hash."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dtlab: error: "), err
    return err


# ---- issue 21, item 1: data from one env, trained and evaluated in another ------------------------
def test_data_from_another_env_is_refused_by_validate_and_train(tmp_path, capsys):
    assert main(["data", "validate", str(HALFCHEETAH), "--env", "Walker2d-v5"]) == 2
    err = one_line_error(capsys)
    assert "recorded in HalfCheetah-v5, not Walker2d-v5" in err and "--env HalfCheetah-v5" in err
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(HALFCHEETAH), "--env", "Walker2d-v5", "--out",
                 str(out), "--steps", "2", "--no-progress"]) == 2
    assert "recorded in HalfCheetah-v5, not Walker2d-v5" in one_line_error(capsys)
    assert not out.exists()  # nothing half-written


def test_another_envs_data_is_refused_before_its_findings_are_warned(tmp_path, capsys):
    """300-step episodes are longer than Pendulum-v1's 200-step limit, a finding under the wrong
    env: the refusal comes first and alone (it was a warning line, then the error)."""
    path = tmp_path / "car.hdf5"
    save_episodes(pendulum_like(n_episodes=3, length=300).with_metadata(
        {"env_id": "MountainCarContinuous-v0"}), path)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--dataset", str(path), "--env", "Pendulum-v1", "--out",
                     str(tmp_path / "run"), "--steps", "2", "--no-progress"]) == 2
    assert "recorded in MountainCarContinuous-v0, not Pendulum-v1" in one_line_error(capsys)
    assert [str(w.message) for w in caught] == []


def test_evaluate_refuses_another_env_and_another_envs_data(tmp_path, capsys):
    """HalfCheetah-v5 and Walker2d-v5 have the same spaces (17 observations, 6 actions)."""
    run = tmp_path / "cheetah"
    assert main(["train", "--dataset", str(HALFCHEETAH), "--env", "HalfCheetah-v5", "--out",
                 str(run), "--steps", "2", "--no-progress", *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--env", "Walker2d-v5", "--episodes", "1"]) == 2
    assert "trained for HalfCheetah-v5, not Walker2d-v5" in one_line_error(capsys)
    # A checkpoint from before the check (trained for Walker2d-v5 on HalfCheetah-v5 data).
    config = next(run.glob("step_*")) / "config.json"
    saved = json.loads(config.read_text())
    assert saved["dataset"]["metadata"]["env_id"] == "HalfCheetah-v5"
    config.write_text(json.dumps({**saved, "env_id": "Walker2d-v5"}))
    assert main(["evaluate", str(run), "--episodes", "1"]) == 2
    assert "recorded in HalfCheetah-v5, not Walker2d-v5" in one_line_error(capsys)
    run = tmp_path / "run"
    assert train(data_file(tmp_path), run, "--steps", "5") == 0
    capsys.readouterr()
    other = data_file(tmp_path, "other.hdf5", env_id="MountainCarContinuous-v0")
    result = tmp_path / "offline.json"
    assert main(["evaluate", str(run), "--offline", "--dataset", str(other), "--out",
                 str(result)]) == 2
    assert "recorded in MountainCarContinuous-v0, not Pendulum-v1" in one_line_error(capsys)
    assert not result.exists()


# ---- issue 21, item 2: a continued job whose inputs changed ---------------------------------------
def test_resume_after_the_dataset_file_changed_is_refused_and_writes_nothing(tmp_path, capsys):
    data, run = data_file(tmp_path), tmp_path / "run"
    assert train(data, run, "--steps", "10") == 0
    data_file(tmp_path, seed=1)  # other data at the same path
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--resume", "--steps", "20"]) == 2
    err = one_line_error(capsys)
    assert "not the one the run" in err and "fingerprint" in err and "--out" in err
    assert snapshot(run) == before
    # Offline evaluation on the training data (its default) is refused too.
    assert main(["evaluate", str(run), "--offline"]) == 2
    assert "content changed" in one_line_error(capsys)


def test_a_run_finds_its_data_from_any_directory_and_after_a_move(tmp_path, capsys, monkeypatch):
    """A dataset named relative to the working directory is recorded as an absolute path, so
    --resume and evaluate --offline work from elsewhere; once the file moved, both say so in one
    line naming --dataset, and --resume --dataset NEWPATH continues (same content) or is refused
    (other content) by the fingerprint."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir(), elsewhere.mkdir()
    data_file(home, "d.hdf5")
    monkeypatch.chdir(home)
    # Messages keep the name the user gave; only the records hold the absolute path.
    assert train("d.hdf5", "other", "--steps", "2", "--model.max-ep-len", "100") == 2
    assert one_line_error(capsys).startswith("dtlab: error: d.hdf5: episode 0 has 200 steps")
    assert train("d.hdf5", "run", "--steps", "5") == 0
    run = home / "run"
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["data"]["dataset"] == str(home / "d.hdf5")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "10", "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--offline", "--windows", "20"]) == 0
    moved = (home / "d.hdf5").rename(elsewhere / "moved.hdf5")
    capsys.readouterr()
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--resume", "--steps", "15"]) == 2
    err = one_line_error(capsys)
    assert f"the run's dataset {home / 'd.hdf5'} is not there" in err and "--dataset" in err
    assert main(["evaluate", str(run), "--offline"]) == 2
    assert f"{home / 'd.hdf5'}, is not there; pass --dataset PATH" in one_line_error(capsys)
    assert snapshot(run) == before
    other = data_file(elsewhere, "other.hdf5", seed=1)
    assert main(["train", "--out", str(run), "--resume", "--steps", "15", "--dataset",
                 str(other)]) == 2
    assert "not the one the run" in one_line_error(capsys)
    assert main(["train", "--out", str(run), "--resume", "--steps", "15", "--dataset",
                 "moved.hdf5", "--no-progress"]) == 0
    assert "done: 15 steps" in capsys.readouterr().out
    assert json.loads((run / "train_config.json").read_text())["data"]["dataset"] == str(moved)


# ---- issue 23 -------------------------------------------------------------------------------------
def test_resume_needs_only_the_run_directory(tmp_path, capsys):
    """Item 2: `--resume --out RUN` continues from the run's saved settings; given flags that
    differ from them are still refused."""
    data, run = data_file(tmp_path), tmp_path / "run"
    assert train(data, run, "--steps", "5") == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "10", "--no-progress"]) == 0
    assert "done: 10 steps" in capsys.readouterr().out
    assert main(["train", "--out", str(run), "--resume", "--steps", "15", "--lr", "1e-3"]) == 2
    assert "optim.lr: 0.0001 -> 0.001" in one_line_error(capsys)
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no run here" in one_line_error(capsys)


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    """Item 6: a run at 10 steps resumed with --steps 10 (nothing to do) or 5 (before it)."""
    data, run = data_file(tmp_path), tmp_path / "run"
    assert train(data, run, "--steps", "10") == 0
    capsys.readouterr()
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "already at step 10 of --steps 10; nothing to do" in capsys.readouterr().out
    assert main(["train", "--out", str(run), "--resume", "--steps", "5"]) == 2
    assert "at step 10, past --steps 5" in one_line_error(capsys)
    assert snapshot(run) == before


def test_evaluation_during_training_is_printed_or_refused(tmp_path, capsys):
    """Item 3: evaluation lines appear as they happen; --eval-every without episodes is refused.
    Item 4: the default targets are said, fitted to the data where the paper's lie beyond it.
    Item 7: --no-progress prints progress lines."""
    data = data_file(tmp_path)
    assert train(data, tmp_path / "a", "--steps", "10", "--eval-every", "5") == 2
    assert "--eval-every 5 evaluates nothing without --eval-episodes" in one_line_error(capsys)
    assert not (tmp_path / "a").exists()
    assert train(data, tmp_path / "b", "--steps", "10", "--eval-every", "5",
                 "--eval-episodes", "1") == 0
    out = capsys.readouterr().out
    # pendulum_like returns are about -500: the paper's -150 is beyond what they support.
    assert re.search(r"evaluation during training at targets -4\d\d: fitted to the data", out), out
    assert re.search(r"^eval step 5: target -4\d\d -> -\d+\.\d \(-?\d+\.\d normalized\), length "
                     r"200$", out, re.M), out
    assert re.search(r"^eval step 10: ", out, re.M)
    assert re.search(r"^step 10/10: loss \d\.\d+, [\d.]+ steps/s", out, re.M), out


def test_a_target_beyond_the_data_warns_naming_it(tmp_path, capsys):
    """Item 5: an uncalibrated checkpoint asked for more than its data supports warns, naming
    the target: -100 against episode returns of about -500 (best about -480, so the data
    supports up to about -240); 1e9 is more than any Pendulum-v1 episode can return (0)."""
    run = tmp_path / "run"
    assert train(data_file(tmp_path), run, "--steps", "5") == 0
    with pytest.warns(Warning, match=r"target -100 asked for, far above the best episode "
                                     r"return in the training data \(-4\d\d"):
        assert main(["evaluate", str(run), "--targets", "-100", "--episodes", "1"]) == 0
    with pytest.warns(Warning, match=r"target 1e\+09 asked for, above 0, the most an episode "
                                     r"of Pendulum-v1 can return"):
        assert main(["evaluate", str(run), "--targets", "1e9", "--episodes", "1"]) == 0


def test_a_run_without_a_checkpoint_yet(tmp_path, capsys):
    """Item 8: a live run before its first checkpoint is not 'not a dtlab checkpoint'."""
    run = tmp_path / "live"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    assert main(["evaluate", str(run)]) == 2
    assert "this run has no checkpoint yet" in one_line_error(capsys)


def test_errors_name_flags(tmp_path, capsys):
    """Item 9: the refusals a new user meets name the flag to change, not a config field."""
    data, run = data_file(tmp_path), tmp_path / "run"
    assert train(data, run, "--steps", "5") == 0
    assert train(data, run, "--steps", "5") == 2
    err = one_line_error(capsys)
    assert "pass --resume to continue it, or choose another --out" in err
    assert main(["train", "--dataset", str(HALFCHEETAH), "--env", "HalfCheetah-v5", "--out",
                 str(tmp_path / "b"), "--model.max-ep-len", "10", "--steps", "1"]) == 2
    assert "raise --model.max-ep-len or pass --truncate-long-episodes" in one_line_error(capsys)


def test_offline_evaluation_defaults_to_the_training_file(tmp_path, capsys):
    """Item 11: `evaluate RUN --offline` needs no --dataset."""
    run = tmp_path / "run"
    assert train(data_file(tmp_path), run, "--steps", "5") == 0
    out = tmp_path / "offline.json"
    assert main(["evaluate", str(run), "--offline", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["dataset"].endswith("data.hdf5")


def test_the_start_line_and_the_best_checkpoint(tmp_path, capsys, monkeypatch):
    """Item 14: a run says what it starts with (model size, device, precision, data, resume
    point); the weights of the best evaluation so far are kept in RUN/best beside the latest."""
    import torch
    from safetensors.torch import load_file

    from dtlab.rundir import RunDirectory

    from dtlab import runtime

    data, run = data_file(tmp_path), tmp_path / "run"
    # auto picks by the CPU's flags: fp32 without native bf16, bf16 with it (faked both ways)
    for flags, auto, where in ((set(), "fp32", run), ({"avx512_bf16"}, "bf16", tmp_path / "b")):
        monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
        assert train(data, where, "--steps", "10", "--eval-every", "5", "--eval-episodes", "1",
                     "--eval-targets", "-400", "--checkpoint-every", "5") == 0
        out = capsys.readouterr().out
        assert re.search(r"^train decision-transformer: 0\.0\dM parameters \(embed 16, 1 layer, "
                         rf"K 5\) on cpu, 1 thread, precision {auto} \(auto\); data data\.hdf5: 3 "
                         r"episodes, 600 transitions, .* 10 steps, from step 0$", out, re.M), out
    scores = {e.step: e.mean_score() for e in RunDirectory(run).evaluations()}
    best_step = max(scores, key=scores.get)
    best = load_file(str(run / "best" / "model.safetensors"))
    at_best = load_file(str(run / f"step_{best_step:08d}" / "model.safetensors"))
    assert all(torch.equal(best[k], at_best[k]) for k in best)
    assert (run / "latest").read_text().strip() == "step_00000010"
    assert main(["train", "--out", str(run), "--resume", "--steps", "12"]) == 0
    assert "resumed from step 10" in capsys.readouterr().out


def test_an_env_id_recorded_as_a_root_attribute_is_read(tmp_path, capsys):
    """Item 13: other tools record the env in a root attribute (env_name); dtlab reads it, shows
    it in `data info` and pairs the data with that env only."""
    import h5py
    import shutil

    path = tmp_path / "cheetah.hdf5"
    shutil.copy(HALFCHEETAH, path)
    with h5py.File(path, "r+") as f:
        del f["metadata/env_id"]
        f.attrs["env_name"] = "HalfCheetah-v5"
    assert main(["data", "info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["env_id"] == "HalfCheetah-v5"
    assert main(["data", "validate", str(path), "--env", "Walker2d-v5"]) == 2
    assert "recorded in HalfCheetah-v5, not Walker2d-v5" in one_line_error(capsys)


def test_an_env_without_a_registered_return_scale_gets_one_fitted_to_its_data(tmp_path, capsys):
    """MountainCarContinuous-v0 has no scale in dtlab's registry: returns-to-go up to 50 get 10
    (the power of ten at or below the largest, by hand), said in the start line and stored in
    the checkpoint, where the old default 1000 shrank them to 0.05; --return-scale still wins."""
    import numpy as np

    from dtlab import checkpoint
    from dtlab.data.formats import load_episodes
    from dtlab.data.returns import fitted_return_scale

    assert [fitted_return_scale(np.array(v)) for v in
            ([95.0], [-1500.0, 3.0], [3190.0], [0.05], [0.0], [10.0])] == \
        [10.0, 1000.0, 1000.0, 0.01, 1.0, 10.0]
    path = car_file(tmp_path)
    assert load_episodes(path).returns_to_go.max() == 50.0
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(path), "--env", "MountainCarContinuous-v0", "--out",
                 str(run), "--no-progress", "--steps", "2", "--model.max-ep-len", "200",
                 *TINY]) == 0
    assert "; return scale 10 (fitted to the data: dtlab knows none for " \
           "MountainCarContinuous-v0; --return-scale sets it)" in capsys.readouterr().out
    _, info = checkpoint.load_info(checkpoint.resolve(run))
    assert info.normalizer.return_scale == 10.0
    assert main(["train", "--dataset", str(path), "--env", "MountainCarContinuous-v0", "--out",
                 str(tmp_path / "given"), "--no-progress", "--steps", "2", "--model.max-ep-len",
                 "200", "--return-scale", "100", *TINY]) == 0
    assert "fitted" not in capsys.readouterr().out
    _, info = checkpoint.load_info(checkpoint.resolve(tmp_path / "given"))
    assert info.normalizer.return_scale == 100.0


def car_file(tmp_path, name="car.hdf5", obs_factor=1.0):
    """4 MountainCarContinuous-shaped episodes of 100 steps paying 0.5 a step (returns-to-go up
    to 50); ``obs_factor`` scales the observations (other data, the same returns)."""
    import numpy as np

    from dtlab.data import EpisodeSet

    rng = np.random.default_rng(0)
    n, length = 400, 100
    trunc = np.zeros(n, bool)
    trunc[length - 1::length] = True
    episodes = EpisodeSet.from_flags(obs_factor * rng.uniform(-1, 1, (n, 2)),
                                     rng.uniform(-1, 1, (n, 1)), np.full(n, 0.5),
                                     np.zeros(n, bool), trunc,
                                     metadata={"env_id": "MountainCarContinuous-v0"})
    save_episodes(episodes, tmp_path / name)
    return tmp_path / name


def _patch_checkpoint(run, change):
    """Rewrite the latest checkpoint's config.json as ``change(record)`` (an older dtlab's)."""
    from dtlab import checkpoint

    config = checkpoint.resolve(run) / "config.json"
    record = json.loads(config.read_text())
    change(record)
    config.write_text(json.dumps(record))


def test_a_resumed_run_keeps_its_return_scale_and_old_checkpoints_check_their_data(tmp_path,
                                                                                  capsys):
    """A run started when dtlab's default scale for the env was 1000 (as before scales were
    fitted) resumes at 1000, with one warning, not at today's fitted 10; a checkpoint without a
    fingerprint (older dtlab) still refuses other data of the same size and returns, by its
    observation statistics."""
    import warnings

    from dtlab import checkpoint

    path, run = car_file(tmp_path), tmp_path / "run"
    args = ["--dataset", str(path), "--env", "MountainCarContinuous-v0", "--out", str(run),
            "--no-progress", "--model.max-ep-len", "200", *TINY]
    assert main(["train", *args, "--steps", "2"]) == 0
    _patch_checkpoint(run, lambda r: r["normalizer"].update(return_scale=1000.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == 0
    assert [str(w.message) for w in caught if "return scale" in str(w.message)] == [
        f"{run}: the run keeps the return scale it started with, 1000 (the default for this "
        "data is now 10)"]
    assert checkpoint.load_info(checkpoint.resolve(run))[1].normalizer.return_scale == 1000.0
    _patch_checkpoint(run, lambda r: r["dataset"].pop("fingerprint"))
    other = car_file(tmp_path, "other.hdf5", obs_factor=0.5)  # same sizes and returns
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--dataset",
                 str(other)]) == 2
    assert "observation statistics" in one_line_error(capsys)
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-progress"]) == 0


def test_off_a_terminal_progress_is_plain_lines(tmp_path, capsys):
    """Captured output is not a terminal: without --no-progress the run still prints plain
    progress lines, not a bar cut to 80 columns (the new-user trial's "1500/1...")."""
    data, run = data_file(tmp_path), tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--env", "Pendulum-v1", "--out", str(run),
                 *TINY, "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^step 10/10: loss \d", out, re.M) and "━" not in out, out


def test_recorded_sources_are_absolute_where_they_name_local_paths(tmp_path, monkeypatch):
    """A file and a dqn-replay directory are recorded by absolute path, the replay source's
    options kept as given; Minari ids and missing paths as given."""
    from dtlab.data.formats import absolute_source, missing_file

    (tmp_path / "replay").mkdir()
    data_file(tmp_path, "d.hdf5")
    monkeypatch.chdir(tmp_path)
    assert absolute_source("d.hdf5") == str(tmp_path / "d.hdf5")
    (tmp_path / "a:b").mkdir()  # a directory whose name holds the separator
    for written, directory in (("replay", "replay"), ("./replay", "replay"),
                               ("replay//", "replay"), ("./a:b/../replay", "replay"),
                               ("a:b", "a:b")):  # as typed, not as pathlib tidies it
        assert absolute_source(f"dqn-replay:{written}:buffers=1-2:stack=4") == \
            f"dqn-replay:{tmp_path / directory}:buffers=1-2:stack=4", written
    assert absolute_source("dqn-replay:./replay") == f"dqn-replay:{tmp_path / 'replay'}"
    # A moved file or replay directory is named in the resume error (which adds --dataset).
    assert missing_file("dqn-replay:gone:stack=4") == f"gone (from {tmp_path})"
    assert missing_file(f"dqn-replay:{tmp_path / 'gone'}") == str(tmp_path / "gone")
    for there in ("dqn-replay:./replay:stack=4", "d.hdf5", "minari:ns/name-v0"):
        assert missing_file(there) is None, there
    for kept in ("minari:ns/name-v0", "missing.hdf5", "dqn-replay:missing:stack=4"):
        assert absolute_source(kept) == kept


def test_published_dataset_records_name_no_local_directory():
    """What export and to-hf publish of a run's data: a file by its name, a dqn-replay source by
    its directory's name with its options; ids and relative names as recorded."""
    from dtlab.checkpoint import shareable_dataset

    record = {"path": "/home/u/data/d.hdf5", "source": "dqn-replay:/home/u/logs/Pong/1:stack=4",
              "episodes": 3}
    assert shareable_dataset(record) == {"path": "d.hdf5", "source": "dqn-replay:1:stack=4",
                                         "episodes": 3}
    for kept in ("minari:ns/name-v0", "d.hdf5", "dqn-replay:logs:stack=4"):
        assert shareable_dataset({"source": kept}) == {"source": kept}
    assert shareable_dataset({"source": "dqn-replay:/a/b:c"}) == {"source": "dqn-replay:b:c"}


def test_a_run_with_no_checkpoint_yet_names_the_other_data_it_starts_on(tmp_path):
    """Nothing was trained, so --resume --dataset OTHER may start again from step 0: the warning
    says it starts on other data than the settings name."""
    import shutil

    import pytest

    from dtlab.errors import DtlabWarning

    data, run = data_file(tmp_path), tmp_path / "run"
    assert train(data, run, "--steps", "2") == 0
    (run / "latest").unlink()
    for step in run.glob("step_*"):
        shutil.rmtree(step)
    other = data_file(tmp_path, "other.hdf5", seed=1)
    with pytest.warns(DtlabWarning, match=rf"starting from step 0, on {re.escape(str(other))} "
                                          rf"\(the run's settings name {re.escape(str(data))}\)"):
        assert main(["train", "--out", str(run), "--resume", "--dataset", str(other),
                     "--no-progress"]) == 0
