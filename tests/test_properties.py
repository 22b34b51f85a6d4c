"""Property tests (hypothesis): format round trips, episode splitting and cutting vs naive loops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats import load_episodes, read_d4rl, read_native, write_d4rl, write_native
from dtlab.data.returns import returns_to_go
from dtlab.errors import DatasetError

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Any finite float32: subnormals, -0.0, and magnitudes up to 3.4e38.
ANY_FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Rewards: large, but an episode's return must stay inside float32 (else DatasetError, below).
REWARD = st.floats(-2.0**100, 2.0**100, width=32)
FLAGS = ("terminated", "truncated", "both", "none")


@st.composite
def episode_sets(draw, every_end_flagged: bool = False, rewards=REWARD) -> EpisodeSet:
    """1-8 episodes of 1-12 steps, obs/act dims 1-5, random flags at episode ends (``"none"``:
    an episode that ends unflagged, which only the native format can keep apart)."""
    obs_dim, act_dim = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=8))
    n = sum(lengths)
    ends = np.cumsum(lengths) - 1
    kinds = FLAGS[:3] if every_end_flagged else FLAGS
    flags = draw(st.lists(st.sampled_from(kinds), min_size=len(lengths), max_size=len(lengths)))
    term = np.zeros(n, bool)
    trunc = np.zeros(n, bool)
    for end, flag in zip(ends, flags):
        term[end] = flag in ("terminated", "both")
        trunc[end] = flag in ("truncated", "both")
    text = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)  # NUL included
    metadata = draw(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True),
                                    st.one_of(text, st.integers(-2**62, 2**62),
                                              st.floats(allow_nan=False), st.booleans()),
                                    max_size=4))
    return EpisodeSet(draw(arrays(np.float32, (n, obs_dim), elements=ANY_FLOAT32)),
                      draw(arrays(np.float32, (n, act_dim), elements=ANY_FLOAT32)),
                      draw(arrays(np.float32, n, elements=rewards)), term, trunc,
                      np.concatenate([[0], ends[:-1] + 1]), metadata=metadata)


def assert_identical(a: EpisodeSet, b: EpisodeSet) -> None:
    """Same dtypes, shapes and bits (so -0.0 != 0.0 and every float32 survives exactly)."""
    for name in ("observations", "actions", "rewards", "terminations", "truncations",
                 "episode_starts", "returns_to_go"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert x.tobytes() == y.tobytes(), name


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


# ---- round trips ---------------------------------------------------------------------------------
@SETTINGS
@given(eps=episode_sets(every_end_flagged=True))
def test_d4rl_round_trip_is_exact(folder, eps):
    path = folder / "data.hdf5"
    write_d4rl(eps, path)
    for back in (read_d4rl(path), load_episodes(path)):
        assert_identical(eps, back)
        assert back.metadata == eps.metadata


@SETTINGS
@given(eps=episode_sets())
def test_native_round_trip_is_exact(folder, eps):
    path = folder / "data.h5"
    write_native(eps, path)
    for back in (read_native(path), load_episodes(path)):
        assert_identical(eps, back)
        assert back.metadata == eps.metadata


@pytest.mark.parametrize("write, read", [(write_d4rl, read_d4rl), (write_native, read_native)])
def test_metadata_strings_round_trip_exactly(folder, write, read):
    # A fixed-length HDF5 string drops trailing NULs: such strings are stored as JSON instead.
    meta = {"nul": "a\x00", "mid": "a\x00b", "empty": "", "uni": "ünï €", "big": 2**62}
    path = folder / "meta.hdf5"
    write(EpisodeSet.from_flags(np.zeros((2, 1)), np.zeros((2, 1)), np.zeros(2), [0, 1],
                                [0, 0], metadata=meta), path)
    assert read(path).metadata == meta


@SETTINGS
@given(eps=episode_sets())
def test_d4rl_keeps_flagged_episode_boundaries_and_merges_unflagged_ones(folder, eps):
    """D4RL stores flags, not starts: episodes ending unflagged run into the next one."""
    path = folder / "merged.hdf5"
    write_d4rl(eps, path)
    back = read_d4rl(path)
    flagged_ends = np.flatnonzero(eps.terminations | eps.truncations)
    expected_starts = [0] + [int(e) + 1 for e in flagged_ends if e + 1 < eps.num_transitions]
    np.testing.assert_array_equal(back.episode_starts, expected_starts)
    for name in ("observations", "actions", "rewards", "terminations"):
        assert getattr(back, name).tobytes() == getattr(eps, name).tobytes(), name


# ---- splitting at flags --------------------------------------------------------------------------
def naive_split(term: np.ndarray, trunc: np.ndarray):
    """Episode starts and flags, one transition at a time (the D4RL convention)."""
    n = len(term)
    starts, out_term, out_trunc = [0], [], []
    for t in range(n):
        out_term.append(bool(term[t]))
        out_trunc.append(bool(trunc[t]) and not term[t])
        if t == n - 1 and not (term[t] or trunc[t]):
            out_trunc[-1] = True  # cut off by the end of the data
        if (term[t] or trunc[t]) and t < n - 1:
            starts.append(t + 1)
    return starts, out_term, out_trunc


def naive_returns_to_go(rewards, starts) -> np.ndarray:
    """float64 sums, one episode and one step at a time, from the episode's end."""
    bounds = list(starts) + [len(rewards)]
    out = np.zeros(len(rewards))
    for start, end in zip(bounds[:-1], bounds[1:]):
        acc = 0.0
        for t in range(end - 1, start - 1, -1):
            acc += float(rewards[t])
            out[t] = acc
    return out


def assert_returns_close(actual, rewards, starts) -> None:
    """returns_to_go subtracts suffix sums over the whole array: exact up to float64 rounding
    of the total, hence an absolute tolerance relative to sum |r| (see test_returns_to_go_of_a_
    small_episode_before_a_huge_one below)."""
    scale = float(np.abs(np.asarray(rewards, np.float64)).sum())
    np.testing.assert_allclose(actual, naive_returns_to_go(rewards, starts), rtol=1e-6,
                               atol=1e-12 * scale)


@SETTINGS
@given(data=st.data(), n=st.integers(1, 60))
def test_from_flags_matches_a_naive_loop(data, n):
    term = data.draw(arrays(bool, n))
    trunc = data.draw(arrays(bool, n))
    obs = data.draw(arrays(np.float32, (n, 2), elements=ANY_FLOAT32))
    rewards = data.draw(arrays(np.float32, n, elements=st.floats(-1e6, 1e6, width=32)))
    eps = EpisodeSet.from_flags(obs, np.zeros((n, 1)), rewards, term, trunc)
    starts, out_term, out_trunc = naive_split(term, trunc)
    np.testing.assert_array_equal(eps.episode_starts, starts)
    np.testing.assert_array_equal(eps.terminations, out_term)
    np.testing.assert_array_equal(eps.truncations, out_trunc)
    assert eps.observations.tobytes() == obs.tobytes()
    assert eps.rewards.tobytes() == rewards.tobytes()
    assert_returns_close(eps.returns_to_go, rewards, starts)


# ---- cutting episodes ----------------------------------------------------------------------------
@SETTINGS
@given(eps=episode_sets(rewards=st.floats(-1e6, 1e6, width=32)), max_len=st.integers(1, 14))
def test_truncate_episodes_matches_a_naive_per_episode_cut(eps, max_len):
    rows, term, trunc, starts = [], [], [], []
    bounds = list(eps.episode_starts) + [eps.num_transitions]
    for start, end in zip(bounds[:-1], bounds[1:]):
        starts.append(len(rows))
        keep = list(range(start, min(end, start + max_len)))
        rows += keep
        term += [bool(eps.terminations[t]) for t in keep]
        trunc += [bool(eps.truncations[t]) for t in keep]
        if end - start > max_len:
            trunc[-1] = True  # the cut end is a truncation, whatever ended the full episode
    cut = eps.truncate_episodes(max_len)
    for name in ("observations", "actions", "rewards"):
        assert getattr(cut, name).tobytes() == getattr(eps, name)[rows].tobytes(), name
    np.testing.assert_array_equal(cut.episode_starts, starts)
    np.testing.assert_array_equal(cut.terminations, term)
    np.testing.assert_array_equal(cut.truncations, trunc)
    assert cut.episode_lengths.max() <= max_len
    # Returns-to-go are recomputed over the kept steps only.
    assert cut.returns_to_go.tobytes() == returns_to_go(cut.rewards, starts).tobytes()
    assert_returns_close(cut.returns_to_go, cut.rewards, starts)
    if eps.episode_lengths.max() <= max_len:
        assert cut is eps
    else:
        assert cut.metadata == {**eps.metadata, "truncated_to": max_len}


# ---- validation ----------------------------------------------------------------------------------
@SETTINGS
@given(rewards=arrays(np.float32, st.integers(1, 6), elements=ANY_FLOAT32))
def test_an_episode_return_beyond_float32_is_a_dataset_error(rewards):
    n = len(rewards)
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(naive_returns_to_go(rewards, [0]).astype(np.float32)).all()
    make = lambda: EpisodeSet.from_flags(np.zeros((n, 1)), np.zeros((n, 1)), rewards,  # noqa: E731
                                         np.zeros(n, bool), np.zeros(n, bool))
    if overflows:  # was: loaded, with inf returns-to-go
        with pytest.raises(DatasetError, match="returns-to-go overflow float32"):
            make()
    else:
        assert np.isfinite(make().returns_to_go).all()


def test_returns_to_go_of_a_small_episode_before_a_huge_one():
    rtg = returns_to_go(np.array([1.0, 1e30], np.float32), np.array([0, 1]))
    np.testing.assert_array_equal(rtg, np.array([1.0, 1e30], np.float32))
