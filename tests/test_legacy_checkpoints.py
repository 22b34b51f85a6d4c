"""Checkpoints written by dtlab before issue 9's restructuring (commit a7ed0e8) still load and act
identically: format 1 (continuous, Pendulum-v1) and format 2 (discrete, CartPole-v1).

The fixtures and their expected actions were written by that commit's code (tests/fixtures/README.md).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from dtlab.policy import DTPolicy

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name,format_version", [("continuous", 1), ("discrete", 2)])
def test_legacy_checkpoint_acts_identically(name, format_version):
    directory = FIXTURES / f"legacy_{name}"
    assert json.loads((directory / "config.json").read_text())["format_version"] == format_version
    expected = json.loads((directory / "expected_actions.json").read_text())
    policy = DTPolicy.from_checkpoint(str(directory))
    policy.reset(target_return=np.array(expected["targets"]))
    observations = np.asarray(expected["observations"], dtype=np.float32)  # (T, 2, obs_dim)
    rewards = None
    for t, want in enumerate(expected["actions"]):
        got = np.asarray(policy.act(observations[t], rewards))
        if name == "discrete":
            assert got.dtype.kind == "i"
            np.testing.assert_array_equal(got, np.asarray(want))
        else:
            np.testing.assert_allclose(got, np.asarray(want, dtype=np.float32), rtol=0, atol=1e-6)
        rewards = np.asarray(expected["rewards_after_first_step"])
