"""Each episode's final observation (the one after its last step) is kept: EpisodeSet carries it,
collection records it, and D4RL (``next_observations``), Minari (the T+1-th observation) and the
native format round-trip it exactly, every array of the file included."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from dtlab.behaviour.scripted import PendulumSwingUp
from dtlab.collect import collect_episodes
from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats import (read_d4rl, read_minari, read_native, write_d4rl, write_minari,
                                write_native)
from dtlab.errors import DatasetError


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    """Every test gets its own empty Minari datasets root."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def pendulum_rollouts(lengths, seed=0):
    """Real Pendulum-v1 rollouts with uniform random torques, one episode per entry of
    ``lengths`` (cut there): per episode (T+1 observations, T actions, T float32 rewards)."""
    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(seed)
    episodes = []
    for e, steps in enumerate(lengths):
        obs, _ = env.reset(seed=seed + e)
        observations, actions, rewards = [obs], [], []
        for _ in range(steps):
            action = rng.uniform(-2, 2, size=1).astype(np.float32)
            obs, reward, _, _, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
        episodes.append((np.array(observations, np.float32), np.array(actions, np.float32),
                         np.array(rewards, np.float32)))
    env.close()
    return episodes


# ---- EpisodeSet ----------------------------------------------------------------------------------
def small_set(finals=None) -> EpisodeSet:
    """Episodes of lengths 3 and 2, obs_dim 2: observation t of the data is [t, -t]."""
    obs = np.stack([np.arange(5.0), -np.arange(5.0)], axis=1)
    return EpisodeSet(obs, np.zeros((5, 1)), np.ones(5), np.array([0, 0, 1, 0, 0], bool),
                      np.array([0, 0, 0, 0, 1], bool), np.array([0, 3]), final_observations=finals)


def test_final_observations_are_validated_and_frozen():
    finals = np.array([[10.0, -10.0], [20.0, -20.0]])  # float64 in, float32 kept
    eps = small_set(finals)
    assert eps.final_observations.dtype == np.float32 and eps.final_observations.shape == (2, 2)
    np.testing.assert_array_equal(eps.final_observations, finals)
    assert not eps.final_observations.flags.writeable
    finals[0, 0] = 99.0  # the caller's array is copied, not frozen or shared
    assert eps.final_observations[0, 0] == 10.0
    assert small_set().final_observations is None
    with pytest.raises(DatasetError, match=r"^<memory>: 'final_observations' has shape \(3, 2\), "
                                           r"expected \(2, 2\) \(one per episode\)$"):
        small_set(np.zeros((3, 2)))
    with pytest.raises(DatasetError, match=r"'final_observations' contains NaN or inf \(first at "
                                           r"episode 1\)"):
        small_set(np.array([[0.0, 0.0], [np.inf, 0.0]]))
    one_dim = EpisodeSet(np.arange(3.0), np.zeros((3, 1)), np.ones(3), np.zeros(3, bool),
                         np.zeros(3, bool), np.array([0, 2]), final_observations=np.array([7., 8.]))
    np.testing.assert_array_equal(one_dim.final_observations, [[7.0], [8.0]])


def test_concatenate_and_truncate_carry_final_observations():
    a = small_set(np.array([[10.0, -10.0], [20.0, -20.0]]))
    b = small_set(np.array([[30.0, -30.0], [40.0, -40.0]]))
    both = EpisodeSet.concatenate([a, b])
    np.testing.assert_array_equal(both.final_observations[:, 0], [10, 20, 30, 40])
    assert EpisodeSet.concatenate([a, small_set()]).final_observations is None  # one part lacks them
    # Cutting to 2 steps: episode 0 (3 steps) ends after observation 1, so its final observation
    # is its observation 2 = [2, -2]; episode 1 (2 steps) keeps its own.
    cut = a.truncate_episodes(2)
    np.testing.assert_array_equal(cut.final_observations, [[2, -2], [20, -20]])
    assert small_set().truncate_episodes(2).final_observations is None


# ---- collection ----------------------------------------------------------------------------------
def test_collection_records_the_observation_after_each_episode():
    seed = 3
    data = collect_episodes("Pendulum-v1", PendulumSwingUp(quality=0.5), num_transitions=250,
                            seed=seed)
    assert data.episode_lengths.tolist() == [200, 50]  # the second is cut by the budget
    env = gym.make("Pendulum-v1")
    for e, (start, length) in enumerate(zip(data.episode_starts, data.episode_lengths)):
        obs, _ = env.reset(seed=seed if e == 0 else None)  # the documented seeding scheme
        for t in range(start, start + length):
            obs, *_ = env.step(data.actions[t])
        np.testing.assert_array_equal(data.final_observations[e], obs)
    env.close()


# ---- D4RL ----------------------------------------------------------------------------------------
def test_d4rl_to_dtlab_to_d4rl_keeps_every_array(tmp_path):
    """A D4RL v2-style file (flags at every episode end, next_observations) written with h5py
    from real rollouts reads and writes back with every array identical: dtype, shape, bits."""
    rollouts = pendulum_rollouts([7, 5, 9])
    obs = np.concatenate([o[:-1] for o, _, _ in rollouts])  # (21, 3)
    nxt = np.concatenate([o[1:] for o, _, _ in rollouts])  # (21, 3): the observation after step i
    n = len(obs)
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[6] = True  # episode 0 "terminated", episodes 1 and 2 timed out
    timeouts[[11, 20]] = True
    source = tmp_path / "in.hdf5"
    with h5py.File(source, "w") as f:
        f["observations"] = obs
        f["next_observations"] = nxt
        f["actions"] = np.concatenate([a for _, a, _ in rollouts])
        f["rewards"] = np.concatenate([r for _, _, r in rollouts])
        f["terminals"] = terminals
        f["timeouts"] = timeouts
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consistent data: nothing to warn about
        eps = read_d4rl(source)
    assert eps.episode_lengths.tolist() == [7, 5, 9]
    np.testing.assert_array_equal(eps.final_observations, [o[-1] for o, _, _ in rollouts])
    write_d4rl(eps, tmp_path / "out.hdf5")
    with h5py.File(source, "r") as a, h5py.File(tmp_path / "out.hdf5", "r") as b:
        assert set(a) == set(b) - {"metadata"} == {"observations", "next_observations", "actions",
                                                    "rewards", "terminals", "timeouts"}
        for key in a:
            assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
            assert a[key][()].tobytes() == b[key][()].tobytes(), key


def test_d4rl_without_final_observations_writes_no_next_observations(tmp_path):
    write_d4rl(small_set(), tmp_path / "a.hdf5")
    with h5py.File(tmp_path / "a.hdf5", "r") as f:
        assert "next_observations" not in f
    write_d4rl(small_set(np.array([[10.0, -10.0], [20.0, -20.0]])), tmp_path / "b.hdf5")
    with h5py.File(tmp_path / "b.hdf5", "r") as f:  # rows 1..4 of the data, ends replaced
        np.testing.assert_array_equal(f["next_observations"][:, 0], [1, 2, 10, 4, 20])


# ---- native --------------------------------------------------------------------------------------
def test_native_round_trip_keeps_final_observations(tmp_path):
    eps = small_set(np.array([[10.5, -10.0], [20.0, -20.25]]))
    write_native(eps, tmp_path / "a.h5")
    back = read_native(tmp_path / "a.h5")
    assert back.final_observations.tobytes() == eps.final_observations.tobytes()
    write_native(small_set(), tmp_path / "b.h5")
    assert read_native(tmp_path / "b.h5").final_observations is None
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert "final_observations" not in f


# ---- Minari --------------------------------------------------------------------------------------
DUMP = textwrap.dedent("""
    import sys, minari, numpy as np
    out = {}
    for dataset_id in sys.argv[2:]:
        for ep in minari.load_dataset(dataset_id).iterate_episodes():
            for name in ("observations", "actions", "rewards", "terminations", "truncations"):
                out[f"{dataset_id}|{ep.id}|{name}"] = np.asarray(getattr(ep, name))
    np.savez(sys.argv[1], **out)
""")


def test_minari_to_dtlab_to_minari_keeps_every_array(tmp_path):
    """A dataset written with Minari's own API from real Pendulum rollouts, read by dtlab and
    written back with dtlab's writer: plain Minari (another process, no dtlab) reads both, and
    every episode array is identical in dtype, shape and bits, the T+1-th observation included."""
    rollouts = pendulum_rollouts([6, 4, 8], seed=5)
    buffers = []
    for e, (observations, actions, rewards) in enumerate(rollouts):
        steps = len(rewards)
        last = np.arange(steps) == steps - 1
        buffers.append(EpisodeBuffer(observations=observations, actions=actions, rewards=rewards,
                                     terminations=last if e == 1 else np.zeros(steps, bool),
                                     truncations=np.zeros(steps, bool) if e == 1 else last))
    env = gym.make("Pendulum-v1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Minari's notes on optional fields
        minari.create_dataset_from_buffers("src/pendulum-v0", buffers, env=env,
                                           algorithm_name="random", author="tester")
    env.close()

    eps = read_minari("src/pendulum-v0")
    np.testing.assert_array_equal(eps.final_observations, [o[-1] for o, _, _ in rollouts])
    write_minari(eps, "back/pendulum-v0", env_id="Pendulum-v1")

    dump = tmp_path / "dump.npz"
    done = subprocess.run([sys.executable, "-c", DUMP, str(dump), "src/pendulum-v0",
                           "back/pendulum-v0"], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=120)
    assert done.returncode == 0, done.stderr
    arrays = np.load(dump)
    names = ("observations", "actions", "rewards", "terminations", "truncations")
    for e, (observations, _, _) in enumerate(rollouts):
        assert arrays[f"src/pendulum-v0|{e}|observations"].shape == (len(observations), 3)
        for name in names:
            a = arrays[f"src/pendulum-v0|{e}|{name}"]
            b = arrays[f"back/pendulum-v0|{e}|{name}"]
            assert (a.dtype, a.shape) == (b.dtype, b.shape), (e, name)
            assert a.tobytes() == b.tobytes(), (e, name)
    assert len(arrays.files) == 2 * 3 * len(names)  # no extra episode on either side
    back = read_minari("back/pendulum-v0")
    assert back.metadata["dtlab_final_observations"] == "recorded"


def test_minari_datasets_dtlab_wrote_with_copied_finals_read_without_them():
    write_minari(small_set(), "copied-v0")  # no final observations known: copies are written
    assert read_minari("copied-v0").final_observations is None
    finals = np.array([[10.0, -10.0], [20.0, -20.0]])
    write_minari(small_set(), "given-v0", final_observations=finals)  # the writer's option
    np.testing.assert_array_equal(read_minari("given-v0").final_observations, finals)
    # The option wins over the EpisodeSet's own.
    write_minari(small_set(finals + 1), "override-v0", final_observations=finals)
    np.testing.assert_array_equal(read_minari("override-v0").final_observations, finals)
