"""Minari in and out: datasets dtlab writes load with Minari itself, datasets Minari writes load in
dtlab with the T-observation alignment, D4RL -> Minari -> D4RL is exact, and failures are
DatasetErrors naming ``minari:<id>``."""

from __future__ import annotations

import json
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

from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats import convert, load_episodes, read_minari, save_episodes, write_d4rl
from dtlab.data.formats import write_minari
from dtlab.errors import DatasetError, EnvError
from dtlab.spaces import ContinuousActions, DiscreteActions, VectorObservations


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    """Every test gets its own empty Minari datasets root."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def make_episodes(metadata=None) -> EpisodeSet:
    """Three episodes of lengths 3 (terminated), 4 (truncated), 2 (terminated); obs 3-D, act 1-D
    (Pendulum-v1's shapes)."""
    rng = np.random.default_rng(0)
    n = 9
    term = np.zeros(n, bool)
    trunc = np.zeros(n, bool)
    term[[2, 8]] = True
    trunc[6] = True
    return EpisodeSet(rng.uniform(-1, 1, size=(n, 3)), rng.uniform(-2, 2, size=(n, 1)),
                      rng.normal(size=n), term, trunc, np.array([0, 3, 7]),
                      metadata=metadata or {})


def load_in_subprocess(dataset_id: str) -> dict:
    """Load ``dataset_id`` with plain Minari in a fresh interpreter (no dtlab imported)."""
    script = textwrap.dedent(f"""
        import json, minari
        ds = minari.load_dataset({dataset_id!r})
        eps = list(ds.iterate_episodes())
        print(json.dumps({{
            "total_episodes": ds.total_episodes, "total_steps": ds.total_steps,
            "obs_space": [type(ds.observation_space).__name__, list(ds.observation_space.shape),
                          str(ds.observation_space.dtype)],
            "act_space": [type(ds.action_space).__name__, list(ds.action_space.shape),
                          ds.action_space.low.tolist(), ds.action_space.high.tolist()],
            "env_id": ds.env_spec.id if ds.env_spec is not None else None,
            "observations": [ep.observations.tolist() for ep in eps],
            "actions": [ep.actions.tolist() for ep in eps],
            "terminations": [ep.terminations.tolist() for ep in eps],
            "truncations": [ep.truncations.tolist() for ep in eps],
            "description": ds.storage.metadata.get("description"),
        }}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=os.environ.copy(), timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def minari_api_dataset(dataset_id: str, action_space=None) -> None:
    """Two episodes written with Minari's own API (not dtlab's writer).

    Episode k, step t: observation [100k + t, -(100k + t)] (T+1 of them), action 100k + t + 0.5,
    reward 10k + t. Episode 0 (3 steps) terminates, episode 1 (2 steps) is truncated.
    """
    buffers = []
    for k, (steps, terminated) in enumerate([(3, True), (2, False)]):
        base = 100 * k + np.arange(steps + 1, dtype=np.float32)  # (T+1,)
        last = np.arange(steps) == steps - 1  # (T,) True at the final step only
        never = np.zeros(steps, bool)
        buffers.append(EpisodeBuffer(
            observations=np.stack([base, -base], axis=1),  # (T+1, 2)
            actions=(base[:steps] + 0.5)[:, None],  # (T, 1)
            rewards=(10 * k + np.arange(steps)).astype(np.float64),
            terminations=last if terminated else never,
            truncations=never if terminated else last,
        ))
    with warnings.catch_warnings():  # Minari warns about each optional field left out
        warnings.simplefilter("ignore", UserWarning)
        minari.create_dataset_from_buffers(
            dataset_id, buffers,
            observation_space=gym.spaces.Box(-1e3, 1e3, shape=(2,), dtype=np.float32),
            action_space=action_space or gym.spaces.Box(-1e3, 1e3, shape=(1,), dtype=np.float32),
            algorithm_name="hand-made", author="tester", description="test data")


# ---- dtlab writes, Minari reads -----------------------------------------------------------------
def test_written_datasets_load_with_minari_in_another_process():
    eps = make_episodes(metadata={"seed": 4})
    finals = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]], np.float32)
    write_minari(eps, "dtlab/pendulum-v0", env_id="Pendulum-v1", final_observations=finals)
    save_episodes(eps, "minari:inferred-v1")  # no env: spaces from the data, finals copied

    ends = [3, 7, 9]
    for dataset_id, has_env in (("dtlab/pendulum-v0", True), ("inferred-v1", False)):
        got = load_in_subprocess(dataset_id)
        assert got["total_episodes"] == 3 and got["total_steps"] == 9
        assert [len(o) for o in got["observations"]] == [4, 5, 3]  # T+1 per episode
        assert [len(a) for a in got["actions"]] == [3, 4, 2]
        assert got["terminations"] == [[False, False, True], [False] * 4, [False, True]]
        assert got["truncations"] == [[False] * 3, [False, False, False, True], [False] * 2]
        for e, (start, stop) in enumerate(zip([0, 3, 7], ends)):
            obs = np.asarray(got["observations"][e], np.float32)
            np.testing.assert_array_equal(obs[:-1], eps.observations[start:stop])
            np.testing.assert_array_equal(np.asarray(got["actions"][e], np.float32),
                                          eps.actions[start:stop])
            final = finals[e] if has_env else eps.observations[stop - 1]
            np.testing.assert_array_equal(obs[-1], final)
        if has_env:  # Pendulum-v1's spaces and spec
            assert got["env_id"] == "Pendulum-v1"
            assert got["obs_space"] == ["Box", [3], "float32"]
            assert got["act_space"] == ["Box", [1], [-2.0], [2.0]]
            assert "copy" not in got["description"]
        else:  # Box spaces spanning the data
            assert got["env_id"] is None
            assert got["obs_space"] == ["Box", [3], "float32"]
            assert got["act_space"][2] == [float(eps.actions.min())]
            assert got["act_space"][3] == [float(eps.actions.max())]
            assert "is a copy of observations[T-1]" in got["description"]


def test_existing_dataset_needs_overwrite_and_failed_write_leaves_nothing(minari_root,
                                                                          monkeypatch):
    eps = make_episodes()
    write_minari(eps, "ns/data-v0")
    with pytest.raises(DatasetError, match=r"^minari:ns/data-v0: dataset already exists"):
        write_minari(eps, "ns/data-v0")

    # Overwrite, then a write that fails after Minari wrote the files: the old dataset survives.
    doubled = EpisodeSet(eps.observations * 2, eps.actions, eps.rewards, eps.terminations,
                         eps.truncations, eps.episode_starts)
    write_minari(doubled, "ns/data-v0", overwrite=True)
    real_create = minari.create_dataset_from_buffers

    def create_then_fail(*args, **kwargs):
        real_create(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", create_then_fail)
    with pytest.raises(DatasetError, match=r"^minari:ns/data-v0: writing failed: OSError: disk"):
        write_minari(eps, "ns/data-v0", overwrite=True)
    with pytest.raises(DatasetError, match="writing failed"):
        write_minari(eps, "ns/new-v0")
    np.testing.assert_array_equal(read_minari("ns/data-v0").observations, doubled.observations)
    assert not (minari_root / "ns" / "new-v0").exists()
    assert sorted(p.name for p in minari_root.iterdir()) == ["ns"]  # no staging dirs left
    assert sorted(minari.list_local_datasets()) == ["ns/data-v0"]


def test_write_rejects_bad_input_before_touching_disk(minari_root):
    eps = make_episodes()
    with pytest.raises(DatasetError, match=r"final_observations has shape \(2, 3\), expected"):
        write_minari(eps, "bad-v0", final_observations=np.zeros((2, 3)))
    with pytest.raises(EnvError, match="CartPole-v1"):  # Discrete actions, 4-D observations
        write_minari(eps, "bad-v0", env_id="CartPole-v1")
    with pytest.raises(DatasetError, match=r"^minari:no-version: malformed Minari dataset id"):
        write_minari(eps, "no-version")
    assert not any(minari_root.iterdir())


# ---- Minari writes, dtlab reads -----------------------------------------------------------------
def test_dataset_written_by_minari_reads_with_t_observations():
    minari_api_dataset("hand/made-v2")
    eps = load_episodes("minari:hand/made-v2")
    assert eps.source == "minari:hand/made-v2"
    np.testing.assert_array_equal(eps.episode_starts, [0, 3])
    # obs[t] is the observation before action t: the final observation of each episode is gone.
    np.testing.assert_array_equal(eps.observations[:, 0], [0, 1, 2, 100, 101])
    np.testing.assert_array_equal(eps.observations[:, 1], [0, -1, -2, -100, -101])
    np.testing.assert_array_equal(eps.actions[:, 0], eps.observations[:, 0] + 0.5)
    np.testing.assert_array_equal(eps.rewards, [0, 1, 2, 10, 11])
    np.testing.assert_array_equal(eps.terminations, [False, False, True, False, False])
    np.testing.assert_array_equal(eps.truncations, [False, False, False, False, True])
    np.testing.assert_array_equal(eps.returns_to_go, [3, 3, 2, 21, 11])
    assert eps.metadata["minari_dataset_id"] == "hand/made-v2"
    assert eps.metadata["minari_algorithm_name"] == "hand-made"
    assert eps.metadata["minari_author"] == "tester"
    assert eps.metadata["minari_description"] == "test data"
    assert "env_id" not in eps.metadata
    assert all(isinstance(v, (str, int, float)) for v in eps.metadata.values())
    # The dataset's own spaces, bounds included, decide the EpisodeSet's specs.
    assert eps.action_space == ContinuousActions(1, (-1e3,), (1e3,))
    assert eps.observation_space == VectorObservations(2)


def test_discrete_n_comes_from_the_datasets_space(tmp_path):
    """A Discrete(4) dataset that only uses actions 0 and 1 keeps n = 4 (not largest index + 1),
    through dtlab's Minari and native writers; D4RL files record no space: largest index + 1."""
    buffers = [EpisodeBuffer(observations=np.arange(8, dtype=np.float32).reshape(4, 2) / 10,
                             actions=np.array([0, 1, 0]),
                             rewards=np.ones(3), terminations=np.array([False, False, True]),
                             truncations=np.zeros(3, bool))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        minari.create_dataset_from_buffers(
            "four/actions-v0", buffers, observation_space=gym.spaces.Box(-1, 1, (2,), np.float32),
            action_space=gym.spaces.Discrete(4), algorithm_name="hand-made")
    eps = read_minari("four/actions-v0")
    assert eps.action_space == DiscreteActions(4) and eps.actions.tolist() == [0, 1, 0]
    save_episodes(eps, "minari:four/copy-v0")  # no env: the space comes from the episodes
    assert read_minari("four/copy-v0").action_space == DiscreteActions(4)
    save_episodes(eps, tmp_path / "n.hdf5", "native")
    assert load_episodes(tmp_path / "n.hdf5").action_space == DiscreteActions(4)
    save_episodes(eps, tmp_path / "d.hdf5", "d4rl")
    assert load_episodes(tmp_path / "d.hdf5").action_space == DiscreteActions(2)
    # An EpisodeSet refuses indices outside a given space.
    with pytest.raises(DatasetError, match=r"^x: 'actions' hold index 4 at transition 1, outside "
                                           r"the action space Discrete\(4\)$"):
        EpisodeSet(np.zeros((2, 2)), np.array([0, 4]), np.zeros(2), np.array([0, 1]),
                   np.zeros(2), np.array([0]), source="x", action_space=DiscreteActions(4))


def test_unsupported_action_spaces_are_dataset_errors():
    minari_api_dataset("discrete-v0", action_space=gym.spaces.Discrete(3, start=1))
    with pytest.raises(DatasetError, match=r"^minari:discrete-v0: Discrete action spaces must "
                                           r"start at 0, got Discrete\(3, start=1\)"):
        read_minari("discrete-v0")
    minari_api_dataset("multi-v0", action_space=gym.spaces.MultiBinary(2))
    with pytest.raises(DatasetError, match=r"^minari:multi-v0: only flat Box action spaces "
                                           r"are supported, got MultiBinary\(2\)"):
        read_minari("multi-v0")


def test_unknown_id_with_failing_download_is_a_dataset_error(minari_root, monkeypatch):
    def no_network(dataset_id, force_download=False):
        raise ConnectionError(f"cannot reach the Hugging Face hub for {dataset_id}\n(offline)")

    monkeypatch.setattr(minari, "download_dataset", no_network)
    with pytest.raises(DatasetError) as info:
        load_episodes("minari:nobody/nothing-v0")
    message = str(info.value)
    assert message.startswith("minari:nobody/nothing-v0: not found locally "
                              f"(MINARI_DATASETS_PATH={minari_root}) and download failed: "
                              "ConnectionError: cannot reach")
    assert "\n" not in message
    with pytest.raises(DatasetError, match=r"^minari:nothing: malformed Minari dataset id"):
        load_episodes("minari:nothing")


# ---- round trips --------------------------------------------------------------------------------
def test_d4rl_to_minari_to_d4rl_is_exact(tmp_path):
    eps = make_episodes(metadata={"env_id": "Pendulum-v1", "algorithm": "sac", "seed": 4})
    write_d4rl(eps, tmp_path / "in.hdf5")
    convert(tmp_path / "in.hdf5", "minari:rt/pendulum-v0", env_id="Pendulum-v1")
    back = convert("minari:rt/pendulum-v0", tmp_path / "out.hdf5", "d4rl")

    with h5py.File(tmp_path / "in.hdf5", "r") as a, h5py.File(tmp_path / "out.hdf5", "r") as b:
        for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key][()], b[key][()], err_msg=key)
    assert back.metadata["algorithm"] == "sac" and back.metadata["seed"] == 4
    assert back.metadata["env_id"] == "Pendulum-v1"
    assert back.metadata["minari_algorithm_name"] == "sac"
    assert back.metadata["dtlab_final_observations"] == "copied from the last step"


def train_tiny_on(tmp_path, capsys, dataset_id: str, env_id: str, max_ep_len: int) -> dict:
    """`dtlab train --dataset minari:<id>` for 4 steps of a tiny model; the checkpoint's config."""
    from dtlab.cli import main

    out = tmp_path / "run"
    code = main(["train", "--dataset", f"minari:{dataset_id}", "--env", env_id, "--out", str(out),
                 "--steps", "4", "--batch-size", "4", "--warmup-steps", "2", "--log-every", "2",
                 "--no-progress", "--no-tensorboard", "--model.embed-dim", "16", "--model.n-layers",
                 "1", "--model.context-len", "4", "--model.max-ep-len", str(max_ep_len)])
    assert code == 0, capsys.readouterr().err
    return json.loads((out / "step_00000004" / "config.json").read_text())


def test_dtlab_trains_on_a_dataset_written_by_minari(tmp_path, capsys):
    """Real Pendulum-v1 rollouts stored with Minari's own writer (T+1 observations per episode)
    train with `dtlab train --dataset minari:<id>`."""
    import gymnasium as gym


    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(0)
    buffers = []
    for ep in range(3):
        obs, _ = env.reset(seed=ep)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        for _ in range(40):  # cut short: the last step is marked truncated
            action = rng.uniform(-2, 2, size=1).astype(np.float32)
            obs, r, term, trunc, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(r)
            terms.append(term)
            truncs.append(trunc)
        truncs[-1] = True
        buffers.append(EpisodeBuffer(id=ep, observations=np.array(observations), actions=np.array(actions),
                                     rewards=np.array(rewards), terminations=np.array(terms),
                                     truncations=np.array(truncs)))
    minari.create_dataset_from_buffers("test/pendulum-random-v0", buffers, env=env,
                                       algorithm_name="random", author="tester",
                                       author_email="t@example.com", code_permalink="none",
                                       description="random Pendulum data")
    cfg = train_tiny_on(tmp_path, capsys, "test/pendulum-random-v0", "Pendulum-v1", max_ep_len=200)
    assert cfg["dataset"]["episodes"] == 3 and cfg["dataset"]["transitions"] == 120


def test_dtlab_trains_on_a_dataset_recorded_by_minaris_data_collector(tmp_path, capsys):
    """Minari's own recorder (`minari.DataCollector`, which needs jax: the `minari[create]` extra in
    dtlab's test dependencies) wraps a real env; dtlab reads back exactly what was stepped and
    trains on it with `dtlab train --dataset minari:<id>`."""
    from minari import DataCollector


    env = DataCollector(gym.make("CartPole-v1"), record_infos=False)
    rng = np.random.default_rng(0)
    seen_obs, seen_act, seen_rew, lengths = [], [], [], []
    for ep in range(4):
        obs, _ = env.reset(seed=ep)
        steps = 0
        while True:
            action = int(rng.integers(2))
            seen_obs.append(obs)
            seen_act.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            seen_rew.append(reward)
            steps += 1
            if terminated or truncated:
                break
        lengths.append(steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        env.create_dataset("test/cartpole-collector-v0", algorithm_name="random", author="tester",
                           author_email="t@example.com", code_permalink="none",
                           description="random CartPole data recorded by DataCollector")
    env.close()
    eps = load_episodes("minari:test/cartpole-collector-v0")
    assert eps.action_space == DiscreteActions(2) and eps.num_episodes == 4
    np.testing.assert_array_equal(eps.episode_lengths, lengths)
    np.testing.assert_array_equal(eps.observations, np.array(seen_obs, np.float32))
    np.testing.assert_array_equal(eps.actions, seen_act)
    np.testing.assert_array_equal(eps.rewards, seen_rew)
    assert eps.terminations.sum() == 4  # random CartPole episodes end by falling over
    cfg = train_tiny_on(tmp_path, capsys, "test/cartpole-collector-v0", "CartPole-v1", max_ep_len=500)
    assert cfg["action_space"] == {"type": "discrete", "n": 2}
    assert cfg["dataset"]["transitions"] == sum(lengths)
