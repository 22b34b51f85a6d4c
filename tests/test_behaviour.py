"""Trained behaviour agents: snapshot choice, actor export, SB3 loading only on request."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

from dtlab.behaviour.policies import ActorPolicy, SB3Policy
from dtlab.behaviour.sac import RunManifest, Snapshot, export_actor, pick_snapshots, read_run_manifest
from dtlab.collect import collect_episodes
from dtlab.errors import ConfigError, DtlabWarning, EnvError


def test_pick_snapshots_follows_d4rl():
    manifest = RunManifest("Hopper-v5", "SAC", 0, 1, tuple(
        Snapshot(s, r, 0.0, 0.0) for s, r in
        [(10, 20.0), (20, 500.0), (30, 1100.0), (40, 2000.0), (50, 3300.0), (60, 3000.0)]))
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
    # Stochastic sampling is reproducible from the generator ...
    stochastic = ActorPolicy(str(out))
    a = collect_episodes("Pendulum-v1", stochastic, num_episodes=1, seed=3)
    b = collect_episodes("Pendulum-v1", ActorPolicy(str(out)), num_episodes=1, seed=3)
    np.testing.assert_array_equal(a.actions, b.actions)
    # ... differs from the deterministic actor at the same observations ...
    mean_actions = np.stack([actor.act(o) for o in a.observations])  # (200, 1)
    assert np.abs(a.actions - mean_actions).mean() > 0.1
    # ... and samples SB3's squashed Gaussian: atanh(action / max_torque) ~ N(mean, exp(log_std)).
    import torch

    obs = np.array([0.3, -0.5, 0.8], dtype=np.float32)
    with torch.no_grad():
        mean, log_std, _ = model.actor.get_action_dist_params(torch.as_tensor(obs[None]))
    mean, std = mean[0, 0].item(), log_std[0, 0].exp().item()
    stochastic.reset(np.random.default_rng(1))
    samples = np.stack([stochastic.act(obs) for _ in range(4000)])[:, 0] / 2.0  # in [-1, 1]
    pre_tanh = np.arctanh(np.clip(samples.astype(np.float64), -1 + 1e-7, 1 - 1e-7))
    assert pre_tanh.mean() == pytest.approx(mean, abs=4 * std / np.sqrt(4000))
    assert pre_tanh.std() == pytest.approx(std, rel=0.05)


def test_actor_file_format(sac_zip, tmp_path):
    """export_actor writes SB3's own tensor names and the documented metadata; read_actor reads
    back exactly what write_actor wrote, and refuses files that are not SAC actors."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    from stable_baselines3 import SAC

    from dtlab.behaviour.policies import SacActorWeights, read_actor, write_actor

    out = export_actor(sac_zip, tmp_path / "a.safetensors", env_id="Pendulum-v1",
                       extra={"step": 7, "variant": "medium"})
    actor = SAC.load(sac_zip, device="cpu").actor
    expected = {f"{part}.{k}" for part in ("latent_pi", "mu", "log_std")
                for k in getattr(actor, part).state_dict()}
    with safe_open(str(out), framework="numpy") as f:
        assert set(f.keys()) == expected
        assert f.metadata() == {"env_id": "Pendulum-v1", "algorithm": "SAC", "action_low": "[-2.0]",
                                "action_high": "[2.0]", "source_snapshot": "snap.zip", "step": "7",
                                "variant": "medium"}
    loaded = read_actor(out)
    np.testing.assert_array_equal(loaded.hidden[1][0], actor.latent_pi[2].weight.detach().numpy())
    assert (loaded.obs_dim, loaded.act_dim, loaded.env_id) == (3, 1, "Pendulum-v1")
    copy = write_actor(tmp_path / "sub" / "b.safetensors", loaded)
    again = read_actor(copy)
    for (w, b), (w2, b2) in zip(loaded.hidden, again.hidden, strict=True):
        np.testing.assert_array_equal(w, w2)
        np.testing.assert_array_equal(b, b2)
    np.testing.assert_array_equal(again.log_std[0], loaded.log_std[0])
    assert dict(again.metadata) == dict(loaded.metadata)
    assert [p.name for p in copy.parent.iterdir()] == ["b.safetensors"]  # no temp file left
    # A missing tensor, and layers that do not chain, are named.
    tensors = load_file(out)
    save_file({k: v for k, v in tensors.items() if k != "mu.bias"}, str(tmp_path / "m.safetensors"),
              metadata=dict(loaded.metadata))
    with pytest.raises(ConfigError, match=r"m\.safetensors: not a dtlab SAC actor file "
                                          r"\(missing 'mu.bias'\)"):
        read_actor(tmp_path / "m.safetensors")
    # The second hidden layer cut to 5 outputs: mu still expects 32 inputs.
    narrow = SacActorWeights((loaded.hidden[0], (loaded.hidden[1][0][:5], loaded.hidden[1][1][:5])),
                             loaded.mu, loaded.log_std, loaded.low, loaded.high, loaded.metadata)
    write_actor(tmp_path / "n.safetensors", narrow)
    with pytest.raises(ConfigError, match=r"n\.safetensors: layer shapes .* do not chain"):
        read_actor(tmp_path / "n.safetensors")


def test_actor_must_match_the_env(sac_zip, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from dtlab.cli import main

    pendulum = export_actor(sac_zip, tmp_path / "pendulum.safetensors", env_id="Pendulum-v1")
    code = main(["collect", "--env", "Hopper-v5", "--policy", f"actor:{pendulum}", "--episodes", "1",
                 "--out", str(tmp_path / "x.hdf5")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{pendulum}: actor was trained on Pendulum-v1, not Hopper-v5" in err
    assert not (tmp_path / "x.hdf5").exists()
    # Mislabelled env id: the weights' shapes still give it away.
    mislabelled = export_actor(sac_zip, tmp_path / "m.safetensors", env_id="Hopper-v5")
    with pytest.raises(EnvError, match=r"m\.safetensors: actor maps observations \(3,\) to actions "
                                       r"\(1,\), but Hopper-v5 has observations \(11,\)"):
        collect_episodes("Hopper-v5", ActorPolicy(str(mislabelled)), num_episodes=1)
    # Other action bounds than the env's.
    meta = {"env_id": "Pendulum-v1", "action_low": "[-1.0]", "action_high": "[1.0]"}
    save_file(load_file(pendulum), str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(EnvError, match="action bounds"):
        collect_episodes("Pendulum-v1", ActorPolicy(str(tmp_path / "b.safetensors")), num_episodes=1)


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
    from dtlab.behaviour.sac import train_behaviour
    from dtlab.behaviour.sac import BehaviourConfig

    run = tmp_path_factory.mktemp("behaviour") / "hopper"
    cfg = BehaviourConfig(env="Hopper-v5", out=str(run), steps=200, eval_every=100, eval_episodes=1,
                          learning_starts=50, buffer_size=1000, seed=0)
    train_behaviour(cfg, log=lambda m: None)
    manifest = train_behaviour(BehaviourConfig(**{**cfg.__dict__, "steps": 300}), log=lambda m: None)
    assert [s.step for s in manifest.snapshots] == [100, 200, 300]  # resumed at 200
    return run


def test_run_manifest_on_disk(hopper_run, tmp_path):
    """The run's manifest.json keeps its layout: what read_run_manifest reads writes back as the
    same text; a bad snapshot entry is named."""
    text = (hopper_run / "manifest.json").read_text()
    raw = json.loads(text)
    assert list(raw) == ["env_id", "algorithm", "seed", "eval_episodes", "snapshots"]
    assert list(raw["snapshots"][0]) == ["step", "return_mean", "return_std", "seconds"]
    assert read_run_manifest(hopper_run).to_json() == text
    assert read_run_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({**raw, "snapshots": [{"step": 1}]}))
    with pytest.raises(ConfigError, match=r"manifest\.json: not a dtlab train-behaviour manifest "
                                          r"\(KeyError: 'return_mean'\)"):
        read_run_manifest(tmp_path)


def test_presets_from_a_behaviour_run(hopper_run, tmp_path, monkeypatch):
    import dtlab.presets as presets

    dest = tmp_path / "presets" / "hopper-v5"
    manifest = presets.export_presets(hopper_run, dest, env_id="Hopper-v5", episodes=2)
    chosen = pick_snapshots(read_run_manifest(hopper_run))
    assert manifest.expert.step == chosen["expert"] and manifest.medium.step == chosen["medium"]
    assert manifest.ref_min_score == manifest.random.mean
    assert json.loads((dest / "manifest.json").read_text()) == json.loads(manifest.to_json())
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path / "presets")
    # Reference scores are recorded as floats, whatever number type the manifest holds.
    written = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps({**written, "ref_min_score": -20}))
    medium = presets.preset_dataset("hopper-medium-v5", num_transitions=300)
    assert type(medium.metadata["dtlab_ref_min_score"]) is float
    assert medium.metadata["dtlab_ref_min_score"] == -20.0
    assert medium.metadata["dtlab_ref_max_score"] == manifest.ref_max_score
    again = presets.preset_dataset("hopper-medium-v5", num_transitions=300)
    np.testing.assert_array_equal(medium.actions, again.actions)  # deterministic regeneration
    assert medium.num_transitions == 300 and medium.metadata["policy_training_steps"] == chosen["medium"]
    both = presets.preset_dataset("hopper-medium-expert-v5", num_transitions=300)
    assert both.num_transitions == 600 == both.metadata["num_transitions"]
    assert [p["policy_training_steps"] for p in both.metadata["parts"]] == [chosen["medium"], chosen["expert"]]
    np.testing.assert_array_equal(both.actions[:300], medium.actions)
    with pytest.raises(ConfigError, match=r"replay_buffer\.pkl: .*pickle.*--trust-pickle"):
        presets.preset_dataset("hopper-medium-replay-v5", behaviour_run=str(hopper_run))
    replay = presets.preset_dataset("hopper-medium-replay-v5", behaviour_run=str(hopper_run),
                                    trust=True)
    assert replay.num_transitions == chosen["medium"]
    with pytest.raises(ConfigError, match="--behaviour-run.*datasets/hopper-medium-replay-v5.hdf5"):
        presets.preset_dataset("hopper-medium-replay-v5")
    with pytest.raises(ConfigError, match="unknown preset"):
        presets.preset_dataset("cartpole-medium-v5")


def test_medium_replay_of_the_presets_own_run_uses_the_presets_medium_step(hopper_run, tmp_path,
                                                                           monkeypatch):
    """A rerun stopped at the preset's medium snapshot (as docs/datasets.md regenerates the
    committed medium-replay files) has no later snapshots, so D4RL's rule applied to it alone
    would pick another step: the preset's step is used when the run is the preset's (same
    evaluation there); another run keeps its own rule, with a warning."""
    import dataclasses

    import dtlab.presets as presets

    run = read_run_manifest(hopper_run)
    own = pick_snapshots(run)["medium"]
    step = next(s for s in run.snapshots if s.step != own)  # a step the rule does not pick
    dest = tmp_path / "presets" / "hopper-v5"
    manifest = presets.export_presets(hopper_run, dest, env_id="Hopper-v5", episodes=2)
    pinned = dataclasses.replace(manifest, medium=dataclasses.replace(
        manifest.medium, step=step.step, training_eval_return=step.return_mean))
    (dest / "manifest.json").write_text(pinned.to_json())
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path / "presets")
    replay = presets.preset_dataset("hopper-medium-replay-v5", behaviour_run=str(hopper_run),
                                    trust=True)
    assert replay.num_transitions == step.step != own
    other = dataclasses.replace(pinned, medium=dataclasses.replace(
        pinned.medium, training_eval_return=step.return_mean + 1.0))  # another run's evaluation
    (dest / "manifest.json").write_text(other.to_json())
    with pytest.warns(DtlabWarning, match="another run"):
        replay = presets.preset_dataset("hopper-medium-replay-v5", behaviour_run=str(hopper_run),
                                        trust=True)
    assert replay.num_transitions == own


def test_committed_medium_replay_files():
    """The files the medium-replay error points to are in the repository: the presets' names,
    every transition up to the committed manifest's medium step."""
    from pathlib import Path

    import dtlab.presets as presets
    from dtlab.data.formats import load_episodes

    for name, path in presets.COMMITTED_FILES.items():
        committed = load_episodes(Path(__file__).resolve().parents[1] / path)
        medium = presets.read_preset_manifest(presets.parse_preset(name)[0]).medium
        assert committed.metadata["dataset"] == name
        assert committed.metadata["policy_training_steps"] == medium.step == committed.num_transitions


def test_cli_medium_replay_needs_trust_pickle(hopper_run, tmp_path, capsys):
    from dtlab.cli import main
    from dtlab.data.formats import load_episodes

    args = ["collect", "--preset", "hopper-medium-replay-v5", "--behaviour-run", str(hopper_run),
            "--out", str(tmp_path / "replay.hdf5")]
    assert main(args) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main([*args, "--trust-pickle"]) == 0
    medium = pick_snapshots(read_run_manifest(hopper_run))["medium"]
    assert load_episodes(tmp_path / "replay.hdf5").num_transitions == medium


def test_cli_medium_step_chooses_where_medium_replay_ends(hopper_run, tmp_path, capsys):
    """--medium-step ends the data at the named snapshot, without the another-run warning (the
    user chose the step); a step that is no snapshot, or the flag on another preset, is one line
    with exit 2 and no file."""
    import warnings

    from dtlab.cli import main
    from dtlab.data.formats import load_episodes

    run = read_run_manifest(hopper_run)
    step = next(s.step for s in run.snapshots if s.step != pick_snapshots(run)["medium"])
    out = tmp_path / "replay.hdf5"
    args = ["collect", "--preset", "hopper-medium-replay-v5", "--behaviour-run", str(hopper_run),
            "--trust-pickle", "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DtlabWarning)
        assert main([*args, "--medium-step", str(step)]) == 0
    replay = load_episodes(out)
    assert replay.num_transitions == step == replay.metadata["policy_training_steps"]
    out.unlink()
    capsys.readouterr()
    assert main([*args, "--medium-step", "150"]) == 2
    err = capsys.readouterr().err
    assert "no snapshot at step 150 (--medium-step)" in err and "100, 200, 300" in err
    assert main(["collect", "--preset", "hopper-medium-v5", "--medium-step", "100", "--out",
                 str(out)]) == 2
    assert "--medium-step is for a medium-replay --preset" in capsys.readouterr().err
    assert not out.exists()


def test_corrupt_manifests_name_the_file(tmp_path, monkeypatch):
    import dtlab.presets as presets
    from dtlab.behaviour.sac import replay_until_medium, train_behaviour
    from dtlab.behaviour.sac import BehaviourConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"env_id": "Pendulum-v1", "snaps')
    with pytest.raises(ConfigError, match=r"run/manifest\.json: cannot read"):
        train_behaviour(BehaviourConfig(env="Pendulum-v1", out=str(run), steps=10), log=lambda m: None)
    with pytest.raises(ConfigError, match=r"run/manifest\.json: cannot read"):
        replay_until_medium(run, "Pendulum-v1", trust=True)
    (run / "manifest.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"run/manifest\.json: not a dtlab train-behaviour"):
        replay_until_medium(run, "Pendulum-v1", trust=True)

    committed = json.loads(presets.preset_manifest_path("Hopper-v5").read_text())
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path / "presets")
    (tmp_path / "presets" / "hopper-v5").mkdir(parents=True)
    (tmp_path / "presets" / "hopper-v5" / "manifest.json").write_text("{not json")
    for name in ("hopper-medium-v5", "hopper-random-v5"):
        with pytest.raises(ConfigError, match=r"hopper-v5/manifest\.json: cannot read"):
            presets.preset_dataset(name, num_transitions=10)
    (tmp_path / "presets" / "hopper-v5" / "manifest.json").write_text(
        json.dumps({**committed, "medium": {"step": 3}}))
    with pytest.raises(ConfigError, match=r"manifest\.json: no valid 'medium' entry \(KeyError: 'file'\)"):
        presets.preset_dataset("hopper-medium-v5", num_transitions=10)
    (tmp_path / "presets" / "hopper-v5" / "manifest.json").write_text(
        json.dumps({**committed, "ref_max_score": "high"}))
    with pytest.raises(ConfigError, match=r"manifest\.json: no valid 'ref_max_score' entry"):
        presets.preset_dataset("hopper-random-v5", num_transitions=10)


@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory):
    """A tiny SAC run on Pendulum-v1 (episodes always 200 steps, actions in [-2, 2]): stopped at
    step 250, in the middle of its second episode, and resumed to 500."""
    from dtlab.behaviour.sac import train_behaviour
    from dtlab.behaviour.sac import BehaviourConfig

    run = tmp_path_factory.mktemp("behaviour") / "pendulum"
    cfg = BehaviourConfig(env="Pendulum-v1", out=str(run), steps=250, eval_every=125,
                          eval_episodes=1, learning_starts=50, buffer_size=1000, seed=0)
    train_behaviour(cfg, log=lambda m: None)
    manifest = train_behaviour(dataclasses.replace(cfg, steps=500), log=lambda m: None)
    assert [s.step for s in manifest.snapshots] == [125, 250, 375, 500]
    return run, cfg


def test_medium_replay_keeps_episodes_apart_across_a_resume(pendulum_run, monkeypatch):
    import dtlab.behaviour.sac as sac

    run, _ = pendulum_run
    monkeypatch.setattr(sac, "pick_snapshots", lambda m: {"expert": 500, "medium": 500})
    data = sac.replay_until_medium(run, "Pendulum-v1", trust=True)
    # 200-step episodes, except the one cut by the stop at step 250 and the last one, cut by the
    # end of the data at the medium snapshot (500).
    np.testing.assert_array_equal(data.episode_starts, [0, 200, 250, 450])
    np.testing.assert_array_equal(np.flatnonzero(data.truncations), [199, 249, 449, 499])
    assert not data.terminations.any()
    # The first 50 actions are uniform over [-2, 2]: stored scaled to [-1, 1] by SB3, unscaled here.
    assert data.actions.min() < -1.0 or data.actions.max() > 1.0
    assert np.abs(data.actions).max() <= 2.0 + 1e-6


def test_medium_replay_needs_trust(pendulum_run):
    from dtlab.behaviour.sac import replay_until_medium

    run, _ = pendulum_run
    with pytest.raises(ConfigError, match=r"replay_buffer\.pkl: .*pickle.*--trust-pickle"):
        replay_until_medium(run, "Pendulum-v1")


def test_resume_refuses_a_buffer_newer_than_the_manifest(pendulum_run, tmp_path):
    from dtlab.behaviour.sac import train_behaviour

    run, cfg = pendulum_run
    copy = tmp_path / "interrupted"
    shutil.copytree(run, copy)
    # Interrupted after writing snapshot 500 and the buffer, before the manifest listed step 500.
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["snapshots"].pop()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(copy))}: replay_buffer\.pkl holds 500 "
                                          r"transitions, but the last snapshot in manifest\.json is "
                                          r"at step 375"):
        train_behaviour(dataclasses.replace(cfg, out=str(copy), steps=625), log=lambda m: None)


def test_train_behaviour_cli_exports_actors(tmp_path, capsys):
    import json as _json

    from dtlab.cli import main

    run, dest = tmp_path / "run", tmp_path / "presets"
    code = main(["train-behaviour", "--env", "Pendulum-v1", "--out", str(run), "--steps", "200",
                 "--eval-every", "100", "--learning-starts", "50", "--buffer-size", "1000",
                 "--eval-episodes", "1", "--export", str(dest), "--export-episodes", "2"])
    assert code == 0, capsys.readouterr().err
    manifest = _json.loads((dest / "manifest.json").read_text())
    assert {manifest["medium"]["file"], manifest["expert"]["file"]} <= {p.name for p in dest.iterdir()}
    assert manifest["ref_max_score"] == manifest["expert"]["return_stochastic"]["mean"]
    # The exported actor collects data through the CLI.
    out = tmp_path / "d.hdf5"
    code = main(["collect", "--env", "Pendulum-v1", "--policy", f"actor:{dest / 'expert.safetensors'}",
                 "--episodes", "1", "--out", str(out)])
    assert code == 0 and out.exists()
