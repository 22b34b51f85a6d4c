"""Return-conditioning calibration (the reliable maximum target, stored in the checkpoint, warned
about) and evaluation without an environment (offline action error and return sensitivity)."""

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dtlab import checkpoint
from dtlab.cli import main
from dtlab.data import EpisodeSet
from dtlab.data.formats import save_episodes
from dtlab.errors import CheckpointError, ConfigError, DtlabWarning
from dtlab.calibrate import calibration_summary, reliable_maximum
from dtlab.offline_eval import offline_evaluation
from dtlab.policy import DTPolicy
from dtlab.rundir import one_writer
from dtlab.spaces import DiscreteActions

FIXTURES = Path(__file__).parent / "fixtures"


# ---- the reliable maximum on hand-computed curves -------------------------------------------------
def test_rises_then_saturates():
    # se 5 everywhere: margin 2 * sqrt(25 + 25) = 14.14. Steps up: +40, +70, +5, -7.
    cal = reliable_maximum([0, 100, 200, 300, 400], [10, 50, 120, 125, 118], [5] * 5)
    assert cal.rises == [True, True, False, False]
    assert cal.reliable_max_target == 200 and cal.achieved_at_reliable_max == 120
    assert cal.rising_range == (0, 200) and cal.saturated


def test_flat_curve_does_not_rise():
    cal = reliable_maximum([-900, -500, -150], [-400, -395, -405], [5, 5, 5])
    assert cal.rises == [False, False] and cal.rising_range is None
    assert cal.reliable_max_target == -900 and cal.saturated


def test_still_rising_at_the_top_of_the_sweep():
    cal = reliable_maximum([0, 1, 2], [0, 100, 200], [1, 1, 1])
    assert cal.reliable_max_target == 2 and cal.rising_range == (0, 2) and not cal.saturated


def test_flat_start_then_rise_then_plateau():
    # se 3: margin 2 * sqrt(18) = 8.49. 10, 12, 9 are one plateau; 60, 110 rise; 112, 108 do not.
    cal = reliable_maximum([0, 100, 200, 300, 400, 500, 600], [10, 12, 9, 60, 110, 112, 108], [3] * 7)
    assert cal.rises == [False, False, True, True, False, False]
    assert cal.rising_range == (200, 400) and cal.reliable_max_target == 400


def test_the_margin_is_z_standard_errors_of_the_difference():
    # se 3 and 4: the difference's standard error is 5; z = 2 makes the margin exactly 10.
    assert reliable_maximum([0, 1], [0, 10], [3, 4]).reliable_max_target == 0  # not more than 10
    assert reliable_maximum([0, 1], [0, 10.01], [3, 4]).reliable_max_target == 1
    assert reliable_maximum([0, 1], [0, 6], [3, 4], z=1.0).reliable_max_target == 1  # margin 5
    with pytest.raises(ConfigError, match="strictly increasing"):
        reliable_maximum([1, 0], [0, 1], [1, 1])


# ---- stored in the checkpoint, warned about -------------------------------------------------------
@pytest.fixture
def checkpoint_copy(tmp_path, tiny_checkpoint):
    copy = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


def test_targets_above_the_reliable_maximum_warn(checkpoint_copy):
    checkpoint.save_calibration(checkpoint_copy, {"reliable_max_target": -300.0})
    policy = DTPolicy.from_checkpoint(checkpoint_copy)
    assert policy.reliable_max_target == -300.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.reset([-500.0, -300.0])
        policy.steer(-400.0)
        assert not caught
        policy.reset([-500.0, -200.0])
        policy.steer(-100.0, index=[0])
    assert [w.category for w in caught] == [DtlabWarning, DtlabWarning]
    assert all("above -300" in str(w.message) and "\n" not in str(w.message) for w in caught)
    with pytest.warns(DtlabWarning, match="reliable maximum target") as record:
        assert main(["evaluate", str(checkpoint_copy), "--targets", "-200", "-250", "--episodes",
                     "2", "--max-steps", "3"]) == 0
    assert len([w for w in record if issubclass(w.category, DtlabWarning)]) == 1


def test_the_reliable_maximum_itself_does_not_warn(checkpoint_copy, capsys):
    """-300.3 is not exact in float32 (-300.29998779 > -300.3): asked for as printed it is not
    above itself, and the default target fitted to it is not rounded up past it (to -300)."""
    checkpoint.save_calibration(checkpoint_copy, {"reliable_max_target": -300.3})
    policy = DTPolicy.from_checkpoint(checkpoint_copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DtlabWarning)
        policy.reset([-500.0, -300.3])
        assert main(["evaluate", str(checkpoint_copy), "--episodes", "1", "--max-steps",
                     "3"]) == 0
    assert "targets -300.3: fitted to the data (its calibrated reliable maximum is -300.3" in \
        capsys.readouterr().out
    with pytest.warns(DtlabWarning, match="above -300.3"):
        policy.reset([-300.2])


def test_a_flat_calibration_says_the_target_does_not_steer(checkpoint_copy):
    """A curve that never rises (issue 21): the summary and the warning say what was measured,
    not that returns "stopped rising" at the lowest target."""
    flat = {"targets": [-600.0, -400.0, -200.0], "means": [-250.3, -260.2, -255.0],
            "reliable_max_target": -600.0, "achieved_at_reliable_max": -250.3,
            "rising_range": None, "saturated": True}  # Pendulum-v1's returns: at most 0
    summary = calibration_summary(flat)
    assert "does not rise with the target" in summary and \
        "-600 to -200 all achieve -260.2 to -250.3" in summary and "does not steer" in summary
    rising = {**flat, "means": [-600.0, -400.0, -395.0], "rising_range": [-600.0, -400.0],
              "reliable_max_target": -400.0, "achieved_at_reliable_max": -400.0}
    assert calibration_summary(rising).startswith("reliable maximum target -400 (achieved "
                                                  "-400.0); achieved return rises with the "
                                                  "target from -600")
    checkpoint.save_calibration(checkpoint_copy, flat)
    policy = DTPolicy.from_checkpoint(checkpoint_copy)
    with pytest.warns(DtlabWarning, match=r"target -100 asked for, above -600;.*no rise of the "
                                          r"achieved return .*targets -600 to -200 all achieved "
                                          r"-260.2 to -250.3.*does not steer"):
        policy.reset([-100.0])
    checkpoint.save_calibration(checkpoint_copy, rising)
    policy = DTPolicy.from_checkpoint(checkpoint_copy)
    with pytest.warns(DtlabWarning, match="above -400, the reliable maximum target .*stopped "
                                          "rising"):
        policy.reset([-100.0])


def test_a_corrupt_calibration_file_is_refused(checkpoint_copy):
    file = checkpoint.resolve(checkpoint_copy) / checkpoint.CALIBRATION_FILE
    file.write_text('{"reliable_max_target": "high"}')
    with pytest.raises(CheckpointError, match="reliable_max_target"):
        DTPolicy.from_checkpoint(checkpoint_copy)


def test_calibrate_command(checkpoint_copy, capsys):
    code = main(["calibrate", str(checkpoint_copy), "--points", "3", "--episodes", "2",
                 "--max-steps", "10"])
    out = capsys.readouterr().out
    assert code == 0 and "reliable maximum target" in out
    ckpt = checkpoint.resolve(checkpoint_copy)
    record = json.loads((ckpt / checkpoint.CALIBRATION_FILE).read_text())
    _, info = checkpoint.load_info(ckpt)
    lo, hi = info.dataset["episode_return"]["min"], info.dataset["episode_return"]["max"]
    np.testing.assert_allclose(record["targets"], np.round([lo, (lo + hi + 0.5 * (hi - lo)) / 2,
                                                            hi + 0.5 * (hi - lo)], 1))
    # 2 episodes: the standard error (ddof 1) equals the population std.
    np.testing.assert_allclose(record["standard_errors"], record["achieved_std"], rtol=1e-9)
    again = reliable_maximum(record["targets"], record["means"], record["standard_errors"])
    assert record["reliable_max_target"] == again.reliable_max_target
    assert (ckpt / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert DTPolicy.from_checkpoint(checkpoint_copy).reliable_max_target == again.reliable_max_target


def test_calibrate_refuses_a_run_directory_that_a_training_run_holds(checkpoint_copy, capsys,
                                                                   monkeypatch, tmp_path):
    """A live `dtlab train` on the run (its lock held, here by this process as train holds it)
    would prune or replace the checkpoint under the calibration: one line naming the holder,
    exit 2, nothing written; the step directory given directly, as ".", or through a symbolic
    link is refused the same; a copy of the checkpoint outside the run directory is calibrated."""
    ckpt = checkpoint.resolve(checkpoint_copy)
    before = sorted(p.name for p in ckpt.iterdir())
    args = ["--points", "2", "--episodes", "2", "--max-steps", "5"]
    link = tmp_path / "best"
    link.symlink_to(ckpt)
    monkeypatch.chdir(ckpt)
    with one_writer(checkpoint_copy):
        for target in (checkpoint_copy, ckpt, ".", link):
            assert main(["calibrate", str(target), *args]) == 2
            assert capsys.readouterr().err.strip() == (
                f"dtlab: error: {checkpoint_copy}: another process (pid {os.getpid()}, training) "
                "holds this run directory; calibrate after it finishes, or copy the checkpoint "
                "out of the run directory to calibrate it now")
        assert sorted(p.name for p in ckpt.iterdir()) == before
        elsewhere = shutil.copytree(ckpt, checkpoint_copy.parent / "copy")
        assert main(["calibrate", str(elsewhere), *args]) == 0
        assert (elsewhere / checkpoint.CALIBRATION_FILE).is_file()
    assert main(["calibrate", str(checkpoint_copy), *args]) == 0  # the lock is free again
    assert (ckpt / checkpoint.CALIBRATION_FILE).is_file()


# ---- offline evaluation ---------------------------------------------------------------------------
def pendulum_like(lengths, seed=0, discrete_actions=None):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    obs_dim = 3 if discrete_actions is None else 4
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    if discrete_actions is None:
        act = rng.uniform(-2.5, 2.5, size=(n, 1)).astype(np.float32)  # some outside: clipped
    else:
        act = rng.integers(0, discrete_actions, size=n)
    rew = -rng.uniform(0, 10, size=n).astype(np.float32)
    trunc = np.zeros(n, bool)
    trunc[np.cumsum(lengths) - 1] = True
    return EpisodeSet.from_flags(obs, act, rew, np.zeros(n, bool), trunc)


@torch.no_grad()
def naive_offline(model, info, episodes, buckets, quantiles):
    """One window at a time: left-padded by hand, the full forward, its last step."""
    norm = info.normalizer
    k, scale = info.model.context_len, norm.return_scale
    mean, std = np.asarray(norm.obs_mean), np.asarray(norm.obs_std)
    discrete = isinstance(info.action_space, DiscreteActions)
    ends = np.arange(episodes.num_transitions)
    rtg_all = episodes.returns_to_go.astype(np.float64)
    low, high = np.quantile(rtg_all[ends], quantiles)
    errors, deltas = [], []
    for e in ends:
        s = max(int(x) for x in episodes.episode_starts if x <= e)
        obs = np.zeros((k, info.observation_space.dim), np.float32)
        act = np.zeros(k, np.int64) if discrete else np.zeros((k, info.action_space.dim), np.float32)
        rtg, ts, mask = np.zeros((k, 1), np.float32), np.zeros(k, np.int64), np.zeros(k, bool)
        for i, p in enumerate(range(e - k + 1, e + 1)):
            if p < s:
                continue
            obs[i] = (episodes.observations[p] - mean) / std
            if discrete:
                act[i] = episodes.actions[p]
            else:
                lo, hi = np.asarray(norm.action_low), np.asarray(norm.action_high)
                act[i] = np.clip(2 * (episodes.actions[p] - lo) / (hi - lo) - 1, -1, 1)
            rtg[i, 0], ts[i], mask[i] = rtg_all[p] / scale, p - s, True
        run = lambda r: model(*(torch.from_numpy(x)[None] for x in (obs, act, r, ts, mask)))[0, -1]  # noqa
        pred = run(rtg)
        swapped = [run(np.where(mask[:, None], rtg - rtg[-1] + q / scale, 0).astype(np.float32))
                   for q in (low, high)]
        if discrete:
            errors.append(float(pred.argmax() == act[-1]))
            deltas.append(float(swapped[0].argmax() != swapped[1].argmax()))
        else:
            errors.append(float(((pred.numpy() - act[-1]) ** 2).mean()))
            deltas.append(float((swapped[1] - swapped[0]).abs().mean()))
    rtg_ends = rtg_all[ends]
    edges = np.quantile(rtg_ends, np.linspace(0, 1, buckets + 1))
    which = np.array([sum(r >= edges[i] for i in range(1, buckets)) for r in rtg_ends])
    per_bucket = [np.mean(np.asarray(errors)[which == b]) if (which == b).any() else None
                  for b in range(buckets)]
    return np.mean(errors), per_bucket, [(which == b).sum() for b in range(buckets)], np.mean(deltas)


def test_offline_evaluation_matches_a_naive_loop_and_makes_no_env(tmp_path, capsys, monkeypatch):
    data = tmp_path / "pendulum.hdf5"
    episodes = pendulum_like([30, 7, 45, 18])
    save_episodes(episodes, data)

    def no_env(*args, **kwargs):
        raise AssertionError("offline evaluation made an env")

    import gymnasium

    monkeypatch.setattr(gymnasium, "make", no_env)
    out = tmp_path / "offline.json"
    ckpt = FIXTURES / "legacy_continuous"
    code = main(["evaluate", str(ckpt), "--offline", "--dataset", str(data), "--windows", "0",
                 "--buckets", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    model, info = checkpoint.load(ckpt)
    overall, per_bucket, counts, delta = naive_offline(model, info, episodes, 3, (0.1, 0.9))
    assert result["metric"] == "mse" and result["windows"] == episodes.num_transitions
    np.testing.assert_allclose(result["mse"], overall, rtol=1e-5)
    assert [b["windows"] for b in result["buckets"]] == counts
    np.testing.assert_allclose([b["mse"] for b in result["buckets"]], per_bucket, rtol=1e-5)
    np.testing.assert_allclose(result["swap"]["mean_abs_delta"], delta, rtol=1e-5, atol=1e-7)
    assert result["swap"]["mean_abs_delta"] > 0  # this DT reads the return-to-go
    assert "return-to-go swapped" in capsys.readouterr().out


def test_offline_evaluation_discrete_and_subsampled():
    episodes = pendulum_like([25, 40, 12], seed=1, discrete_actions=2)
    model, info = checkpoint.load(FIXTURES / "legacy_discrete")
    result = offline_evaluation(model, info, episodes, buckets=2, windows=0)
    overall, per_bucket, counts, changed = naive_offline(model, info, episodes, 2, (0.1, 0.9))
    assert result["metric"] == "accuracy"
    np.testing.assert_allclose(result["accuracy"], overall, rtol=1e-12)
    np.testing.assert_allclose([b["accuracy"] for b in result["buckets"]], per_bucket, rtol=1e-12)
    np.testing.assert_allclose(result["swap"]["changed_fraction"], changed, rtol=1e-12)
    sub = offline_evaluation(model, info, episodes, buckets=2, windows=20, seed=3)
    assert sub["windows"] == 20 and sum(b["windows"] for b in sub["buckets"]) == 20


def test_offline_evaluation_refuses_data_that_does_not_fit(tmp_path, capsys):
    data = tmp_path / "cartpole-like.hdf5"
    save_episodes(pendulum_like([10], discrete_actions=2), data)
    code = main(["evaluate", str(FIXTURES / "legacy_continuous"), "--offline", "--dataset",
                 str(data), "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert code == 2 and "do not fit the checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()
    assert main(["evaluate", str(FIXTURES / "legacy_continuous"), "--offline"]) == 2
    assert "records no dataset file; pass --dataset" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::dtlab.errors.DtlabWarning")  # the data's actions reach 2.5
def test_baselines_are_return_insensitive_offline(tmp_path):
    from dtlab.config import ModelConfig
    from dtlab.train import train
    from tests.configs import train_config

    episodes = pendulum_like([60, 40, 50])
    cfg = train_config(dataset="<memory>", env="Pendulum-v1", out=str(tmp_path / "run"), steps=3,
                       batch_size=4, warmup_steps=1, progress=False, tensorboard=False,
                       model=ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200,
                                         architecture="transformer-bc"))
    model, info = checkpoint.load(train(cfg, episodes).checkpoint)
    result = offline_evaluation(model, info, episodes, windows=50)
    assert result["swap"]["mean_abs_delta"] == 0.0 and math.isfinite(result["mse"])


def test_calibration_needs_two_episodes_per_target():
    """One episode has no standard error: every difference would count as a rise (a new user's
    --calibrate-episodes 1 reported a 'reliable maximum' from a 0.1 change in return)."""
    from dtlab.benchmark.plan import BenchmarkConfig
    from dtlab.calibrate import CalibrateConfig

    with pytest.raises(ConfigError, match="episodes must be >= 2, got 1"):
        CalibrateConfig(checkpoint="run", episodes=1)
    with pytest.raises(ConfigError, match="calibrate-episodes must be >= 2, got 1"):
        BenchmarkConfig(datasets=("d.hdf5",), calibrate_episodes=1)
    CalibrateConfig(checkpoint="run", episodes=2)  # the smallest that has one


def test_sweeps_stop_at_the_most_a_bounded_env_can_return():
    """By hand: returns -1500 to -120 (Pendulum-v1 pays at most 0 a step). The calibration sweep
    reaches 50% of the range, 1380, past the best: -120 + 690 = 570, a return no Pendulum
    episode has; capped at 0 it is linspace(-1500, 0, 4). evaluate --sweep's 20% (-120 + 276 =
    156) is capped the same way; a ceiling the sweep does not reach changes nothing."""
    from dtlab.calibrate import calibration_targets
    from dtlab.data.records import ReturnStats
    from dtlab.envs import env_info
    from dtlab.evaluate import sweep_targets

    stats = ReturnStats(mean=-800.0, std=400.0, min=-1500.0, max=-120.0)
    assert calibration_targets(stats, 4) == [-1500.0, -810.0, -120.0, 570.0]
    ceiling = env_info("Pendulum-v1").max_return
    assert calibration_targets(stats, 4, ceiling) == [-1500.0, -1000.0, -500.0, 0.0]
    assert sweep_targets(stats, 3, ceiling=ceiling) == [-1500.0, -750.0, 0.0]
    assert sweep_targets(stats, 3, ceiling=1000.0) == [-1500.0, -672.0, 156.0]


def test_cartpole_ceilings_follow_gymnasiums_time_limits():
    """CartPole pays +1 a step until its time limit: Gymnasium registers 200 steps for v0 and 500
    for v1, so those are the most an episode returns, the episode length and the top default
    target (v0 used v1's 500 before)."""
    import gymnasium as gym

    from dtlab.envs import env_info

    for env_id in ("CartPole-v0", "CartPole-v1"):
        limit = gym.spec(env_id).max_episode_steps
        info = env_info(env_id)
        assert info.max_return == limit == info.max_ep_len == max(info.targets)
        assert info.ref_max_score == limit


def test_mountain_car_returns_are_bounded():
    """MountainCarContinuous pays +100 at the flag less an action cost, MountainCar -1 a step:
    at most 100 and 0 (Gymnasium's docs), so a calibration sweep of data whose best return is 95
    stops at 100, where it asked for 161 (the new-user trial)."""
    import gymnasium as gym

    from dtlab.calibrate import calibration_targets
    from dtlab.data.records import ReturnStats
    from dtlab.envs import env_info

    for env_id, most in (("MountainCarContinuous-v0", 100.0), ("MountainCar-v0", 0.0)):
        assert env_info(env_id).max_return == most
        assert env_info(env_id).max_ep_len == gym.spec(env_id).max_episode_steps
    stats = ReturnStats(mean=20.0, std=40.0, min=-37.5, max=95.0)
    assert calibration_targets(stats, 6)[-1] > 100.0
    assert calibration_targets(stats, 6, env_info("MountainCarContinuous-v0").max_return)[-1] == 100.0
