"""Crash safety, numerical faults, dataset checks at training time."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dtlab.trainer as train_module  # where the step and its loss live
from dtlab import checkpoint
from dtlab.config import ModelConfig
from tests.configs import flat_fields, train_config
from dtlab.data import EpisodeSet
from dtlab.data.formats import save_episodes
from dtlab.errors import ConfigError, DatasetError, DtlabWarning, TrainingError
from dtlab.rundir import LOCK_FILE, one_writer
from dtlab.train import train

TINY = ModelConfig(embed_dim=16, n_layers=1, n_heads=1, context_len=4, max_ep_len=200)


def episodes(n_episodes=3, length=200, seed=0, action_scale=2.0):
    rng = np.random.default_rng(seed)
    n = n_episodes * length
    trunc = np.zeros(n, bool)
    trunc[length - 1::length] = True
    return EpisodeSet.from_flags(rng.normal(size=(n, 3)), rng.uniform(-action_scale, action_scale, (n, 1)),
                                 -rng.uniform(0, 5, n), np.zeros(n, bool), trunc, source="data.hdf5")


def cfg(tmp_path, name="run", **kw):
    base = dict(dataset="data.hdf5", env="Pendulum-v1", out=str(tmp_path / name), steps=8, batch_size=4,
                warmup_steps=2, log_every=2, checkpoint_every=4, progress=False, tensorboard=False,
                model=TINY)
    return train_config(**{**base, **kw})


def nan_on_call(n):
    """An action_loss that returns NaN on its n-th call (1-based)."""
    calls = {"n": 0}
    real = train_module.action_loss

    def loss(*args):
        calls["n"] += 1
        out = real(*args)
        return out * float("nan") if calls["n"] == n else out
    return loss


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "action_loss", nan_on_call(6))
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 6 .*step_00000004"):
        train(cfg(tmp_path), episodes())
    # The last good checkpoint is intact and loadable.
    model, info = checkpoint.load(tmp_path / "run")
    assert info.step == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_counts_and_does_not_apply_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "action_loss", nan_on_call(3))
    result = train(cfg(tmp_path, skip_nonfinite=True), episodes())
    assert result.skipped_nonfinite == 1 and result.steps == 8
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in records] == [0, 1, 1, 1]
    weights = load_file(str(result.checkpoint / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_long_episodes_refused_or_truncated(tmp_path):
    data = episodes(length=250)  # longer than max_ep_len=200
    with pytest.raises(DatasetError, match="episode 0 has 250 steps, more than model.max_ep_len=200"):
        train(cfg(tmp_path), data)
    cut = data.truncate_episodes(200)
    assert cut.episode_lengths.tolist() == [200, 200, 200]
    assert cut.truncations.sum() == 3
    np.testing.assert_allclose(cut.episode_returns[0], data.rewards[:200].sum(), rtol=1e-5)
    result = train(cfg(tmp_path, "cut", truncate_long_episodes=True), data)
    assert result.steps == 8


def test_actions_outside_bounds_warn_or_fail_when_strict(tmp_path):
    data = episodes(action_scale=3.0)  # Pendulum's torque bound is 2
    with pytest.warns(DtlabWarning, match="actions lie outside the action bounds"):
        train(cfg(tmp_path), data)
    with pytest.raises(DatasetError, match="data.hdf5: .* outside the action bounds"):
        train(cfg(tmp_path, "strict", strict=True), data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(cfg(tmp_path, "ok"), episodes(action_scale=2.0))  # in bounds: no warning


def _train_cmd(data, out, steps, every):
    return [sys.executable, "-m", "dtlab.cli", "train", "--dataset", str(data), "--env", "Pendulum-v1",
            "--out", str(out), "--steps", str(steps), "--batch-size", "8", "--warmup-steps", "5",
            "--log-every", "5", "--checkpoint-every", str(every), "--no-progress", "--no-tensorboard",
            "--model.embed-dim", "16", "--model.n-layers", "1", "--model.context-len", "4",
            "--model.max-ep-len", "200", "--threads", "1", "--seed", "7"]


def _wait_for_checkpoint(out, proc, timeout=60):
    start = time.time()
    while not (out / "latest").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_mid_run_then_resume_equals_uninterrupted(tmp_path, sig):
    data = tmp_path / "data.hdf5"
    save_episodes(episodes(), data)
    steps, every = 400, 20
    full = subprocess.run(_train_cmd(data, tmp_path / "full", steps, every), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(data, out, steps, every), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(out, proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:  # a failed wait must not leave the run training on behind the test
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        assert "continue with: dtlab train --out" in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    _, info = checkpoint.load(out)  # whatever moment it died at, the latest checkpoint loads
    assert 0 < info.step < steps
    resumed = subprocess.run(_train_cmd(data, out, steps, every) + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(checkpoint.resolve(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(out) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_directory_has_one_writer(tmp_path):
    """A run directory held by another process (as ``one_writer`` holds it for a live run) is
    refused with a ConfigError before anything in it changes, fresh or resumed; free again, the
    run continues."""
    data = episodes()
    out = tmp_path / "run"
    with one_writer(out):  # as another process's live run holds it (its own open file)
        with pytest.raises(ConfigError, match=rf"{out}: another process \(pid {os.getpid()}, "
                                              r"training\) holds this run directory; let it"):
            train(cfg(tmp_path), data)
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # the holder's, untouched
    train(cfg(tmp_path), data)
    with one_writer(out):
        before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
        with pytest.raises(ConfigError, match="another process"):
            train(cfg(tmp_path, steps=16, resume=True), data)
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert train(cfg(tmp_path, steps=16, resume=True), data).steps == 16


@pytest.mark.parametrize("can_lock", [True, False])
def test_a_run_refused_under_the_lock_leaves_no_directory_behind(tmp_path, monkeypatch, can_lock):
    """The run directory is created to be locked; a run that then fails its checks (here: resume
    without a checkpoint) removes every directory it created, also where nothing can be locked
    (no fcntl, as on Windows)."""
    if not can_lock:
        monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    with pytest.raises(ConfigError, match="resume is set but the run directory has no checkpoint"):
        train(cfg(tmp_path / "a" / "b", resume=True), episodes())
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "existing"  # a directory that was there: only the lock file goes
    existing.mkdir()
    with pytest.raises(ConfigError, match="resume is set"):
        train(cfg(existing, resume=True), episodes())
    assert existing.is_dir() and not any(existing.iterdir())


def test_a_failed_run_keeps_a_sibling_run_in_a_parent_it_created(tmp_path):
    """`--out sweep/a` and `--out sweep/b` started together with sweep/ missing: a created
    sweep/, b's run lives in it; a failing before its first checkpoint removes sweep/a only."""
    data = episodes()
    sweep = tmp_path / "sweep"
    with pytest.raises(RuntimeError, match="a fails"):
        with one_writer(sweep / "a") as made:
            assert made == sweep
            train(cfg(sweep, "b"), data)  # the sibling, finished while a is still starting
            raise RuntimeError("a fails before its first checkpoint")
    assert not (sweep / "a").exists()
    assert checkpoint.load(sweep / "b")[1].step == 8


def test_a_run_failing_in_training_keeps_a_sibling_run_in_a_parent_it_created(tmp_path,
                                                                             monkeypatch):
    """The same when the run fails inside the training loop (a non-finite loss at step 2, before
    its first checkpoint at 4) after a sibling run entered the parent it created."""
    sweep = tmp_path / "sweep"
    calls = {"n": 0}
    real = train_module.action_loss

    def sibling_starts_then_nan(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            (sweep / "b").mkdir()
            (sweep / "b" / "train_config.json").write_text("{}")  # a live run's first file
            return real(*args) * float("nan")
        return real(*args)

    monkeypatch.setattr(train_module, "action_loss", sibling_starts_then_nan)
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 2"):
        train(cfg(sweep, "a"), episodes())
    assert not (sweep / "a").exists()
    assert (sweep / "b" / "train_config.json").read_text() == "{}"


def test_a_lock_file_removed_between_open_and_lock_is_refused(tmp_path, monkeypatch):
    """The holder's run failed and removed its directory while this run was opening the lock
    file: the lock taken then is on a file nobody else sees, so the run is refused (one line)."""
    import fcntl

    out = tmp_path / "run"
    real = fcntl.flock

    def holder_cleans_up_first(fd, op):
        (out / LOCK_FILE).unlink()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", holder_cleans_up_first)
    with pytest.raises(ConfigError, match=f"{out}: the run directory or its lock file .lock was "
                                          "removed or replaced while this process was opening"):
        train(cfg(tmp_path), episodes())
    assert not out.exists()  # the refused run took back the directory it made


def test_a_second_train_on_a_live_run_directory_is_refused(tmp_path):
    """Two processes: `dtlab train --resume` on the --out of a run still training exits 2 with a
    one-line error, and the live run goes on (here until it is stopped with SIGTERM)."""
    data = tmp_path / "data.hdf5"
    save_episodes(episodes(), data)
    out = tmp_path / "run"
    live = subprocess.Popen(_train_cmd(data, out, 100_000, 20), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(out, live)
        second = subprocess.run(_train_cmd(data, out, 100_000, 20) + ["--resume"],
                                capture_output=True, text=True, check=False, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (f"dtlab: error: {out}: another process (pid {live.pid}, "
                                         "training) holds this run directory; let it finish or "
                                         "stop it, or choose another --out")
        assert live.poll() is None  # still training
        live.send_signal(signal.SIGTERM)
        _, stderr = live.communicate(timeout=120)
        assert live.returncode == 128 + signal.SIGTERM, stderr
    finally:
        if live.poll() is None:
            live.kill()
            live.communicate()
    assert checkpoint.load(out)[1].step > 0


def test_outputs_get_default_permissions_not_private_temp_ones(tmp_path, tiny_checkpoint):
    """Atomic writes go through mkstemp/mkdtemp/safetensors (0600/0700); the finished files must
    have what a plain open() would give (0666/0777 minus the umask), or other users of a shared
    machine cannot read datasets and checkpoints."""
    import os
    import stat
    from pathlib import Path

    from dtlab.atomic import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        n = 6
        ep = EpisodeSet.from_flags(np.zeros((n, 2), np.float32), np.zeros((n, 1), np.float32),
                                   np.zeros(n, np.float32), np.eye(1, n, n - 1, dtype=bool)[0],
                                   np.zeros(n, bool))
        save_episodes(ep, tmp_path / "d.hdf5")
        model, info = checkpoint.load(tiny_checkpoint)
        ck = checkpoint.save(tmp_path / "run", "step_1", model, info)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(Path(p).stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == 0o644
    assert mode(tmp_path / "d.hdf5") == 0o644
    assert mode(ck) == 0o755
    assert {mode(f) for f in Path(ck).iterdir()} == {0o644}
