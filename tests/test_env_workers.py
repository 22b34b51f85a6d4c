"""Rollouts with the environments in worker processes: the same returns as in-process, whatever
the number of workers; worker failures are reported."""

import numpy as np
import pytest
import torch

from dtlab.checkpoint import PolicyInfo
from dtlab.config import ModelConfig
from dtlab.evaluate import EvalConfig
from dtlab.env_workers import EnvWorkers, LocalEnvs
from dtlab.envs import env_info
from dtlab.errors import EnvError
from dtlab.evaluate import evaluate_checkpoint
from dtlab.model import DecisionTransformer
from dtlab.normalizer import Normalizer
from dtlab.policy import DTPolicy
from dtlab.rollout import Evaluator, rollout
from dtlab.spaces import ContinuousActions, VectorObservations


def hopper_policy(seed=0) -> DTPolicy:
    """An untrained small DT for Hopper-v5 (11-D observations, 3 actions in [-1, 1])."""
    torch.manual_seed(seed)
    cfg = ModelConfig(embed_dim=16, n_layers=1, n_heads=1, context_len=5, max_ep_len=1000)
    obs, act = VectorObservations(11), ContinuousActions(3, (-1.0,) * 3, (1.0,) * 3)
    info = PolicyInfo(model=cfg, observation_space=obs, action_space=act,
                      normalizer=Normalizer([0.0] * 11, [1.0] * 11, 1000.0, act.low, act.high),
                      env_id="Hopper-v5", ref_min_score=env_info("Hopper-v5").ref_min_score,
                      ref_max_score=env_info("Hopper-v5").ref_max_score, dataset={})
    model = DecisionTransformer(cfg, obs, act)
    torch.nn.init.normal_(model.predict_action.weight, std=0.1)  # varied actions: falls vary
    return DTPolicy(model, info)


def _outcome(report):
    return [(r.target, r.returns, r.lengths) for r in report.results]


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Pendulum-v1"])
def test_worker_rollouts_equal_in_process_rollouts(env_id, tiny_checkpoint):
    policy = hopper_policy() if env_id == "Hopper-v5" else DTPolicy.from_checkpoint(tiny_checkpoint)
    targets = (3600.0, 1800.0) if env_id == "Hopper-v5" else (-150.0, -600.0)
    # 3 episodes x 2 targets in waves of 4 envs (the second wave reuses the envs), episodes cut
    # at 100 steps (untrained Hopper episodes end earlier, at different steps).
    kw = dict(seed=5, max_steps=100, max_parallel=4)
    reference = rollout(policy, env_id, targets, 3, **kw)
    lengths = [n for r in reference.results for n in r.lengths]
    if env_id == "Hopper-v5":
        assert len(set(lengths)) > 1  # episodes end at different steps: the active set shrinks
    for workers in (1, 2, 3):
        report = rollout(policy, env_id, targets, 3, workers=workers, **kw)
        assert _outcome(report) == _outcome(reference), workers  # exactly equal
        assert report.env_steps == reference.env_steps
    # The same seeds give the same starts (paired across targets): different seeds differ.
    other = rollout(policy, env_id, targets, 3, workers=2, **{**kw, "seed": 6})
    assert _outcome(other) != _outcome(reference)


def test_evaluation_during_training_and_the_cli_path_use_the_workers(tiny_checkpoint):
    policy = DTPolicy.from_checkpoint(tiny_checkpoint)
    direct = Evaluator("Pendulum-v1", (-300.0,), 2, seed=1, max_steps=20)(policy)
    pooled = Evaluator("Pendulum-v1", (-300.0,), 2, seed=1, max_steps=20, workers=2)(policy)
    assert _outcome(pooled) == _outcome(direct)
    cfgs = [EvalConfig(checkpoint=tiny_checkpoint, targets=(-200.0,), episodes=2, max_steps=15,
                       device="cpu", precision="fp32", eval_workers=w) for w in (0, 2)]
    a, b = (evaluate_checkpoint(c)["results"] for c in cfgs)
    assert a == b


def test_worker_failures_are_reported():
    with pytest.raises(EnvError, match="unknown environment 'NoSuchEnv-v0'"):
        EnvWorkers("NoSuchEnv-v0", 2, 1)
    with EnvWorkers("Pendulum-v1", 4, 2) as envs:
        obs = envs.reset(np.arange(4), np.arange(4))
        assert len(obs) == 4 and obs[0].shape == (3,)
        bad = np.array([["x"]], dtype=object)  # not a torque: Pendulum's own error
        local = LocalEnvs("Pendulum-v1", 1)
        local.reset(np.arange(1), np.arange(1))
        with pytest.raises(Exception) as in_process:
            local.step(np.array([0]), bad)
        with pytest.raises(in_process.type) as in_worker:  # raised here as it was there
            envs.step(np.array([0]), bad)
        assert str(in_worker.value) == str(in_process.value)
        envs._procs[1].kill()  # our own child process
        envs._procs[1].join()
        with pytest.raises(EnvError, match="env worker 1 exited"):
            envs.step(np.array([0, 1]), np.zeros((2, 1), np.float32))


def test_training_evaluations_keep_their_env_workers(tmp_path, monkeypatch):
    """Issue 21 item 7e: `--eval-workers 1` during training starts its worker processes once and
    keeps them across evaluations (they were started anew at every evaluation), with the same
    returns as evaluating in the training process; the processes end with the run."""
    import dtlab.rollout as rollout_module
    from tests.configs import pendulum_like, train_config
    from dtlab.train import train

    started = []

    class Counting(EnvWorkers):
        def __init__(self, *args, **kwargs):
            started.append(args)
            super().__init__(*args, **kwargs)

        def close(self):
            started.append("closed")
            super().close()

    monkeypatch.setattr(rollout_module, "EnvWorkers", Counting)
    base = dict(dataset="<memory>", env="Pendulum-v1", steps=9, batch_size=8, warmup_steps=2,
                log_every=3, progress=False, tensorboard=False, eval_every=3, eval_episodes=2,
                eval_targets=(-300.0,), model=ModelConfig(embed_dim=16, n_layers=1, context_len=4,
                                                          max_ep_len=200))
    pooled = train(train_config(out=str(tmp_path / "a"), eval_workers=1, **base), pendulum_like())
    assert len(pooled.evaluations) == 3 and started == [("Pendulum-v1", 2, 1), "closed"]
    local = train(train_config(out=str(tmp_path / "b"), **base), pendulum_like())
    assert [e.results for e in pooled.evaluations] == [e.results for e in local.evaluations]
