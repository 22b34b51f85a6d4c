"""End to end through the CLI on real envs (issue 12): an ALE game (Breakout, frame stacks) and
PointMaze (Dict observations): collect, train, evaluate two targets; SB3 zips as Atari
behaviour policies; a Minari dataset with a Dict space written by Minari itself; bad input."""

import json
import warnings

import h5py
import numpy as np
import pytest
import torch

from dtlab import checkpoint
from dtlab.checkpoint import PolicyInfo
from dtlab.cli import main
from dtlab.config import ModelConfig
from dtlab.data import EpisodeSet
from dtlab.data.formats import load_episodes, write_native
from dtlab.envs import env_info, make_env
from dtlab.baselines import build_model
from dtlab.normalizer import Normalizer
from dtlab.spaces import DictObservations, DiscreteActions, ImageObservations

BREAKOUT = "ALE/Breakout-v5"
MAZE = "PointMaze_UMaze-v3"
TINY = ["--model.embed-dim", "16", "--model.n-layers", "1", "--model.context-len", "4",
        "--batch-size", "8", "--warmup-steps", "1", "--no-progress", "--no-tensorboard"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err):
    return code == 2 and err.startswith("dtlab: error: ") and err.count("\n") == 1


@pytest.fixture(scope="module")
def breakout_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("atari") / "breakout-random.hdf5"
    assert main(["collect", "--env", BREAKOUT, "--transitions", "300", "--seed", "0",
                 "--out", str(path)]) == 0
    return path


# ---- Atari -----------------------------------------------------------------------------------------
def test_atari_env_is_the_dt_papers_preprocessing():
    env = make_env(BREAKOUT)
    assert env.observation_space.shape == (4, 84, 84) and env.observation_space.dtype == np.uint8
    assert env.spec.max_episode_steps == 27_000
    assert env.spec.kwargs["frameskip"] == 1  # AtariPreprocessing skips the frames instead
    assert env.spec.kwargs["repeat_action_probability"] == 0.25  # the v5 sticky actions
    obs, _ = env.reset(seed=0)
    assert all((obs[i] == obs[0]).all() for i in range(4))  # reset: the first frame repeated
    info = env_info(BREAKOUT)
    assert (info.ref_min_score, info.ref_max_score, info.targets) == (1.7, 30.5, (90.0,))
    env.close()


def test_atari_collect_stores_each_newest_frame_once(breakout_file):
    with h5py.File(breakout_file) as f:
        frames = f["observations"]
        assert frames.dtype == np.uint8 and frames.shape == (300, 84, 84)
        assert frames.compression == "gzip" and frames.chunks == (64, 84, 84)
        first = frames[0]
    episodes = load_episodes(breakout_file)
    assert episodes.observation_space == ImageObservations((84, 84), 4)
    assert episodes.action_space == DiscreteActions(4)  # 300 random steps use all 4 actions
    env = make_env(BREAKOUT)
    obs, _ = env.reset(seed=0)  # collect_episodes resets the first episode with the seed
    np.testing.assert_array_equal(first, obs[-1])
    env.close()


def test_atari_collect_train_evaluate_two_targets_through_the_cli(breakout_file, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--dataset", breakout_file, "--env", BREAKOUT,
                             "--steps", "12", "--out", run, "--model.max-ep-len", "1000", *TINY)
    assert code == 0, err
    config = json.loads((checkpoint.resolve(run) / "config.json").read_text())
    assert config["observation_space"] == {"type": "image", "shape": [84, 84], "stack": 4}
    assert config["normalizer"]["obs_mean"] == [0.0] and config["normalizer"]["obs_std"] == [255.0]
    assert config["normalizer"]["return_scale"] == 1.0  # the env registry's Atari scale
    results = tmp_path / "results.json"
    code, out, err = run_cli(capsys, "evaluate", run, "--targets", "5", "1", "--episodes", "2",
                             "--max-steps", "60", "--out", results, "--temperature", "1.0")
    assert code == 0, err
    data = json.loads(results.read_text())
    assert [r["target"] for r in data["results"]] == [5.0, 1.0]
    assert all(len(r["returns"]) == 2 and max(r["lengths"]) <= 60 for r in data["results"])
    assert data["timing"]["env_steps"] == sum(sum(r["lengths"]) for r in data["results"])


@pytest.mark.parametrize("algo", ["PPO", "DQN"])
def test_atari_collect_with_a_stable_baselines3_zip(tmp_path, capsys, algo):
    """A CNN agent trained (briefly) on dtlab's ALE env: its zip collects through --policy sb3:."""
    import stable_baselines3 as sb3

    env = make_env(BREAKOUT)
    kwargs = ({"n_steps": 16, "batch_size": 16, "n_epochs": 1} if algo == "PPO" else
              {"buffer_size": 64, "learning_starts": 8, "train_freq": 4})
    model = getattr(sb3, algo)("CnnPolicy", env, seed=0, device="cpu", **kwargs)
    model.learn(16)
    model.save(tmp_path / "agent.zip")
    env.close()
    out = tmp_path / "sb3.hdf5"
    code, stdout, err = run_cli(capsys, "collect", "--env", BREAKOUT, "--policy",
                                f"sb3:{tmp_path / 'agent.zip'}", "--trust-pickle",
                                "--transitions", "40", "--out", out)
    assert code == 0, err
    episodes = load_episodes(out)
    assert episodes.num_transitions == 40 and episodes.metadata["policies"][0].startswith(
        f"sb3:{algo}(")


def test_frame_or_stack_mismatch_with_the_checkpoint_is_refused(tmp_path, capsys):
    """A checkpoint of 3-frame stacks evaluated on the 4-frame ALE env: one line, exit 2, no
    results file."""
    spec = ImageObservations((84, 84), 3)
    cfg = ModelConfig(embed_dim=16, n_layers=1, context_len=2, max_ep_len=100)
    info = PolicyInfo(model=cfg, observation_space=spec, action_space=DiscreteActions(4),
                      normalizer=Normalizer.for_images(1.0), env_id=BREAKOUT)
    ckpt = checkpoint.save(tmp_path / "ckpt", "step_00000001", build_model(cfg, spec,
                                                                           DiscreteActions(4)), info)
    results = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", ckpt, "--max-steps", "10", "--out", results)
    assert one_line_error(code, err) and not results.exists()
    assert "has observations (4, 84, 84)" in err and "(3, 84, 84) uint8 frame stacks" in err
    # Frames of another size in the training data: refused before anything is written.
    rng = np.random.default_rng(0)
    small = EpisodeSet.from_flags(rng.integers(0, 255, (20, 64, 64), dtype=np.uint8),
                                  np.zeros(20, int), np.zeros(20), np.eye(20, dtype=bool)[19],
                                  np.zeros(20, bool), observation_space=ImageObservations((64, 64)))
    write_native(small, tmp_path / "small.hdf5")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", tmp_path / "small.hdf5", "--env",
                           BREAKOUT, "--out", run, "--steps", "2", *TINY)
    assert one_line_error(code, err) and not run.exists()
    assert "(4, 64, 64) uint8 frame stacks" in err and "small.hdf5" in err


def test_action_index_outside_the_action_space_is_refused(breakout_file, tmp_path, capsys):
    episodes = load_episodes(breakout_file)
    actions = episodes.actions.copy()
    actions[17] = 7  # Breakout has 4 actions
    bad = EpisodeSet(episodes.observations, actions, episodes.rewards, episodes.terminations,
                     episodes.truncations, episodes.episode_starts,
                     observation_space=episodes.observation_space)
    write_native(bad, tmp_path / "bad.hdf5")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", tmp_path / "bad.hdf5", "--env", BREAKOUT,
                           "--out", run, "--steps", "2", *TINY)
    assert one_line_error(code, err) and not run.exists()
    assert "bad.hdf5" in err and "actions up to index 7" in err and "4 actions" in err


# ---- PointMaze (Dict observations) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def maze_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("maze") / "pointmaze.hdf5"
    assert main(["collect", "--env", MAZE, "--policy", "pointmaze-goal", "--quality", "0.8",
                 "--episodes", "6", "--out", str(path)]) == 0
    return path


def test_pointmaze_collect_train_evaluate_through_the_cli(maze_file, tmp_path, capsys):
    episodes = load_episodes(maze_file)
    assert episodes.observation_space == DictObservations(
        ("achieved_goal", "desired_goal", "observation"), (2, 2, 4))
    assert episodes.episode_returns.max() > episodes.episode_returns.min()  # a spread of returns
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", maze_file, "--env", MAZE, "--obs-keys",
                           "observation,desired_goal", "--steps", "10", "--out", run,
                           "--model.max-ep-len", "300", "--return-scale", "100", *TINY)
    assert code == 0, err
    config = json.loads((checkpoint.resolve(run) / "config.json").read_text())
    assert config["observation_space"] == {"type": "dict", "keys": ["observation", "desired_goal"],
                                           "dims": [4, 2]}
    results = tmp_path / "results.json"
    code, out, err = run_cli(capsys, "evaluate", run, "--targets", "250", "0", "--episodes", "1",
                             "--max-steps", "50", "--out", results)
    assert code == 0, err
    data = json.loads(results.read_text())
    assert [r["target"] for r in data["results"]] == [250.0, 0.0]
    assert [r["lengths"] for r in data["results"]] == [[50], [50]]


def test_obs_keys_missing_or_unknown_is_refused_listing_the_keys(maze_file, tmp_path, capsys):
    run = tmp_path / "run"
    for extra, message in (([], r"has Dict observations; choose the keys"),
                           (["--obs-keys", "observation,goal"], r"no observation key 'goal'")):
        code, _, err = run_cli(capsys, "train", "--dataset", maze_file, "--env", MAZE, "--out", run,
                               "--steps", "2", *extra, *TINY)
        assert one_line_error(code, err) and not run.exists()
        assert message.split("'")[0].replace("\\", "") in err
        assert "available keys: achieved_goal, desired_goal, observation" in err
        assert str(maze_file) in err


def test_dict_observations_written_to_minari_without_an_env_round_trip(maze_file, tmp_path,
                                                                       monkeypatch):
    """write_minari with no env_id takes its spaces from the data: for Dict observations a
    Dict of Boxes spanning each key's values (was: UnboundLocalError, the action space never
    set on that path); read back, the episodes are the same."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    import minari

    from dtlab.data.formats import write_minari

    episodes = load_episodes(maze_file)
    write_minari(episodes, "test/maze-no-env-v0")
    space = minari.load_dataset("test/maze-no-env-v0").observation_space
    assert set(space.spaces) == {"achieved_goal", "desired_goal", "observation"}
    back = load_episodes("minari:test/maze-no-env-v0")
    assert back.observation_space == episodes.observation_space
    np.testing.assert_array_equal(back.observations, episodes.observations)
    np.testing.assert_array_equal(back.actions, episodes.actions)
    np.testing.assert_array_equal(back.rewards, episodes.rewards)


def test_pointmaze_collected_into_minari_round_trips_its_dict_space(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    code, _, err = run_cli(capsys, "collect", "--env", MAZE, "--policy", "pointmaze-goal",
                           "--episodes", "2", "--out", "minari:test/pointmaze-goal-v0")
    assert code == 0, err
    import minari

    dataset = minari.load_dataset("test/pointmaze-goal-v0")
    first = next(iter(dataset.iterate_episodes()))
    assert set(first.observations) == {"achieved_goal", "desired_goal", "observation"}
    assert first.observations["observation"].shape == (301, 4)  # T + 1
    back = load_episodes("minari:test/pointmaze-goal-v0")
    assert back.observation_space == DictObservations(
        ("achieved_goal", "desired_goal", "observation"), (2, 2, 4))
    np.testing.assert_allclose(back.observations[:300, 4:], first.observations["observation"][:300],
                               rtol=1e-6)


def test_a_minari_dict_dataset_recorded_by_minaris_data_collector_reads_and_trains(
        tmp_path, monkeypatch, capsys):
    from minari import DataCollector

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = DataCollector(make_env(MAZE), record_infos=False)
    rng = np.random.default_rng(0)
    seen = []
    for ep in range(2):
        obs, _ = env.reset(seed=ep)
        for t in range(300):
            seen.append(np.concatenate([obs["observation"], obs["desired_goal"]]))
            obs, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
            if terminated or truncated:
                break
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        env.create_dataset("test/pointmaze-collector-v0", algorithm_name="random",
                           author="tester", author_email="t@example.com", code_permalink="none",
                           description="random PointMaze data recorded by DataCollector")
    env.close()
    episodes = load_episodes("minari:test/pointmaze-collector-v0")
    assert isinstance(episodes.observation_space, DictObservations)
    chosen = episodes.select_observation_keys(["observation", "desired_goal"])
    np.testing.assert_allclose(chosen.observations, np.array(seen, np.float32), rtol=1e-6)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", "minari:test/pointmaze-collector-v0",
                           "--env", MAZE, "--obs-keys", "observation", "desired_goal",
                           "--steps", "4", "--out", run, "--model.max-ep-len", "300", *TINY)
    assert code == 0, err
    loaded, info = checkpoint.load(run)
    assert info.observation_space == DictObservations(("observation", "desired_goal"), (4, 2))
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
