"""Spaces, the Normalizer, EpisodeSet's immutable metadata, and checkpoint format 3."""

import json
import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch

from dtlab import checkpoint
from dtlab.config import ModelConfig
from dtlab.data import EpisodeSet
from dtlab.errors import CheckpointError, ConfigError, DtlabWarning, EnvError
from dtlab.normalizer import Normalizer, from_unit_interval, to_unit_interval
from dtlab.policy import DTPolicy
from dtlab.spaces import (ContinuousActions, DiscreteActions, VectorObservations,
                          action_space_from_gym, action_space_from_json, check_against_env,
                          observation_space_from_gym, observation_space_from_json)
from dtlab.train import train
from tests.configs import train_config


# ---- specs ---------------------------------------------------------------------------------------
def test_specs_from_gym_and_json_round_trip():
    pendulum = action_space_from_gym(gym.spaces.Box(-2.0, 2.0, (1,), np.float32))
    assert pendulum == ContinuousActions(1, (-2.0,), (2.0,))
    assert action_space_from_gym(gym.spaces.Box(-np.inf, np.inf, (3,))) == ContinuousActions(3)
    assert action_space_from_gym(gym.spaces.Discrete(5)) == DiscreteActions(5)
    assert observation_space_from_gym(gym.spaces.Box(-1, 1, (11,))) == VectorObservations(11)
    with pytest.raises(EnvError, match=r"unsupported action space Discrete\(3, start=1\)"):
        action_space_from_gym(gym.spaces.Discrete(3, start=1))
    with pytest.raises(EnvError, match="unsupported observation space"):
        observation_space_from_gym(gym.spaces.Box(0, 255, (8, 8, 3), np.uint8))
    for spec in (pendulum, ContinuousActions(2), DiscreteActions(4)):
        data = json.loads(json.dumps(spec.to_json()))
        assert action_space_from_json(data) == spec
    assert pendulum.to_json() == {"type": "continuous", "dim": 1, "low": [-2.0], "high": [2.0]}
    assert observation_space_from_json({"type": "vector", "dim": 3}) == VectorObservations(3)


@pytest.mark.parametrize("data,message", [
    ({"type": "discrete", "n": 0}, r"'action_space': 'n' must be a positive integer, got 0"),
    ({"type": "discrete", "n": True}, r"'action_space': 'n' must be a positive integer"),
    ({"type": "continuous", "dim": 2, "low": [0.0], "high": [1.0, 2.0]},
     r"'action_space': 'low' must be a list of 2 finite numbers"),
    ({"type": "continuous", "dim": 1, "low": [1.0], "high": [1.0]},
     r"'action_space': 'low' must be below 'high'"),
    ({"type": "continuous", "dim": 1, "low": [0.0]}, r"both be given or both be null"),
    ({"type": "box", "dim": 1}, r"'action_space' must be an object with \"type\""),
    ({"type": "discrete", "n": 2, "start": 1}, r"unknown keys \['start'\]"),
])
def test_invalid_specs_are_one_line_config_errors_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        action_space_from_json(data)
    assert "\n" not in str(err.value)


def test_check_against_env_messages():
    env = gym.make("Pendulum-v1")
    check_against_env(env, VectorObservations(3), ContinuousActions(1), what="x", exact_n=True,
                      advice="A")
    with pytest.raises(EnvError, match=r"^dataset d has observations \(4,\) and actions \(1,\), "
                                       r"but Pendulum-v1 has observations \(3,\) .*; A$") as err:
        check_against_env(env, VectorObservations(4), ContinuousActions(1), what="dataset d",
                          exact_n=False, advice="A")
    assert "\n" not in str(err.value)
    cartpole = gym.make("CartPole-v1")
    check_against_env(cartpole, VectorObservations(4), DiscreteActions(1), what="d", exact_n=False,
                      advice="A")
    with pytest.raises(EnvError, match=r"^the checkpoint .* 1 actions, but CartPole-v1 .* 2 "
                                       r"actions; B$"):
        check_against_env(cartpole, VectorObservations(4), DiscreteActions(1),
                          what="the checkpoint", exact_n=True, advice="B")
    with pytest.raises(EnvError, match=r"^d has continuous actions but CartPole-v1's action space "
                                       r"is Discrete\(2\); C$"):
        check_against_env(cartpole, VectorObservations(4), ContinuousActions(1), what="d",
                          exact_n=True, advice="C")


def test_env_advice_names_the_recorded_env_only_when_it_is_another_known_one():
    from dtlab.envs import env_advice

    # Another env Gymnasium knows: pass it.
    assert env_advice("Hopper-v5", "Pendulum-v1") == "pass --env Hopper-v5"
    # The env given itself (case aside): no other --env to name; the spaces changed, or the
    # record is wrong.
    same = env_advice("cartpole-v1", "CartPole-v1", "it was trained on")
    assert same.startswith("it was trained on CartPole-v1 itself") and "--env CartPole" not in same
    # Nothing recorded, or a name Gymnasium does not know (D4RL's): which env --env must be.
    for recorded in (None, "hopper-medium-v2"):
        assert env_advice(recorded, "Hopper-v5") == "pass --env the env the data was recorded in"


# ---- Normalizer ----------------------------------------------------------------------------------
def test_normalizer_hand_computed_numpy_and_torch_agree():
    norm = Normalizer(obs_mean=[1.0, -2.0], obs_std=[2.0, 4.0], return_scale=100.0,
                      action_low=[-2.0, 0.0], action_high=[2.0, 10.0])
    obs = np.array([[3.0, 2.0], [1.0, -2.0]], np.float32)
    np.testing.assert_array_equal(norm.normalize_observations(obs), [[1.0, 1.0], [0.0, 0.0]])
    assert norm.scale_returns(np.float32(-250.0)) == -2.5 and norm.unscale_returns(-2.5) == -250.0
    env_actions = np.array([[-2.0, 0.0], [0.0, 5.0], [2.0, 10.0], [3.0, 20.0]])
    np.testing.assert_array_equal(norm.actions_to_model(env_actions),
                                  [[-1, -1], [0, 0], [1, 1], [1, 1]])  # clipped beyond the bounds
    np.testing.assert_array_equal(norm.actions_from_model(np.array([[-1.0, 0.0], [0.5, 1.0]])),
                                  [[-2.0, 5.0], [1.0, 10.0]])
    tnorm = norm.converted(lambda a: torch.tensor(a, dtype=torch.float32))
    assert isinstance(tnorm.obs_mean, torch.Tensor) and isinstance(norm.obs_mean, np.ndarray)
    torch.testing.assert_close(tnorm.normalize_observations(torch.from_numpy(obs)),
                               torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    pred = np.random.default_rng(0).uniform(-1, 1, (5, 2)).astype(np.float32)
    torch.testing.assert_close(tnorm.actions_from_model(torch.from_numpy(pred)),
                               torch.from_numpy(norm.actions_from_model(pred).astype(np.float32)))
    np.testing.assert_allclose(to_unit_interval(from_unit_interval(pred, -3.0, 5.0), -3.0, 5.0),
                               pred, atol=1e-6)
    identity = Normalizer([0.0], [1.0], 1.0)  # discrete indices pass through
    idx = np.array([3, 0, 1])
    assert identity.actions_to_model(idx) is idx and identity.actions_from_model(idx) is idx
    back = Normalizer.from_json(json.loads(json.dumps(norm.to_json())))
    assert back.to_json() == norm.to_json()
    with pytest.raises(ConfigError, match=r"'normalizer.obs_std' must be a non-empty list of "
                                          "positive numbers"):
        Normalizer([0.0], [0.0], 1.0)
    with pytest.raises(ConfigError, match="'normalizer.return_scale' must be a positive number"):
        Normalizer([0.0], [1.0], -1.0)


def pendulum_with_constant_velocity(n_episodes=3, length=200, seed=0) -> EpisodeSet:
    """Pendulum-v1 shapes (cos, sin, angular velocity), but the velocity is always 0."""
    rng = np.random.default_rng(seed)
    n = n_episodes * length
    th = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(th), np.sin(th), np.zeros(n)], 1)
    trunc = np.zeros(n, bool)
    trunc[length - 1::length] = True
    return EpisodeSet.from_flags(obs, rng.uniform(-2, 2, (n, 1)), -rng.uniform(0, 5, n),
                                 np.zeros(n, bool), trunc, source="constant.hdf5")


def test_constant_observation_dimension_gets_std_one(tmp_path):
    """Issue 10: a coordinate that is constant in the data got std 1e-6, so evaluation inputs
    reached ~6e6. Now its std is 1 (a warning names it, the checkpoint records it) and
    normalized evaluation inputs are the env's own bounded values."""
    episodes = pendulum_with_constant_velocity()
    with pytest.warns(DtlabWarning, match=r"^constant.hdf5: observation dimensions \[2\] are "
                                          r"constant in the data"):
        norm = Normalizer.from_episodes(episodes, 100.0, ContinuousActions(1, (-2.0,), (2.0,)))
    assert norm.constant_dims == (2,) and norm.obs_std[2] == 1.0 and norm.obs_mean[2] == 0.0
    obs64 = episodes.observations.astype(np.float64)  # the other dims: data std + 1e-6 (DT)
    np.testing.assert_array_equal(norm.obs_std[:2], (obs64.std(0) + 1e-6).astype(np.float32)[:2])

    cfg = train_config(dataset="<memory>", env="Pendulum-v1", out=str(tmp_path / "run"), steps=4,
                       batch_size=4, warmup_steps=2, progress=False, tensorboard=False,
                       model=ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200))
    with pytest.warns(DtlabWarning) as record:
        result = train(cfg, episodes)
    constant = [str(w.message) for w in record if "constant" in str(w.message)]
    assert len(constant) == 1, constant  # one line (the data diagnostics' finding is not repeated)
    assert "observation dimensions [2] are constant in the data" in constant[0]
    saved = json.loads((result.checkpoint / "config.json").read_text())["normalizer"]
    assert saved["constant_dims"] == [2] and saved["obs_std"][2] == 1.0
    policy = DTPolicy.from_checkpoint(result.checkpoint)
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    policy.reset(-200.0)
    reward, seen = None, []
    for _ in range(30):
        action = policy.act(obs, reward)
        seen.append(obs)
        obs, reward, *_ = env.step(action)
    inputs = policy._obs[0].numpy()  # (K, 3) normalized observations of the last K steps
    np.testing.assert_allclose(inputs[:, 2], np.array(seen)[-4:, 2], rtol=1e-6)  # (x - 0) / 1
    assert np.abs(inputs).max() < 20  # Pendulum's velocity is at most 8


# ---- EpisodeSet metadata -------------------------------------------------------------------------
def test_episode_set_metadata_is_immutable_and_copied():
    meta = {"env_id": "Pendulum-v1", "episode_return": {"mean": 1.0}}
    eps = EpisodeSet.from_flags(np.zeros((3, 2)), np.zeros((3, 1)), np.ones(3), np.zeros(3),
                                np.array([0, 0, 1]), metadata=meta)
    meta["env_id"] = "changed"
    meta["episode_return"]["mean"] = 2.0
    assert eps.metadata == {"env_id": "Pendulum-v1", "episode_return": {"mean": 1.0}}
    with pytest.raises(TypeError):
        eps.metadata["env_id"] = "x"  # noqa
    more = eps.with_metadata({"seed": 3})
    assert more.metadata == {**eps.metadata, "seed": 3} and "seed" not in eps.metadata
    assert more.observations is eps.observations  # read-only arrays are shared
    back = pickle.loads(pickle.dumps(more))
    assert back.metadata == more.metadata and back.action_space == more.action_space
    with pytest.raises(TypeError):
        back.metadata["seed"] = 4  # noqa


# ---- checkpoint format 3 -------------------------------------------------------------------------
@pytest.mark.parametrize("edit,message", [
    (lambda c: (c["action_space"].update(dim=2, low=[-2.0, -2.0], high=[2.0, 2.0]),
                c["normalizer"].update(action_low=[-2.0, -2.0], action_high=[2.0, 2.0])),
     r"'embed_action.weight' has shape \(16, 1\), config.json implies \(16, 2\)"),
    (lambda c: c["normalizer"].update(obs_std=[1.0, 0.0, 1.0]),
     r"invalid config: 'normalizer.obs_std' must be a non-empty list of positive numbers"),
    (lambda c: c["normalizer"].update(action_low=[-1.0]),
     r"'normalizer.action_low'/'action_high' differ from the bounds in 'action_space'"),
    (lambda c: c["observation_space"].update(dim=4),
     r"'normalizer.obs_mean' has 3 entries but 'observation_space.dim' is 4"),
    (lambda c: c["action_space"].update(low=None, high=None),
     r"'action_space' needs the env's bounds"),
    (lambda c: c.update(discrete=True), r"invalid config: unknown keys \['discrete'\]"),
    (lambda c: c.pop("normalizer"), r"missing keys \['normalizer'\]"),
])
def test_invalid_format3_configs_are_one_line_errors(tmp_path, tiny_checkpoint, edit, message):
    model, info = checkpoint.load(tiny_checkpoint)
    ck = checkpoint.save(tmp_path / "run", "step_1", model, info)
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message) as err:
        checkpoint.load(ck)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(ck))


def test_format3_round_trip_keeps_every_record(tmp_path, tiny_checkpoint):
    model, info = checkpoint.load(tiny_checkpoint)
    again = checkpoint.load(checkpoint.save(tmp_path / "run", "step_1", model, info))[1]
    assert again.to_json() == info.to_json() and again.format_version == 3
    assert again.action_space == ContinuousActions(1, (-2.0,), (2.0,))
    state = model.state_dict()
    for key, value in checkpoint.load(tmp_path / "run")[0].state_dict().items():
        assert torch.equal(value, state[key]), key
