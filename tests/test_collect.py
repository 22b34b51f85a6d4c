"""Episode collection: determinism, episode flags, the D4RL observation view, policy quality."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

import dtlab
from dtlab.behaviour.policies import RandomPolicy
from dtlab.behaviour.scripted import PendulumSwingUp, pendulum_mixed_dataset
from dtlab.collect import collect_episodes
from dtlab.collect import PolicySpec, parse_policy
from dtlab.errors import ConfigError, EnvError

FIELDS = ("observations", "actions", "rewards", "terminations", "truncations", "episode_starts")


def pendulum_action_space() -> gymnasium.spaces.Box:
    env = gymnasium.make("Pendulum-v1")
    space = env.action_space
    env.close()
    return space


def test_same_seed_same_data_and_other_seed_differs():
    def run(seed):
        return collect_episodes("Pendulum-v1", lambda i: PendulumSwingUp(quality=0.5),
                                num_episodes=2, seed=seed)

    a, b, c = run(3), run(3), run(4)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert not np.array_equal(a.observations, c.observations)
    assert not np.array_equal(a.actions, c.actions)


def test_pendulum_episodes_are_200_steps_truncated_not_terminated():
    policy = RandomPolicy(pendulum_action_space())
    data = collect_episodes("Pendulum-v1", policy, num_episodes=2, seed=0)
    np.testing.assert_array_equal(data.episode_starts, [0, 200])
    assert data.num_transitions == 400
    assert data.observations.shape == (400, 3) and data.observations.dtype == np.float32
    assert data.actions.shape == (400, 1) and data.actions.dtype == np.float32
    assert not data.terminations.any()
    np.testing.assert_array_equal(np.flatnonzero(data.truncations), [199, 399])


def test_transition_budget_truncates_the_last_episode():
    data = collect_episodes("Pendulum-v1", PendulumSwingUp(), num_transitions=250, seed=0)
    assert data.num_transitions == 250
    np.testing.assert_array_equal(data.episode_lengths, [200, 50])
    np.testing.assert_array_equal(np.flatnonzero(data.truncations), [199, 249])
    assert data.metadata["num_episodes"] == 2 and data.metadata["num_transitions"] == 250


def test_observations_are_pre_action_states_replayed_in_a_fresh_env():
    seed = 7
    data = collect_episodes("Pendulum-v1", lambda i: PendulumSwingUp(quality=0.3),
                            num_transitions=300, seed=seed)
    # Replay every recorded action with the documented seeding scheme in a fresh env: reset(seed)
    # before the first episode, reset() before the next.
    env = gymnasium.make("Pendulum-v1")
    for e, (start, length) in enumerate(zip(data.episode_starts, data.episode_lengths)):
        obs, _ = env.reset(seed=seed if e == 0 else None)
        for t in range(start, start + length):
            np.testing.assert_array_equal(data.observations[t], obs)  # state before action t
            obs, reward, terminated, truncated, _ = env.step(data.actions[t])
            assert np.float32(reward) == data.rewards[t]
            assert terminated == data.terminations[t]
            if t + 1 < start + length:
                assert not truncated
                np.testing.assert_array_equal(data.observations[t + 1], obs)  # next observation
    env.close()


def test_terminating_env_and_callable_policy_gets_episode_index():
    env = gymnasium.make("Hopper-v5")
    space = env.action_space
    env.close()
    seen = []

    def make_policy(i):
        seen.append(i)
        return RandomPolicy(space)

    data = collect_episodes("Hopper-v5", make_policy, num_transitions=300, seed=0)
    assert seen == list(range(data.num_episodes))
    assert data.num_episodes > 1  # a random Hopper falls within ~20 steps
    ends = np.append(data.episode_starts[1:], data.num_transitions) - 1
    assert data.terminations[ends[:-1]].all()  # early episodes end by falling (terminated)
    assert data.terminations[-1] or data.truncations[-1]
    assert not (data.terminations & data.truncations).any()
    # Uniform over Hopper's [-1, 1]^3: centred, spread over the whole box (std 1/sqrt(3)).
    assert np.abs(data.actions.mean(axis=0)).max() < 0.15
    assert (data.actions.min(axis=0) < -0.95).all() and (data.actions.max(axis=0) > 0.95).all()
    np.testing.assert_allclose(data.actions.std(axis=0), 1 / np.sqrt(3), rtol=0.15)


def test_random_policy_spans_pendulum_torque_range():
    data = collect_episodes("Pendulum-v1", RandomPolicy(pendulum_action_space()), num_episodes=2,
                            seed=0)
    actions = data.actions[:, 0]  # uniform over [-2, 2]: mean 0, std 4 / sqrt(12)
    assert abs(actions.mean()) < 0.2
    assert actions.min() < -1.9 and actions.max() > 1.9
    assert actions.std() == pytest.approx(4 / np.sqrt(12), rel=0.1)


def test_quality_separates_returns():
    def mean_return(quality):
        policy = PendulumSwingUp(quality=quality)
        data = collect_episodes("Pendulum-v1", policy, num_episodes=5, seed=0)
        return float(data.episode_returns.mean())

    low, mid, high = mean_return(0.0), mean_return(0.6), mean_return(1.0)
    assert low < -800.0 and high > -300.0
    assert low + 300.0 < mid < high - 200.0


def test_scripted_controller_balances_upright():
    data = collect_episodes("Pendulum-v1", PendulumSwingUp(), num_episodes=3, seed=1)
    ends = data.episode_starts + data.episode_lengths - 1
    cos_th = data.observations[ends, 0]
    assert (cos_th > 0.999).all()  # upright at the end of every episode


def test_metadata_provenance():
    data = collect_episodes("Pendulum-v1", lambda i: PendulumSwingUp(quality=[0.0, 1.0][i % 2]),
                            num_episodes=3, seed=5, metadata={"note": "test"})
    meta = data.metadata
    assert meta["env_id"] == "Pendulum-v1"
    assert meta["gymnasium_version"] == gymnasium.__version__
    assert meta["dtlab_version"] == dtlab.__version__
    assert meta["seed"] == 5 and meta["note"] == "test"
    assert meta["policies"] == ["pendulum_swingup(quality=0.000)",
                                "pendulum_swingup(quality=1.000)"]
    assert meta["episode_policy"] == [0, 1, 0]
    returns = data.episode_returns
    assert meta["episode_return"]["mean"] == pytest.approx(float(returns.mean()))
    assert meta["episode_return"]["min"] == pytest.approx(float(returns.min()))
    with pytest.raises(ConfigError, match="seed"):
        collect_episodes("Pendulum-v1", PendulumSwingUp(), num_episodes=1, metadata={"seed": 1})


def test_pendulum_mixed_dataset_spreads_qualities():
    data = pendulum_mixed_dataset(num_episodes=12, seed=0)
    assert data.num_episodes == 12 and data.num_transitions == 2400
    assert len(data.metadata["policies"]) == 12  # one quality per episode
    returns = data.episode_returns
    assert returns.max() - returns.min() > 500.0


def test_bad_arguments_raise():
    with pytest.raises(ConfigError):
        collect_episodes("Pendulum-v1", PendulumSwingUp())
    with pytest.raises(ConfigError):
        collect_episodes("Pendulum-v1", PendulumSwingUp(), num_episodes=1, num_transitions=10)
    with pytest.raises(ConfigError):
        PendulumSwingUp(quality=1.5)
    with pytest.raises(RuntimeError, match="reset"):
        RandomPolicy(pendulum_action_space()).act(np.zeros(3, dtype=np.float32))


def test_unknown_or_uninstallable_env_is_an_env_error():
    with pytest.raises(EnvError, match="unknown environment 'Hopper-v9'"):
        collect_episodes("Hopper-v9", PendulumSwingUp(), num_episodes=1)
    gymnasium.register("DtlabTestMissingModule-v0", entry_point="dtlab_no_such_module:Env")
    try:
        with pytest.raises(EnvError, match="DtlabTestMissingModule-v0.*missing package"):
            collect_episodes("DtlabTestMissingModule-v0", PendulumSwingUp(), num_episodes=1)
    finally:
        del gymnasium.registry["DtlabTestMissingModule-v0"]


def cli(capsys, *argv):
    from dtlab.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args, message", [
    (["--preset", "hopper-random-v9"], "unknown environment 'Hopper-v9'"),
    (["--preset", "hopper-random-v5", "--episodes", "3"], "presets are sized by transitions"),
    (["--preset", "hopper-random-v5", "--env", "Walker2d-v5"], "conflicts with --preset"),
    (["--env", "Pendulum-v1", "--policy", "pendulum-mixed", "--transitions", "100"],
     "give episodes, not transitions"),
    (["--env", "Pendulum-v1", "--episodes", "0"], "episodes must be >= 1, got 0"),
    (["--env", "Pendulum-v1", "--transitions", "0"], "transitions must be >= 1, got 0"),
    (["--preset", "hopper-random-v5", "--transitions", "0"], "transitions must be >= 1, got 0"),
    (["--env", "Pendulum-v1", "--episodes", "1", "--out", "minari:x/y-v0", "--format", "d4rl"],
     "is a Minari dataset, but format is d4rl"),
    (["--env", "Pendulum-v1", "--episodes", "1", "--out", "minari:x/y-v0", "--format", "native"],
     "is a Minari dataset, but format is native"),
    (["--env", "Pendulum-v1", "--episodes", "1", "--format", "minari"],
     "give out minari:<id>"),
    (["--env", "Pendulum-v1", "--episodes", "1", "--policy", "scripted"], "unknown policy 'scripted'"),
    (["--env", "Pendulum-v1", "--episodes", "1", "--policy", "actor:"], "policy actor: needs a file"),
    (["--env", "Hopper-v5", "--episodes", "1", "--policy", "pendulum-swingup"],
     "policy pendulum-swingup is for Pendulum-v1"),
    (["--env", "Hopper-v5", "--policy", "pendulum-mixed"], "policy pendulum-mixed is for Pendulum-v1"),
    (["--env", "Pendulum-v1"], "give episodes or transitions"),
    (["--env", "Pendulum-v1", "--episodes", "1", "--transitions", "5"],
     "give episodes or transitions, not both"),
    (["--episodes", "1"], "give env (or preset)"),
])
def test_cli_collect_refuses_conflicting_options(tmp_path, capsys, args, message):
    out = tmp_path / "data.hdf5"
    code, stdout, err = cli(capsys, "collect", "--out", out, *args)
    assert code == 2 and stdout == "" and "Traceback" not in err
    assert err.startswith("dtlab: error: ") and message in err
    assert not out.exists()


def test_cli_collect_formats(tmp_path, capsys, monkeypatch):
    import h5py

    from dtlab.data.formats import load_episodes

    code, _, _ = cli(capsys, "collect", "--env", "Pendulum-v1", "--episodes", 1, "--out",
                     tmp_path / "d.hdf5")
    assert code == 0
    with h5py.File(tmp_path / "d.hdf5") as f:  # default layout: D4RL's keys
        assert "terminals" in f and "timeouts" in f
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    code, _, err = cli(capsys, "collect", "--env", "Pendulum-v1", "--episodes", 1, "--out",
                       "minari:dtlab/pendulum-random-v0")
    assert code == 0, err  # minari:<id> implies --format minari
    assert load_episodes("minari:dtlab/pendulum-random-v0").num_transitions == 200


def test_sharded_collection_is_the_same_in_parallel_and_in_sequence():
    from dtlab.collect import collect_sharded

    space = gymnasium.make("Pendulum-v1").action_space
    parallel = collect_sharded("Pendulum-v1", RandomPolicy(space), num_transitions=450, seed=5, shards=2)
    serial = collect_sharded("Pendulum-v1", RandomPolicy(space), num_transitions=450, seed=5, shards=2,
                             processes=1)
    np.testing.assert_array_equal(parallel.actions, serial.actions)
    np.testing.assert_array_equal(parallel.observations, serial.observations)
    # Shares 225 + 225: each shard is one full 200-step episode plus a 25-step cut-off one.
    assert parallel.episode_lengths.tolist() == [200, 25, 200, 25]
    assert parallel.truncations.sum() == 4 and parallel.metadata["shards"] == 2
    assert parallel.metadata["num_transitions"] == 450


def test_sharded_collection_reports_a_failing_shard():
    from dtlab.collect import collect_sharded

    class Broken:
        name = "broken"

        def check_env(self, env):
            pass

        def reset(self, rng):
            pass

        def act(self, observation):
            raise RuntimeError("policy exploded")

    with pytest.raises(RuntimeError, match="policy exploded"):
        collect_sharded("Pendulum-v1", Broken(), num_transitions=20, seed=0, shards=2)


@pytest.mark.parametrize("env_id", ["Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"])
def test_committed_presets_regenerate_deterministically(env_id):
    """The committed behaviour actors load safely, match the env, and regenerate the same data for
    the same seed (a small budget instead of the presets' 1M transitions)."""
    from dtlab.presets import preset_dataset, read_preset_manifest

    manifest = read_preset_manifest(env_id)
    assert manifest.env_id == env_id
    assert manifest.expert.return_stochastic.mean > 3 * manifest.medium.return_stochastic.mean / 2
    assert manifest.expert.step > manifest.medium.step
    name = f"{env_id.split('-')[0].lower()}-expert-v5"
    a = preset_dataset(name, num_transitions=400)
    b = preset_dataset(name, num_transitions=400)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert a.metadata["env_id"] == env_id
    assert a.metadata["policy_training_steps"] == manifest.expert.step
    assert a.metadata["dtlab_ref_max_score"] == manifest.ref_max_score


def test_sharded_collection_forks_a_policy_factory_that_cannot_be_pickled():
    import pickle

    from dtlab.collect import collect_sharded

    def factory(i):
        return PendulumSwingUp(quality=0.5)

    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(factory)  # a local function: a pool that pickled its job would fail
    parallel = collect_sharded("Pendulum-v1", factory, num_transitions=300, seed=2, shards=3)
    serial = collect_sharded("Pendulum-v1", factory, num_transitions=300, seed=2, shards=3,
                             processes=1)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(parallel, name), getattr(serial, name), err_msg=name)
    assert parallel.episode_lengths.tolist() == [100, 100, 100]


def test_parse_policy():
    assert parse_policy("random") == PolicySpec("random")
    assert parse_policy("pendulum-mixed") == PolicySpec("pendulum-mixed")
    assert parse_policy("actor:runs/a:b.safetensors") == PolicySpec("actor", "runs/a:b.safetensors")
    assert parse_policy("sb3:ppo.zip") == PolicySpec("sb3", "ppo.zip")
    for bad in ("Random", "actor", "ppo:x.zip", "", "random:x"):
        with pytest.raises(ConfigError, match="unknown policy"):
            parse_policy(bad)
    with pytest.raises(ConfigError, match=r"^policy sb3: needs a file"):
        parse_policy("sb3:")


def test_config_minari_prefix_is_the_data_layers():
    from dtlab.data.formats import MINARI_PREFIX as _MINARI_PREFIX
    from dtlab.data.formats import MINARI_PREFIX

    assert _MINARI_PREFIX == MINARI_PREFIX


def test_policies_check_their_env():
    box = pendulum_action_space()
    with pytest.raises(EnvError, match=r"^CartPole-v1: RandomPolicy draws from Box\(shape=\(1,\)"):
        collect_episodes("CartPole-v1", RandomPolicy(box), num_episodes=1)
    wider = gymnasium.spaces.Box(-3.0, 3.0, (1,), np.float32)  # Pendulum's shape, other bounds
    with pytest.raises(EnvError, match="RandomPolicy draws from"):
        collect_episodes("Pendulum-v1", RandomPolicy(wider), num_episodes=1)
    with pytest.raises(EnvError, match="RandomPolicy draws from Discrete"):
        collect_episodes("Pendulum-v1", RandomPolicy(gymnasium.spaces.Discrete(2)), num_episodes=1)
    with pytest.raises(EnvError, match=r"^policy pendulum-swingup is for Pendulum-v1, not "
                                       r"MountainCarContinuous-v0$"):
        collect_episodes("MountainCarContinuous-v0", PendulumSwingUp(), num_episodes=1)


@pytest.mark.parametrize("env_id", ["Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"])
def test_committed_preset_manifests_read_and_write_back_byte_for_byte(env_id, tmp_path):
    from dtlab.presets import preset_manifest_path, read_preset_manifest, write_preset_manifest

    manifest = read_preset_manifest(env_id)
    assert manifest.ref_min_score == manifest.random.mean
    assert manifest.ref_max_score == manifest.expert.return_stochastic.mean
    written = write_preset_manifest(tmp_path, manifest)
    assert written.read_bytes() == preset_manifest_path(env_id).read_bytes()
