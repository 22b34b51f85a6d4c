"""The DT paper's baselines: transformer-BC (no return-to-go tokens), MLP-BC on single states,
Percentile BC's episode selection; trained and run through the same trainer and policy."""

import json
import shutil

import numpy as np
import pytest
import torch

from dtlab import checkpoint
from dtlab.config import DataConfig, ModelConfig
from dtlab.data import EpisodeSet
from dtlab.errors import ConfigError
from dtlab.baselines import MLPBC, build_model
from dtlab.model import ActionHead, DecisionTransformer
from dtlab.policy import DTPolicy
from dtlab.spaces import ContinuousActions, DiscreteActions, VectorObservations
from dtlab.rundir import RunDirectory
from dtlab.train import prepare, train
from tests.configs import train_config

K = 6


def inputs(b=3, k=K, obs_dim=5, act_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, obs_dim, generator=g), torch.rand(b, k, act_dim, generator=g) * 2 - 1,
            torch.randn(b, k, 1, generator=g), torch.arange(k).repeat(b, 1) + 3)


def tbc(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(embed_dim=32, n_layers=2, n_heads=2, context_len=K, max_ep_len=50,
                      dropout=0.0, architecture="transformer-bc")
    return build_model(cfg, VectorObservations(5), ContinuousActions(2)).eval()


def test_transformer_bc_ignores_returns_to_go():
    m = tbc()
    assert isinstance(m, DecisionTransformer) and not m.returns_tokens
    assert not any(name.startswith("embed_return") for name in m.state_dict())
    obs, act, rtg, ts = inputs()
    base = m(obs, act, rtg, ts)
    for other in (torch.zeros_like(rtg), rtg * 100 + 7, torch.randn_like(rtg)):
        assert torch.equal(m(obs, act, other, ts), base)
    masks = torch.tensor([[False, False, True, True, True, True]] * 3)
    assert torch.equal(m(obs, act, rtg, ts, masks), m(obs, act, -rtg, ts, masks))
    # The decision transformer, by contrast, reads them.
    torch.manual_seed(0)
    dt = build_model(ModelConfig(embed_dim=32, n_layers=2, n_heads=2, context_len=K,
                                 max_ep_len=50, dropout=0.0), VectorObservations(5),
                     ContinuousActions(2)).eval()
    assert not torch.allclose(dt(obs, act, rtg, ts), dt(obs, act, rtg * 100, ts))


def test_transformer_bc_is_causal_and_reads_the_state_token():
    m = tbc()
    obs, act, rtg, ts = inputs()
    base = m(obs, act, rtg, ts)
    for t in range(K):
        obs2, act2 = obs.clone(), act.clone()
        obs2[:, t + 1:] += 5.0
        act2[:, t:] = -act2[:, t:]  # a_t follows s_t: it must not change the prediction of a_t
        out = m(obs2, act2, rtg, ts)
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
        if t + 1 < K:
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])
        obs3 = obs.clone()
        obs3[:, t] += 5.0  # s_t itself changes the prediction for step t
        assert not torch.allclose(m(obs3, act, rtg, ts)[:, t], base[:, t])
    torch.testing.assert_close(m.predict_last(obs, act, rtg, ts), base[:, -1], rtol=0, atol=1e-6)


def test_transformer_bc_padding():
    m = tbc()
    obs, act, rtg, ts = inputs(b=1, k=3)
    short = m(obs, act, rtg, ts)
    pad = K - 3
    masks = torch.tensor([[False] * pad + [True] * 3])
    garbage = lambda x: torch.cat([torch.full((1, pad, *x.shape[2:]), 7.0, dtype=x.dtype), x], 1)  # noqa
    padded = m(garbage(obs), garbage(act), garbage(rtg),
               torch.cat([torch.zeros(1, pad, dtype=torch.long), ts], 1), masks)
    torch.testing.assert_close(padded[:, pad:], short, rtol=0, atol=1e-5)


def test_mlp_bc_prediction_at_t_depends_only_on_s_t():
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=32, n_layers=3, dropout=0.1, context_len=1, architecture="mlp-bc")
    m = build_model(cfg, VectorObservations(5), ContinuousActions(2)).eval()
    assert isinstance(m, MLPBC)
    # The DT code's MLPBCModel layout: n_layers Linear(., embed_dim) + activation + dropout, head.
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert [tuple(x.weight.shape) for x in linears] == [(32, 5), (32, 32), (32, 32), (2, 32)]
    obs, act, rtg, ts = inputs()
    base = m(obs, act, rtg, ts)
    assert base.shape == (3, K, 2) and bool((base.abs() < 1).all())  # tanh head
    changed = m(obs, -act, rtg * 9, ts + 20, torch.zeros(3, K, dtype=torch.bool))
    assert torch.equal(changed, base)  # actions, returns-to-go, timesteps, masks: ignored
    for t in range(K):
        obs2 = obs.clone()
        obs2[:, t] += 3.0
        out = m(obs2, act, rtg, ts)
        others = [i for i in range(K) if i != t]
        assert torch.equal(out[:, others], base[:, others])
        assert not torch.allclose(out[:, t], base[:, t])
        torch.testing.assert_close(m(obs[:, t:t + 1], act, rtg, ts)[:, 0], base[:, t],
                                   rtol=0, atol=1e-6)  # each state alone gives the same action
    torch.testing.assert_close(m.predict_last(obs, act, rtg, ts), base[:, -1], rtol=0, atol=1e-6)
    discrete = build_model(cfg, VectorObservations(5), DiscreteActions(4)).eval()
    assert discrete(obs[:, :, :5], torch.zeros(3, K, dtype=torch.long), rtg, ts).shape == (3, K, 4)


def test_dt_and_mlp_bc_share_the_action_head():
    """One ActionHead for every network: tanh of a linear map for continuous actions, the linear
    map's logits for discrete ones (against the formula written out), under the parameter names
    checkpoints store."""
    torch.manual_seed(0)
    h = torch.randn(4, 7, 32)
    cont = ActionHead(32, ContinuousActions(2))
    torch.testing.assert_close(cont(h), torch.tanh(h @ cont.weight.T + cont.bias))
    disc = ActionHead(32, DiscreteActions(5))
    torch.testing.assert_close(disc(h), h @ disc.weight.T + disc.bias)  # logits: not squashed
    assert disc.greedy_action(torch.tensor([[0.1, 2.0, -1.0, 0.0, 1.9]])).tolist() == [1]
    x = torch.rand(3, 2) * 2 - 1
    assert torch.equal(cont.greedy_action(x), x)  # continuous actions as they are
    assert cont.empty_actions(3, 4, "cpu").shape == (3, 4, 2)
    assert disc.empty_actions(3, 4, "cpu").dtype == torch.long
    with pytest.raises(ConfigError, match="cannot act in"):
        ActionHead(32, "Box(3)")
    for architecture, k in (("decision-transformer", K), ("mlp-bc", 1)):
        cfg = ModelConfig(embed_dim=32, n_layers=1, context_len=k, architecture=architecture)
        m = build_model(cfg, VectorObservations(5), DiscreteActions(5))
        assert type(m.predict_action) is ActionHead and m.predict_action.logits
        assert {"predict_action.weight", "predict_action.bias"} <= set(m.state_dict())


def test_mlp_bc_needs_context_len_1():
    with pytest.raises(ConfigError, match="--model.context-len must be 1 for --model.architecture mlp-bc"):
        ModelConfig(architecture="mlp-bc")
    with pytest.raises(ConfigError, match="--top-fraction"):
        DataConfig(dataset="x", env="Pendulum-v1", top_fraction=0.0)


def episodes_with_returns(lengths, returns, seed=0):
    """Episodes of the given lengths whose returns are exactly ``returns`` (reward on the last
    step), observations tagging the episode id."""
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rewards = np.zeros(n, np.float32)
    rewards[np.cumsum(lengths) - 1] = returns
    obs = np.repeat(np.arange(len(lengths), dtype=np.float32), lengths)[:, None] * np.ones((1, 3))
    obs[:, 1:] = rng.normal(size=(n, 2))
    act = rng.uniform(-2, 2, size=(n, 1)).astype(np.float32)
    trunc = np.zeros(n, bool)
    trunc[np.cumsum(lengths) - 1] = True
    return EpisodeSet(obs, act, rewards, np.zeros(n, bool), trunc, starts)


def naive_top(lengths, returns, fraction):
    """Best episode first (ties: earlier first), keep adding while the total stays in budget."""
    budget = max(1, int(fraction * sum(lengths)))
    order = sorted(range(len(lengths)), key=lambda e: (-returns[e], e))
    kept, total = [], 0
    for e in order:
        if kept and total + lengths[e] > budget:
            break
        kept.append(e)
        total += lengths[e]
    return sorted(kept)


@pytest.mark.parametrize("seed", range(4))
def test_top_fraction_keeps_the_highest_return_episodes(seed):
    rng = np.random.default_rng(seed)
    e = 40
    lengths = rng.integers(1, 30, size=e).tolist()
    returns = rng.integers(-5, 6, size=e).astype(np.float32).tolist()  # many ties
    episodes = episodes_with_returns(lengths, returns, seed)
    for fraction in (1e-6, 0.1, 0.25, 0.5, 0.9, 1.0):
        top = episodes.top_fraction(fraction)
        kept = np.unique(top.observations[:, 0]).astype(int).tolist()
        assert kept == naive_top(lengths, returns, fraction), fraction
        assert top.num_transitions == sum(lengths[i] for i in kept)
        np.testing.assert_array_equal(top.episode_returns, np.asarray(returns)[kept])
        np.testing.assert_array_equal(top.episode_lengths, np.asarray(lengths)[kept])
        for i, ep in enumerate(kept):  # each episode's steps intact, in order
            src = slice(episodes.episode_starts[ep], episodes.episode_starts[ep] + lengths[ep])
            dst = slice(top.episode_starts[i], top.episode_starts[i] + lengths[ep])
            np.testing.assert_array_equal(top.observations[dst], episodes.observations[src])
            np.testing.assert_array_equal(top.actions[dst], episodes.actions[src])
    assert episodes.top_fraction(1.0).num_episodes == e
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="top_fraction"):
            episodes.top_fraction(bad)


def test_top_fraction_keeps_the_recorded_action_space():
    """A Discrete(4) set stays Discrete(4) when the kept episodes use only actions 0 and 1."""
    actions = np.array([0, 1, 0, 1, 2, 3, 3, 2])  # episode 0 (return 4) uses 0 and 1 only
    data = EpisodeSet(np.zeros((8, 2), np.float32), actions, np.array([1.0] * 4 + [0.0] * 4),
                      np.zeros(8, bool), np.zeros(8, bool), np.array([0, 4]),
                      action_space=DiscreteActions(4))
    top = data.top_fraction(0.5)
    assert top.num_episodes == 1 and set(top.actions.tolist()) == {0, 1}
    assert top.action_space == DiscreteActions(4)


def tiny_episodes():
    return episodes_with_returns([200, 200, 150, 50], [-300.0, -900.0, -100.0, -600.0])


@pytest.mark.parametrize("architecture", ["transformer-bc", "mlp-bc"])
def test_baselines_train_save_load_and_act(tmp_path, architecture):
    k = 1 if architecture == "mlp-bc" else 4
    model = ModelConfig(embed_dim=16, n_layers=1, context_len=k, max_ep_len=200,
                        architecture=architecture)
    cfg = train_config(dataset="<memory>", env="Pendulum-v1", out=str(tmp_path / "run"), steps=4,
                       batch_size=4, warmup_steps=2, progress=False, tensorboard=False,
                       log_every=2, model=model)
    result = train(cfg, tiny_episodes())
    saved = json.loads((result.checkpoint / "config.json").read_text())
    assert saved["model"]["architecture"] == architecture
    policy = DTPolicy.from_checkpoint(result.checkpoint)
    assert policy.info.model.architecture == architecture
    obs = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    policy.reset([-100.0, -900.0])
    a1 = policy.act(obs)
    policy.reset([-5000.0, 5000.0])
    np.testing.assert_array_equal(policy.act(obs), a1)  # the target changes nothing
    with pytest.raises(ConfigError, match="kv-cache rollouts are for decision-transformer"):
        DTPolicy.from_checkpoint(result.checkpoint, kv_cache=True)


def test_percentile_bc_trains_on_the_top_episodes_with_all_data_statistics():
    episodes = tiny_episodes()
    cfg = train_config(dataset="<memory>", env="Pendulum-v1", top_fraction=0.5,
                       model=ModelConfig(embed_dim=16, n_layers=1, context_len=1, max_ep_len=200,
                                         architecture="mlp-bc"))
    kept, info = prepare(cfg, episodes)
    # 300 of 600 transitions: episodes -100 (150 steps) then -300 (200 steps) would be 350.
    assert kept.num_episodes == 1 and float(kept.episode_returns[0]) == -100.0
    mean = episodes.observations.astype(np.float64).mean(0)  # from all data, as the DT code
    np.testing.assert_allclose(info.normalizer.obs_mean, mean, rtol=1e-5)
    assert not np.allclose(kept.observations.mean(0), mean, rtol=1e-3)  # (the kept part differs)
    assert info.dataset["top_fraction"]["episodes"] == 1


def test_runs_saved_before_the_new_fields_still_resume(tmp_path):
    """A train_config.json without model.architecture and data.top_fraction (older dtlab) resumes
    when they keep their defaults, and refuses when they differ."""
    out = tmp_path / "run"
    cfg = train_config(dataset="<memory>", env="Pendulum-v1", out=str(out), steps=4, batch_size=4,
                       warmup_steps=2, progress=False, tensorboard=False, log_every=2,
                       model=ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200))
    train(cfg, tiny_episodes())
    path = out / "train_config.json"
    saved = json.loads(path.read_text())
    del saved["model"]["architecture"], saved["data"]["top_fraction"]
    path.write_text(json.dumps(saved))
    RunDirectory(out).check_resume_config(cfg)
    import dataclasses

    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                               architecture="transformer-bc"))
    with pytest.raises(ConfigError, match="model.architecture: None -> 'transformer-bc'"):
        RunDirectory(out).check_resume_config(other)


def test_checkpoints_without_the_architecture_key_load_as_decision_transformer(tmp_path):
    from pathlib import Path

    legacy = Path(__file__).parent / "fixtures" / "legacy_continuous"
    assert "architecture" not in json.loads((legacy / "config.json").read_text())["model"]
    model, info = checkpoint.load(legacy)
    assert info.model.architecture == "decision-transformer"
    assert isinstance(model, DecisionTransformer) and model.returns_tokens
    copy = tmp_path / "ckpt"
    shutil.copytree(legacy, copy)
    data = json.loads((copy / "config.json").read_text())
    data["model"]["architecture"] = "transformer-bc"  # weights of a DT do not fit a TBC
    (copy / "config.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="unexpected"):
        checkpoint.load(copy)
