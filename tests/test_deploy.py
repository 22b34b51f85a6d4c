"""The deploy artifact (dtlab.export) and its torch-free runtime (dtlab.deploy) against DTPolicy.

Parity: whole episodes on real envs, the runtime fed exactly what DTPolicy is fed (the envs are
stepped with DTPolicy's actions), before and after the window fills, after steer, batch 1 and
batch N, with episodes ending at different steps (``index``). The checkpoints are tiny models
with random weights spread wider than the init (std 0.3 added), so that discrete logits are far
from ties and continuous actions far from 0: parity is about the arithmetic, not the skill.
"""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dtlab import checkpoint
from dtlab.deploy import DeployedPolicy
from dtlab.envs import make_env
from dtlab.errors import ConfigError, DtlabWarning, EnvError
from dtlab.export import StepGraph, export_onnx, export_run
from dtlab.policy import DTPolicy
from dtlab.spaces import (DictObservations, DiscreteActions, ImageObservations,
                          VectorObservations)

from tests.configs import HOPPER_DATA, box, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def lockstep(env_id, dt, deployed, targets, *, steps, steer=None, single=False, first_reward=None):
    """Run len(targets) episodes with DTPolicy's actions; feed the runtime the same observations
    and rewards (``first_reward`` at the first step, which both must ignore); return
    [(step, episode indices, DTPolicy's actions, the runtime's)]."""
    envs = [make_env(env_id) for _ in targets]
    obs = [env.reset(seed=i)[0] for i, env in enumerate(envs)]
    rewards = [0.0] * len(targets)
    live = np.ones(len(targets), bool)
    dt.reset(targets[0] if single else targets)
    deployed.reset(targets[0] if single else targets)
    record = []
    for t in range(steps):
        idx = np.flatnonzero(live)
        if not idx.size:
            break
        index = None if single else idx
        if steer is not None and t == steer[0]:
            dt.steer(steer[1], index=index)
            deployed.steer(steer[1], index=index)
        if isinstance(obs[0], dict):
            batch = obs[0] if single else [obs[i] for i in idx]
        else:
            batch = obs[0] if single else np.stack([obs[i] for i in idx])
        reward = first_reward if t == 0 else (
            rewards[0] if single else np.array([rewards[i] for i in idx]))
        a = dt.act(batch, reward, index=index)
        b = deployed.act(batch, reward, index=index)
        record.append((t, idx, np.asarray(a), np.asarray(b)))
        for j, i in enumerate(idx):
            action = a if single else a[j]
            obs[i], rewards[i], terminated, truncated, _ = envs[i].step(action)
            live[i] = not (terminated or truncated)
    for env in envs:
        env.close()
    return record


def assert_parity(record, k, discrete):
    assert any(t < k for t, *_ in record) and any(t >= k + 2 for t, *_ in record)
    for t, idx, a, b in record:
        assert a.shape == b.shape, t
        if discrete:
            assert a.dtype == b.dtype == np.int64 and (a == b).all(), (t, idx, a, b)
        else:
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0, err_msg=f"step {t}")


@pytest.fixture(scope="module")
def hopper(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hopper")
    run = make_checkpoint(tmp, "Hopper-v5", VectorObservations(11), box("Hopper-v5"),
                          returns=(0.0, 3000.0), max_ep_len=1000)
    return run, export_run(run, tmp / "artifact")


def test_hopper_parity_batch_n_with_steer_and_episodes_ending_apart(hopper):
    run, artifact = hopper
    record = lockstep("Hopper-v5", DTPolicy.from_checkpoint(run), DeployedPolicy(artifact),
                      [300.0, 900.0, 2000.0], steps=40, steer=(7, 500.0))
    assert_parity(record, 4, discrete=False)
    assert len({len(idx) for _, idx, *_ in record}) > 1  # episodes ended apart: index subsets


def test_hopper_parity_batch_1_unbatched(hopper):
    run, artifact = hopper
    dt, deployed = DTPolicy.from_checkpoint(run), DeployedPolicy(artifact)
    record = lockstep("Hopper-v5", dt, deployed, [700.0], steps=30, steer=(5, 200.0), single=True,
                      first_reward=250.0)
    assert record[0][2].shape == record[0][3].shape == (3,)
    assert_parity(record, 4, discrete=False)
    np.testing.assert_allclose(deployed.returns_to_go, dt.returns_to_go, rtol=1e-6)


def test_acting_on_every_episode_runs_the_graph_fixed_to_that_batch_size(hopper, monkeypatch):
    """act on all n episodes runs the graph with its batch axis fixed to n (onnxruntime then
    folds the shape arithmetic) and gives the dynamic graph's actions; act on a subset runs the
    dynamic graph."""
    import onnxruntime as ort

    _, artifact = hopper
    policy = DeployedPolicy(artifact)
    calls = []
    run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, names, feed, *a: (
        calls.append((self, {k: v.copy() for k, v in feed.items()})) or run(self, names, feed)))
    policy.reset([300.0, 900.0, 2000.0])
    obs = np.linspace(-1, 1, 33, dtype=np.float32).reshape(3, 11)
    action = policy.act(obs)
    policy.act(obs[:2], [1.0, 2.0], index=[0, 1])
    policy.act(obs, [1.0, 2.0, 3.0])
    monkeypatch.undo()
    shapes = [session.get_inputs()[0].shape for session, _ in calls]
    assert shapes == [[3, 11], ["batch", 11], [3, 11]]
    assert calls[0][0] is calls[2][0]  # loaded once for the size
    want = policy.session.run(["action"], calls[0][1])[0]  # the dynamic graph, the same inputs
    np.testing.assert_allclose(action, want, atol=1e-6, rtol=0)


def test_a_reward_passed_at_the_first_step_is_ignored_exactly(hopper):
    run, artifact = hopper
    dt, deployed = DTPolicy.from_checkpoint(run), DeployedPolicy(artifact)
    obs = np.linspace(-1, 1, 11, dtype=np.float32)
    for policy in (dt, deployed):
        policy.reset([333.3, 1000.0])
        policy.act(np.stack([obs, obs]), [1e5, 1e5])  # first step: ignored
    assert np.array_equal(deployed.returns_to_go, dt.returns_to_go)
    np.testing.assert_allclose(dt.returns_to_go, [333.3, 1000.0], rtol=1e-6)


@pytest.mark.parametrize("architecture", ["decision-transformer", "transformer-bc", "mlp-bc"])
def test_cartpole_parity_discrete(tmp_path, architecture):
    k = 1 if architecture == "mlp-bc" else 4
    run = make_checkpoint(tmp_path, "CartPole-v1", VectorObservations(4), DiscreteActions(2),
                          architecture=architecture, max_ep_len=500, seed=1, k=k,
                          returns=(0.0, 500.0))
    artifact = export_run(run, tmp_path / "artifact")
    record = lockstep("CartPole-v1", DTPolicy.from_checkpoint(run), DeployedPolicy(artifact),
                      [50.0, 200.0, 500.0, 20.0], steps=30, steer=(6, 400.0))
    assert_parity(record, k, discrete=True)
    if architecture != "mlp-bc":  # (this MLP's bias picks one action in every state seen)
        assert len({int(v) for *_, a, _ in record for v in np.ravel(a)}) == 2  # both taken


def test_pendulum_parity_maps_actions_to_the_envs_bounds(tmp_path):
    run = make_checkpoint(tmp_path, "Pendulum-v1", VectorObservations(3), box("Pendulum-v1"),
                          returns=(-1500.0, 0.0), max_ep_len=200, seed=4)
    artifact = export_run(run, tmp_path / "artifact")
    record = lockstep("Pendulum-v1", DTPolicy.from_checkpoint(run), DeployedPolicy(artifact),
                      [-200.0, -900.0], steps=10, steer=(6, -100.0))
    assert_parity(record, 4, discrete=False)
    assert max(np.abs(a).max() for *_, a, _ in record) > 1.0  # beyond [-1, 1]: bounds matter


@pytest.fixture(scope="module")
def pointmaze(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pointmaze")
    spec = DictObservations(("observation", "desired_goal"), (4, 2))
    run = make_checkpoint(tmp, "PointMaze_UMaze-v3", spec, box("PointMaze_UMaze-v3"),
                          max_ep_len=300, seed=2)
    return run, export_run(run, tmp / "artifact")


@pytest.fixture(scope="module")
def breakout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("breakout")
    run = make_checkpoint(tmp, "ALE/Breakout-v5", ImageObservations((84, 84), 4),
                          DiscreteActions(4), k=3, max_ep_len=2000, seed=3)
    return run, export_run(run, tmp / "artifact")


@pytest.mark.parametrize("env_id, spec, returns, max_ep_len", [
    ("Pendulum-v1", VectorObservations(3), (-1500.0, 0.0), 200),
    ("Hopper-v5", VectorObservations(11), (0.0, 3000.0), 1000)])
def test_stochastic_head_exports_its_greedy_action(tmp_path, env_id, spec, returns, max_ep_len):
    """A --model.policy stochastic run (every dtlab finetune policy) exports the action DTPolicy
    takes at temperature 0, tanh of the Gaussian's mean, mapped to the env's bounds; policy.json
    and the model card say so."""
    run = make_checkpoint(tmp_path, env_id, spec, box(env_id), returns=returns,
                          max_ep_len=max_ep_len, seed=5, policy="stochastic")
    artifact = export_run(run, tmp_path / "artifact")
    record = lockstep(env_id, DTPolicy.from_checkpoint(run), DeployedPolicy(artifact),
                      [returns[0] / 2, returns[1] / 2, returns[1]], steps=10, steer=(6, returns[1]))
    assert_parity(record, 4, discrete=False)
    assert record[0][2].shape == (3, box(env_id).dim)
    policy = json.loads((artifact / "policy.json").read_text())
    assert policy["policy"] == "stochastic" and policy["acts"].startswith("greedy (the mean)")
    assert "action head: stochastic; the artifact acts greedy (the mean)" in \
        (artifact / "README.md").read_text()


def test_pointmaze_dict_observations_parity(pointmaze):
    run, artifact = pointmaze
    record = lockstep("PointMaze_UMaze-v3", DTPolicy.from_checkpoint(run),
                      DeployedPolicy(artifact), [0.0, 1.0], steps=12, steer=(6, 0.5))
    assert_parity(record, 4, discrete=False)


def test_atari_frame_stacks_parity(breakout):
    run, artifact = breakout
    record = lockstep("ALE/Breakout-v5", DTPolicy.from_checkpoint(run), DeployedPolicy(artifact),
                      [10.0, 90.0], steps=8, steer=(4, 5.0))
    assert_parity(record, 3, discrete=True)


class AllRealPadding(StepGraph):
    """d3rlpy's export: every position of the window is treated as real (an all-zero padding
    mask), so the zero-filled padded steps are attended to."""

    def forward(self, observation, last_reward, target, observations, actions, returns_to_go,
                timesteps, masks):
        out = super().forward(observation, last_reward, target, observations, actions,
                              returns_to_go, timesteps, torch.ones_like(masks))
        return (*out[:-1], torch.ones_like(out[-1]))


def test_a_graph_that_does_not_mask_padding_fails_the_parity_check(hopper, tmp_path, monkeypatch):
    run, artifact = hopper
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "policy.json").write_text((artifact / "policy.json").read_text())
    model, info = checkpoint.load(run)
    monkeypatch.setattr("dtlab.export.StepGraph", AllRealPadding)
    export_onnx(model, info, wrong / "policy.onnx")
    record = lockstep("Hopper-v5", DTPolicy.from_checkpoint(run), DeployedPolicy(wrong),
                      [700.0], steps=20, single=True)
    with pytest.raises(AssertionError):
        assert_parity(record, 4, discrete=False)
    early = [np.abs(a - b).max() for t, _, a, b in record if t < 3]
    assert min(early) > 1e-3  # the first K-1 actions differ, as d3rlpy's do


def test_policy_json_records_ranges_returns_and_calibration(tmp_path):
    run = make_checkpoint(tmp_path, "Hopper-v5", VectorObservations(11), box("Hopper-v5"),
                          returns=(0.0, 1000.0), max_ep_len=1000)
    checkpoint.save_calibration(run, {"reliable_max_target": 1500.0, "rising_range": [0.0, 1500.0],
                                      "saturated": True})
    artifact = export_run(run, tmp_path / "artifact", dataset=str(HOPPER_DATA))
    record = json.loads((artifact / "policy.json").read_text())
    with h5py.File(HOPPER_DATA) as f:
        obs = f["observations"][:].astype(np.float64)
    np.testing.assert_allclose(record["observation_range"]["low"], obs.min(0))
    np.testing.assert_allclose(record["observation_range"]["high"], obs.max(0))
    assert record["reliable_targets"]["max"] == 1500.0
    # Published files name the data by its file name, not this machine's directories.
    assert record["observation_range"]["source"] == HOPPER_DATA.name
    assert str(tmp_path) not in (artifact / "policy.json").read_text()
    assert record["context_len"] == 4 and record["max_ep_len"] == 1000
    assert record["action_space"]["type"] == "continuous" and record["env_id"] == "Hopper-v5"
    card = (artifact / "README.md").read_text()
    assert "1500" in card and "Hopper-v5" in card
    assert sorted(p.name for p in artifact.iterdir()) == ["README.md", "policy.json", "policy.onnx"]

    policy = DeployedPolicy(artifact)
    with pytest.warns(DtlabWarning, match="target 1600 asked for, above 1500"):
        policy.reset([1000.0, 1600.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.reset([1000.0, 1400.0])  # within the calibrated range: silent
        policy.act(obs[:2])  # training observations: silent
    far = obs[:2].copy()
    far[1, 5] = obs[:, 5].max() + 3 * obs[:, 5].std()
    far[0, 8] = obs[:, 8].min() - 3 * obs[:, 8].std()
    with pytest.warns(DtlabWarning, match=r"dimensions \[5, 8\] lie more than 1 standard deviation "):
        policy.act(far, [1.0, 1.0])
    with pytest.warns(DtlabWarning, match="target 2000 asked for, above 1500"):
        policy.steer(2000.0, index=[0])
    # A limit not exact in float32 asked for as recorded is not above itself (test_calibration).
    record["reliable_targets"]["max"] = 1500.3
    (artifact / "policy.json").write_text(json.dumps(record))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DeployedPolicy(artifact).reset([1500.3])


def warnings_at(run, artifact, target):
    """(policy, the DtlabWarning messages its reset(target) gave) for both runtimes."""
    for policy in (DeployedPolicy(artifact), DTPolicy.from_checkpoint(run)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policy.reset(target)
        yield policy, [str(w.message) for w in caught if issubclass(w.category, DtlabWarning)]


def test_uncalibrated_runtimes_warn_at_the_same_targets(hopper):
    """Uncalibrated, both runtimes warn above the highest target the data supports: by hand,
    returns 0 to 3000, best 3000 plus half the scale max(|3000|, 3000 - 0): 4500."""
    run, artifact = hopper
    assert json.loads((artifact / "policy.json").read_text())["supported_max_target"] == 4500.0
    assert "warns, as DTPolicy does, for targets above 4500.0" in (artifact / "README.md").read_text()
    for target, warns in ((3200.0, False), (4500.0, False), (4600.0, True)):
        for policy, said in warnings_at(run, artifact, target):
            assert bool(said) == warns, (type(policy).__name__, target, said)
    with pytest.warns(DtlabWarning, match=r"target 4600 asked for, above 4500, the highest "
                                          r"target the training data supports"):
        DeployedPolicy(artifact).reset(4600.0)


def test_both_runtimes_warn_above_the_most_a_bounded_env_can_return(tmp_path):
    """Pendulum-v1 pays at most 0 a step: returns -1500 to -120 support, by the data's rule,
    -120 + 0.5 * max(120, 1380) = 570, capped at 0, the most an episode can return; both
    runtimes warn above 0 and not at it, naming the env's maximum, and the card says so."""
    run = make_checkpoint(tmp_path, "Pendulum-v1", VectorObservations(3), box("Pendulum-v1"),
                          returns=(-1500.0, -120.0), max_ep_len=200)
    artifact = export_run(run, tmp_path / "artifact")
    record = json.loads((artifact / "policy.json").read_text())
    assert record["supported_max_target"] == 0.0 and record["env_max_return"] == 0.0
    assert "targets above 0.0, the most an episode of Pendulum-v1 can return" in \
        (artifact / "README.md").read_text()
    for target, warns in ((-100.0, False), (0.0, False), (10.0, True)):
        for policy, said in warnings_at(run, artifact, target):
            assert bool(said) == warns, (type(policy).__name__, target, said)
            assert all("the most an episode of Pendulum-v1 can return" in m for m in said), said
    # A calibration made before sweeps stopped at 0 (its reliable maximum 50): the limit of both
    # runtimes is still 0, named as the env's.
    checkpoint.save_calibration(run, {"reliable_max_target": 50.0,
                                      "rising_range": [-1500.0, 50.0], "saturated": True})
    artifact = export_run(run, tmp_path / "calibrated")
    for policy in (DeployedPolicy(artifact), DTPolicy.from_checkpoint(run)):
        with pytest.warns(DtlabWarning, match="above 0, the most an episode of Pendulum-v1"):
            policy.reset(10.0)


def test_an_artifact_written_before_supported_max_target_warns_above_the_datas_best(
        hopper, tmp_path):
    import shutil

    old = shutil.copytree(hopper[1], tmp_path / "old")
    record = json.loads((old / "policy.json").read_text())
    del record["supported_max_target"]
    (old / "policy.json").write_text(json.dumps(record))
    with pytest.warns(DtlabWarning, match=r"target 3200 asked for, above 3000, the best "
                                          r"episode return"):
        DeployedPolicy(old).reset(3200.0)


def test_the_runtime_runs_with_torch_unimportable(hopper):
    """dtlab.deploy needs neither torch nor dtlab's torch modules (the import contract checks the
    imports; this runs it)."""
    _, artifact = hopper
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\nfrom dtlab.deploy import DeployedPolicy\n"
            f"p = DeployedPolicy({str(artifact)!r}); p.reset([1.0, 2.0])\n"
            "a = p.act(np.zeros((2, 11), np.float32)); a = p.act(np.zeros((2, 11)), [1.0, 1.0])\n"
            "assert a.shape == (2, 3) and 'torch' not in [m for m in sys.modules if sys.modules[m]]\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "ok", out.stderr


def test_max_ep_len_and_bad_observations_are_refused(tmp_path):
    run = make_checkpoint(tmp_path, "CartPole-v1", VectorObservations(4), DiscreteActions(2),
                          max_ep_len=3)
    with pytest.warns(DtlabWarning, match="no observation ranges.*--dataset"):  # data is gone
        artifact = export_run(run, tmp_path / "artifact")
    assert json.loads((artifact / "policy.json").read_text())["observation_range"] is None
    policy = DeployedPolicy(artifact)
    policy.reset(10.0)
    for _ in range(3):
        policy.act(np.zeros(4))
    with pytest.raises(ConfigError, match="max_ep_len is 3"):
        policy.act(np.zeros(4))
    policy.reset([1.0, 2.0])
    with pytest.raises(EnvError, match=r"shape \(2, 5\) for 2 episodes; expected \(2, 4\)$"):
        policy.act(np.zeros((2, 5)))
    with pytest.raises(EnvError, match=r"observation contains NaN/inf \(dimension 2\) for "
                                       r"episode 1"):
        policy.act(np.array([[0.0, 0, 0, 0], [0, 0, np.nan, 0]]))
    with pytest.raises(EnvError, match="last_reward contains NaN/inf"):
        policy.act(np.zeros((2, 4)), np.array([0.0, np.inf]))


def test_cli_export_and_its_refusals(hopper, tmp_path, capsys, monkeypatch):
    from dtlab.cli import main

    run, _ = hopper
    out = tmp_path / "a"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "policy.json", "policy.onnx"]
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and err.count("\n") == 1
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "b").exists()
    # Without the export extra (onnx hidden from the import system): one line naming it, no output.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", str(run), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'dtlab[export]'" in err
    assert not (tmp_path / "c").exists()


def test_the_standalone_distribution_is_these_files_at_dtlabs_version():
    """deploy/pyproject.toml builds dtlab-deploy from src/dtlab/deploy itself (a link), at
    dtlab's version, and reads the artifact version that dtlab.export writes."""
    import tomllib

    from dtlab import __version__
    from dtlab import export
    from dtlab.deploy import runtime

    project = tomllib.loads((ROOT / "deploy" / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__ and project["name"] == "dtlab-deploy"
    assert "torch" not in " ".join(project["dependencies"])
    assert (ROOT / "deploy" / "src" / "dtlab_deploy").resolve() == ROOT / "src" / "dtlab" / "deploy"
    assert (runtime.ARTIFACT_FORMAT, runtime.ARTIFACT_VERSION) == \
        (export.ARTIFACT_FORMAT, export.ARTIFACT_VERSION)
    assert runtime.STATE_NAMES == export.STATE_NAMES


# ---- input checks: the same rules in DTPolicy and DeployedPolicy ----------------------------------
RUNTIMES = ["DTPolicy", "DeployedPolicy"]


def load(runtime, run, artifact):
    return DTPolicy.from_checkpoint(run) if runtime == "DTPolicy" else DeployedPolicy(artifact)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_observations_of_another_shape_are_refused_even_when_their_size_fits(hopper, runtime):
    """(obs_dim, n) has the size of (n, obs_dim) but reshaping it would mix the episodes'
    observations: refused, as (obs_dim, 1) and (1, 1, obs_dim) are for one episode."""
    policy = load(runtime, *hopper)
    x = np.linspace(-1, 1, 22, dtype=np.float32).reshape(2, 11)
    policy.reset([300.0, 900.0])
    with pytest.raises(EnvError, match=r"^act got observations of shape \(11, 2\) for 2 "
                                       r"episodes; expected \(2, 11\)$"):
        policy.act(x.T)
    policy.reset(300.0)
    for bad in (x[:1].T, x[None, :1]):
        with pytest.raises(EnvError, match=re.escape(f"shape {bad.shape} for 1 episode; "
                                                     "expected (1, 11) or (11,)")):
            policy.act(bad)
    assert policy.act(x[0]).shape == policy.act(x[:1], 1.0).shape == (3,)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_dict_observation_keys_are_checked_by_shape(pointmaze, runtime):
    policy = load(runtime, *pointmaze)
    goal = np.array([[0.5, -0.5], [1.0, 1.5]], np.float32)  # (2, 2)
    obs = np.arange(8, dtype=np.float32).reshape(2, 4) / 8  # (2, 4)
    policy.reset([0.0, 1.0])
    with pytest.raises(EnvError, match=r"key 'observation' of shape \(4, 2\) for 2 episodes; "
                                       r"expected \(2, 4\)$"):
        policy.act({"observation": obs.T, "desired_goal": goal})
    with pytest.raises(EnvError, match=r"key 'desired_goal' of shape \(1, 4\) for 2 episodes"):
        policy.act({"observation": obs, "desired_goal": goal.reshape(1, 4)})
    with pytest.raises(EnvError, match="3 Dict observations for 2 episodes"):
        policy.act([{"observation": obs[0], "desired_goal": goal[0]}] * 3)
    policy.reset(0.0)
    with pytest.raises(EnvError, match=r"key 'observation' of shape \(4, 1\) for 1 episode; "
                                       r"expected \(1, 4\) or \(4,\)$"):
        policy.act({"observation": obs[0][:, None], "desired_goal": goal[0]})
    assert policy.act({"observation": obs[0], "desired_goal": goal[0]}).shape == (2,)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_frame_stacks_are_checked_by_shape(breakout, runtime):
    policy = load(runtime, *breakout)
    frames = np.zeros((2, 4, 84, 84), np.uint8)
    policy.reset([10.0, 90.0])
    with pytest.raises(EnvError, match=r"shape \(1, 2, 4, 84, 84\) \(uint8\) for 2 episodes; "
                                       r"expected \(2, 4, 84, 84\) uint8$"):
        policy.act(frames[None])
    policy.reset(10.0)
    with pytest.raises(EnvError, match=r"\(1, 1, 4, 84, 84\) \(uint8\) for 1 episode; expected "
                                       r"\(1, 4, 84, 84\) uint8 or \(4, 84, 84\) uint8$"):
        policy.act(frames[None, :1])
    with pytest.raises(EnvError, match=r"\(4, 84, 84\) \(float32\) for 1 episode"):
        policy.act(frames[0].astype(np.float32))
    assert policy.act(frames[0]).shape == policy.act(frames[:1], 1.0).shape == ()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_last_reward_index_and_steer_values_of_the_wrong_size_are_named(hopper, runtime):
    """One dtlab error naming the argument and the sizes, not numpy's or torch's; the policy
    refuses before changing anything: it then acts as a fresh one does."""
    policy, fresh = load(runtime, *hopper), load(runtime, *hopper)
    obs = np.linspace(-1, 1, 22, dtype=np.float32).reshape(2, 11)
    for p in (policy, fresh):
        p.reset([300.0, 900.0])
        p.act(obs)
    with pytest.raises(EnvError, match=r"^last_reward has shape \(3,\) for 2 episodes; give "
                                       r"one value per episode \(shape \(2,\)\) or a scalar$"):
        policy.act(obs, np.zeros(3))
    with pytest.raises(ConfigError, match=r"^index \[5\] names episodes outside 0\.\.1"):
        policy.steer(-500.0, index=[5])
    with pytest.raises(ConfigError, match=r"^index \[-1\] names episodes outside 0\.\.1"):
        policy.act(obs[:1], 1.0, index=[-1])
    with pytest.raises(ConfigError, match=r"^index \[1, 1\] names an episode more than once"):
        policy.act(obs, [1.0, 2.0], index=[1, 1])
    with pytest.raises(ConfigError, match=r"^index must be .*integers"):
        policy.steer(-500.0, index=[True, False])
    with pytest.raises(ConfigError, match=r"^steer's return_to_go has shape \(3,\) for 2 episodes"):
        policy.steer([100.0, 200.0, 300.0])
    with pytest.raises(ConfigError, match=r"^steer's return_to_go has shape \(2,\) for 1 episode"):
        policy.steer([100.0, 200.0], index=[0])
    np.testing.assert_array_equal(policy.act(obs, [1.0, 2.0]), fresh.act(obs, [1.0, 2.0]))
    policy.steer([100.0, 200.0], index=[1, 0])  # good input: one value per episode named
    policy.act(obs[::-1], 3.0, index=[1, 0])  # (a view with a negative stride)
    np.testing.assert_allclose(policy.returns_to_go, [200.0, 100.0], rtol=1e-6)
