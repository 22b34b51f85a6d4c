"""Training loop, checkpoints, resume, policy and evaluation on tiny configs."""

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dtlab import checkpoint
from dtlab.config import ModelConfig
from dtlab.evaluate import EvalConfig
from tests.configs import pendulum_like, train_config
from dtlab.errors import CheckpointError, ConfigError, TrainingError
from dtlab.evaluate import evaluate_checkpoint
from dtlab.policy import DTPolicy
from dtlab.rundir import RunDirectory
from dtlab.train import train

TINY = ModelConfig(embed_dim=16, n_layers=1, n_heads=2, context_len=5, max_ep_len=200)



def config(tmp_path, name="run", **kw):
    base = dict(dataset="<memory>", env="Pendulum-v1", out=str(tmp_path / name), steps=12,
                batch_size=8, warmup_steps=4, log_every=3, checkpoint_every=6, progress=False,
                tensorboard=False, model=TINY, seed=3)
    return train_config(**{**base, **kw})


def weights(path):
    return load_file(str(checkpoint.resolve(path) / checkpoint.WEIGHTS_FILE))


def test_resume_equals_uninterrupted_run(tmp_path):
    episodes = pendulum_like()
    full = train(config(tmp_path, "full"), episodes)
    # Same run stopped at step 6 (its checkpoint), then resumed to 12.
    train(config(tmp_path, "split", steps=6), episodes)
    resumed = train(config(tmp_path, "split", resume=True), episodes)
    assert full.steps == resumed.steps == 12
    w_full, w_res = weights(tmp_path / "full"), weights(tmp_path / "split")
    for key in w_full:
        assert torch.equal(w_full[key], w_res[key]), key
    # Metrics after the resume point are not duplicated.
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]
    # Different seed -> different weights (the equality above is not vacuous).
    other = train(config(tmp_path, "other", seed=4), episodes)
    assert not torch.equal(weights(other.checkpoint)["predict_action.weight"], w_full["predict_action.weight"])


def test_resume_from_a_run_saved_by_a_non_fused_optimizer(tmp_path):
    """Runs saved before the CPU optimizer became fused (and CPU runs resumed on CUDA, or back)
    carry ``fused=False`` in their optimizer groups: the resumed run uses its own kernel, whose
    state is the same, and continues as the uninterrupted run does."""
    episodes = pendulum_like()
    full = train(config(tmp_path, "full"), episodes)
    train(config(tmp_path, "split", steps=6), episodes)
    state_file = tmp_path / "split" / "step_00000006" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    for group in state["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = False, None  # as a non-fused optimizer saved it
    torch.save(state, state_file)
    resumed = train(config(tmp_path, "split", resume=True), episodes)
    assert resumed.steps == 12
    w_full, w_res = weights(full.checkpoint), weights(tmp_path / "split")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_checkpoint_rotation_and_latest(tmp_path):
    result = train(config(tmp_path, steps=12, checkpoint_every=3, keep_checkpoints=2), pendulum_like())
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000009", "step_00000012"]
    assert (run / "latest").read_text().strip() == "step_00000012"
    assert result.checkpoint == run / "step_00000012"
    assert not list(run.glob(".*tmp*"))


def test_save_load_gives_identical_actions(tmp_path):
    result = train(config(tmp_path), pendulum_like())
    model, info = checkpoint.load(result.checkpoint)
    a = DTPolicy(model, info)
    b = DTPolicy.from_checkpoint(tmp_path / "run")
    rng = np.random.default_rng(0)
    a.reset([-100.0, -300.0])
    b.reset([-100.0, -300.0])
    for t in range(8):  # past the context length, so the window slides
        obs = rng.normal(size=(2, 3)).astype(np.float32)
        r = rng.normal(size=2).astype(np.float32)
        np.testing.assert_array_equal(a.act(obs, r), b.act(obs, r))


def test_policy_matches_full_window_recomputation(tmp_path):
    """DTPolicy's rolling context == building the whole left-padded window from the history."""
    result = train(config(tmp_path), pendulum_like())
    model, info = checkpoint.load(result.checkpoint)
    policy = DTPolicy(model, info)
    k, scale = info.model.context_len, info.normalizer.return_scale
    mean, std = info.normalizer.obs_mean, info.normalizer.obs_std
    rng = np.random.default_rng(1)
    target = -250.0
    policy.reset(target)
    hist_obs, hist_act, hist_rtg = [], [], []
    rtg = target
    for t in range(9):
        obs = rng.normal(size=3).astype(np.float32)
        reward = float(rng.normal()) if t else None
        if t:
            rtg -= reward
        action = policy.act(obs, reward)
        hist_obs.append((obs - mean) / std)
        hist_rtg.append(rtg / scale)
        # Naive: the last min(t+1, K) steps, left-padded to K, current action slot zero.
        real = min(t + 1, k)
        o = np.zeros((1, k, 3), np.float32)
        a = np.zeros((1, k, 1), np.float32)
        r = np.zeros((1, k, 1), np.float32)
        ts = np.zeros((1, k), np.int64)
        m = np.zeros((1, k), bool)
        o[0, k - real:] = hist_obs[-real:]
        a[0, k - real:k - 1] = np.array(hist_act[len(hist_act) - real + 1:]).reshape(-1, 1) if real > 1 else 0
        r[0, k - real:, 0] = hist_rtg[-real:]
        ts[0, k - real:] = np.arange(t + 1 - real, t + 1)
        m[0, k - real:] = True
        with torch.no_grad():
            pred = model(*(torch.from_numpy(x) for x in (o, a, r, ts, m)))[0, -1].numpy()
        hist_act.append(pred[0])
        low, high = info.action_space.low[0], info.action_space.high[0]
        expected = low + (pred + 1) / 2 * (high - low)
        np.testing.assert_allclose(action, expected, rtol=0, atol=1e-5)


def test_steering_changes_the_return_to_go(tmp_path):
    result = train(config(tmp_path), pendulum_like())
    policy = DTPolicy.from_checkpoint(result.checkpoint)
    policy.reset(-400.0)
    policy.act(np.zeros(3, np.float32))
    policy.act(np.zeros(3, np.float32), last_reward=-10.0)
    assert policy.returns_to_go[0] == pytest.approx(-390.0)
    policy.steer(-100.0)
    policy.act(np.zeros(3, np.float32), last_reward=-5.0)  # conditions on exactly -100
    assert policy.returns_to_go[0] == pytest.approx(-100.0)
    # Earlier tokens -400, -390 shift by -100 - (-385) = +285, as if -115 had been asked at the start.
    np.testing.assert_allclose(policy._rtg[0, -3:, 0].numpy() * policy.info.normalizer.return_scale,
                               [-115.0, -105.0, -100.0], rtol=1e-5)
    policy.act(np.zeros(3, np.float32), last_reward=-20.0)  # back to decrementing by rewards
    assert policy.returns_to_go[0] == pytest.approx(-80.0)


def test_tiny_end_to_end_train_and_evaluate(tmp_path):
    result = train(config(tmp_path, eval_episodes=2, eval_targets=(-200.0,)), pendulum_like())
    assert result.evaluations and len(result.evaluations[-1].results[0].returns) == 2
    out = tmp_path / "eval.json"
    data = evaluate_checkpoint(EvalConfig(checkpoint=str(tmp_path / "run"), targets=(-150.0, -600.0),
                                          episodes=3, out=str(out), max_steps=30))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(data))
    assert [r["target"] for r in saved["results"]] == [-150.0, -600.0]
    for r in saved["results"]:
        assert r["lengths"] == [30, 30, 30]
        assert r["mean"] == pytest.approx(np.mean(r["returns"]))
        # Episodes cut at 30 of Pendulum's 200 steps carry no normalized score (issue 10) ...
        assert r["normalized_mean"] is None
    assert saved["normalized_scores_comparable"] is False and saved["max_steps"] == 30
    # ... while the training evaluation ran to the standard time limit and has one.
    assert result.evaluations[-1].results[0].normalized_mean is not None
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recorded = RunDirectory(tmp_path / "run").evaluations()
    assert recorded == result.evaluations and recorded[-1].step == 12
    assert (tmp_path / "run" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_refuses_to_overwrite_a_run_and_resume_without_run(tmp_path):
    episodes = pendulum_like(1)
    train(config(tmp_path, steps=2), episodes)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config(tmp_path, steps=2), episodes)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(config(tmp_path, "nothing", resume=True), episodes)


def test_corrupt_and_inconsistent_checkpoints_are_refused(tmp_path):
    result = train(config(tmp_path, steps=2), pendulum_like(1))
    ck = result.checkpoint
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer than this dtlab"):
        checkpoint.load(ck)
    (ck / "config.json").write_text(json.dumps({**cfg, "model": {**cfg["model"], "embed_dim": 32}}))
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.load(ck)
    (ck / "config.json").write_text(json.dumps(cfg))
    (ck / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        checkpoint.load(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        checkpoint.load(ck)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing")


def test_kv_cache_is_exact_until_the_window_slides(tmp_path):
    """Opt-in kv_cache mode: identical to full recomputation for the first K steps (and after
    steering rebuilds it), then approximate. (With one layer it would stay exact: first-layer keys
    and values depend on their own token only.)"""
    result = train(config(tmp_path, model=replace(TINY, n_layers=2)), pendulum_like())
    exact = DTPolicy.from_checkpoint(result.checkpoint)
    cached = DTPolicy.from_checkpoint(result.checkpoint, kv_cache=True)
    k = exact.context_len
    rng = np.random.default_rng(0)
    targets = [-100.0, -300.0, -500.0]
    exact.reset(targets)
    cached.reset(targets)
    diffs = []
    active = np.arange(3)
    for t in range(3 * k):
        if t == k + 2:
            active = np.array([0, 2])  # an episode ends: the cache keeps the others' rows
        obs = rng.normal(size=(active.size, 3)).astype(np.float32)
        r = rng.normal(size=active.size).astype(np.float32)
        a = exact.act(obs, r, index=active)
        b = cached.act(obs, r, index=active)
        diffs.append(float(np.abs(a - b).max()))
    assert max(diffs[:k]) < 1e-5  # exact while the whole episode fits in the window
    assert max(diffs[k:]) > 1e-6  # then approximate (the test would catch a silent exact fallback)
    cached.steer(-50.0, index=active)
    exact.steer(-50.0, index=active)
    obs = rng.normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_allclose(cached.act(obs, np.zeros(2), index=active),
                               exact.act(obs, np.zeros(2), index=active), atol=1e-5)  # rebuilt exactly


def test_policy_takes_read_only_arrays_without_warnings(tiny_checkpoint):
    """Rows of a loaded dataset are read-only (EpisodeSet arrays): acting on them must not warn
    (torch.from_numpy/as_tensor warn about non-writable arrays)."""
    policy = DTPolicy.from_checkpoint(tiny_checkpoint)
    obs = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    targets, rewards, index = np.array([-950.0, -1000.0]), np.array([-1.0, -2.0]), np.array([0, 1])
    for arr in (obs, targets, rewards, index):
        arr.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.reset(targets)
        first = policy.act(obs, None, index=index)
        policy.act(obs, rewards, index=index)
        policy.steer(targets, index=index)
    assert first.shape == (2, 1) and np.isfinite(first).all()


def test_policy_refuses_timesteps_beyond_max_ep_len(tiny_checkpoint):
    policy = DTPolicy.from_checkpoint(tiny_checkpoint)  # max_ep_len 200
    policy.reset([-100.0, -300.0])
    obs = np.zeros((2, 3), np.float32)
    for _ in range(200):  # timesteps 0..199 are embedded
        policy.act(obs, np.zeros(2))
    with pytest.raises(ConfigError, match=r"^episode 0 \(target -100\) reached timestep 200, but the "
                                          r"model's max_ep_len is 200 \(it embeds timesteps 0 to "
                                          r"199\); cap episodes at 200 steps with max_steps "
                                          r"\(dtlab evaluate --max-steps 200\)$"):
        policy.act(obs, np.zeros(2))


def test_policy_refuses_non_finite_actions_naming_target_and_step(tiny_checkpoint):
    policy = DTPolicy.from_checkpoint(tiny_checkpoint)
    policy.reset([-100.0, -300.0])
    policy.act(np.zeros((2, 3), np.float32), None)
    bad = np.array([[0.0, 0.0, 0.0], [3e38, 0.0, 0.0]], np.float32)  # finite, overflows episode 1
    with pytest.raises(TrainingError, match=r"^the model produced a non-finite action \(\[nan\]\) "
                                            r"for episode 1 \(target -300\) at step 1;"):
        policy.act(bad, np.zeros(2))


@pytest.mark.parametrize("eval_every", [0, 3])
def test_a_run_directory_removed_while_training_stops_the_run_in_one_line(tmp_path, eval_every):
    """The directory removed at step 5, after step 4's checkpoint (in should_stop, polled once
    before the loop and once a step: the 6th poll): the next checkpoint (step 6) or, first, the
    evaluation at step 6 (of evaluations every 3 steps) raises one TrainingError line naming it,
    and nothing recreates a partial directory."""
    import shutil

    out = tmp_path / "run"
    polls = []

    def remove_at_step_5():
        polls.append(1)
        if len(polls) == 6:
            shutil.rmtree(out)
        return False

    cfg = train_config(dataset="x", env="Pendulum-v1", out=str(out), steps=8, batch_size=4,
                       warmup_steps=1, checkpoint_every=2, eval_every=eval_every,
                       eval_episodes=1 if eval_every else 0, eval_targets=(-200.0,), progress=False,
                       tensorboard=False, model=TINY)
    with pytest.raises(TrainingError, match=r"run directory was removed or moved while "
                                            r"training \(train_config.json is gone\)") as caught:
        train(cfg, pendulum_like(), should_stop=remove_at_step_5)
    assert str(out) in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists()
