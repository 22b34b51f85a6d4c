"""Return-to-go and D4RL-style normalized scores (pure numpy)."""

from __future__ import annotations

import numpy as np


def returns_to_go(rewards: np.ndarray, episode_starts: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """Return-to-go ``R_t = sum_{t' >= t} gamma^(t'-t) r_t'`` within each episode.

    ``rewards`` is the flat (N,) reward array of all episodes, ``episode_starts`` the (E,) index of
    each episode's first step. Accumulates in float64 and returns float32.

    >>> returns_to_go(np.array([1.0, 2.0, 3.0, 10.0, 20.0]), np.array([0, 3]))
    array([ 6.,  5.,  3., 30., 20.], dtype=float32)
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    n = rewards.shape[0]
    bounds = np.append(np.asarray(episode_starts, dtype=np.int64), n)
    out = np.empty(n, dtype=np.float64)
    if gamma == 1.0:
        # Per-episode reversed cumulative sums: exact within each episode (a global suffix sum
        # minus an offset would let one episode's large rewards cancel another's small ones).
        for start, end in zip(bounds[:-1], bounds[1:]):
            out[start:end] = np.cumsum(rewards[start:end][::-1])[::-1]
    else:
        for start, end in zip(bounds[:-1], bounds[1:]):
            acc = 0.0
            for t in range(end - 1, start - 1, -1):
                acc = rewards[t] + gamma * acc
                out[t] = acc
    return out.astype(np.float32)


def fitted_return_scale(returns_to_go: np.ndarray) -> float:
    """A return scale for data whose env has none registered: the power of ten at or below the
    largest |return-to-go|, so the scaled returns-to-go reach [1, 10) at most, as the DT paper's
    1000 does for its Hopper and Walker2d data (best returns about 3,200 and 4,600). 1.0 when
    every return-to-go is 0. ``returns_to_go``: (N,) in the env's units."""
    largest = float(np.max(np.abs(np.asarray(returns_to_go, dtype=np.float64)), initial=0.0))
    if not np.isfinite(largest) or largest == 0.0:
        return 1.0
    return float(10.0 ** np.floor(np.log10(largest)))


def normalized_score(episode_return: float | np.ndarray, ref_min: float, ref_max: float):
    """D4RL normalized score: 100 * (return - random) / (expert - random).

    Definition from D4RL (``d4rl.get_normalized_score``), scaled to percent as in the DT paper.

    >>> float(normalized_score(3234.3, -20.272305, 3234.3))
    100.0
    >>> round(float(normalized_score(1607.0138475, -20.272305, 3234.3)), 6)  # half way
    50.0
    """
    return 100.0 * (np.asarray(episode_return, dtype=np.float64) - ref_min) / (ref_max - ref_min)
