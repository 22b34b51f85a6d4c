"""An SB3 agent trained under VecNormalize collects with its statistics (issue 21, item 4): it
acts on normalized observations, the dataset records the env's raw ones."""

import numpy as np
import pytest

from dtlab.cli import main
from dtlab.data.formats import load_episodes


@pytest.fixture(scope="module")
def vecnorm_agent(tmp_path_factory):
    """A PPO agent trained 256 steps on CartPole-v1 under VecNormalize, saved the RL Zoo way:
    agent.zip with vecnormalize.pkl beside it."""
    import stable_baselines3 as sb3
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    folder = tmp_path_factory.mktemp("vecnorm")
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=0), norm_reward=False)
    model = sb3.PPO("MlpPolicy", venv, seed=0, device="cpu", n_steps=64, batch_size=32,
                    n_epochs=2)
    model.learn(256)
    model.save(folder / "agent.zip")
    venv.save(folder / "vecnormalize.pkl")
    return folder, model


def collect(capsys, folder, *extra):
    out = folder / f"data{len(extra)}.hdf5"
    code = main(["collect", "--env", "CartPole-v1", "--policy", f"sb3:{folder / 'agent.zip'}",
                 "--episodes", "3", "--deterministic", "--out", str(out), *map(str, extra)])
    return code, out, capsys.readouterr().err


def test_vecnormalize_beside_the_zip_is_used(vecnorm_agent, capsys):
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    folder, model = vecnorm_agent
    code, out, err = collect(capsys, folder, "--trust-pickle")
    assert code == 0, err
    data = load_episodes(out)
    vecnorm = VecNormalize.load(str(folder / "vecnormalize.pkl"), make_vec_env("CartPole-v1"))
    normalized = vecnorm.normalize_obs(data.observations)  # (N, 4)
    expected, _ = model.predict(normalized, deterministic=True)
    np.testing.assert_array_equal(data.actions, expected)
    raw, _ = model.predict(data.observations, deterministic=True)
    assert (raw != data.actions).any()  # raw observations would have acted otherwise
    assert np.abs(data.observations).max() < 5  # raw CartPole states, not normalized ones
    assert data.metadata["policies"] == ["sb3:PPO(agent.zip)+VecNormalize(vecnormalize.pkl)"]


def test_vecnormalize_flag_and_refusals(vecnorm_agent, capsys, tmp_path):
    folder, _ = vecnorm_agent
    code, out, err = collect(capsys, folder)
    assert code == 2 and "vecnormalize.pkl" in err and "--trust-pickle" in err
    assert not out.exists()
    code, out, err = collect(capsys, folder, "--trust-pickle", "--vecnormalize", tmp_path / "no.pkl")
    assert code == 2 and "no.pkl: VecNormalize statistics file not found" in err
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    code, out, err = collect(capsys, folder, "--trust-pickle", "--vecnormalize", tmp_path / "bad.pkl")
    assert code == 2 and "bad.pkl: not loadable VecNormalize statistics" in err
    assert not out.exists()
    code = main(["collect", "--env", "CartPole-v1", "--episodes", "1", "--vecnormalize", "x.pkl",
                 "--out", str(tmp_path / "r.hdf5")])
    assert code == 2 and "--vecnormalize is for --policy sb3:PATH" in capsys.readouterr().err
