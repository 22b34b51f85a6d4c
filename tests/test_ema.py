"""The weights' exponential moving average (optim.ema_decay) and the learning rate the logs
report, against hand computations."""

import json

import torch

from dtlab import checkpoint
from tests.configs import pendulum_like
from tests.test_train import config, weights
from dtlab.train import train


def test_ema_weights_are_the_moving_average_of_the_raw_weights(tmp_path):
    """The checkpoint's model is e_1 = w_1, e_k = d e_{k-1} + (1 - d) w_k over the raw weights
    w_k after each step; the raw weights train exactly as in a run without the average."""
    episodes, d = pendulum_like(), 0.8
    # Reference: the raw weights after every step, from a run without the average.
    train(config(tmp_path, "raw", steps=5, checkpoint_every=1, keep_checkpoints=10), episodes)
    raw = [load_step(tmp_path / "raw", k) for k in range(1, 6)]
    expected = dict(raw[0])
    for w in raw[1:]:
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in expected}
    train(config(tmp_path, "ema", steps=5, ema_decay=d), episodes)
    got = weights(tmp_path / "ema")
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-6), key
    assert not torch.allclose(got["predict_action.weight"], raw[-1]["predict_action.weight"])
    state = checkpoint.load_trainer_state(tmp_path / "ema")
    assert state["ema_n_averaged"] == 5
    assert all(torch.equal(state["raw_weights"][k], raw[-1][k]) for k in raw[-1])


def load_step(run, step):
    from safetensors.torch import load_file
    return load_file(str(run / f"step_{step:08d}" / checkpoint.WEIGHTS_FILE))


def test_ema_run_resumes_bit_for_bit(tmp_path):
    episodes = pendulum_like()
    train(config(tmp_path, "full", ema_decay=0.9), episodes)
    train(config(tmp_path, "split", steps=6, ema_decay=0.9), episodes)
    train(config(tmp_path, "split", resume=True, ema_decay=0.9), episodes)
    full, split = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(full[k], split[k]) for k in full)
    raw_full = checkpoint.load_trainer_state(tmp_path / "full")["raw_weights"]
    raw_split = checkpoint.load_trainer_state(tmp_path / "split")["raw_weights"]
    assert all(torch.equal(raw_full[k], raw_split[k]) for k in raw_full)


def test_logged_learning_rate_is_the_one_applied(tmp_path):
    """lr 1e-3 with a 10-step warm-up: step k applies k x 1e-4 (LRSchedule(k - 1) = k / 10)."""
    train(config(tmp_path, steps=4, lr=1e-3, warmup_steps=10, log_every=1), pendulum_like())
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in lines if "lr" in r}
    assert sorted(lrs) == [1, 2, 3, 4]
    assert all(abs(lrs[k] - k * 1e-4) < 1e-12 for k in lrs), lrs


def test_the_best_checkpoint_holds_the_best_evaluation_not_the_last(tmp_path):
    """RUN/best holds the weights evaluated best (mean score over targets), here step 10 of
    evaluations scoring 10, 30, 20 at steps 5, 10, 15."""
    from types import SimpleNamespace

    from dtlab.metrics import TargetResult

    scores = iter([10.0, 30.0, 20.0])

    def evaluator(policy):
        s = next(scores)
        result = TargetResult(-100.0, [s], [200], s, 0.0, s, 0.0)
        return SimpleNamespace(results=[result], timing=lambda: {})

    train(config(tmp_path, steps=15, checkpoint_every=5, keep_checkpoints=10, eval_every=5,
                 eval_episodes=1), pendulum_like(), evaluator=evaluator)
    run = tmp_path / "run"
    from safetensors.torch import load_file

    best = load_file(str(run / "best" / checkpoint.WEIGHTS_FILE))
    assert all(torch.equal(best[k], v) for k, v in load_step(run, 10).items())
    assert not all(torch.equal(best[k], v) for k, v in load_step(run, 15).items())
    assert checkpoint.load_info(run / "best")[1].step == 10
