"""Return-to-go and window sampling against hand-computed goldens and a naive per-sample loop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtlab.data import EpisodeSet, SequenceSampler, returns_to_go
from dtlab.errors import DatasetError
from dtlab.normalizer import Normalizer


def naive_rtg(rewards, starts, gamma=1.0):
    out = np.zeros(len(rewards))
    bounds = list(starts) + [len(rewards)]
    for s, e in zip(bounds[:-1], bounds[1:]):
        for t in range(s, e):
            out[t] = sum(gamma ** (u - t) * rewards[u] for u in range(t, e))
    return out


def test_rtg_golden():
    # Two episodes: rewards [1, 2, 3] and [10, -4]; hand-computed suffix sums.
    rtg = returns_to_go(np.array([1, 2, 3, 10, -4], dtype=np.float32), np.array([0, 3]))
    np.testing.assert_array_equal(rtg, [6, 5, 3, 6, -4])
    # Discounted, gamma = 0.5: [1 + 0.5*2 + 0.25*3, 2 + 0.5*3, 3] = [2.75, 3.5, 3].
    rtg = returns_to_go(np.array([1, 2, 3], dtype=np.float32), np.array([0]), gamma=0.5)
    np.testing.assert_allclose(rtg, [2.75, 3.5, 3.0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.integers(0, 2**31 - 1),
       st.sampled_from([1.0, 0.9]))
def test_rtg_matches_naive(lengths, seed, gamma):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=sum(lengths)).astype(np.float32)
    starts = np.cumsum([0] + lengths[:-1])
    np.testing.assert_allclose(returns_to_go(rewards, starts, gamma), naive_rtg(rewards, starts, gamma),
                               rtol=1e-5, atol=1e-5)


def make_episodes(lengths, seed=0, obs_dim=2, act_dim=1):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    trunc = np.zeros(n, bool)
    trunc[np.cumsum(lengths) - 1] = True
    return EpisodeSet.from_flags(rng.normal(size=(n, obs_dim)), rng.uniform(-1, 1, (n, act_dim)),
                                 rng.normal(size=n), np.zeros(n, bool), trunc)


def test_window_golden_three_step_episode_k5():
    # One 3-step episode, K=5, identity normalization: observations = [[1], [2], [3]],
    # actions [[.1], [.2], [.3]], rewards [1, 2, 3] -> rtg [6, 5, 3].
    ep = EpisodeSet.from_flags(np.array([[1.0], [2.0], [3.0]]), np.array([[0.1], [0.2], [0.3]]),
                               np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1]), np.zeros(3))
    s = SequenceSampler(ep, 5, Normalizer(obs_mean=[0.0], obs_std=[1.0], return_scale=1.0))
    b = s.gather(np.array([0, 2]))
    np.testing.assert_array_equal(b.masks, [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(b.timesteps, [[0, 0, 0, 0, 0], [0, 0, 0, 1, 2]])
    np.testing.assert_array_equal(b.returns_to_go[..., 0], [[0, 0, 0, 0, 6], [0, 0, 6, 5, 3]])
    np.testing.assert_array_equal(b.observations[..., 0], [[0, 0, 0, 0, 1], [0, 0, 1, 2, 3]])
    np.testing.assert_allclose(b.actions[..., 0], [[0, 0, 0, 0, 0.1], [0, 0, 0.1, 0.2, 0.3]])
    # Scaling: return_scale 2 halves returns-to-go; normalization shifts real observations only.
    s2 = SequenceSampler(ep, 5, Normalizer(obs_mean=[1.0], obs_std=[2.0], return_scale=2.0))
    b2 = s2.gather(np.array([2]))
    np.testing.assert_array_equal(b2.returns_to_go[0, :, 0], [0, 0, 3, 2.5, 1.5])
    np.testing.assert_array_equal(b2.observations[0, :, 0], [0, 0, 0, 0.5, 1.0])


def naive_window(ep, end, k, mean, std, scale):
    """The window ending at flat index ``end``, built step by step."""
    e = int(np.searchsorted(ep.episode_starts, end, side="right") - 1)
    start = ep.episode_starts[e]
    first = max(start, end - k + 1)
    real = end - first + 1
    obs = np.zeros((k, ep.obs_dim), np.float32)
    act = np.zeros((k, ep.act_dim), np.float32)
    rtg = np.zeros((k, 1), np.float32)
    ts = np.zeros(k, np.int64)
    mask = np.zeros(k, bool)
    for j in range(real):
        t = first + j
        pos = k - real + j
        obs[pos] = (ep.observations[t] - mean) / std
        act[pos] = ep.actions[t]
        rtg[pos, 0] = ep.returns_to_go[t] / scale
        ts[pos] = t - start
        mask[pos] = True
    return obs, act, rtg, ts, mask


@pytest.mark.filterwarnings("ignore:.*constant in the data")  # e.g. a one-step dataset
@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=6), st.integers(1, 8), st.integers(0, 10**6))
def test_sampler_matches_naive_loop(lengths, k, seed):
    ep = make_episodes(lengths, seed)
    norm = Normalizer.from_episodes(ep, 10.0, ep.action_space)
    mean, std = norm.obs_mean, norm.obs_std
    s = SequenceSampler(ep, k, norm)
    rng = np.random.default_rng(seed)
    b = s.sample(16, rng)
    ends = np.random.default_rng(seed).integers(0, ep.num_transitions, size=16)
    for i, end in enumerate(ends):
        obs, act, rtg, ts, mask = naive_window(ep, end, k, mean, std, 10.0)
        np.testing.assert_allclose(b.observations[i], obs, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b.actions[i], act)
        np.testing.assert_allclose(b.returns_to_go[i], rtg, rtol=1e-6)
        np.testing.assert_array_equal(b.timesteps[i], ts)
        np.testing.assert_array_equal(b.masks[i], mask)
        assert b.masks[i, -1]  # the last token is always real


def test_sampling_is_proportional_to_episode_length():
    ep = make_episodes([10, 90])
    s = SequenceSampler(ep, 4, Normalizer(obs_mean=[0.0, 0.0], obs_std=[1.0, 1.0], return_scale=1.0))
    ends = s.window_ends(20000, np.random.default_rng(0))
    frac_long = np.mean(ends >= 10)
    assert abs(frac_long - 0.9) < 0.01


def test_action_scaling_to_unit_range():
    ep = EpisodeSet.from_flags(np.zeros((3, 1)), np.array([[-2.0], [0.0], [2.5]]), np.zeros(3),
                               np.zeros(3), np.array([0, 0, 1]))
    s = SequenceSampler(ep, 3, Normalizer(obs_mean=[0.0], obs_std=[1.0], return_scale=1.0,
                                          action_low=[-2.0], action_high=[2.0]))
    np.testing.assert_allclose(s.gather(np.array([2])).actions[0, :, 0], [-1.0, 0.0, 1.0])  # clipped


def test_episode_set_splits_and_flags():
    # Flags: terminal at 1, timeout at 3, both at 4 (termination wins), final episode cut off.
    ep = EpisodeSet.from_flags(np.zeros((7, 1)), np.zeros((7, 1)), np.arange(7.0),
                               np.array([0, 1, 0, 0, 1, 0, 0]), np.array([0, 0, 0, 1, 1, 0, 0]))
    np.testing.assert_array_equal(ep.episode_starts, [0, 2, 4, 5])
    np.testing.assert_array_equal(ep.terminations, [0, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(ep.truncations, [0, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(ep.episode_returns, [1, 5, 4, 11])


@pytest.mark.parametrize("field,value,message", [
    ("observations", np.nan, "NaN or inf"),
    ("rewards", np.inf, "NaN or inf"),
])
def test_episode_set_rejects_nonfinite(field, value, message):
    arrays = dict(observations=np.zeros((4, 2)), actions=np.zeros((4, 1)), rewards=np.zeros(4))
    arrays[field][2] = value
    with pytest.raises(DatasetError, match=message):
        EpisodeSet.from_flags(**arrays, terminations=np.zeros(4), truncations=np.zeros(4), source="x.h5")


def test_episode_set_rejects_length_mismatch():
    with pytest.raises(DatasetError, match="'actions' has 3 entries but 'observations' has 4"):
        EpisodeSet.from_flags(np.zeros((4, 2)), np.zeros((3, 1)), np.zeros(4), np.zeros(4), np.zeros(4))
