"""Sampled evaluation (temperature > 0): an episode's result depends on its seed, env seed and
target only, not on how many episodes or which other targets run beside it (issue 21, item 6)."""

import numpy as np
import pytest

from dtlab.errors import ConfigError
from dtlab.policy import DTPolicy
from dtlab.rollout import rollout

RUN = "tests/fixtures/legacy_discrete"  # a tiny CartPole-v1 checkpoint


def returns_of(target, targets, episodes, seed=0, max_parallel=256):
    policy = DTPolicy.from_checkpoint(RUN, temperature=1.0, seed=seed)
    report = rollout(policy, "CartPole-v1", targets, episodes, seed=0, max_steps=60,
                     max_parallel=max_parallel)
    return next(r for r in report.results if r.target == target).returns[:4]


def test_an_episode_result_does_not_depend_on_the_batch():
    alone = returns_of(50.0, [50.0], 4)
    assert returns_of(50.0, [50.0], 6) == alone
    assert returns_of(50.0, [10.0, 50.0], 4) == alone
    assert returns_of(50.0, [50.0, 10.0, 200.0], 6) == alone
    assert returns_of(50.0, [200.0, 50.0], 4, max_parallel=3) == alone  # in waves
    assert len(set(alone)) > 1  # sampled episodes differ from each other
    assert returns_of(50.0, [50.0], 4, seed=1) != alone  # the seed picks the streams


def test_streams_are_checked():
    policy = DTPolicy.from_checkpoint(RUN, temperature=1.0)
    for bad in ([0], [0, -1], [0.5, 1.0]):
        with pytest.raises(ConfigError, match="^streams must be 2 non-negative integers"):
            policy.reset([10.0, 20.0], streams=np.asarray(bad))


def test_a_stream_is_keyed_by_the_key_and_the_target():
    """Same key and target: the same draws; another target or key: its own stream."""
    def actions(targets, streams):
        policy = DTPolicy.from_checkpoint(RUN, temperature=5.0)  # near-uniform draws
        policy.reset(targets, streams=np.asarray(streams))
        return np.stack([policy.act(np.zeros((2, 4)), np.zeros(2)) for _ in range(30)], 1)

    same = actions([50.0, 50.0], [3, 3])
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.array_equal(*actions([50.0, 50.5], [3, 3]))
    assert not np.array_equal(*actions([50.0, 50.0], [3, 4]))
