"""dtlab finetune (the Online Decision Transformer): the replay, hindsight relabelling, resume
after kill -9, and the command line's refusals."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from configs import pendulum_like, train_config  # noqa: E402

from dtlab.config import ModelConfig  # noqa: E402
from dtlab.data.replay import Trajectory, TrajectoryReplay  # noqa: E402
from dtlab.data.sampling import SequenceSampler  # noqa: E402
from dtlab.normalizer import Normalizer  # noqa: E402
from dtlab.spaces import ContinuousActions, VectorObservations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _trajectory(rewards, tag=0.0, terminated=False):
    t = len(rewards)
    return Trajectory(np.full((t, 3), tag, np.float32), np.zeros((t, 1), np.float32),
                      np.asarray(rewards, np.float32), terminated)


def test_replay_drops_the_oldest_trajectories_first():
    replay = TrajectoryReplay(3)
    for i in range(5):
        replay.add(_trajectory([1.0] * (i + 1), tag=i))
    assert [float(t.observations[0, 0]) for t in replay] == [2.0, 3.0, 4.0]
    restored = TrajectoryReplay.from_arrays(replay.to_arrays())
    assert [float(t.observations[0, 0]) for t in restored] == [2.0, 3.0, 4.0]
    assert restored.capacity == 3


def test_replay_starts_with_the_best_episodes_weakest_first():
    episodes = pendulum_like(n_episodes=5, length=10, seed=3)
    replay = TrajectoryReplay.from_best(episodes, 3)
    best = np.sort(episodes.episode_returns)[-3:]  # ascending: the order they were added
    np.testing.assert_allclose([t.episode_return for t in replay], best, rtol=1e-5)
    replay.add(_trajectory([0.0]))
    np.testing.assert_allclose([t.episode_return for t in replay][:2], best[1:], rtol=1e-5)


def test_returns_to_go_are_relabelled_from_the_achieved_rewards():
    replay = TrajectoryReplay(4)
    replay.add(_trajectory([1.0, 2.0, 3.0], terminated=True))
    replay.add(_trajectory([-1.0, 5.0]))
    spec = ContinuousActions(1, [-2.0], [2.0])
    episodes = replay.episodes(VectorObservations(3), spec)
    # By hand: suffix sums within each trajectory, whatever return its rollout asked for.
    np.testing.assert_allclose(episodes.returns_to_go, [6.0, 5.0, 3.0, 4.0, 5.0])
    assert episodes.terminations.tolist() == [False, False, True, False, False]
    assert episodes.truncations.tolist() == [False, False, False, False, True]
    sampler = SequenceSampler(episodes, 2, Normalizer(np.zeros(3), np.ones(3), 10.0, [-2.0],
                                                      [2.0]))
    batch = sampler.gather(np.array([1, 4]))
    np.testing.assert_allclose(batch.returns_to_go[..., 0], [[0.6, 0.5], [0.4, 0.5]], rtol=1e-6)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A tiny stochastic-head run on Pendulum-shaped data saved as a file."""
    from dtlab.data.formats import save_episodes
    from dtlab.train import train

    root = tmp_path_factory.mktemp("odt")
    save_episodes(pendulum_like(n_episodes=6, length=200, seed=1), str(root / "data.hdf5"),
                  "native")
    model = ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200, dropout=0.1,
                        policy="stochastic")
    train(train_config(model=model, dataset=str(root / "data.hdf5"), env="Pendulum-v1",
                       out=str(root / "off"), steps=10, lr=1e-3, warmup_steps=1, batch_size=8,
                       progress=False, tensorboard=False))
    return root


def _finetune_args(run, out, *extra):
    return ["finetune", str(run), "--env", "Pendulum-v1", "--online-steps", "600", "--out",
            str(out), "--eval-every", "400", "--eval-episodes", "1", "--eval-targets", "-100",
            "--updates-per-rollout", "20", "--replay-trajectories", "4", "--max-episode-steps",
            "100", "--checkpoint-every", "1", "--device", "cpu", *extra]


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dtlab", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _in_process(run, out, stop_after=None, resume=False):
    from dtlab.cli_errors import parse
    from dtlab.finetune import FinetuneConfig, finetune

    args = _finetune_args(run, out, *(["--resume"] if resume else []))[1:]
    cfg = parse(FinetuneConfig, args, prog="dtlab finetune", description="")
    polls = []
    return finetune(cfg, should_stop=lambda: stop_after is not None and
                    len(polls.append(1) or polls) >= stop_after, echo=False)


def test_finetune_stopped_and_resumed_equals_an_uninterrupted_run(offline_run):
    from safetensors.torch import load_file

    whole = _in_process(offline_run / "off", offline_run / "p_whole")
    assert not whole.interrupted and whole.env_steps == 600 and whole.rollouts == 6
    # Polled once before the start, then after each rollout: True at the third poll.
    stopped = _in_process(offline_run / "off", offline_run / "p_stop", stop_after=3)
    assert stopped.interrupted and stopped.rollouts == 2
    resumed = _in_process(offline_run / "off", offline_run / "p_stop", resume=True)
    assert resumed.checkpoint.name == whole.checkpoint.name == "step_00000130"
    for file in ("model.safetensors", "replay.safetensors"):
        a, b = (load_file(r.checkpoint / file) for r in (whole, resumed))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow  # three CLI processes, about 30 s
def test_finetune_resumes_bit_for_bit_after_kill_9(offline_run):
    from safetensors.torch import load_file

    whole = _cli(_finetune_args(offline_run / "off", offline_run / "whole"))
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    assert "online learning curve" in out and (offline_run / "whole" /
                                               "online_learning_curve.png").is_file()
    killed = offline_run / "killed"
    proc = _cli(_finetune_args(offline_run / "off", killed))
    deadline = time.monotonic() + 240
    while not (killed / "step_00000050").is_dir() and time.monotonic() < deadline:  # rollout 2
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "latest").read_text().strip() != "step_00000130"  # killed before the end
    resumed = _cli(_finetune_args(offline_run / "off", killed, "--resume"))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    final = "step_00000130"  # 10 offline steps + 6 rollouts (of 100 env steps) x 20 updates
    a = load_file(offline_run / "whole" / final / "model.safetensors")
    b = load_file(killed / final / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    ra = load_file(offline_run / "whole" / final / "replay.safetensors")
    rb = load_file(killed / final / "replay.safetensors")
    assert all((ra[k] == rb[k]).all() for k in ra)
    whole_evals = (offline_run / "whole" / "evaluations.jsonl").read_text().splitlines()
    assert len(whole_evals) == 3  # env steps 0, 400, 600
    assert [line.split('"timing"')[0] for line in whole_evals] == \
        [line.split('"timing"')[0] for line in (killed / "evaluations.jsonl").read_text()
         .splitlines()]


def test_finetune_refuses_a_deterministic_run_in_one_line(offline_run, tmp_path):
    from dtlab.train import train

    model = ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200)
    train(train_config(model=model, dataset=str(offline_run / "data.hdf5"), env="Pendulum-v1",
                       out=str(tmp_path / "det"), steps=2, warmup_steps=1, batch_size=4,
                       progress=False, tensorboard=False))
    proc = _cli(_finetune_args(tmp_path / "det", tmp_path / "ft"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1
    assert "--model.policy stochastic" in err and not (tmp_path / "ft").exists()


def test_finetune_refuses_another_env_in_one_line(offline_run, tmp_path):
    args = _finetune_args(offline_run / "off", tmp_path / "ft")
    args[args.index("Pendulum-v1")] = "MountainCarContinuous-v0"
    proc = _cli(args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1
    assert "--env Pendulum-v1" in err and not (tmp_path / "ft").exists()
