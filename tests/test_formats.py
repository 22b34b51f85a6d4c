"""Dataset file formats: round trips, D4RL's exact layout, and a DatasetError for every bad file."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats import (load_episodes, read_d4rl, read_native, save_episodes, write_d4rl,
                                write_native)
from dtlab.errors import ConfigError, DatasetError
from dtlab.spaces import ContinuousActions

D4RL_KEYS = {"observations", "actions", "rewards", "terminals", "timeouts"}


def make_episodes(metadata=None) -> EpisodeSet:
    """Three episodes of lengths 3 (terminated), 4 (truncated), 2 (terminated); obs 3-D, act 2-D."""
    rng = np.random.default_rng(0)
    n = 9
    term = np.zeros(n, bool)
    trunc = np.zeros(n, bool)
    term[[2, 8]] = True
    trunc[6] = True
    return EpisodeSet(rng.normal(size=(n, 3)), rng.uniform(-1, 1, size=(n, 2)),
                      rng.normal(size=n), term, trunc, np.array([0, 3, 7]),
                      metadata=metadata or {})


def assert_same_episodes(a: EpisodeSet, b: EpisodeSet) -> None:
    for name in ("observations", "actions", "rewards", "terminations", "truncations",
                 "episode_starts", "returns_to_go"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def write_raw_d4rl(path, **arrays) -> None:
    """A D4RL-style file written directly with h5py (not with our writer)."""
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)


def valid_d4rl_arrays(n=6):
    rng = np.random.default_rng(1)
    timeouts = np.zeros(n, bool)
    timeouts[n - 1:] = True  # one timeout at the end (none when n == 0)
    return dict(observations=rng.normal(size=(n, 3)).astype(np.float32),
                actions=rng.normal(size=(n, 2)).astype(np.float32),
                rewards=np.ones(n, np.float32), terminals=np.zeros(n, bool), timeouts=timeouts)


# ---- D4RL -----------------------------------------------------------------------------------------
def test_d4rl_round_trip(tmp_path):
    eps = make_episodes()
    path = tmp_path / "data.hdf5"
    write_d4rl(eps, path)
    back = read_d4rl(path)
    assert_same_episodes(eps, back)
    assert back.source == str(path)
    assert_same_episodes(eps, load_episodes(path))


def test_d4rl_file_has_exactly_d4rls_keys_dtypes_and_shapes(tmp_path):
    path = tmp_path / "data.hdf5"
    write_d4rl(make_episodes(), path)
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == D4RL_KEYS
        assert (f["observations"].shape, f["observations"].dtype) == ((9, 3), np.float32)
        assert (f["actions"].shape, f["actions"].dtype) == ((9, 2), np.float32)
        assert (f["rewards"].shape, f["rewards"].dtype) == ((9,), np.float32)
        assert (f["terminals"].shape, f["terminals"].dtype) == ((9,), np.bool_)
        assert (f["timeouts"].shape, f["timeouts"].dtype) == ((9,), np.bool_)
        assert f["observations"].compression == "gzip"
        np.testing.assert_array_equal(np.flatnonzero(f["terminals"][()]), [2, 8])
        np.testing.assert_array_equal(np.flatnonzero(f["timeouts"][()]), [6])


def test_d4rl_metadata_written_under_metadata_group_and_read_back(tmp_path):
    meta = {"algorithm": "SAC", "iteration": 7, "score": 1.5, "deterministic": False,
            "policy": {"nonlinearity": "relu"}, "env/id": "Hopper-v5", "seeds": [1, 2]}
    path = tmp_path / "data.hdf5"
    write_d4rl(make_episodes(meta), path)
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == D4RL_KEYS | {"metadata"}
        assert f["metadata/algorithm"][()] == b"SAC"
        assert f["metadata/iteration"][()] == 7
        assert f["metadata/policy/nonlinearity"][()] == b"relu"
    assert read_d4rl(path).metadata == {
        "algorithm": "SAC", "iteration": 7, "score": 1.5, "deterministic": False,
        "policy/nonlinearity": "relu", "env/id": "Hopper-v5", "seeds": [1, 2]}
    write_d4rl(make_episodes(meta), path, metadata={"algorithm": "BC"})
    assert read_d4rl(path).metadata == {"algorithm": "BC"}


def test_hand_built_d4rl_file_splits_at_terminals_and_timeouts(tmp_path):
    # 9 rows: terminal at 2, timeout at 5, terminal AND timeout at 6 (terminal wins),
    # rows 7-8 cut off by the end of the file (kept, marked truncated).
    n = 9
    terminals = np.zeros(n, bool)
    terminals[[2, 6]] = True
    timeouts = np.zeros(n, bool)
    timeouts[[5, 6]] = True
    obs = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    path = tmp_path / "hopper-like.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["next_observations"] = obs + 1
        f["actions"] = np.full((n, 3), 0.5, np.float32)
        f["rewards"] = np.arange(1, n + 1, dtype=np.float32)  # 1..9
        f["terminals"] = terminals
        f["timeouts"] = timeouts
        f["infos/qpos"] = np.zeros((n, 2))
        f["metadata/algorithm"] = np.bytes_("SAC")  # fixed-length bytes, as in D4RL's files
        f["metadata/iteration"] = np.int64(3)
        f["metadata/policy/fc0/weight"] = np.zeros((4, 4))  # arrays are skipped
    eps = load_episodes(path)
    np.testing.assert_array_equal(eps.episode_starts, [0, 3, 6, 7])
    np.testing.assert_array_equal(eps.episode_lengths, [3, 3, 1, 2])
    np.testing.assert_array_equal(np.flatnonzero(eps.terminations), [2, 6])
    np.testing.assert_array_equal(np.flatnonzero(eps.truncations), [5, 8])
    np.testing.assert_array_equal(eps.episode_returns, [1 + 2 + 3, 4 + 5 + 6, 7, 8 + 9])
    np.testing.assert_array_equal(eps.observations, obs)
    assert eps.metadata == {"algorithm": "SAC", "iteration": 3}


def test_d4rl_without_timeouts_and_with_column_shaped_rewards_and_1d_actions(tmp_path):
    path = tmp_path / "old.hdf5"
    terminals = np.array([0, 1, 0, 0], np.float32)  # older files store flags as floats
    write_raw_d4rl(path, observations=np.zeros((4, 2)), actions=np.array([0.0, 1.0, 2.0, 3.0]),
                   rewards=np.array([[1.0], [2.0], [3.0], [4.0]]), terminals=terminals)
    eps = load_episodes(path)
    assert eps.actions.shape == (4, 1) and eps.rewards.shape == (4,)
    assert eps.action_space == ContinuousActions(1)
    np.testing.assert_array_equal(eps.episode_starts, [0, 2])
    np.testing.assert_array_equal(eps.terminations, [False, True, False, False])
    np.testing.assert_array_equal(eps.truncations, [False, False, False, True])
    np.testing.assert_array_equal(eps.returns_to_go, [3, 2, 7, 4])


# ---- native ---------------------------------------------------------------------------------------
def test_native_round_trip_with_metadata(tmp_path):
    meta = {"env_id": "Hopper-v5", "collected_by": {"policy": "sac", "steps": 1000},
            "scores": [1.0, 2.5], "seed": np.int64(4)}
    eps = make_episodes(meta)
    path = tmp_path / "data.h5"
    save_episodes(eps, path)
    with h5py.File(path, "r") as f:
        assert f.attrs["dtlab_format"] == 1
        assert set(f.keys()) == {"observations", "actions", "rewards", "terminations",
                                 "truncations", "episode_starts"}
    for back in (read_native(path), load_episodes(path)):
        assert_same_episodes(eps, back)
        assert back.metadata == {"env_id": "Hopper-v5",
                                 "collected_by": {"policy": "sac", "steps": 1000},
                                 "scores": [1.0, 2.5], "seed": 4}
        assert back.source == str(path)


def test_save_episodes_d4rl_and_unknown_format(tmp_path):
    eps = make_episodes()
    save_episodes(eps, tmp_path / "d.hdf5", format="d4rl")
    with h5py.File(tmp_path / "d.hdf5", "r") as f:
        assert "terminals" in f and "dtlab_format" not in f.attrs
    with pytest.raises(ConfigError, match="unknown dataset format"):
        save_episodes(eps, tmp_path / "x.hdf5", format="pickle")


# ---- bad input: a DatasetError that names the file ------------------------------------------------
def _missing_file(path):
    pass


def _text_file(path):
    path.write_text("observations,actions\n1,2\n")


def _truncated_hdf5(path):
    write_d4rl(make_episodes(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _missing_rewards(path):
    arrays = valid_d4rl_arrays()
    del arrays["rewards"]
    write_raw_d4rl(path, **arrays)


def _length_mismatch(path):
    arrays = valid_d4rl_arrays()
    arrays["rewards"] = arrays["rewards"][:-1]
    write_raw_d4rl(path, **arrays)


def _nan_observation(path):
    arrays = valid_d4rl_arrays()
    arrays["observations"][3, 1] = np.nan
    write_raw_d4rl(path, **arrays)


def _inf_reward(path):
    arrays = valid_d4rl_arrays()
    arrays["rewards"][4] = np.inf
    write_raw_d4rl(path, **arrays)


def _empty(path):
    write_raw_d4rl(path, **valid_d4rl_arrays(n=0))


def _unknown_layout(path):
    with h5py.File(path, "w") as f:
        f["obs"] = np.zeros((3, 2))


def _dones_not_terminals(path):  # Gymnasium-style names another tool wrote
    arrays = valid_d4rl_arrays()
    arrays["dones"] = arrays.pop("terminals")
    arrays.pop("timeouts", None)
    write_raw_d4rl(path, **arrays)


def _singular_observation(path):
    arrays = valid_d4rl_arrays()
    arrays["observation"] = arrays.pop("observations")
    write_raw_d4rl(path, **arrays)


def _newer_native(path):
    write_native(make_episodes(), path)
    with h5py.File(path, "r+") as f:
        f.attrs["dtlab_format"] = 2


def _native_missing_starts(path):
    write_native(make_episodes(), path)
    with h5py.File(path, "r+") as f:
        del f["episode_starts"]


BAD_FILES = {
    "missing file": (_missing_file, "file not found"),
    "text file": (_text_file, r"not an HDF5 file \(or truncated/corrupt\)"),
    "truncated hdf5": (_truncated_hdf5, "truncated"),
    "missing key": (_missing_rewards, r"missing key 'rewards' \(D4RL layout needs observations, "
                                      r"actions, rewards, terminals \(timeouts and "
                                      r"next_observations are optional\); top-level keys: "
                                      r"'actions', 'observations', 'terminals'.*\)$"),
    "renamed key": (_singular_observation, r"missing key 'observations' .*top-level keys: "
                                           r"'actions', 'observation', .*\); rename "
                                           r"'observation' to 'observations'$"),
    "gymnasium names": (_dones_not_terminals, r"unrecognized HDF5 layout: .* top-level keys: "
                                              r"'actions', 'dones', .*; rename 'dones' to "
                                              r"'terminals'$"),
    "length mismatch": (_length_mismatch, "'rewards' has 5 entries but 'observations' has 6"),
    "nan observation": (_nan_observation, r"'observations' contains NaN or inf \(first at "
                                          r"transition 3\)"),
    "inf reward": (_inf_reward, r"'rewards' contains NaN or inf \(first at transition 4\)"),
    "empty": (_empty, r"empty \(0 transitions\)"),
    "unknown layout": (_unknown_layout, r"missing root attribute 'dtlab_format'.*'terminals'/"
                                        r"'timeouts'.*top-level keys: 'obs'"),
    "newer native": (_newer_native, "written by a newer dtlab"),
    "native missing key": (_native_missing_starts, "missing key 'episode_starts'"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_raises_dataset_error_naming_the_file(tmp_path, name):
    make, message = BAD_FILES[name]
    path = tmp_path / "bad.hdf5"
    make(path)
    with pytest.raises(DatasetError, match=message) as err:
        load_episodes(path)
    assert str(err.value).startswith(f"{path}: ")


def test_direct_readers_raise_dataset_error_too(tmp_path):
    path = tmp_path / "bad.hdf5"
    _missing_rewards(path)
    with pytest.raises(DatasetError, match=re.escape(f"{path}: missing key 'rewards'")):
        read_d4rl(path)
    with pytest.raises(DatasetError, match="file not found"):
        read_native(tmp_path / "nope.h5")


# ---- atomic writes --------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", [write_d4rl, write_native])
def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch, writer):
    original = h5py.Group.create_dataset
    calls = []

    def create_dataset_then_fail(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise RuntimeError("disk full (simulated)")
        return original(self, *args, **kwargs)

    path = tmp_path / "data.hdf5"
    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        writer(make_episodes(), path)
    assert len(calls) == 3  # the failure really came mid-write
    assert list(tmp_path.iterdir()) == []

    # Over an existing file: the old contents survive, no temp file is left.
    monkeypatch.setattr(h5py.Group, "create_dataset", original)
    old = make_episodes({"version": "old"})
    writer(old, path)
    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset_then_fail)
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        writer(make_episodes({"version": "new"}), path)
    assert list(tmp_path.iterdir()) == [path]
    back = load_episodes(path)
    assert_same_episodes(old, back)
    assert back.metadata == {"version": "old"}
