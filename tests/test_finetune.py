"""dtlab finetune (the Online Decision Transformer): the replay, hindsight relabelling, the
exploration target, resume after kill -9, and the command line's refusals."""

import dataclasses
import hashlib
import json
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


def _in_process(run, out, *extra, stop_after=None, echo=False):
    from dtlab.cli_errors import parse
    from dtlab.finetune import FinetuneConfig, finetune

    args = _finetune_args(run, out, *extra)[1:]
    cfg = parse(FinetuneConfig, args, prog="dtlab finetune", description="")
    polls = []
    return finetune(cfg, should_stop=lambda: stop_after is not None and
                    len(polls.append(1) or polls) >= stop_after, echo=echo)


def test_default_evaluation_targets_take_a_calibrated_maximum(offline_run, capsys):
    """As dtlab evaluate: the data-fitted default targets start from the run's calibrated
    reliable maximum when it has one (this data's returns do not support Pendulum's -150)."""
    import shutil

    from dtlab import checkpoint

    run = shutil.copytree(offline_run / "off", offline_run / "off_calibrated")
    checkpoint.save_calibration(checkpoint.resolve(run), {"reliable_max_target": -321.0})
    args = _finetune_args(run, offline_run / "p_calibrated", "--online-steps", "100")
    for flag in ("--eval-targets", "--env"):  # --env too: it defaults to the run's
        at = args.index(flag)
        del args[at:at + 2]
    from dtlab.cli_errors import parse
    from dtlab.finetune import FinetuneConfig, finetune

    finetune(parse(FinetuneConfig, args[1:], prog="dtlab finetune", description=""))
    start = capsys.readouterr().out.splitlines()[0]
    assert "evaluation targets -321: fitted to the data (its calibrated reliable maximum" in start
    recorded = json.loads((offline_run / "p_calibrated" / "finetune_config.json").read_text())
    assert recorded["env"] == "Pendulum-v1"


def test_the_model_card_of_a_finetuned_run_says_so(offline_run):
    from dtlab.export import export_run

    out = offline_run / "p_card"
    _in_process(offline_run / "off", out, "--online-steps", "100")
    card = (export_run(out, offline_run / "card_artifact") / "README.md").read_text()
    assert "## Online finetuning" in card and "100 online env steps (--online-steps), 20 " \
        "updates after each exploration rollout at target 0" in card
    assert "- online env step 100: target -100:" in card  # one rollout of --max-episode-steps 100


def test_exploration_target_is_the_papers_for_positive_targets_and_more_than_the_best_else():
    from dtlab.finetune import exploration_target

    # By hand: the paper's g_online = 2 x g_eval for Hopper's 3,600 (the highest of the two).
    assert exploration_target((1800.0, 3600.0), 2.0) == 7200.0
    # Pendulum-like negative returns: -400 + (2 - 1) x 400 = 0, not 2 x -400 = -800 (worse
    # than the evaluation target); -400 + (1.5 - 1) x 400 = -200.
    assert exploration_target((-800.0, -400.0), 2.0) == 0.0
    assert exploration_target((-400.0,), 1.5) == -200.0


def test_finetune_stopped_and_resumed_equals_an_uninterrupted_run(offline_run, capsys):
    from safetensors.torch import load_file

    from dtlab.errors import ConfigError

    whole = _in_process(offline_run / "off", offline_run / "p_whole", echo=True)
    assert not whole.interrupted and whole.env_steps == 600 and whole.rollouts == 6
    assert whole.gradient_step == 130  # 10 offline steps + 6 rollouts x 20 updates
    # The start line: the exploration target -100 + (2 - 1) x |-100| and why, the evaluation
    # targets, the replay's 4 best offline episodes of 200 steps; the target is recorded.
    start = capsys.readouterr().out.splitlines()[0]
    assert "exploration target 0 (-100 + (2 - 1) x |-100|: --exploration-scale" in start
    assert "evaluation targets -100 (--eval-targets)" in start
    assert "replay of 4 trajectories (800 transitions)" in start
    recorded = json.loads((offline_run / "p_whole" / "finetune_config.json").read_text())
    weights = (offline_run / "off" / (offline_run / "off" / "latest").read_text().strip()
               / "model.safetensors").read_bytes()
    assert recorded["resolved"] == {"run": str((offline_run / "off").resolve()),
                                    "run_weights": hashlib.sha256(weights).hexdigest(),
                                    "exploration_target": 0.0, "eval_targets": [-100.0]}
    metrics = [json.loads(line) for line in (offline_run / "p_whole" / "metrics.jsonl")
               .read_text().splitlines()]
    # One process: each record's rollout_length an int (the 100 steps of --max-episode-steps).
    assert [m["rollout_length"] for m in metrics] == [100] * 6
    assert all(type(m["rollout_length"]) is int for m in metrics)
    # Resumed once finished: nothing runs and nothing is rewritten; the command says so.
    files = {name: (offline_run / "p_whole" / name).read_bytes() for name in
             ("evaluations.jsonl", "metrics.jsonl", "finetune_config.json", "train_config.json")}
    again = _in_process(offline_run / "off", offline_run / "p_whole", "--resume")
    assert again.already_done and again.env_steps == 600 and again.rollouts == 6
    assert again.checkpoint == whole.checkpoint and again.gradient_step == 130
    cli = _cli(_finetune_args(offline_run / "off", offline_run / "p_whole", "--resume",
                              "--online-steps", "500"))
    out, err = cli.communicate(timeout=300)
    assert cli.returncode == 0 and "already at 600 online env steps (--online-steps 500); " \
        "nothing to do" in out, (out, err)
    assert {name: (offline_run / "p_whole" / name).read_bytes() for name in files} == files
    # Polled once before the start, then after each rollout: True at the third poll.
    stopped = _in_process(offline_run / "off", offline_run / "p_stop", stop_after=3)
    assert stopped.interrupted and stopped.rollouts == 2
    with pytest.raises(ConfigError, match="repeat the finetuning's own flags: --seed 0 "):
        _in_process(offline_run / "off", offline_run / "p_stop", "--resume", "--seed", "1")
    # Moved before it resumes: the directory given is the run, whatever --out it started with;
    # and RUN written another way (as from another working directory) is the same offline run.
    (offline_run / "p_stop").rename(offline_run / "p_moved")
    resumed = _in_process(offline_run / "p_moved" / ".." / "off", offline_run / "p_moved",
                          "--resume")
    assert resumed.checkpoint.name == whole.checkpoint.name == "step_00000130"
    assert resumed.checkpoint.parent == offline_run / "p_moved"
    for file in ("model.safetensors", "replay.safetensors"):
        a, b = (load_file(r.checkpoint / file) for r in (whole, resumed))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_resume_recognizes_the_offline_run_by_its_weights_wherever_it_moved(tmp_path):
    """The offline run moved (or copied) since the finetuning started: RUN names another
    directory, and the resume goes on when the checkpoint there holds the weights it started
    from (their SHA-256, recorded as resolved.run_weights); other weights are refused, naming
    RUN, in one line."""
    from dtlab.cli_errors import parse
    from dtlab.errors import ConfigError
    from dtlab.finetune import FinetuneConfig, _check_resume_settings
    from dtlab.rundir import RunDirectory

    def config(run):
        return parse(FinetuneConfig, _finetune_args(run, tmp_path / "ft")[1:],
                     prog="dtlab finetune", description="")

    moved = tmp_path / "moved" / "step_00000010"
    moved.mkdir(parents=True)
    (moved / "model.safetensors").write_bytes(b"the offline weights")
    started = dataclasses.asdict(config(tmp_path / "gone"))
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "finetune_config.json").write_text(json.dumps({
        **started, "eval_targets": list(started["eval_targets"]), "resolved": {
            "run": str(tmp_path / "gone"),
            "run_weights": hashlib.sha256(b"the offline weights").hexdigest()}}))
    _check_resume_settings(RunDirectory(tmp_path / "ft"), config(tmp_path / "moved"), moved)
    (moved / "model.safetensors").write_bytes(b"trained on since")
    with pytest.raises(ConfigError, match=r"repeat the finetuning's own flags: RUN ") as caught:
        _check_resume_settings(RunDirectory(tmp_path / "ft"), config(tmp_path / "moved"), moved)
    assert "\n" not in str(caught.value)


def test_finetune_of_an_averaged_run_evaluates_the_average_not_the_raw_weights(
        offline_run, tmp_path):
    from dtlab import checkpoint
    from dtlab.config import ModelConfig
    from dtlab.policy import DTPolicy
    from dtlab.rollout import Evaluator
    from dtlab.rundir import RunDirectory
    from dtlab.train import train

    model = ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200, dropout=0.1,
                        policy="stochastic")
    train(train_config(model=model, dataset=str(offline_run / "data.hdf5"), env="Pendulum-v1",
                       out=str(tmp_path / "off"), steps=10, lr=1e-2, warmup_steps=1,
                       batch_size=8, ema_decay=0.9, progress=False, tensorboard=False))
    _in_process(tmp_path / "off", tmp_path / "ft", stop_after=2)  # step 0 and one rollout
    first = RunDirectory(tmp_path / "ft").evaluations()[0]
    assert first.step == 0 and first.weights == "average"
    # Reference: the offline checkpoint (whose model is the average), evaluated by hand with
    # the finetuning's evaluator settings and precision (auto: bf16 on a CPU with native bf16);
    # the raw weights would act otherwise.
    at, _ = checkpoint.load_info(tmp_path / "off")
    weights, info = checkpoint.load(at, "cpu")
    precision = RunDirectory(tmp_path / "ft").saved_precision()
    report = Evaluator("Pendulum-v1", (-100.0,), 1, seed=0, max_steps=100)(
        DTPolicy(weights, info, "cpu", precision=precision))
    assert [r.returns for r in first.results] == [list(r.returns) for r in report.results]
    raw = checkpoint.load_trainer_state(at)["raw_weights"]
    assert any((raw[k] != v).any() for k, v in weights.state_dict().items())


@pytest.mark.slow  # three CLI processes, about 30 s
def test_finetune_resumes_bit_for_bit_after_kill_9(offline_run):
    from safetensors.torch import load_file

    whole = _cli(_finetune_args(offline_run / "off", offline_run / "whole"))
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    assert "online learning curve" in out and (offline_run / "whole" /
                                               "online_learning_curve.png").is_file()
    assert f"checkpoint {offline_run / 'whole' / 'step_00000130'} (gradient step 130)" in out
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


# ---- under torchrun: 2 ranks (gloo on the CPU), started as tests/test_distributed.py does -------
def _two_rank_args(run, out):
    """Rounds of 2 rollouts of 50 steps: 200 online env steps are 2 rounds (4 rollouts)."""
    return ["finetune", str(run), "--env", "Pendulum-v1", "--online-steps", "200", "--out",
            str(out), "--eval-every", "100", "--eval-episodes", "1", "--eval-targets", "-100",
            "--updates-per-rollout", "5", "--replay-trajectories", "6", "--max-episode-steps",
            "50", "--checkpoint-every", "1", "--device", "cpu"]


def _finetune_two_ranks(tmp, run, out, spy, stop_at_poll=None, restart=0, timeout=120,
                        cwds=None):
    """Both ranks' records (tests/ddp_worker.py's finetune_rank; rank r in directory ``cwds[r]``
    when given), the processes joined within ``timeout`` seconds (a rank left waiting at a
    collective fails the test, not hangs it)."""
    import torch
    import torch.multiprocessing as mp

    spy.mkdir()
    context = mp.start_processes(_finetune_rank, args=(
        str(tmp / f"store-{spy.name}"), _two_rank_args(run, out)[1:], str(spy), stop_at_poll,
        restart, cwds and [str(c) for c in cwds]), nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"2-rank finetune did not finish in {timeout} s")
    return [torch.load(spy / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _finetune_rank(rank, *args):  # spawn needs a function importable by name
    sys.path.insert(0, str(ROOT))
    from tests.ddp_worker import finetune_rank

    finetune_rank(rank, *args)


@pytest.fixture(scope="module")
def two_rank_run(offline_run):
    """An uninterrupted 2-rank finetuning into ``ddp_whole`` (a relative --out) and both ranks'
    records. Rank 1 works in a directory of its own, as on a node that does not share rank 0's
    file system: what every rank must do together (the last checkpoint, a collective) is decided
    from what they share, never from reading rank 0's files."""
    (offline_run / "rank1_files").mkdir()
    return _finetune_two_ranks(offline_run, offline_run / "off", Path("ddp_whole"),
                               offline_run / "spy_whole",
                               cwds=[offline_run, offline_run / "rank1_files"])


def test_two_rank_finetune_ranks_hold_the_same_weights_and_replay_in_rank_order(
        offline_run, two_rank_run):
    import gymnasium as gym
    import torch

    r0, r1 = two_rank_run
    # 2 rounds x 2 ranks x 50 env steps; 10 offline steps + 2 rounds x 5 updates.
    assert r0["result"] == ("step_00000020", 200, 4, 3, False)  # evaluated at 0, 100 and 200
    assert r1["result"] == ("step_00000020", 200, 4, 0, False)  # rank 0 alone evaluates
    assert len((offline_run / "ddp_whole" / "evaluations.jsonl").read_text().splitlines()) == 3
    assert list((offline_run / "rank1_files").iterdir()) == []  # rank 0 alone writes
    for key in r0["weights"]:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key
    for key in r0["replay"]:
        assert torch.equal(r0["replay"][key], r1["replay"][key]), key
    # The replay of 6: the 2 best offline episodes, then round 1's rollouts of ranks 0 and 1,
    # then round 2's; each rank's own rollouts as it took them.
    replay = r0["replay"]
    assert replay["lengths"].tolist() == [200, 200, 50, 50, 50, 50]
    online = torch.split(replay["observations"][400:], 50)
    mine = [r0["own"][0], r1["own"][0], r0["own"][1], r1["own"][1]]
    for k, (observations, own) in enumerate(zip(online, mine)):
        assert torch.equal(observations, own["observations"]), k
    # Rollout k starts where Pendulum-v1 resets with the env seed the finetuning documents for
    # it: SeedSequence([seed, 0x0D7, k]) (rank r's in round i is k = 2i + r): distinct per rank.
    env = gym.make("Pendulum-v1")
    for k, observations in enumerate(online):
        seed = int(np.random.SeedSequence([0, 0x0D7, k]).generate_state(1)[0])
        start, _ = env.reset(seed=seed)
        np.testing.assert_array_equal(observations[0].numpy(), start.astype(np.float32))
    env.close()
    # metrics.jsonl, one record per round: the means over its 2 rollouts (one per rank).
    metrics = [json.loads(line) for line in (offline_run / "ddp_whole" / "metrics.jsonl")
               .read_text().splitlines()]
    assert [m["rollout_length"] for m in metrics] == [50.0, 50.0]
    assert all(type(m["rollout_length"]) is float for m in metrics)  # a mean
    for m, pair in zip(metrics, [mine[:2], mine[2:]]):
        assert m["rollout_return"] == pytest.approx(
            np.mean([float(own["rewards"].double().sum()) for own in pair]), rel=1e-6)
    from safetensors.torch import load_file

    saved = load_file(offline_run / "ddp_whole" / "step_00000020" / "model.safetensors")
    assert all(torch.equal(saved[k], r0["weights"][k]) for k in saved)


def test_two_rank_finetuning_resumed_in_one_process_redraws_from_the_finetunings_streams(
        offline_run, two_rank_run, tmp_path, monkeypatch):
    import shutil

    from dtlab.cli_errors import parse
    from dtlab.errors import DtlabWarning
    from dtlab.finetune import FinetuneConfig, finetune

    shutil.copytree(offline_run / "ddp_whole", tmp_path / "ddp_whole")
    monkeypatch.chdir(tmp_path)  # the same --out as the 2-rank run's: a copy of it
    args = _two_rank_args(offline_run / "off", "ddp_whole")[1:]
    args[args.index("--online-steps") + 1] = "250"  # one more rollout of 50 steps
    cfg = parse(FinetuneConfig, [*args, "--resume"], prog="dtlab finetune", description="")
    with pytest.warns(DtlabWarning, match="resuming a run of 2 process") as caught:
        result = finetune(cfg, echo=False)
    assert result.env_steps == 250 and result.gradient_step == 25
    # Not --seed 0's (0, rank, step) streams, which are the offline run's: the finetuning's.
    own = int(np.random.SeedSequence([0, 0x0D7]).generate_state(1)[0])
    assert any(f"restart from (seed {own}, rank, step 20)" in str(w.message) for w in caught)


@pytest.mark.slow  # two spawned processes, about 10 s
def test_two_rank_finetune_signalled_on_one_rank_during_setup_stops_every_rank(offline_run):
    # Rank 1 alone is signalled before the first rollout (its first poll): the ranks decide
    # together, so both stop there (KeyboardInterrupt, as before any checkpoint) and leave
    # nothing behind; a rank stopping alone would leave the other waiting at a collective.
    out = offline_run / "ddp_setup_stop"
    ranks = _finetune_two_ranks(offline_run, offline_run / "off", out,
                                offline_run / "spy_setup_stop", stop_at_poll=1)
    assert [r["result"] for r in ranks] == ["KeyboardInterrupt"] * 2
    assert not out.exists()


@pytest.mark.slow  # two more 2-process runs, about 20 s
def test_two_rank_finetune_stopped_and_restarted_equals_an_uninterrupted_run(
        offline_run, two_rank_run):
    import torch
    from safetensors.torch import load_file

    from dtlab import checkpoint

    out = offline_run / "ddp_stop"
    # Rank 1 alone is signalled, after round 1 (its polls: before the start, after each round):
    # both ranks stop there with a checkpoint.
    stopped = _finetune_two_ranks(offline_run, offline_run / "off", out,
                                  offline_run / "spy_stop", stop_at_poll=2)
    assert [r["result"][1:] for r in stopped] == [(100, 2, 2, True), (100, 2, 0, True)]
    # Started again as torchrun restarts workers (TORCHELASTIC_RESTART_COUNT 1, no --resume).
    resumed = _finetune_two_ranks(offline_run, offline_run / "off", out,
                                  offline_run / "spy_resume", restart=1)
    assert [r["result"] for r in resumed] == [("step_00000020", 200, 4, 1, False),
                                              ("step_00000020", 200, 4, 0, False)]
    whole, again = offline_run / "ddp_whole" / "step_00000020", out / "step_00000020"
    for file in ("model.safetensors", "replay.safetensors"):
        a, b = load_file(whole / file), load_file(again / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    a, b = (checkpoint.load_trainer_state(p) for p in (whole, again))
    for r in (0, 1):  # each rank's own streams, as the uninterrupted run left them
        assert a["ranks"][r]["numpy_rng"] == b["ranks"][r]["numpy_rng"]
        assert torch.equal(a["ranks"][r]["torch_rng"], b["ranks"][r]["torch_rng"])
    assert a["ranks"][0]["numpy_rng"] != a["ranks"][1]["numpy_rng"]
    lines = [[line.split('"timing"')[0] for line in (run / "evaluations.jsonl").read_text()
              .splitlines()] for run in (offline_run / "ddp_whole", out)]
    # Those before the stop kept (env steps 0 and 100: past the checkpoint's gradient step 15),
    # the one after it made by the resumed run.
    assert lines[0] == lines[1] and len(lines[0]) == 3


@pytest.mark.slow  # torchrun, two attempts of 2 processes, about 30 s
def test_two_rank_finetune_killed_and_restarted_by_torchrun_equals_an_uninterrupted_run(
        offline_run, two_rank_run):
    import torch
    from safetensors.torch import load_file

    from tests.torchrun_runs import WORKER, torchrun_once_more_on_teardown_abort

    out = offline_run / "ddp_killed"
    # tests/ddp_worker.py as the script: rank 1 kills itself (SIGKILL) right after gradient step
    # 16 of the first attempt, in round 2, past round 1's checkpoint (step 15); torchrun
    # restarts both workers, which resume from it without --resume.
    proc = torchrun_once_more_on_teardown_abort(
        ["16", *_two_rank_args(offline_run / "off", out)], offline_run, out, restarts=1,
        script=WORKER, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun restarted the workers" in proc.stderr
    assert proc.stdout.count("done: 200 online env steps in 4 rollouts") == 1  # rank 0 reports
    whole, again = offline_run / "ddp_whole" / "step_00000020", out / "step_00000020"
    for file in ("model.safetensors", "replay.safetensors"):
        a, b = load_file(whole / file), load_file(again / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    lines = [[line.split('"timing"')[0] for line in (run / "evaluations.jsonl").read_text()
              .splitlines()] for run in (offline_run / "ddp_whole", out)]
    assert lines[0] == lines[1] and len(lines[0]) == 3
