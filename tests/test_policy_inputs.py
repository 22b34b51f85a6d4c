"""DTPolicy.act names bad input (NaN observations, a batch of the wrong shape) as the caller's."""

import numpy as np
import pytest
import torch

from dtlab.errors import EnvError
from dtlab.policy import DTPolicy


def test_policy_names_bad_observations_before_the_model_sees_them(tiny_checkpoint, monkeypatch):
    """A NaN observation is the caller's, not the model's: named with its dimension; a batch of
    the wrong shape says what was expected; the model never runs on either."""
    policy = DTPolicy.from_checkpoint(tiny_checkpoint)
    forwards = []
    monkeypatch.setattr(policy.model, "predict_last",
                        lambda *a, **k: forwards.append(1) or torch.zeros(a[0].shape[0], 1))
    policy.reset([-100.0, -300.0])
    nan_obs = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, np.nan]], np.float32)
    with pytest.raises(EnvError, match=r"^observation contains NaN/inf \(dimension 2\) for "
                                       r"episode 1 at step 0"):
        policy.act(nan_obs)
    with pytest.raises(EnvError, match=r"^act got observations of shape \(3,\) for 2 episodes; "
                                       r"expected \(2, 3\)$"):
        policy.act(np.zeros(3, np.float32))
    assert forwards == []
    policy.act(np.zeros((2, 3), np.float32))  # good input after bad: the policy still acts
    assert forwards == [1]


def test_act_without_a_reward_after_the_first_step_warns(tiny_checkpoint):
    """Issue 23 (walkthrough): a missing last_reward after an episode's first step leaves the
    return-to-go where it was; that is said, once, instead of passing silently."""
    import warnings

    from dtlab.errors import DtlabWarning
    from dtlab.policy import DTPolicy

    policy = DTPolicy.from_checkpoint(tiny_checkpoint)
    policy.reset(-950.0)
    obs = np.zeros(3, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DtlabWarning)
        policy.act(obs)  # the first step has no previous reward
        policy.act(obs, -1.0)
    with pytest.warns(DtlabWarning, match="no last_reward after an episode's first step"):
        policy.act(obs)


def test_observations_are_taken_by_shape_not_by_size(tiny_checkpoint):
    """Pendulum (obs_dim 3): two episodes' observations transposed, (3, 2), have the right size
    but would be read as mixed-up rows; one episode's (3, 1) and (1, 1, 3) are not (1, 3) or
    (3,). Each is refused with the shape got and the shape expected."""
    policy = DTPolicy.from_checkpoint(tiny_checkpoint)
    x = np.array([[0.1, 0.2, 0.3], [-0.4, -0.5, -0.6]], np.float32)  # (2, 3)
    policy.reset([-300.0, -600.0])
    with pytest.raises(EnvError, match=r"shape \(3, 2\) for 2 episodes; expected \(2, 3\)$"):
        policy.act(x.T)
    policy.reset(-300.0)
    with pytest.raises(EnvError, match=r"shape \(3, 1\) for 1 episode; expected \(1, 3\) or "
                                       r"\(3,\)$"):
        policy.act(np.zeros((3, 1)))
    with pytest.raises(EnvError, match=r"shape \(1, 1, 3\) for 1 episode"):
        policy.act(np.zeros((1, 1, 3)))
    assert policy.act(x[0]).shape == (1,)  # (obs_dim,) for one episode: one unbatched action
