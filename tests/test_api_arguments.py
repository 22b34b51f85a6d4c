"""Python API arguments that would reach torch, Gymnasium or numpy unchecked get dtlab's errors
(issue 21, item 8): devices, precision, seeds, rollout sizes, episode indices."""

import numpy as np
import pytest
import torch

from dtlab import checkpoint
from dtlab.behaviour.policies import RandomPolicy
from dtlab.collect import collect_episodes
from dtlab.errors import ConfigError
from dtlab.offline_eval import offline_evaluation
from dtlab.policy import DTPolicy
from dtlab.rollout import rollout
from dtlab.runtime import available_devices

RUN = "tests/fixtures/legacy_continuous"


def test_a_device_this_machine_lacks_is_a_config_error_naming_what_is_available():
    missing = [] if torch.cuda.is_available() else ["cuda", "cuda:0"]
    missing.append(f"cuda:{torch.cuda.device_count()}")  # one past the last
    if not torch.backends.mps.is_available():
        missing.append("mps")
    for device in missing:
        for load in (lambda: DTPolicy.from_checkpoint(RUN, device=device),
                     lambda: checkpoint.load(RUN, device)):
            with pytest.raises(ConfigError, match=rf"^device: '{device}' requested .*available "
                                                  rf"here: auto, cpu.*--device"):
                load()
    for bad in ("cuda:x", "gpu", "cpu:-1x"):
        with pytest.raises(ConfigError, match=rf"^device: invalid device '{bad}'"):
            DTPolicy.from_checkpoint(RUN, device=bad)
    assert available_devices()[0] == "cpu"
    assert DTPolicy.from_checkpoint(RUN, device=torch.device("cpu")).device.type == "cpu"


def test_policy_rollout_and_collection_arguments_are_checked():
    model, info = checkpoint.load(RUN)
    with pytest.raises(ConfigError, match="^precision must be fp32 or bf16, got 'fp16'"):
        DTPolicy(model, info, precision="fp16")
    for seed in (-1, "0", 1.5):
        with pytest.raises(ConfigError, match="^DTPolicy's seed must be"):
            DTPolicy(model, info, seed=seed)
    policy = DTPolicy(model, info)
    for kwargs, name in (({"seed": -5}, "seed"), ({"max_steps": 0}, "max_steps"),
                         ({"max_parallel": 0}, "max_parallel"), ({"workers": -1}, "workers")):
        with pytest.raises(ConfigError, match=f"^rollout's {name} must be"):
            rollout(policy, "Pendulum-v1", [-100.0], 1, **kwargs)
    policy.reset([-100.0, -200.0])
    with pytest.raises(ConfigError, match=r"index \[2\] names episodes outside 0..1"):
        policy.act(np.zeros((1, 3)), index=[2])
    with pytest.raises(ConfigError, match="^collect_episodes's seed must be >= 0"):
        collect_episodes("Pendulum-v1", RandomPolicy.for_env("Pendulum-v1"), num_episodes=1, seed=-1)


def test_offline_evaluation_resolves_its_device(tmp_path):
    model, info = checkpoint.load(RUN)
    with pytest.raises(ConfigError, match="^device: invalid device 'gpu'"):
        offline_evaluation(model, info, None, device="gpu")
