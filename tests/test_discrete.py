"""Discrete actions end to end: data, sampling, model, loss, policy, formats, collection (CartPole)."""

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from dtlab import checkpoint
from dtlab.behaviour.policies import RandomPolicy, SB3Policy
from dtlab.cli import main
from dtlab.collect import collect_episodes
from dtlab.config import ModelConfig
from dtlab.data import EpisodeSet, SequenceSampler
from dtlab.data.formats import load_episodes, save_episodes
from dtlab.errors import DatasetError, EnvError
from dtlab.rollout import rollout
from dtlab.model import DecisionTransformer
from dtlab.normalizer import Normalizer
from dtlab.policy import DTPolicy
from dtlab.spaces import ContinuousActions, DiscreteActions, VectorObservations
from dtlab.train import action_loss, train
from tests.configs import flat_fields, train_config

TINY = ModelConfig(embed_dim=16, n_layers=1, n_heads=2, context_len=4, max_ep_len=500)


def cartpole_random(episodes=12, seed=0) -> EpisodeSet:
    return collect_episodes("CartPole-v1", RandomPolicy(gym.spaces.Discrete(2)),
                            num_episodes=episodes, seed=seed)


def test_integer_actions_are_discrete_indices():
    flags = np.array([0, 0, 1])
    ep = EpisodeSet.from_flags(np.zeros((3, 2)), np.array([[2], [0], [1]], np.int32), np.ones(3),
                               flags, np.zeros(3))
    assert ep.action_space == DiscreteActions(3)  # largest index + 1
    assert ep.actions.dtype == np.int64 and ep.actions.shape == (3,)
    assert ep.summary()["discrete_actions"] is True and ep.summary()["num_actions"] == 3
    assert not hasattr(ep, "act_dim")  # act_dim is the width of continuous actions only
    continuous = EpisodeSet.from_flags(np.zeros((3, 2)), np.array([2.0, 0.0, 1.0]), np.ones(3),
                                       flags, np.zeros(3))
    assert continuous.action_space == ContinuousActions(1) and continuous.actions.shape == (3, 1)
    assert continuous.act_dim == 1 and continuous.observation_space == VectorObservations(2)
    with pytest.raises(DatasetError, match=r"^x.hdf5: discrete 'actions' must be >= 0 \(first "
                                           r"negative at transition 1: -1\)"):
        EpisodeSet.from_flags(np.zeros((3, 2)), np.array([0, -1, 1]), np.ones(3), flags,
                              np.zeros(3), source="x.hdf5")


def test_discrete_windows_golden():
    # Episode of 3 steps with actions [1, 0, 1]; K = 4: the window ending at step 1 is
    # left-padded with two zeros and holds [1, 0].
    ep = EpisodeSet.from_flags(np.arange(3.0)[:, None], np.array([1, 0, 1]), np.ones(3),
                               np.array([0, 0, 1]), np.zeros(3))
    s = SequenceSampler(ep, 4, Normalizer(obs_mean=[0.0], obs_std=[1.0], return_scale=1.0))
    b = s.gather(np.array([1, 2]))
    assert b.actions.dtype == np.int64 and b.actions.shape == (2, 4)
    np.testing.assert_array_equal(b.actions, [[0, 0, 1, 0], [0, 1, 0, 1]])
    np.testing.assert_array_equal(b.masks, [[0, 0, 1, 1], [0, 1, 1, 1]])


def test_discrete_model_is_causal_and_predict_last_matches_forward():
    torch.manual_seed(0)
    model = DecisionTransformer(TINY, VectorObservations(3), DiscreteActions(5)).eval()
    g = torch.Generator().manual_seed(1)
    obs, rtg = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 1, generator=g)
    act = torch.randint(0, 5, (2, 4), generator=g)
    ts = torch.arange(4).expand(2, 4)
    logits = model(obs, act, rtg, ts)
    assert logits.shape == (2, 4, 5)
    changed = act.clone()
    changed[:, 2] = (act[:, 2] + 1) % 5  # a_3 is seen only from step 4 on
    after = model(obs, changed, rtg, ts)
    torch.testing.assert_close(after[:, :3], logits[:, :3])
    assert not torch.allclose(after[:, 3], logits[:, 3])
    torch.testing.assert_close(model.predict_last(obs, act, rtg, ts), logits[:, -1])
    assert isinstance(model.embed_action, torch.nn.Embedding)


def test_discrete_loss_is_masked_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g)
    target = torch.tensor([[1, 3, 0], [2, 2, 1]])
    masks = torch.tensor([[False, True, True], [True, True, True]])
    naive = []  # -log softmax(logits)[target], by hand, over the real positions
    for b in range(2):
        for k in range(3):
            if masks[b, k]:
                z = logits[b, k]
                naive.append(-(z[target[b, k]] - torch.log(torch.exp(z).sum())))
    torch.testing.assert_close(action_loss(logits, target, masks), torch.stack(naive).mean())


def test_cartpole_train_policy_and_rollout(tmp_path):
    episodes = cartpole_random()
    assert episodes.action_space == DiscreteActions(2) and episodes.actions.dtype == np.int64
    assert set(np.unique(episodes.actions)) == {0, 1}
    cfg = train_config(dataset="<memory>", env="CartPole-v1", out=str(tmp_path / "run"), steps=30,
                      batch_size=16, warmup_steps=5, progress=False, tensorboard=False, model=TINY,
                      lr=3e-3)
    result = train(cfg, episodes)
    model, info = checkpoint.load(result.checkpoint)
    assert info.action_space == DiscreteActions(2) and info.normalizer.action_low is None
    # The policy's rolling context equals the naive full left-padded window; it acts greedily.
    policy = DTPolicy(model, info)
    k, scale = info.model.context_len, info.normalizer.return_scale
    mean, std = info.normalizer.obs_mean, info.normalizer.obs_std
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    policy.reset(200.0)
    hist_obs, hist_act, hist_rtg, rtg, reward = [], [], [], 200.0, None
    for t in range(7):
        action = policy.act(obs, reward)
        assert isinstance(action, np.integer) and env.action_space.contains(int(action))
        if t:
            rtg -= reward
        hist_obs.append((obs - mean) / std)
        hist_rtg.append(rtg / scale)
        real = min(t + 1, k)
        o = np.zeros((1, k, 4), np.float32)
        a = np.zeros((1, k), np.int64)
        r = np.zeros((1, k, 1), np.float32)
        m = np.zeros((1, k), bool)
        o[0, k - real:] = hist_obs[-real:]
        if real > 1:
            a[0, k - real:k - 1] = hist_act[len(hist_act) - real + 1:]
        r[0, k - real:, 0] = hist_rtg[-real:]
        ts = np.zeros((1, k), np.int64)
        ts[0, k - real:] = np.arange(t + 1 - real, t + 1)
        m[0, k - real:] = True
        with torch.no_grad():
            logits = model(*(torch.from_numpy(x) for x in (o, a, r, ts, m)))[0, -1]
        assert int(action) == int(logits.argmax())
        hist_act.append(int(action))
        obs, reward, terminated, truncated, _ = env.step(action)
        assert not (terminated or truncated)
    results = rollout(DTPolicy(model, info), "CartPole-v1", (500.0, 100.0), 3, seed=0).results
    assert [r.target for r in results] == [500.0, 100.0]
    assert all(len(r.returns) == 3 and min(r.returns) >= 1 for r in results)
    # A discrete checkpoint on a continuous env (and vice versa) is refused.
    with pytest.raises(EnvError, match="discrete actions but Pendulum-v1's action space is Box"):
        rollout(DTPolicy(model, info), "Pendulum-v1", (0.0,), 1)


@pytest.mark.parametrize("fmt", ["d4rl", "native", "minari"])
def test_discrete_formats_round_trip(tmp_path, fmt, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    episodes = cartpole_random(episodes=3)
    dst = "minari:test/cartpole-random-v0" if fmt == "minari" else str(tmp_path / f"c.{fmt}.hdf5")
    options = {"env_id": "CartPole-v1"} if fmt == "minari" else {}
    save_episodes(episodes, dst, fmt, **options)
    back = load_episodes(dst)
    assert back.action_space == DiscreteActions(2) and back.actions.dtype == np.int64
    for name in ("observations", "actions", "rewards", "terminations", "truncations",
                 "episode_starts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(episodes, name))
    if fmt == "d4rl":
        import h5py

        with h5py.File(dst) as f:
            assert f["actions"].dtype == np.int64 and f["actions"].shape == (episodes.num_transitions,)
    if fmt == "minari":  # Minari itself, in a fresh process, sees a Discrete(2) dataset
        code = ("import minari, json; d = minari.load_dataset('test/cartpole-random-v0'); "
                "ep = next(iter(d.iterate_episodes())); "
                "print(json.dumps([str(d.action_space), d.total_episodes, d.total_steps, "
                "str(ep.actions.dtype), len(ep.observations) - len(ep.actions)]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={"MINARI_DATASETS_PATH": str(tmp_path / "minari"),
                                              "PATH": "/usr/bin:/bin"})
        space, n_eps, n_steps, dtype, extra = json.loads(out.stdout.strip().splitlines()[-1])
        assert space == "Discrete(2)" and n_eps == 3 and n_steps == episodes.num_transitions
        assert dtype == "int64" and extra == 1


@pytest.mark.parametrize("algo", ["DQN", "PPO"])
def test_sb3_discrete_policies_collect(tmp_path, capsys, algo):
    import stable_baselines3 as sb3

    kwargs = {"learning_starts": 10, "buffer_size": 500} if algo == "DQN" else {"n_steps": 32,
                                                                                 "batch_size": 16}
    model = getattr(sb3, algo)("MlpPolicy", "CartPole-v1", seed=0, device="cpu", **kwargs)
    model.learn(64)
    model.save(tmp_path / "agent.zip")
    out = tmp_path / "data.hdf5"
    code = main(["collect", "--env", "CartPole-v1", "--policy", f"sb3:{tmp_path / 'agent.zip'}",
                 "--trust-pickle", "--episodes", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = load_episodes(out)
    assert data.action_space == DiscreteActions(2) and data.num_episodes == 3
    assert data.metadata["policies"] == [f"sb3:{algo}(agent.zip)"]
    # The same agent on an env with other spaces is refused.
    with pytest.raises(EnvError, match="do not match Acrobot-v1's"):
        SB3Policy(str(tmp_path / "agent.zip"), "Acrobot-v1", trust=True)


def test_cli_collect_train_evaluate_cartpole(tmp_path, capsys):
    data = tmp_path / "cartpole.hdf5"
    assert main(["collect", "--env", "CartPole-v1", "--policy", "random", "--episodes", "20",
                 "--out", str(data)]) == 0
    assert main(["data", "validate", str(data), "--env", "CartPole-v1"]) == 0
    assert "0 actions outside" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--env", "CartPole-v1", "--out", str(run),
                 "--steps", "6", "--batch-size", "4", "--warmup-steps", "2", "--no-progress",
                 "--no-tensorboard", "--model.embed-dim", "16", "--model.n-layers", "1",
                 "--model.context-len", "4", "--model.max-ep-len", "500"]) == 0
    results = tmp_path / "results.json"
    assert main(["evaluate", str(run), "--episodes", "2", "--out", str(results)]) == 0
    payload = json.loads(results.read_text())
    # Random CartPole data: the paper's 500 and 250 lie beyond its best return, so the default
    # targets are fitted to it (its best return and half of it), and the console says so.
    best = float(f"{payload['dataset_return']['max']:.3g}")
    assert best < 200 and [r["target"] for r in payload["results"]] == [best, float(f"{best / 2:.3g}")]
    assert "fitted to the data" in capsys.readouterr().out
    # A discrete dataset against a continuous env is refused in one line.
    assert main(["train", "--dataset", str(data), "--env", "Pendulum-v1", "--out",
                 str(tmp_path / "bad"), "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cartpole.hdf5 has discrete actions but Pendulum-v1's action space is Box" in err
    assert not (tmp_path / "bad").exists()


def test_checkpoint_format_versions(tmp_path, tiny_checkpoint):
    """New checkpoints, continuous and discrete alike, are format 3: spaces and normalizer as
    records, no flat 'discrete'/'act_dim' fields (formats 1 and 2 still load:
    test_legacy_checkpoints.py)."""
    cont = json.loads((checkpoint.resolve(tiny_checkpoint) / "config.json").read_text())
    assert cont["format_version"] == 3 and "discrete" not in cont and "act_dim" not in cont
    assert cont["action_space"] == {"type": "continuous", "dim": 1, "low": [-2.0], "high": [2.0]}
    assert cont["observation_space"] == {"type": "vector", "dim": 3}
    assert cont["normalizer"]["action_low"] == [-2.0] and cont["normalizer"]["return_scale"] == 100.0
    cfg = train_config(dataset="<memory>", env="CartPole-v1", out=str(tmp_path / "run"), steps=2,
                      batch_size=4, warmup_steps=1, progress=False, tensorboard=False, model=TINY)
    disc = json.loads((train(cfg, cartpole_random(3)).checkpoint / "config.json").read_text())
    assert disc["format_version"] == 3 and "discrete" not in disc
    assert disc["action_space"] == {"type": "discrete", "n": 2}
    assert disc["normalizer"]["action_low"] is None and disc["normalizer"]["action_high"] is None


class ThreeActions(gym.Env):
    """CartPole's observation shape with 3 actions (a checkpoint trained on CartPole must not run)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(4, np.float32), {}

    def step(self, action):
        return np.zeros(4, np.float32), 1.0, True, False, {}


def test_space_mismatches_are_one_line_errors(tmp_path):
    from dtlab.behaviour.sac import train_behaviour
    from dtlab.behaviour.sac import BehaviourConfig
    from dtlab.envs import describe_space

    if "dtlab-test/ThreeActions-v0" not in gym.registry:
        gym.register("dtlab-test/ThreeActions-v0", entry_point=ThreeActions, max_episode_steps=10)
    cfg = train_config(dataset="<memory>", env="CartPole-v1", out=str(tmp_path / "run"), steps=2,
                      batch_size=4, warmup_steps=1, progress=False, tensorboard=False, model=TINY)
    model, info = checkpoint.load(train(cfg, cartpole_random(3)).checkpoint)
    with pytest.raises(EnvError, match=r"the checkpoint has observations \(4,\) and 2 actions, "
                                       r"but .* has observations \(4,\) and 3 actions"):
        rollout(DTPolicy(model, info), "dtlab-test/ThreeActions-v0", (1.0,), 1)
    # ... while a dataset that uses only some of an env's actions is fine for training.
    few = EpisodeSet.from_flags(np.zeros((4, 4)), np.array([0, 1, 1, 0]), np.ones(4),
                                np.array([0, 0, 0, 1]), np.zeros(4))
    cfg3 = train_config(**{**flat_fields(cfg), "env": "dtlab-test/ThreeActions-v0",
                          "out": str(tmp_path / "three")})
    assert checkpoint.load(train(cfg3, few).checkpoint)[1].action_space == DiscreteActions(3)
    beyond = EpisodeSet.from_flags(np.zeros((4, 4)), np.array([0, 7, 1, 0]), np.ones(4),
                                   np.array([0, 0, 0, 1]), np.zeros(4), source="seven.hdf5")
    with pytest.raises(EnvError, match=r"dataset seven.hdf5 has observations \(4,\) and actions "
                                       r"up to index 7, but CartPole-v1 has observations \(4,\) "
                                       r"and 2 actions"):
        train(train_config(**{**flat_fields(cfg), "out": str(tmp_path / "seven")}), beyond)
    assert not (tmp_path / "seven").exists()
    # Spaces in messages are one line, whatever their bounds.
    uneven = gym.spaces.Box(np.arange(17, dtype=np.float32) - 50, np.arange(17, dtype=np.float32) * 3 + 1)
    assert "\n" in str(uneven)  # what gymnasium prints: whole arrays, over several lines
    assert describe_space(uneven) == "Box(shape=(17,), float32)"
    assert describe_space(gym.spaces.Discrete(3, start=1)) == "Discrete(3, start=1)"
    # SAC behaviour agents need Box actions: a clear error, and no run directory left.
    with pytest.raises(EnvError, match=r"^CartPole-v1: SAC needs a continuous \(Box\) action space, "
                                       r"got Discrete\(2\)"):
        train_behaviour(BehaviourConfig(env="CartPole-v1", out=str(tmp_path / "sac")))
    assert not (tmp_path / "sac").exists()
    # A policy that returns a non-integer for a Discrete space is refused, not rounded.
    with pytest.raises(EnvError, match=r"returned 0.5 for a Discrete\(2\) action space"):
        collect_episodes("CartPole-v1", lambda i: HalfPolicy(), num_episodes=1)


class HalfPolicy:
    name = "half"

    def check_env(self, env):
        pass

    def reset(self, rng):
        pass

    def act(self, observation):
        return 0.5
