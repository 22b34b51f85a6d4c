"""``dtlab benchmark`` end to end at a tiny budget through the CLI: stopped by SIGINT after its
first run and continued (finished runs are not redone; the interrupted one continues bit for bit),
the report rebuilt with --report-only, its IQM and confidence intervals checked against numpy."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from dtlab import benchmark
from dtlab.cli import main
from dtlab.behaviour.scripted import pendulum_mixed_dataset
from dtlab.config import BenchmarkConfig, EvalDuringTraining, ModelConfig
from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats import save_episodes
from dtlab.errors import ConfigError
from dtlab.policy import DTPolicy

# The order runs are trained in: seed-major (every algorithm of seed 0 first).
RUNS = [("mlp-bc", 0), ("decision-transformer", 0), ("mlp-bc", 1), ("decision-transformer", 1)]


@pytest.fixture(scope="module")
def pendulum_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "pendulum-small.hdf5"
    save_episodes(pendulum_mixed_dataset(num_episodes=12, seed=0), path)
    return path


def bench_args(data, out, *extra):
    return ["benchmark", "--datasets", str(data), "--env", "Pendulum-v1",
            "--algorithms", "mlp-bc", "decision-transformer", "--seeds", "0", "1",
            "--steps", "30", "--eval-every", "15", "--eval-episodes", "1",
            "--model.embed-dim", "16", "--model.n-layers", "1", "--model.context-len", "4",
            "--model.max-ep-len", "200", "--batch-size", "8", "--warmup-steps", "5",
            "--bootstrap-reps", "300", "--no-progress", "--out", str(out), *extra]


def run_files(out):
    return {(a, s): benchmark.run_dir(out, "pendulum-small", a, s) / benchmark.RUN_FILE
            for a, s in RUNS}


def interrupt_second_run(files, stop: threading.Event):
    """Send this process SIGINT (as Ctrl-C does) once the first run has finished and the second
    has started training."""
    while not stop.is_set():
        if files[0].is_file() and (files[1].parent / "train_config.json").is_file():
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.005)


def naive_iqm(scores):
    """Interquartile mean: drop the lowest and highest quarter (floor(n / 4) each), average."""
    x = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    cut = int(0.25 * x.size)
    return float(x[cut:x.size - cut].mean())


def test_benchmark_stops_continues_and_reports(tmp_path, capsys, pendulum_file):
    out = tmp_path / "bench"
    files = run_files(out)
    stop = threading.Event()
    watcher = threading.Thread(target=interrupt_second_run, args=(list(files.values()), stop))
    watcher.start()
    try:
        code = main(bench_args(pendulum_file, out))
    finally:
        stop.set()
        watcher.join()
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT, err
    assert "run the same command again to continue" in err
    done_first = {k: f.read_bytes() for k, f in files.items() if f.is_file()}
    assert list(done_first) == [RUNS[0]]
    metrics_mtime = {k: (files[k].parent / "metrics.jsonl").stat().st_mtime_ns for k in done_first}
    # The run that was stopped has a checkpoint and no run.json: it continues from there.
    stopped = RUNS[1]
    assert (files[stopped].parent / "latest").is_file() and not files[stopped].exists()
    stopped_at = int((files[stopped].parent / "latest").read_text().strip()[len("step_"):])
    assert stopped_at < 30  # stopped mid-run, with a checkpoint

    code = main(bench_args(pendulum_file, out))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert all(f.is_file() for f in files.values())
    for k, content in done_first.items():  # finished runs were not redone
        assert files[k].read_bytes() == content
        assert (files[k].parent / "metrics.jsonl").stat().st_mtime_ns == metrics_mtime[k]

    # The stopped run continued bit for bit: the same weights as one uninterrupted training.
    cfg = BenchmarkConfig(datasets=(str(pendulum_file),), env="Pendulum-v1", steps=30,
                          eval_every=15, eval_episodes=1, model=ModelConfig(
                              embed_dim=16, n_layers=1, context_len=4, max_ep_len=200))
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=8,
                                                             warmup_steps=5))
    entry = benchmark.load_datasets(cfg)[0]
    fresh = benchmark.run_train_config(cfg, entry, *stopped, tmp_path / "fresh")
    from dtlab.train import train

    result = train(dataclasses.replace(fresh, evaluation=EvalDuringTraining()), entry.episodes)
    stopped_run = json.loads(files[stopped].read_text())
    final = files[stopped].parent / stopped_run["checkpoint"] / "model.safetensors"
    a, b = load_file(final), load_file(result.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    report = json.loads((out / benchmark.RESULTS_JSON).read_text())
    assert report["runs_finished"] == 4 and report["runs_expected"] == 4
    cells = {(c["algorithm"], c["target"]): c for c in report["results"]}
    # DT at each of Pendulum's registry targets; mlp-bc once, target-free.
    assert set(cells) == {("decision-transformer", -150.0), ("decision-transformer", -500.0),
                          ("decision-transformer", -900.0), ("mlp-bc", None)}
    for (algorithm, target), cell in cells.items():
        assert cell["seeds"] == [0, 1]
        runs = [json.loads(files[(algorithm, s)].read_text()) for s in (0, 1)]
        per_eval = [[r["normalized_mean"] for e in run["evaluations"] for r in e["results"]
                     if target is None or r["target"] == target] for run in runs]
        assert [e["step"] for e in runs[0]["evaluations"]] == [15, 30]
        last = [scores[-1] for scores in per_eval]
        final_mean = [np.mean(scores[-3:]) for scores in per_eval]  # both evaluations here
        best = [max(scores) for scores in per_eval]
        for which, scores in (("last", last), ("final", final_mean), ("best", best)):
            stats = cell[which]
            np.testing.assert_allclose(stats["per_seed"], scores, rtol=1e-12)
            np.testing.assert_allclose(stats["mean"], np.mean(scores), rtol=1e-12)
            np.testing.assert_allclose(stats["std"], np.std(scores), rtol=1e-12)
            np.testing.assert_allclose(stats["iqm"], naive_iqm(scores), rtol=1e-12)
            lo, hi = stats["ci95"]
            assert min(scores) - 1e-9 <= lo <= stats["iqm"] <= hi <= max(scores) + 1e-9
    behaviour = report["datasets"]["pendulum-small"]["behaviour"]
    from dtlab.data.formats import load_episodes
    from dtlab.envs import PENDULUM_REF_MAX, PENDULUM_REF_MIN

    mean_return = float(load_episodes(pendulum_file).episode_returns.astype(np.float64).mean())
    np.testing.assert_allclose(behaviour["normalized"], 100 * (mean_return - PENDULUM_REF_MIN)
                               / (PENDULUM_REF_MAX - PENDULUM_REF_MIN), rtol=1e-9)
    table = (out / benchmark.RESULTS_MD).read_text()
    assert "| pendulum-small | mlp-bc | target-free | 2 |" in table
    assert "| pendulum-small | behaviour policy (dataset mean) |" in table
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in report["plots"])

    # --report-only rebuilds the same table from the runs alone.
    for name in (benchmark.RESULTS_JSON, benchmark.RESULTS_MD):
        (out / name).unlink()
    assert main(["benchmark", "--out", str(out), "--report-only", "--bootstrap-reps", "300"]) == 0
    rebuilt = json.loads((out / benchmark.RESULTS_JSON).read_text())
    assert rebuilt["results"] == report["results"] and rebuilt["runs_finished"] == 4
    assert (out / benchmark.RESULTS_MD).read_text().splitlines()[4:] == table.splitlines()[4:]


def test_benchmark_calibrates_each_dt_run_after_training_it(tmp_path, pendulum_file):
    """--calibrate: each finished DT run is calibrated in the benchmark's process right after its
    training released the run directory (not refused by its own lock); the record is in run.json,
    in the checkpoint (what DTPolicy reads) and in the report, and the baselines have none."""
    out = tmp_path / "bench"
    args = bench_args(pendulum_file, out, "--calibrate", "--calibrate-points", "2",
                      "--calibrate-episodes", "2")
    del args[args.index("--seeds") + 2]  # seed 0 only
    assert main(args) == 0
    dt = json.loads(run_files(out)[("decision-transformer", 0)].read_text())
    record = dt["calibration"]
    assert len(record["targets"]) == 2 and record["episodes"] == 2
    ckpt = benchmark.run_dir(out, "pendulum-small", "decision-transformer", 0)
    assert DTPolicy.from_checkpoint(ckpt).reliable_max_target == record["reliable_max_target"]
    assert json.loads(run_files(out)[("mlp-bc", 0)].read_text())["calibration"] is None
    report = json.loads((out / "results.json").read_text())
    assert [(c["seed"], c["reliable_max_target"]) for c in report["calibration"]] == [
        (0, record["reliable_max_target"])]
    assert (out / "plots" / "pendulum-small-calibration.png").stat().st_size > 0


def test_iqm_interval_against_numpy():
    """rliable's IQM over a (runs, tasks) matrix equals the 25%-trimmed mean of all its entries,
    and its bootstrap interval contains it; the interval does not depend on numpy's global state."""
    scores = np.random.default_rng(3).normal(50, 20, size=(8, 3))  # (runs, tasks)
    np.random.seed(123)
    iqm, lo, hi = benchmark.iqm_with_ci(scores, reps=500)
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)  # restored
    np.testing.assert_allclose(iqm, naive_iqm(scores), rtol=1e-12)
    assert lo < iqm < hi
    assert benchmark.iqm_with_ci(scores, reps=500) == (iqm, lo, hi)  # seeded: reproducible


def test_benchmark_refuses_other_settings_in_the_same_directory(tmp_path, pendulum_file):
    out = tmp_path / "bench"
    out.mkdir()
    cfg = BenchmarkConfig(datasets=(str(pendulum_file),), env="Pendulum-v1", steps=30, out=str(out))
    entries = benchmark.load_datasets(cfg)
    benchmark.check_settings(out, cfg, entries)
    with pytest.raises(ConfigError, match="steps: 30 -> 40"):
        benchmark.check_settings(out, dataclasses.replace(cfg, steps=40), entries)
    benchmark.check_settings(out, dataclasses.replace(cfg, seeds=(5,)), entries)  # seeds may grow


def test_benchmark_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, pendulum_file):
    out = tmp_path / "bench"
    cases = [
        (["--datasets", str(tmp_path / "missing.hdf5"), "--env", "Pendulum-v1"], "file not found"),
        (["--datasets", str(pendulum_file), "--env", "NoSuchEnv-v0"], "unknown environment"),
        (["--datasets", str(pendulum_file), "--env", "Hopper-v5"], "observations"),
        (["--datasets", str(pendulum_file), str(pendulum_file)], "would share the directory"),
        (["--model.architecture", "transformer-bc", "--datasets", str(pendulum_file)],
         "set per run by algorithms"),
        ([], "datasets must name at least one"),
    ]
    for args, message in cases:
        code = main(["benchmark", "--out", str(out), "--no-progress", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_dataset_names():
    assert benchmark.dataset_name("data/hopper-medium-v5.hdf5") == "hopper-medium-v5"
    assert benchmark.dataset_name("minari:mujoco/hopper/medium-v0") == "mujoco-hopper-medium-v0"
    assert Path(benchmark.dataset_name("a b/c d.hdf5")).name == "c_d"


def weights_and_returns(out):
    """Per run: its final weights and every evaluation's returns."""
    got = {}
    for (algorithm, seed), f in run_files(out).items():
        run = json.loads(f.read_text())
        got[(algorithm, seed)] = (
            load_file(f.parent / run["checkpoint"] / "model.safetensors"),
            [r["returns"] for e in run["evaluations"] for r in e["results"]])
    return got


def test_runs_in_worker_processes_stop_continue_and_equal_one_process(tmp_path, capsys,
                                                                      pendulum_file):
    """--jobs 2: SIGINT to the benchmark stops its workers' runs with checkpoints (exit 130); run
    again, it finishes, and every run equals the one-process benchmark's (weights bit for bit,
    evaluation returns exactly)."""
    longer = ["--steps", "120", "--eval-every", "30", "--threads", "1"]
    parallel = tmp_path / "parallel"
    files = list(run_files(parallel).values())
    stop = threading.Event()

    def interrupt_once_training():
        while not stop.is_set():
            if (files[0].parent / "train_config.json").is_file():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=interrupt_once_training)
    watcher.start()
    try:
        code = main(bench_args(pendulum_file, parallel, *longer, "--jobs", "2"))
    finally:
        stop.set()
        watcher.join()
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT, err
    # The workers' runs stopped mid-way with a checkpoint (the SIGINT reached only the parent,
    # which passed it on); the runs not started yet were not started.
    stopped = [f for f in files if (f.parent / "latest").is_file() and not f.is_file()]
    assert stopped, [sorted(p.name for p in f.parent.iterdir()) for f in files if f.parent.is_dir()]
    assert not files[-1].parent.exists()
    assert main(bench_args(pendulum_file, parallel, *longer, "--jobs", "2")) == 0
    assert main(bench_args(pendulum_file, tmp_path / "one", *longer)) == 0
    capsys.readouterr()
    got, want = weights_and_returns(parallel), weights_and_returns(tmp_path / "one")
    for key, (weights, returns) in want.items():
        assert returns == got[key][1], key
        assert weights.keys() == got[key][0].keys()
        assert all(np.array_equal(weights[k], got[key][0][k]) for k in weights), key
    assert not list(parallel.glob("runs/*/*/seed*/*.tmp*"))  # no half-written files
    # "final" averages each run's last 3 of its 4 evaluations.
    report = json.loads((parallel / benchmark.RESULTS_JSON).read_text())
    for cell in report["results"]:
        per_seed = []
        for seed in cell["seeds"]:
            run = json.loads(run_files(parallel)[(cell["algorithm"], seed)].read_text())
            scores = [r["normalized_mean"] for e in run["evaluations"] for r in e["results"]
                      if cell["target"] is None or r["target"] == cell["target"]]
            assert len(scores) == 4
            per_seed.append(sum(scores[1:]) / 3)
        np.testing.assert_allclose(cell["final"]["per_seed"], per_seed, rtol=1e-12)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_run_being_trained_by_another_process_is_refused(tmp_path, capsys, pendulum_file, jobs):
    """A run locked by another process: a one-line error naming it (exit 2); with --jobs 2 the
    error comes from a worker, and the run training beside it stops."""
    out = tmp_path / "bench"
    locked = RUNS[0] if jobs == 1 else RUNS[2]
    with benchmark.run_lock(out, "pendulum-small", *locked):  # as another process would hold it
        code = main(bench_args(pendulum_file, out, "--jobs", str(jobs), "--threads", "1"))
    err = capsys.readouterr().err.strip()
    run = benchmark.run_dir(out, "pendulum-small", *locked)
    assert code == 2
    assert err == (f"dtlab: error: {run}: another process (pid {os.getpid()}, training) holds "
                   "this run; let it finish or stop it, then run the benchmark again")
    assert not run.exists()  # nothing trained
    assert not run_files(out)[RUNS[3]].exists()  # the last run did not finish (nor start, unless
    # two slots freed at once with --jobs 2; it was then stopped)
    assert main(bench_args(pendulum_file, out, "--jobs", str(jobs))) == 0  # the lock is free again
    assert all(f.is_file() for f in run_files(out).values())


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_dataset_warning_is_shown_once_on_one_line(tmp_path, jobs):
    """The checks before the runs warn about the data once; neither the runs (which prepare the
    data again) nor the --jobs workers (fresh processes, the CLI's format unset) repeat it."""
    data = pendulum_mixed_dataset(num_episodes=4, seed=0)
    path = tmp_path / "wide-actions.hdf5"  # torques beyond Pendulum's bound of 2
    save_episodes(EpisodeSet.from_flags(data.observations, data.actions * 3.0, data.rewards,
                                        data.terminations, data.truncations), path)
    # A process of its own: pytest records warnings itself, and the CLI's format is the point.
    proc = subprocess.run([sys.executable, "-m", "dtlab.cli", *bench_args(
        path, tmp_path / "bench", "--steps", "6", "--eval-every", "6", "--jobs", str(jobs),
        "--threads", "1")], capture_output=True, text=True, check=False)
    err = proc.stderr
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if "outside the action bounds" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("dtlab: warning: ") and path.name in lines[0]


def test_progress_estimate_counts_rounds_of_jobs():
    progress = benchmark.RunProgress(total=9, done=2, enabled=False, jobs=4)
    progress.seconds = [100.0, 300.0]  # mean 200 s; 7 runs left: 2 rounds of 4
    assert progress.eta() == "0:06:40"
    progress.done = 8  # one run left: one round, however many jobs
    assert progress.eta() == "0:03:20"
