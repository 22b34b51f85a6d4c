"""``dtlab benchmark``: its plan (cells as ``dtlab train`` command lines that parse back to the
cells' configs; the targets the data supports), its runner (cells as processes: the plan's lines
run by a plain bash loop give the same report as the benchmark itself; Ctrl-C and a rerun), and
its report (last, final, best, swing and gap against hand-computed values, IQM against numpy)."""

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dtlab.rundir import RunDirectory
import tyro
from safetensors.numpy import load_file

from dtlab.behaviour.scripted import pendulum_mixed_dataset
from dtlab.benchmark import datasets, plan, report
from dtlab.benchmark.plan import BenchmarkConfig
from dtlab.cli import main
from dtlab.config import (DataConfig, EvalDuringTraining, ModelConfig, OptimConfig, RunConfig,
                          TrainConfig)
from dtlab.calibrate import CalibrateConfig
from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats import save_episodes
from dtlab.errors import ConfigError
from dtlab.policy import DTPolicy

# The order cells run in: seed-major (every algorithm of seed 0 first).
RUNS = [("mlp-bc", 0), ("decision-transformer", 0), ("mlp-bc", 1), ("decision-transformer", 1)]
TINY = ["--env", "Pendulum-v1", "--algorithms", "mlp-bc", "decision-transformer",
        "--steps", "30", "--eval-every", "15", "--eval-episodes", "1",
        "--model.embed-dim", "16", "--model.n-layers", "1", "--model.context-len", "4",
        "--model.max-ep-len", "200", "--batch-size", "8", "--warmup-steps", "5",
        "--bootstrap-reps", "300", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def pendulum_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "pendulum-small.hdf5"
    save_episodes(pendulum_mixed_dataset(num_episodes=12, seed=0), path)
    return path


def bench_args(data, out, *extra, seeds=("0", "1")):
    return ["benchmark", "--datasets", str(data), *TINY, "--seeds", *seeds, "--out", str(out),
            *extra]


def run_dir(out, algorithm, seed):
    return plan.run_dir(out, "pendulum-small", algorithm, seed)


def naive_iqm(scores):
    """Interquartile mean: drop the lowest and highest quarter (floor(n / 4) each), average."""
    x = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    cut = int(0.25 * x.size)
    return float(x[cut:x.size - cut].mean())


def dtlab_on_path(tmp_path) -> dict:
    """An environment whose `dtlab` is this interpreter's dtlab (these sources)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "dtlab"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m dtlab \"$@\"\n")
    shim.chmod(0o755)
    src = str(Path(plan.__file__).resolve().parents[2])
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


# ---- the plan -------------------------------------------------------------------------------------
def test_train_argv_parses_back_to_the_cells_config():
    """Every field changed from its default, in every group (bools both ways, tuples, negative
    floats, None over a default), becomes flags that dtlab train parses back to the same config."""
    cfg = TrainConfig(
        data=DataConfig("d.hdf5", env="Pendulum-v1", return_scale=123.5, strict=True,
                        top_fraction=0.25),
        model=ModelConfig(embed_dim=16, n_layers=1, context_len=4, activation="gelu",
                          architecture="transformer-bc", dropout=0.0),
        optim=OptimConfig(batch_size=8, lr=3e-4, betas=(0.8, 0.95), schedule="cosine", seed=7,
                          precision="fp32", ema_decay=0.999, skip_nonfinite=True),
        run=RunConfig(out="b/runs/x/seed7", steps=30, resume=True, threads=1, progress=False,
                      tensorboard=False, checkpoint_every_minutes=0.0),
        evaluation=EvalDuringTraining(eval_every=15, eval_episodes=2,
                                      eval_targets=(-150.0, -1234.5)))
    argv = plan.train_argv(cfg)
    assert argv[0] == "train"
    assert tyro.cli(TrainConfig, args=argv[1:]) == cfg
    assert "--no-progress" in argv and "--resume" in argv and "--model.embed-dim" in argv
    calibrate = CalibrateConfig(checkpoint="b/runs/x/seed7", points=3, episodes=2, threads=1)
    argv = plan.calibrate_argv(calibrate)
    assert argv[:2] == ["calibrate", "b/runs/x/seed7"]
    assert tyro.cli(CalibrateConfig, args=argv[1:]) == calibrate


def test_data_fitted_target_where_the_paper_targets_lie_far_beyond_the_data():
    # Hopper's paper targets over a file whose best return is 980.4 (issue 22): 3600 > 1.5 x 980.4.
    returns = np.array([3.5, 400.0, 980.4])
    assert datasets.data_fitted_target((3600.0, 1800.0), returns) == 980.0
    assert datasets.data_fitted_target((1471.0,), returns) == 980.0  # 1471 > 980.4 + 490.2
    assert datasets.data_fitted_target((1470.0,), returns) is None  # within half of 980.4 beyond
    # D4RL hopper-medium-replay's best is about 3190: 3600 is within reach.
    assert datasets.data_fitted_target((3600.0, 1800.0), np.array([100.0, 3190.0])) is None
    # Rounded to 3 significant digits; negative returns (Pendulum): half of max(|best|, range).
    assert datasets.data_fitted_target((5000.0,), np.array([0.0, 1234.5])) == 1230.0
    assert datasets.data_fitted_target((-150.0,), np.array([-1600.0, -1234.0])) == -1230.0
    assert datasets.data_fitted_target((-700.0,), np.array([-1600.0, -1234.0])) is None
    targets, kinds, why = datasets.choose_targets("Hopper-v5", (), returns)
    assert targets == (3600.0, 1800.0, 980.0)
    assert kinds == (datasets.PAPER, datasets.PAPER, datasets.DATA_FITTED)
    assert "data-fitted" in why and "3.7x" in why and "(the DT paper's for Hopper-v5)" in why
    targets, kinds, why = datasets.choose_targets("Hopper-v5", (900.0, 450.0), returns)
    assert targets == (900.0, 450.0) and kinds == (datasets.GIVEN,) * 2 and "--eval-targets" in why


def test_plan_prints_the_cells_with_the_targets_it_chose(tmp_path, capsys):
    """--plan on data far below Pendulum's paper targets: the DT cell is also evaluated at the
    data's best return, the console says so, the target-free cell at one target; --eval-targets
    replaces them. Nothing is trained; the settings and datasets are recorded."""
    from dtlab.behaviour.policies import RandomPolicy
    from dtlab.collect import collect_episodes

    data = tmp_path / "pendulum-random.hdf5"
    episodes = collect_episodes("Pendulum-v1", RandomPolicy.for_env("Pendulum-v1"),
                                num_episodes=3, seed=0)
    save_episodes(episodes, data)
    fitted = float(f"{float(episodes.episode_returns.max()):.3g}")
    assert fitted < -1000  # far below the paper's -150
    out = tmp_path / "bench"
    assert main(bench_args(data, out, "--plan", seeds=("0",))) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and all(line.startswith("dtlab train ") for line in lines)
    mlp, dt = (shlex.split(line) for line in lines)
    targets = dt[dt.index("--eval-targets") + 1:dt.index("--eval-targets") + 5]
    assert [float(t) for t in targets] == [-150.0, -500.0, -900.0, fitted]
    assert mlp[mlp.index("--eval-targets") + 1:][:1] == ["-150.0"]
    assert f"{fitted:g} (data-fitted" in captured.err
    assert not (out / "runs" / "pendulum-random" / "mlp-bc").exists()  # nothing trained
    record = json.loads((out / "runs" / "pendulum-random" / "dataset.json").read_text())
    assert record["target_kinds"] == ["paper", "paper", "paper", "data-fitted"]

    other = tmp_path / "given"
    assert main(bench_args(data, other, "--plan", "--eval-targets", "-1000", "-1400",
                           seeds=("0",))) == 0
    captured = capsys.readouterr()
    dt = shlex.split(captured.out.splitlines()[1])
    assert dt[dt.index("--eval-targets") + 1:][:2] == ["-1000.0", "-1400.0"]
    assert "-1000, -1400 (--eval-targets;" in captured.err


# ---- the runner: the plan's lines in a bash loop == the benchmark --------------------------------
def test_plan_run_by_a_bash_loop_gives_the_same_report_as_the_benchmark(tmp_path):
    """The required property of issue 20: `--plan`'s lines run one by one by bash, then
    `--report-only`, give the same results.json scores as `dtlab benchmark` (here with --jobs 2,
    as processes). Also: the dataset's warning is shown once, not once per cell, and the report's
    numbers are the cells' own evaluation records."""
    data = pendulum_mixed_dataset(num_episodes=12, seed=0)
    path = tmp_path / "pendulum-small.hdf5"  # torques beyond Pendulum's bound of 2: a warning
    save_episodes(EpisodeSet.from_flags(data.observations, data.actions * 3.0, data.rewards,
                                        data.terminations, data.truncations), path)
    env = dtlab_on_path(tmp_path)
    direct, planned = tmp_path / "direct", tmp_path / "planned"

    proc = subprocess.run(["dtlab", *bench_args(path, direct, "--jobs", "2", seeds=("0",))],
                          env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "outside the action bounds" in line]
    assert len(warned) == 1 and warned[0].startswith("dtlab: warning: "), proc.stderr
    assert ("decision-transformer targets -150, -500, -900 (dtlab's defaults for Pendulum-v1; "
            "the data's best return is") in proc.stderr

    lines = subprocess.run(["dtlab", *bench_args(path, planned, "--plan", seeds=("0",))],
                           env=env, capture_output=True, text=True, check=True).stdout
    assert len(lines.splitlines()) == 2
    loop = subprocess.run(["bash", "-c", 'while IFS= read -r line; do bash -c "$line" || exit 1; '
                           'done'], input=lines, env=env, capture_output=True, text=True,
                          check=False)
    assert loop.returncode == 0, loop.stderr[-2000:]
    subprocess.run(["dtlab", "benchmark", "--out", str(planned), "--report-only",
                    "--bootstrap-reps", "300"], env=env, capture_output=True, check=True)

    want = json.loads((direct / plan.RESULTS_JSON).read_text())
    got = json.loads((planned / plan.RESULTS_JSON).read_text())
    assert got["results"] == want["results"] and got["runs_finished"] == 2
    assert {(c["algorithm"], c["target"]) for c in got["results"]} == {
        ("decision-transformer", -150.0), ("decision-transformer", -500.0),
        ("decision-transformer", -900.0), ("mlp-bc", None)}
    for cell in got["results"]:  # the cell's own record: its evaluations.jsonl
        target = -150.0 if cell["target"] is None else cell["target"]
        records = RunDirectory(planned / "runs" / "pendulum-small" / cell["algorithm"]
                               / "seed0").evaluations()
        scores = [r.normalized_mean for e in records for r in e.results if r.target == target]
        assert len(scores) == 2
        assert cell["last"]["per_seed"] == [scores[-1]] and cell["best"]["per_seed"] == [max(scores)]
        assert cell["swing"]["per_seed"] == [abs(scores[1] - scores[0])]
    assert all((planned / p).read_bytes()[:4] == b"\x89PNG" for p in got["plots"])


# ---- the report -----------------------------------------------------------------------------------
def write_cell(out, algorithm, seed, scores, targets, every=10):
    """A cell's run directory as dtlab train leaves it, as far as the report reads it:
    evaluations.jsonl with an evaluation per step (normalized scores; returns x 10)."""
    directory = run_dir(out, algorithm, seed)
    directory.mkdir(parents=True)
    lines = []
    for i, per_target in enumerate(scores):
        step = every * (i + 1)
        lines.append({"step": step, "weights": "raw", "timing": {}, "results": [
            {"target": t, "returns": [10 * s], "lengths": [200], "mean": 10 * s, "std": 0.0,
             "normalized_mean": s, "normalized_std": 0.0} for t, s in zip(targets, per_target)]})
    (directory / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture
def report_dir(tmp_path):
    """A benchmark directory of 3 finished DT seeds (targets -150 and -300, 4 evaluations each),
    2 finished mlp-bc seeds and one unfinished mlp-bc seed (3 of 4 evaluations)."""
    out = tmp_path / "bench"
    dataset = out / "runs" / "pendulum-small"
    dataset.mkdir(parents=True)
    (out / plan.SETTINGS_FILE).write_text(json.dumps({"steps": 40}))
    (dataset / plan.DATASET_FILE).write_text(json.dumps({
        "name": "pendulum-small", "source": "x.hdf5", "env": "Pendulum-v1",
        "targets": [-150.0, -300.0], "target_kinds": ["paper", "data-fitted"],
        "score": "normalized", "behaviour": {"normalized": 50.0, "mean_return": -700.0},
        "episode_returns": [-900.0, -500.0]}))
    dt = {0: [(10, 5), (30, 6), (20, 9), (25, 7)], 1: [(40, 1), (60, 2), (50, 3), (70, 4)],
          2: [(0, 0), (10, 10), (20, 20), (30, 30)]}
    for seed, scores in dt.items():
        write_cell(out, "decision-transformer", seed, scores, (-150.0, -300.0))
    mlp = {0: [(1,), (5,), (2,), (4,)], 1: [(3,), (3,), (3,), (3,)]}
    for seed, scores in mlp.items():
        write_cell(out, "mlp-bc", seed, scores, (-150.0,))
    write_cell(out, "mlp-bc", 2, [(9,), (9,), (9,)], (-150.0,))  # unfinished: 30 of 40 steps
    return out, dt, mlp


def test_report_numbers_against_hand_computed_values(report_dir):
    out, dt, mlp = report_dir
    result = report.build_report(out, BenchmarkConfig(report_only=True, bootstrap_reps=50))
    cells = {(c["algorithm"], c["target"]): c for c in result["results"]}
    assert set(cells) == {("decision-transformer", -150.0), ("decision-transformer", -300.0),
                          ("mlp-bc", None)}
    assert result["runs_finished"] == 5  # the unfinished mlp-bc seed 2 is left out
    assert cells[("mlp-bc", None)]["seeds"] == [0, 1]
    # DT at -150, seeds 0, 1, 2: scores (10, 30, 20, 25), (40, 60, 50, 70), (0, 10, 20, 30).
    c = cells[("decision-transformer", -150.0)]
    assert c["target_kind"] == "paper" and cells[("decision-transformer", -300.0)]["target_kind"] \
        == "data-fitted"
    assert c["last"]["per_seed"] == [25, 70, 30]
    assert c["final"]["per_seed"] == [25, 60, 20]  # the mean of the last 3
    assert c["best"]["per_seed"] == [30, 70, 30]
    assert c["swing"]["per_seed"] == [(20 + 10 + 5) / 3, (20 + 10 + 20) / 3, 10]
    assert c["gap"]["per_seed"] == [5, 0, 0]
    for which in report.MEASURES:
        np.testing.assert_allclose(c[which]["iqm"], naive_iqm(c[which]["per_seed"]), rtol=1e-12)
        np.testing.assert_allclose(c[which]["mean"], np.mean(c[which]["per_seed"]), rtol=1e-12)
    m = cells[("mlp-bc", None)]
    assert m["swing"]["per_seed"] == [(4 + 3 + 2) / 3, 0] and m["gap"]["per_seed"] == [1, 0]
    table = (out / plan.RESULTS_MD).read_text()
    assert "| pendulum-small | mlp-bc | target-free | 2 |" in table
    assert "| pendulum-small | decision-transformer | -300 (data-fitted) | 3 |" in table
    assert "swing: IQM [95% CI] | best − last: IQM [95% CI] |" in table
    assert (out / "plots" / "pendulum-small-learning-curves.png").read_bytes()[:4] == b"\x89PNG"


def test_curve_labels_name_targets_only_where_the_algorithm_reads_them():
    assert report.curve_label("mlp-bc", None, None) == "mlp-bc"
    assert report.curve_label("decision-transformer", 3600.0, "paper") == \
        "decision-transformer @ 3600 (paper)"


def test_iqm_interval_against_numpy():
    """rliable's IQM over a (runs, tasks) matrix equals the 25%-trimmed mean of all its entries,
    and its bootstrap interval contains it; the interval does not depend on numpy's global state."""
    scores = np.random.default_rng(3).normal(50, 20, size=(8, 3))  # (runs, tasks)
    np.random.seed(123)
    iqm, lo, hi = report.iqm_with_ci(scores, reps=500)
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)  # restored
    np.testing.assert_allclose(iqm, naive_iqm(scores), rtol=1e-12)
    assert lo < iqm < hi
    assert report.iqm_with_ci(scores, reps=500) == (iqm, lo, hi)  # seeded: reproducible


# ---- inputs ---------------------------------------------------------------------------------------
def test_benchmark_refuses_other_settings_in_the_same_directory(tmp_path, pendulum_file):
    out = tmp_path / "bench"
    out.mkdir()
    cfg = BenchmarkConfig(datasets=(str(pendulum_file),), env="Pendulum-v1", steps=30, out=str(out))
    (out / plan.SETTINGS_FILE).write_text(json.dumps(plan.settings(cfg)))
    entries = plan.load_datasets(cfg)
    plan.check_settings(out, cfg, entries)
    with pytest.raises(ConfigError, match="steps: 30 -> 40"):
        plan.check_settings(out, dataclasses.replace(cfg, steps=40), entries)
    with pytest.raises(ConfigError, match=r"eval_targets: \[\] -> \[-200.0\]"):
        plan.check_settings(out, dataclasses.replace(cfg, eval_targets=(-200.0,)), entries)
    plan.check_settings(out, dataclasses.replace(cfg, seeds=(5,)), entries)  # seeds may grow


def test_benchmark_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, pendulum_file):
    out = tmp_path / "bench"
    cases = [
        (["--datasets", str(tmp_path / "missing.hdf5"), "--env", "Pendulum-v1"], "file not found"),
        (["--datasets", str(pendulum_file), "--env", "NoSuchEnv-v0"], "unknown environment"),
        (["--datasets", str(pendulum_file), "--env", "Hopper-v5"], "observations"),
        (["--datasets", str(pendulum_file), str(pendulum_file)], "would share the directory"),
        (["--model.architecture", "transformer-bc", "--datasets", str(pendulum_file)],
         "set per cell by --algorithms"),
        (["--datasets", str(pendulum_file), "--eval-targets", "1", "1"], "--eval-targets must"),
        (["--datasets", str(pendulum_file), "--plan", "--report-only"], "give one of them"),
        ([], "--datasets must name at least one"),
        (["--report-only"], "no benchmark here"),
    ]
    for args, message in cases:
        code = main(["benchmark", "--out", str(out), "--no-progress", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_dataset_names():
    assert datasets.dataset_name("data/hopper-medium-v5.hdf5") == "hopper-medium-v5"
    assert datasets.dataset_name("minari:mujoco/hopper/medium-v0") == "mujoco-hopper-medium-v0"
    assert Path(datasets.dataset_name("a b/c d.hdf5")).name == "c_d"


def test_progress_off_a_terminal_prints_a_line_per_cell(capsys):
    """Enabled, but stdout is not a terminal (pytest captures it): no bar, which a log or pipe
    would get only when the benchmark ends, but a line for each cell as it finishes."""
    from dtlab.benchmark.runner import RunProgress

    progress = RunProgress(total=2, done=0, enabled=True)
    progress.start("hopper/dt/seed0")
    progress.finish("hopper/dt/seed0", 12.0)
    progress.close()
    err = capsys.readouterr().err
    assert "cell 1/2 done: hopper/dt/seed0 (12 s; ETA 0:00:12)" in err, err


def test_progress_estimate_counts_rounds_of_jobs():
    from dtlab.benchmark.runner import RunProgress

    progress = RunProgress(total=9, done=2, enabled=False, jobs=4)
    progress.seconds = [100.0, 300.0]  # mean 200 s; 7 cells left: 2 rounds of 4
    assert progress.eta() == "0:06:40"
    progress.done = 8  # one cell left: one round, however many jobs
    assert progress.eta() == "0:03:20"


def test_progress_estimate_counts_the_running_cells_elapsed_time():
    """By hand, jobs 2, cells of 4,000 s: with one of two cells done and the other 3,990 s in,
    10 s are left (the estimate before counted a whole cell, 1:06:40). Two cells more: one
    takes the free slot (4,000 s), the other b's after its 10 s (4,010 s)."""
    from dtlab.benchmark.runner import RunProgress

    now = [0.0]
    progress = RunProgress(total=2, done=0, enabled=False, jobs=2, clock=lambda: now[0])
    progress.start("a")
    progress.start("b")
    now[0] = 3990.0
    progress.finish("a", 4000.0)
    assert progress.running == ["b"]
    assert progress.eta() == "0:00:10"
    progress.total = 4
    assert progress.eta() == "1:06:50"
    progress.start("c")  # c running beside b, d waiting for b's slot: the same end
    assert progress.eta() == "1:06:50"
    now[0] = 5000.0  # b overdue counts as ending now: d 4,000 s from now, c has 2,990 s left
    assert progress.eta() == "1:06:40"


# ---- stopping, continuing, calibrating, refusing (processes: slow) -------------------------------
@pytest.mark.slow
def test_benchmark_stops_on_sigint_and_a_rerun_continues_bit_for_bit(tmp_path, capsys,
                                                                    pendulum_file):
    """SIGINT to the benchmark (as Ctrl-C) stops the running cell's dtlab train with a checkpoint
    (exit 130); the same command again keeps the finished cell and continues the stopped one with
    --resume: its final weights equal one uninterrupted training's."""
    out = tmp_path / "bench"
    longer = ["--steps", "400", "--eval-every", "200"]
    second = run_dir(out, *RUNS[1])
    stop = threading.Event()

    def interrupt_second_cell():
        while not stop.is_set():
            if (second / "train_config.json").is_file():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=interrupt_second_cell)
    watcher.start()
    try:
        code = main(bench_args(pendulum_file, out, *longer, seeds=("0",)))
    finally:
        stop.set()
        watcher.join()
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT, err
    assert "run the same command again to continue" in err
    first_metrics = (run_dir(out, *RUNS[0]) / "metrics.jsonl").read_bytes()
    stopped_at = int((second / "latest").read_text().strip()[len("step_"):])
    assert stopped_at < 400

    assert main(bench_args(pendulum_file, out, *longer, seeds=("0",))) == 0
    capsys.readouterr()
    assert (run_dir(out, *RUNS[0]) / "metrics.jsonl").read_bytes() == first_metrics  # not redone
    from dtlab.train import train

    cfg = BenchmarkConfig(datasets=(str(pendulum_file),), env="Pendulum-v1", steps=400,
                          eval_every=200, eval_episodes=1, threads=1, out=str(tmp_path / "fresh"),
                          model=ModelConfig(embed_dim=16, n_layers=1, context_len=4,
                                            max_ep_len=200),
                          optim=OptimConfig(batch_size=8, warmup_steps=5))
    entry = plan.load_datasets(cfg)[0]
    fresh = plan.cell_train_config(cfg, entry, *RUNS[1])
    result = train(dataclasses.replace(fresh, evaluation=EvalDuringTraining()), entry.episodes)
    a = load_file(second / "step_00000400" / "model.safetensors")
    b = load_file(result.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_benchmark_calibrates_each_dt_cell_after_training_it(tmp_path, pendulum_file):
    """--calibrate: each finished DT cell is calibrated (a dtlab calibrate process); the record is
    in the checkpoint (what DTPolicy reads) and in the report, and the baselines have none."""
    out = tmp_path / "bench"
    assert main(bench_args(pendulum_file, out, "--calibrate", "--calibrate-points", "2",
                           "--calibrate-episodes", "2", seeds=("0",))) == 0
    directory = run_dir(out, "decision-transformer", 0)
    record = json.loads((directory / (directory / "latest").read_text().strip()
                         / "calibration.json").read_text())
    assert len(record["targets"]) == 2 and record["episodes"] == 2
    assert DTPolicy.from_checkpoint(directory).reliable_max_target == record["reliable_max_target"]
    result = json.loads((out / "results.json").read_text())
    assert [(c["seed"], c["reliable_max_target"]) for c in result["calibration"]] == [
        (0, record["reliable_max_target"])]
    assert (out / "plots" / "pendulum-small-calibration.png").stat().st_size > 0


@pytest.mark.slow
def test_a_cell_being_trained_by_another_process_is_refused(tmp_path, capsys, pendulum_file):
    """A cell whose run directory another process holds: the cell's dtlab train refuses, and the
    benchmark says so in one line naming the cell (exit 2); afterwards it runs."""
    from dtlab import locks
    from dtlab.prepare import LOCK_FILE

    out = tmp_path / "bench"
    held = run_dir(out, *RUNS[0])
    held.mkdir(parents=True)
    fd = locks.acquire(held / LOCK_FILE, "training")  # as another dtlab train would hold it
    try:
        code = main(bench_args(pendulum_file, out, seeds=("0",)))
    finally:
        locks.release(fd)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("dtlab: error: cell pendulum-small/mlp-bc/seed0: ")
    assert f"pid {os.getpid()}" in err[-1]
    assert main(bench_args(pendulum_file, out, seeds=("0",))) == 0
