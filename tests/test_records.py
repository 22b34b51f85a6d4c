"""Typed records at the seams: ReturnStats and Provenance (dtlab.data.records)."""

import math

import numpy as np

from dtlab.data import EpisodeSet
from dtlab.data.records import Provenance, ReturnStats
from dtlab.envs import reference_scores


def test_return_stats_match_numpy_and_round_trip():
    returns = np.array([-3.0, 10.5, 2.25], np.float32)
    stats = ReturnStats.of(returns)
    assert (stats.mean, stats.min, stats.max) == (np.mean([-3.0, 10.5, 2.25]), -3.0, 10.5)
    assert math.isclose(stats.std, np.std([-3.0, 10.5, 2.25]))
    assert list(stats.to_json()) == ["mean", "std", "min", "max"]  # the on-disk key order
    assert ReturnStats.from_json(stats.to_json()) == stats
    assert ReturnStats.from_json({"mean": 1.0}) is None and ReturnStats.from_json("x") is None
    assert ReturnStats.from_json({"mean": float("nan"), "std": 0, "min": 0, "max": 0}) is None


def test_provenance_reads_each_formats_keys_in_one_place():
    dtlab_keys = Provenance.from_metadata({
        "env_id": "Hopper-v5", "policies": ["sac-medium"], "seed": 3, "dtlab_version": "0.1.0",
        "gymnasium_version": "1.4.0", "dtlab_ref_min_score": 17.4, "dtlab_ref_max_score": 2591.1,
        "ref_min_score": -99.0, "episode_return": {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0},
        "shards": 2})
    assert dtlab_keys.env_id == "Hopper-v5" and dtlab_keys.policies == ("sac-medium",)
    assert dtlab_keys.seed == 3 and dtlab_keys.ref_min_score == 17.4  # dtlab's key wins
    assert dtlab_keys.episode_return == ReturnStats(1.0, 0.0, 1.0, 1.0)
    assert dict(dtlab_keys.extras) == {"shards": 2}
    minari = Provenance.from_metadata({"minari_ref_min_score": -5, "minari_ref_max_score": 5.0})
    assert (minari.ref_min_score, minari.ref_max_score) == (-5.0, 5.0)
    d4rl = Provenance.from_metadata({"algorithm": "SAC", "seed": True, "env_id": 7})
    assert d4rl.policies == ("SAC",) and d4rl.seed is None and d4rl.env_id is None
    assert Provenance.from_metadata({}) == Provenance()


def test_reference_score_precedence_is_decided_once():
    # The registry's (D4RL's constants) win for the tasks it knows; recorded ones serve the rest.
    assert reference_scores("Hopper-v5", 17.4, 2591.1) == (-20.272305, 3234.3)
    assert reference_scores("MyEnv-v0", 1.0, 2.0) == (1.0, 2.0)
    assert reference_scores("MyEnv-v0", 1.0, None) == (None, None)


def test_episode_set_exposes_both_records():
    n = 6
    episodes = EpisodeSet.from_flags(np.zeros((n, 2)), np.zeros((n, 1)), np.arange(n, dtype=float),
                                     np.zeros(n, bool), np.array([0, 0, 1, 0, 0, 1], bool),
                                     metadata={"env_id": "Pendulum-v1"})
    assert episodes.return_stats == ReturnStats.of(np.array([0 + 1 + 2, 3 + 4 + 5]))
    assert episodes.provenance.env_id == "Pendulum-v1"
    assert episodes.summary()["episode_return"] == episodes.return_stats.to_json()


def test_setting_differences_names_each_differing_field():
    from dtlab.config import setting_differences

    saved = {"steps": 10, "optim": {"lr": 1e-4, "seed": 0}, "model": {"embed_dim": 128}}
    now = {"steps": 20, "optim": {"lr": 1e-3, "seed": 0, "skip_nonfinite": True},
           "model": {"embed_dim": 128, "architecture": "decision-transformer"}}
    assert setting_differences(saved, now) == [
        ("steps", 10, 20), ("optim.lr", 1e-4, 1e-3), ("optim.skip_nonfinite", None, True),
        ("model.architecture", None, "decision-transformer")]
    # Fields added since the run was saved count as their defaults; exempt ones are skipped.
    assert setting_differences(saved, now, defaults={"model": {"architecture": "decision-transformer"}},
                               exempt=frozenset({"optim.skip_nonfinite"})) == [
        ("steps", 10, 20), ("optim.lr", 1e-4, 1e-3)]
    assert setting_differences({"optim": 3}, {"optim": {"lr": 1.0}}) == [("optim.lr", None, 1.0)]


def test_supported_max_and_whose_default_targets_are_said():
    from dtlab.rollout import default_targets

    # By hand: returns -1536.7 to -0.3 (Pendulum-like), best plus half of
    # max(|-0.3|, -0.3 - -1536.7) = -0.3 + 768.2 = 767.9.
    stats = ReturnStats(mean=-600.0, std=400.0, min=-1536.7, max=-0.3)
    assert math.isclose(stats.supported_max, 767.9)
    assert stats.supports(767.9) and not stats.supports(768.0)
    targets, why = default_targets("Pendulum-v1", stats)
    assert targets == (-150.0, -500.0, -900.0) and "dtlab's defaults for Pendulum-v1" in why
    targets, why = default_targets("Hopper-v5", ReturnStats(mean=2000.0, std=500.0, min=0.0,
                                                             max=3000.0))
    assert targets == (3600.0, 1800.0) and "the DT paper's for Hopper-v5" in why
