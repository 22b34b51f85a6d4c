"""Trained behaviour agents: snapshot choice, actor export, SB3 loading only on request."""

import numpy as np
import pytest

from dtlab.behaviour import export_actor, pick_snapshots
from dtlab.collect import ActorPolicy, SB3Policy, collect_episodes
from dtlab.errors import ConfigError, EnvError


def test_pick_snapshots_follows_d4rl():
    manifest = {"snapshots": [{"step": s, "return_mean": r} for s, r in
                              [(10, 20.0), (20, 500.0), (30, 1100.0), (40, 2000.0), (50, 3300.0), (60, 3000.0)]]}
    # Expert: best (3300 at step 50); medium: closest to 3300 / 3 = 1100 -> step 30.
    assert pick_snapshots(manifest) == {"expert": 50, "medium": 30}


@pytest.fixture(scope="module")
def sac_zip(tmp_path_factory):
    from stable_baselines3 import SAC

    path = tmp_path_factory.mktemp("sac") / "snap.zip"
    model = SAC("MlpPolicy", "Pendulum-v1", seed=0, device="cpu", policy_kwargs={"net_arch": [32, 32]})
    model.save(path)
    return path


def test_exported_actor_matches_sb3(sac_zip, tmp_path):
    from stable_baselines3 import SAC

    out = export_actor(sac_zip, tmp_path / "actor.safetensors", env_id="Pendulum-v1", extra={"step": 0})
    model = SAC.load(sac_zip, device="cpu")
    actor = ActorPolicy(str(out), deterministic=True)
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs = rng.normal(size=3).astype(np.float32)
        expected, _ = model.predict(obs, deterministic=True)
        np.testing.assert_allclose(actor.act(obs), expected, rtol=1e-5, atol=1e-5)
    # Stochastic sampling is reproducible from the generator and stays inside the bounds.
    stochastic = ActorPolicy(str(out))
    a = collect_episodes("Pendulum-v1", stochastic, num_episodes=1, seed=3)
    b = collect_episodes("Pendulum-v1", ActorPolicy(str(out)), num_episodes=1, seed=3)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert np.abs(a.actions).max() <= 2.0


def test_sb3_zip_needs_explicit_trust_and_matching_spaces(sac_zip):
    with pytest.raises(ConfigError, match="pickles that can run code"):
        SB3Policy(str(sac_zip), "Pendulum-v1", trust=False)
    with pytest.raises(EnvError, match="do not match"):
        SB3Policy(str(sac_zip), "Hopper-v5", trust=True)
    policy = SB3Policy(str(sac_zip), "Pendulum-v1", trust=True)
    data = collect_episodes("Pendulum-v1", policy, num_episodes=1, seed=0)
    assert data.num_transitions == 200


def test_bad_actor_file(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot load actor weights"):
        ActorPolicy(str(bad))


@pytest.fixture(scope="module")
def hopper_run(tmp_path_factory):
    """A tiny SAC run on Hopper-v5: 3 snapshots, replay buffer, manifest; stopped and resumed."""
    from dtlab.behaviour import train_behaviour
    from dtlab.config import BehaviourConfig

    run = tmp_path_factory.mktemp("behaviour") / "hopper"
    cfg = BehaviourConfig(env="Hopper-v5", out=str(run), steps=200, eval_every=100, eval_episodes=1,
                          learning_starts=50, buffer_size=1000, seed=0)
    train_behaviour(cfg, log=lambda m: None)
    manifest = train_behaviour(BehaviourConfig(**{**cfg.__dict__, "steps": 300}), log=lambda m: None)
    assert [s["step"] for s in manifest["snapshots"]] == [100, 200, 300]  # resumed at 200
    return run


def test_presets_from_a_behaviour_run(hopper_run, tmp_path, monkeypatch):
    import dtlab.collect as collect
    from dtlab.behaviour import export_presets, pick_snapshots, read_manifest

    dest = tmp_path / "presets" / "hopper-v5"
    manifest = export_presets(hopper_run, dest, env_id="Hopper-v5", episodes=2)
    chosen = pick_snapshots(read_manifest(hopper_run))
    assert manifest["expert"]["step"] == chosen["expert"] and manifest["medium"]["step"] == chosen["medium"]
    assert manifest["ref_min_score"] == manifest["random"]["return_stochastic"]["mean"]
    monkeypatch.setattr(collect, "PRESET_DIR", tmp_path / "presets")
    medium = collect.preset_dataset("hopper-medium-v5", num_transitions=300)
    again = collect.preset_dataset("hopper-medium-v5", num_transitions=300)
    np.testing.assert_array_equal(medium.actions, again.actions)  # deterministic regeneration
    assert medium.num_transitions == 300 and medium.metadata["policy_training_steps"] == chosen["medium"]
    both = collect.preset_dataset("hopper-medium-expert-v5", num_transitions=300)
    assert both.num_transitions == 600
    np.testing.assert_array_equal(both.actions[:300], medium.actions)
    replay = collect.preset_dataset("hopper-medium-replay-v5", behaviour_run=str(hopper_run))
    assert replay.num_transitions == chosen["medium"]
    assert replay.actions.min() >= -1.0 and replay.actions.max() <= 1.0
    with pytest.raises(ConfigError, match="--behaviour-run"):
        collect.preset_dataset("hopper-medium-replay-v5")
    with pytest.raises(ConfigError, match="unknown preset"):
        collect.preset_dataset("cartpole-medium-v5")
