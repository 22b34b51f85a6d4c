"""``dtlab benchmark``: the DT paper's protocol as one resumable command.

For every dataset x algorithm x seed: train ``steps`` gradient steps with dtlab's own sampler and
``train_step``, evaluate every ``eval_every`` steps and at the end, and report per cell the last
score of each run, the mean of its last ``FINAL_EVALUATIONS`` (3) and its best, over seeds as
mean ± std and as the interquartile mean (IQM) with a 95% stratified-bootstrap confidence
interval (rliable: Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice"),
beside the behaviour policy's score (the dataset's mean
episode return). Scores are D4RL normalized scores when the env has reference returns (dtlab's
env registry or the dataset's metadata), else raw returns.

Algorithms (``ModelConfig.architecture`` names the network):

- decision-transformer: evaluated at each of the env's target returns (the DT paper's: Hopper
  3600/1800, HalfCheetah 12000/6000, Walker2d 5000/2500);
- transformer-bc: the same transformer without return-to-go tokens;
- mlp-bc: an MLP on single states, trained on windows of length 1;
- percentile-bc: mlp-bc on the best ``top_fraction`` of the data (the DT paper's %BC).

The three baselines ignore the target: each evaluation point is one rollout (conditioned on the
env's first target, which they do not read), reported target-free (``target: null``).

Layout of OUT::

    benchmark.json                       the settings every run shares (checked when continuing)
    runs/<dataset>/dataset.json          source, env, targets, episode returns, behaviour score
    runs/<dataset>/<algorithm>/seed<k>/  a dtlab training run (continued through train's own
                                         resume), evaluations.json (every evaluation so far),
                                         run.json once finished
    results.json, results.md, plots/     rebuilt from the finished runs at the end of every call

Stopping (Ctrl-C, SIGTERM, kill -9) and running the same command again continues: finished runs
(run.json) are not redone, an unfinished one resumes bit for bit from its latest checkpoint.

``jobs`` > 1 trains that many runs at a time, each in a worker process (spawned; a run's results
do not depend on which process trains it). While a run trains, its process holds an exclusive
lock (``fcntl.flock``) on ``runs/<dataset>/.<algorithm>-seed<k>.lock``, which the OS releases
however the process ends: a second process that reaches the same run (another benchmark call on
the same OUT, or a worker left over from a killed one) gets a ConfigError instead of training it
at the same time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtlab import checkpoint, locks, runtime
from dtlab.atomic import write_json, write_text_atomic
from dtlab.config import (ALGORITHMS, BenchmarkConfig, CalibrateConfig, DataConfig,
                          EvalDuringTraining, RunConfig, TrainConfig, setting_differences)
from dtlab.data.episodes import EpisodeSet
from dtlab.data.returns import normalized_score
from dtlab.envs import env_info, make_env, reference_scores
from dtlab.errors import ConfigError, DtlabWarning, one_line_warning
from dtlab.rollout import Evaluator, RolloutReport

RUNS_DIR, PLOTS_DIR = "runs", "plots"
SETTINGS_FILE, DATASET_FILE, RUN_FILE, EVALUATIONS_FILE = (
    "benchmark.json", "dataset.json", "run.json", "evaluations.json")
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
TARGET_FREE = frozenset({"transformer-bc", "mlp-bc", "percentile-bc"})
BOOTSTRAP_SEED = 0  # the report's bootstrap is seeded: rebuilding it gives the same intervals
# "final": the mean of each run's last evaluations. On data where the policy swings between
# evaluations (hopper-medium-replay: 30-60 points 2,500 steps apart, docs/results.md) the last
# evaluation alone is one noisy sample of the curve.
FINAL_EVALUATIONS = 3


# ---- datasets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the benchmark: its directory name, source, env and evaluation targets."""

    name: str
    source: str
    env: str
    targets: tuple[float, ...]
    episodes: EpisodeSet


def dataset_name(source: str) -> str:
    """Directory name of a dataset: a file's name without its suffix (hopper-medium-v5.hdf5 ->
    hopper-medium-v5), a Minari id with '/' as '-' (minari:mujoco/hopper/medium-v0 ->
    mujoco-hopper-medium-v0)."""
    name = source[len("minari:"):].replace("/", "-") if source.startswith("minari:") \
        else Path(source).stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "dataset"


def load_datasets(cfg: BenchmarkConfig) -> list[DatasetEntry]:
    """Load every dataset and pick its env (--env, else its recorded env_id) and targets (the env
    registry's). ConfigError when two datasets share a name, a dataset records no env, or dtlab
    knows no targets for its env; DatasetError for unreadable data."""
    from dtlab.data.formats import load_episodes

    entries: list[DatasetEntry] = []
    seen: dict[str, str] = {}
    for source in cfg.datasets:
        name = dataset_name(source)
        if name in seen:
            raise ConfigError(f"datasets: {seen[name]} and {source} would share the directory "
                              f"{RUNS_DIR}/{name}; rename one")
        seen[name] = source
        episodes = load_episodes(source)
        env = cfg.env or episodes.provenance.env_id
        if not isinstance(env, str) or not env:
            raise ConfigError(f"{source}: the dataset records no env_id; set env")
        make_env(env).close()  # EnvError for an id Gymnasium does not know
        targets = env_info(env).targets
        if not targets:
            raise ConfigError(f"{source}: dtlab knows no target returns for {env} (env registry, "
                              "dtlab/envs.py)")
        entries.append(DatasetEntry(name, source, env, tuple(targets), episodes))
    return entries


def dataset_record(entry: DatasetEntry) -> dict[str, Any]:
    """dataset.json: what the report needs about a dataset without loading it again."""
    stats = entry.episodes.return_stats
    recorded = entry.episodes.provenance
    ref_min, ref_max = reference_scores(entry.env, recorded.ref_min_score, recorded.ref_max_score)
    return {
        "name": entry.name, "source": entry.source, "env": entry.env,
        "targets": list(entry.targets), "episodes": entry.episodes.num_episodes,
        "transitions": entry.episodes.num_transitions,
        "score": "normalized" if ref_min is not None else "return",
        "ref_min_score": ref_min, "ref_max_score": ref_max,
        "behaviour": {"mean_return": stats.mean, "std_return": stats.std,
                      "normalized": None if ref_min is None
                      else float(normalized_score(stats.mean, ref_min, ref_max))},
        "episode_returns": entry.episodes.episode_returns.astype(np.float64).tolist(),
    }


# ---- one run --------------------------------------------------------------------------------------
def run_dir(out: Path, dataset: str, algorithm: str, seed: int) -> Path:
    return out / RUNS_DIR / dataset / algorithm / f"seed{seed}"


def run_train_config(cfg: BenchmarkConfig, entry: DatasetEntry, algorithm: str, seed: int,
                     directory: Path) -> TrainConfig:
    """The training run of one cell and seed: the benchmark's model and optim groups with the
    algorithm's architecture (mlp-bc: context_len 1), this seed, checkpoints at every
    evaluation, resume when the directory holds a run."""
    from dtlab.rundir import TRAIN_CONFIG_FILE

    architecture = "mlp-bc" if algorithm in ("mlp-bc", "percentile-bc") else algorithm
    model = dataclasses.replace(cfg.model, architecture=architecture,
                                **({"context_len": 1} if architecture == "mlp-bc" else {}))
    resume = ((directory / TRAIN_CONFIG_FILE).is_file()
              or (directory / checkpoint.LATEST_FILE).is_file())
    return TrainConfig(
        data=DataConfig(dataset=entry.source, env=entry.env,
                        top_fraction=cfg.top_fraction if algorithm == "percentile-bc" else None),
        model=model, optim=dataclasses.replace(cfg.optim, seed=seed),
        run=RunConfig(out=str(directory), steps=cfg.steps, resume=resume,
                      checkpoint_every=cfg.eval_every, keep_checkpoints=2,
                      log_every=min(100, cfg.steps), device=cfg.device, threads=cfg.threads,
                      progress=False, tensorboard=False),
        evaluation=EvalDuringTraining(eval_every=cfg.eval_every, eval_episodes=cfg.eval_episodes,
                                      eval_targets=eval_targets(entry, algorithm)))


def eval_targets(entry: DatasetEntry, algorithm: str) -> tuple[float, ...]:
    """The env's targets; one (unread) target for the target-free baselines."""
    return entry.targets[:1] if algorithm in TARGET_FREE else entry.targets


@dataclass(frozen=True)
class RecordingEvaluator:
    """Evaluation during a benchmark run: rolls out (``dtlab.rollout.Evaluator``) and records the
    report under its step in ``path`` (evaluations.json), so that evaluations made before an
    interruption survive; a resumed run that evaluates a step again replaces its record (with
    the same numbers: rollouts are deterministic)."""

    evaluator: Evaluator
    path: Path

    def __call__(self, policy) -> RolloutReport:
        report = self.evaluator(policy)
        records = _read_json(self.path) if self.path.is_file() else {}
        step = int(policy.info.step)
        records[str(step)] = {"step": step,
                              "results": [dataclasses.asdict(r) for r in report.results],
                              "timing": report.timing()}
        write_json(self.path, records)
        return report


def run_one(cfg: BenchmarkConfig, entry: DatasetEntry, algorithm: str, seed: int,
            should_stop: Callable[[], bool]) -> dict | None:
    """Train and evaluate one run, or continue it; returns its run.json record, or None when
    ``should_stop`` interrupted it (its latest checkpoint is then where it continues)."""
    from dtlab.train import train

    directory = run_dir(Path(cfg.out), entry.name, algorithm, seed)
    done = directory / RUN_FILE
    with run_lock(Path(cfg.out), entry.name, algorithm, seed):  # until run.json is written
        if done.is_file():
            record = _read_json(done)
            if (cfg.calibrate and algorithm == "decision-transformer"
                    and not record.get("calibration")):
                record["calibration"] = _calibrate(cfg, entry, directory / record["checkpoint"])
                write_json(done, record)
            return record
        targets = eval_targets(entry, algorithm)
        evaluator = RecordingEvaluator(
            Evaluator(entry.env, targets, cfg.eval_episodes, seed=seed * cfg.eval_episodes),
            directory / EVALUATIONS_FILE)
        result = train(run_train_config(cfg, entry, algorithm, seed, directory), entry.episodes,
                       evaluator=evaluator, should_stop=should_stop)
        if result.interrupted:
            return None
        records = _read_json(directory / EVALUATIONS_FILE).values()
        record = {
            "dataset": entry.name, "algorithm": algorithm, "seed": seed, "steps": result.steps,
            "target_free": algorithm in TARGET_FREE, "eval_targets": list(targets),
            "eval_episodes": cfg.eval_episodes,
            "checkpoint": str(result.checkpoint.relative_to(directory)),
            "evaluations": sorted((r for r in records if r["step"] <= result.steps),
                                  key=lambda r: r["step"]),
            "calibration": None,
        }
        if cfg.calibrate and algorithm == "decision-transformer":
            record["calibration"] = _calibrate(cfg, entry, result.checkpoint)
        write_json(done, record)
        return record


@contextlib.contextmanager
def run_lock(out: Path, dataset: str, algorithm: str, seed: int):
    """Hold the exclusive lock of one run while it trains (module docstring; ``dtlab.locks``).
    ConfigError, naming the run and the holder's pid, when another process holds it or removed
    its lock file meanwhile. Where nothing can be locked (Windows) nothing is."""
    path = out / RUNS_DIR / dataset / f".{algorithm}-seed{seed}.lock"
    run = run_dir(out, dataset, algorithm, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = locks.acquire(path, "training")
    except (FileNotFoundError, locks.Replaced):
        raise ConfigError(f"{run}: its lock file {path.name} was removed or replaced while this "
                          "process was opening it; run the benchmark again") from None
    except locks.Held as held:
        raise ConfigError(f"{run}: {held.holder()} holds this run; let it finish or stop it, "
                          "then run the benchmark again") from None
    try:
        yield
    finally:
        locks.release(fd)


def _calibrate(cfg: BenchmarkConfig, entry: DatasetEntry, ckpt: Path) -> dict:
    from dtlab.evaluate import calibrate_checkpoint

    return calibrate_checkpoint(CalibrateConfig(
        checkpoint=str(ckpt), points=cfg.calibrate_points, episodes=cfg.calibrate_episodes,
        device=cfg.device, threads=cfg.threads), episodes=entry.episodes)


# ---- the benchmark --------------------------------------------------------------------------------
def settings(cfg: BenchmarkConfig) -> dict[str, Any]:
    """What every run of one benchmark directory must share (benchmark.json); datasets,
    algorithms and seeds may be added in later calls."""
    optim = dataclasses.asdict(cfg.optim)
    del optim["seed"]  # each run's seed
    return json.loads(json.dumps({
        "steps": cfg.steps, "eval_every": cfg.eval_every, "eval_episodes": cfg.eval_episodes,
        "top_fraction": cfg.top_fraction, "model": dataclasses.asdict(cfg.model),
        "optim": optim}))


def check_settings(out: Path, cfg: BenchmarkConfig, entries: list[DatasetEntry]) -> None:
    """Refuse to continue a benchmark directory with other settings or another file under a
    dataset's name (ConfigError naming the differences); records them on the first call."""
    path, now = out / SETTINGS_FILE, settings(cfg)
    if path.is_file():
        saved = _read_json(path)
        differ = setting_differences(saved, now)
        if differ:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ)
            raise ConfigError(f"{path}: this benchmark ran with other settings ({shown}); continue "
                              "with the same settings or use another --out")
    for entry in entries:
        file = out / RUNS_DIR / entry.name / DATASET_FILE
        if file.is_file() and _read_json(file).get("source") != entry.source:
            raise ConfigError(f"{file}: runs under the name {entry.name} used "
                              f"{_read_json(file).get('source')}, not {entry.source}")
    if not path.is_file():
        write_json(path, now)


@dataclass
class BenchmarkResult:
    report: dict  # results.json's content
    interrupted: bool
    trained: int  # runs finished in this call


def run_benchmark(cfg: BenchmarkConfig, *, should_stop: Callable[[], bool] = lambda: False,
                  echo: bool = False) -> BenchmarkResult:
    """Run (or continue) every dataset x algorithm x seed of ``cfg``, then rebuild the report from
    the finished runs (``--report-only``: only that). ``should_stop`` is polled every training
    step (the CLI wires SIGINT/SIGTERM to it): the current run stops with a checkpoint.
    Raises DtlabError subclasses for bad datasets or settings before any run starts."""
    out = Path(cfg.out)
    if cfg.report_only:
        if not (out / SETTINGS_FILE).is_file():
            raise ConfigError(f"{out}: no benchmark here (no {SETTINGS_FILE}); nothing to report")
        return BenchmarkResult(build_report(out, cfg, echo=echo), False, 0)
    from dtlab.train import prepare

    with _shown_once() as shown:  # what the checks warn about, the runs do not repeat
        entries = load_datasets(cfg)
        for entry in entries:  # every check that can fail on bad input, before anything is written
            for algorithm in cfg.algorithms:
                prepare(run_train_config(cfg, entry, algorithm, cfg.seeds[0], out / "-"),
                        entry.episodes)
        check_settings(out, cfg, entries)
    for entry in entries:
        write_json(out / RUNS_DIR / entry.name / DATASET_FILE, dataset_record(entry))
    # Seed-major: each seed completes every dataset x algorithm before the next seed starts, so a
    # benchmark stopped early already compares every algorithm on the seeds it finished.
    grid = [(e, a, s) for s in cfg.seeds for e in entries for a in cfg.algorithms]
    finished = sum(_finished(out, e.name, a, s) for e, a, s in grid)
    progress = RunProgress(len(grid), finished, enabled=cfg.progress, jobs=cfg.jobs)
    try:
        if cfg.jobs > 1:
            interrupted, trained = _run_in_workers(cfg, grid, progress, should_stop, shown)
        else:
            with warnings.catch_warnings():
                _ignore_warnings(shown)
                interrupted, trained = _run_in_order(cfg, grid, progress, should_stop)
    finally:
        progress.close()
    return BenchmarkResult(build_report(out, cfg, expected=len(grid), echo=echo), interrupted,
                           trained)


@contextlib.contextmanager
def _shown_once():
    """Show the warnings the block raises as usual (also when it raises) and yield the list of
    the DtlabWarning messages among them, filled when the block ends: every run's ``prepare``
    repeats the checks, and in ``--jobs`` workers (fresh processes) Python's once-per-location
    rule would not hold them back."""
    messages: list[str] = []
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield messages
    finally:
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        messages.extend(dict.fromkeys(str(w.message) for w in caught
                                      if issubclass(w.category, DtlabWarning)))


def _ignore_warnings(messages: Sequence[str]) -> None:
    """Filter out the DtlabWarnings whose message is exactly one of ``messages``."""
    for message in messages:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z",
                                category=DtlabWarning)


def _finished(out: Path, dataset: str, algorithm: str, seed: int) -> bool:
    return run_dir(out, dataset, algorithm, seed).joinpath(RUN_FILE).is_file()


def _label(entry: DatasetEntry, algorithm: str, seed: int) -> str:
    return f"{entry.name}/{algorithm}/seed{seed}"


def _timed_run(cfg: BenchmarkConfig, entry: DatasetEntry, algorithm: str, seed: int,
               should_stop: Callable[[], bool]) -> tuple[bool, bool, float]:
    """``run_one``, timed: (finished, finished before this call, seconds)."""
    was_done = _finished(Path(cfg.out), entry.name, algorithm, seed)
    started = time.perf_counter()
    complete = run_one(cfg, entry, algorithm, seed, should_stop) is not None
    return complete, was_done, time.perf_counter() - started


def _run_in_order(cfg: BenchmarkConfig, grid: list, progress: "RunProgress",
                  should_stop: Callable[[], bool]) -> tuple[bool, int]:
    """Train the runs of ``grid`` one after the other in this process; returns (interrupted,
    runs trained)."""
    trained = 0
    for entry, algorithm, seed in grid:
        if should_stop():
            return True, trained
        label = _label(entry, algorithm, seed)
        progress.start(label)
        complete, was_done, seconds = _timed_run(cfg, entry, algorithm, seed, should_stop)
        if not complete:
            return True, trained
        trained += not was_done
        progress.finish(label, None if was_done else seconds)
    return False, trained


# ---- runs in worker processes (--jobs) ------------------------------------------------------------
_WORKER: dict[str, Any] = {}  # a worker process's settings, stop test and current dataset


def _worker_start(cfg: BenchmarkConfig, stop, shown: tuple[str, ...], one_line: bool) -> None:
    """Initializer of a worker process. Its runs stop (with a checkpoint, as in one process) when
    the parent sets ``stop`` (a shared bool without a lock: a worker killed while reading it
    cannot leave it locked), when this process receives SIGINT or SIGTERM (Ctrl-C reaches the
    whole process group), or when the parent dies; a worker whose parent died exits as soon as
    its run has stopped, so none is left behind. Warnings: the parent's messages ``shown``
    already are not repeated; ``one_line``: formatted as the CLI formats them."""
    import multiprocessing
    import signal
    import threading

    _ignore_warnings(shown)
    if one_line:
        warnings.formatwarning = one_line_warning
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    orphaned = threading.Event()
    busy = threading.Lock()  # held while a run trains

    def watch_parent() -> None:
        from multiprocessing.connection import wait

        wait([multiprocessing.parent_process().sentinel])  # returns when the parent has exited
        orphaned.set()
        with busy:  # the run (if any) stops at its next step, with a checkpoint
            os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    _WORKER.update(cfg=cfg, entry=None, busy=busy, should_stop=lambda: bool(
        received or stop.value or orphaned.is_set()))


def _worker_run(source: str, algorithm: str, seed: int) -> tuple[bool, bool, float]:
    """One run in a worker: (finished, finished before this call, seconds)."""
    cfg, should_stop = _WORKER["cfg"], _WORKER["should_stop"]
    with _WORKER["busy"]:
        entry = _WORKER["entry"]
        if entry is None or entry.source != source:  # one dataset in memory at a time
            _WORKER["entry"] = None
            entry = _WORKER["entry"] = load_datasets(
                dataclasses.replace(cfg, datasets=(source,)))[0]
        try:
            return _timed_run(cfg, entry, algorithm, seed, should_stop)
        except KeyboardInterrupt:  # stopped before its first step (dtlab.train): nothing written
            return False, _finished(Path(cfg.out), entry.name, algorithm, seed), 0.0


def _run_in_workers(cfg: BenchmarkConfig, grid: list, progress: "RunProgress",
                    should_stop: Callable[[], bool], shown: Sequence[str] = ()
                    ) -> tuple[bool, int]:
    """Train the runs of ``grid`` in order, ``cfg.jobs`` at a time in spawned worker processes;
    returns (interrupted, runs trained). A run's error stops the others (each at its next step,
    with a checkpoint) and is raised here; so is a TrainingError when a worker process dies.
    Whatever ends this function (an exception in this process included), the workers' runs stop
    first, with checkpoints."""
    import concurrent.futures as cf
    import ctypes
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    from dtlab.errors import TrainingError

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.RawValue(ctypes.c_bool, False)
    threads = cfg.threads
    if threads is None and runtime.omp_threads() is None:
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs)  # the cores, shared out
    worker_cfg = dataclasses.replace(cfg, threads=threads, progress=False)
    todo, running = list(grid), {}
    interrupted, trained, error = False, 0, None

    def broken(labels) -> TrainingError:
        return TrainingError(
            f"a benchmark worker process died (killed, or out of memory?) while training "
            f"{', '.join(labels) or 'nothing'}; the other runs stopped with checkpoints: run the "
            "same command again to continue")

    with cf.ProcessPoolExecutor(cfg.jobs, mp_context=ctx, initializer=_worker_start,
                                initargs=(worker_cfg, stop, tuple(shown),
                                          warnings.formatwarning is one_line_warning)) as pool:
        try:
            while todo or running:
                while todo and len(running) < cfg.jobs and not stop.value:
                    entry, algorithm, seed = todo.pop(0)
                    label = _label(entry, algorithm, seed)
                    try:
                        future = pool.submit(_worker_run, entry.source, algorithm, seed)
                    except BrokenProcessPool:
                        error = error or broken(list(running.values()))
                        stop.value = True
                        break
                    progress.start(label)
                    running[future] = label
                if not running:
                    break
                finished, _ = cf.wait(running, timeout=0.1, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    label = running.pop(future)
                    try:
                        complete, was_done, seconds = future.result()
                    except BrokenProcessPool:
                        if not (stop.value or should_stop()):
                            error = error or broken([label, *running.values()])
                        interrupted = True
                        stop.value = True
                        continue
                    except BaseException as exc:  # noqa: BLE001 - raised below, once all stopped
                        error = error or exc
                        stop.value = True
                        continue
                    if not complete:
                        interrupted = True
                        stop.value = True
                    elif was_done:
                        progress.finish(label, None)
                    else:
                        trained += 1
                        progress.finish(label, seconds)
                if not stop.value and (todo or running) and should_stop():
                    interrupted = True
                    stop.value = True
        finally:
            stop.value = True  # e.g. KeyboardInterrupt here: the workers stop, then the pool ends
    if error is not None:
        raise error
    return interrupted, trained


class RunProgress:
    """Runs done / total and an estimate of the time left (the mean time of the runs trained in
    this call, times the rounds of ``jobs`` runs left); a rich bar, or one printed line per run
    when disabled."""

    def __init__(self, total: int, done: int, enabled: bool, jobs: int = 1) -> None:
        self.total, self.done, self.enabled, self.jobs = total, done, enabled, jobs
        self.seconds: list[float] = []
        self.running: list[str] = []
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("ETA {task.fields[eta]}  {task.fields[run]}"))
            self._bar.start()
            self._task = self._bar.add_task("runs", total=total, completed=done, eta="-",
                                            run="")

    def eta(self) -> str:
        if not self.seconds:
            return "-"
        rounds = -(-(self.total - self.done) // self.jobs)  # runs left, trained jobs at a time
        left = round(rounds * sum(self.seconds) / len(self.seconds))
        return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"

    def start(self, label: str) -> None:
        self.running.append(label)
        if self._bar is not None:
            self._bar.update(self._task, run=", ".join(self.running))

    def finish(self, label: str, seconds: float | None) -> None:
        """``seconds`` None: the run had finished before this call (counted, not timed)."""
        if label in self.running:
            self.running.remove(label)
        if seconds is None:
            if self._bar is not None:
                self._bar.update(self._task, run=", ".join(self.running))
            return
        self.done += 1
        self.seconds.append(seconds)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, eta=self.eta(),
                             run=", ".join(self.running))
        else:
            print(f"run {self.done}/{self.total} done: {label} ({seconds:.0f} s; ETA {self.eta()})",
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ---- the report -----------------------------------------------------------------------------------
def iqm_with_ci(scores: np.ndarray, reps: int) -> tuple[float, float, float]:
    """Interquartile mean of ``scores`` (runs, tasks) and its 95% stratified-bootstrap confidence
    interval (rliable's ``get_interval_estimates`` with ``metrics.aggregate_iqm``, percentile
    method, resampling runs within each task). rliable draws from numpy's global generator; it
    is seeded with BOOTSTRAP_SEED here and restored afterwards."""
    from rliable import library, metrics

    state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)
    try:
        point, interval = library.get_interval_estimates(
            {"scores": np.asarray(scores, dtype=np.float64)},
            lambda s: np.array([metrics.aggregate_iqm(s)]), reps=reps)
    finally:
        np.random.set_state(state)
    return float(point["scores"][0]), float(interval["scores"][0, 0]), float(interval["scores"][1, 0])


def _stats(per_run: np.ndarray, matrix: np.ndarray, reps: int) -> dict[str, Any]:
    """mean ± std (over runs, ddof 0) of the per-run scores, and the IQM of the (runs, tasks)
    matrix with its CI."""
    iqm, lo, hi = iqm_with_ci(matrix, reps)
    return {"per_seed": per_run.tolist(), "mean": float(per_run.mean()),
            "std": float(per_run.std()), "iqm": iqm, "ci95": [lo, hi]}


def run_curves(run: dict, kind: str) -> dict[float | None, list[tuple[int, float]]]:
    """Per target (None for a target-free run): the (step, score) of every evaluation; the score
    is the normalized mean return (kind "normalized") or the mean return."""
    curves: dict[float | None, list[tuple[int, float]]] = {}
    for evaluation in run["evaluations"]:
        for r in evaluation["results"]:
            key = None if run["target_free"] else float(r["target"])
            value = r["normalized_mean"] if kind == "normalized" else r["mean"]
            curves.setdefault(key, []).append(
                (int(evaluation["step"]), float("nan") if value is None else float(value)))
    return curves


def _algorithm_order(name: str) -> tuple[int, str]:
    return (ALGORITHMS.index(name) if name in ALGORITHMS else len(ALGORITHMS), name)


def build_report(out: Path, cfg: BenchmarkConfig | None = None, *, expected: int | None = None,
                 echo: bool = False) -> dict:
    """results.json, results.md and plots/ from every finished run under ``out`` (and the
    datasets' dataset.json); returns results.json's content."""
    reps = cfg.bootstrap_reps if cfg is not None else 2000
    datasets = {d["name"]: d for d in map(_read_json, sorted(out.glob(f"{RUNS_DIR}/*/{DATASET_FILE}")))}
    runs = [r for r in map(_read_json, sorted(out.glob(f"{RUNS_DIR}/*/*/seed*/{RUN_FILE}")))
            if r.get("dataset") in datasets]
    runs.sort(key=lambda r: (r["dataset"], _algorithm_order(r["algorithm"]), r["seed"]))
    # cells[(dataset, algorithm, target)][seed] = [(step, score), ...]
    cells: dict[tuple[str, str, float | None], dict[int, list[tuple[int, float]]]] = {}
    for run in runs:
        kind = datasets[run["dataset"]]["score"]
        for target, curve in run_curves(run, kind).items():
            cells.setdefault((run["dataset"], run["algorithm"], target), {})[run["seed"]] = curve
    results = []
    for (name, algorithm, target), by_seed in cells.items():
        seeds = sorted(by_seed)
        last = np.array([by_seed[s][-1][1] for s in seeds])  # (seeds,)
        best = np.array([max(v for _, v in by_seed[s]) for s in seeds])  # (seeds,)
        final = np.array([np.mean([v for _, v in by_seed[s][-FINAL_EVALUATIONS:]])
                          for s in seeds])  # (seeds,)
        results.append({"dataset": name, "algorithm": algorithm, "target": target,
                        "seeds": seeds, "last": _stats(last, last[:, None], reps),
                        "final": _stats(final, final[:, None], reps),
                        "best": _stats(best, best[:, None], reps)})
    report = {
        "score": {name: d["score"] for name, d in datasets.items()},
        # The settings the runs were trained with (benchmark.json), not this call's defaults.
        "settings": _read_json_or_none(out / SETTINGS_FILE) or (settings(cfg) if cfg else None),
        "runs_finished": len(runs), "runs_expected": expected,
        "datasets": {name: {k: v for k, v in d.items() if k != "episode_returns"}
                     for name, d in datasets.items()},
        "results": results,
        "aggregate": _aggregate(results, datasets, reps),
        "calibration": [{"dataset": r["dataset"], "seed": r["seed"],
                         **{k: r["calibration"][k] for k in (
                             "reliable_max_target", "achieved_at_reliable_max", "rising_range",
                             "saturated", "z", "episodes")}}
                        for r in runs if r.get("calibration")],
        "runs": [{"dataset": r["dataset"], "algorithm": r["algorithm"], "seed": r["seed"],
                  "dir": str(run_dir(out, r["dataset"], r["algorithm"], r["seed"])
                             .relative_to(out)), "steps": r["steps"]} for r in runs],
    }
    report["plots"] = _plots(out, report, cells, datasets, runs)
    write_json(out / RESULTS_JSON, report)
    text = results_markdown(report)
    write_text_atomic(out / RESULTS_MD, text)
    if echo:
        print(text)
        print(f"wrote {out / RESULTS_JSON}, {out / RESULTS_MD}, {out / PLOTS_DIR}/")
    return report


def _aggregate(results: list[dict], datasets: dict, reps: int) -> list[dict]:
    """Across datasets, per algorithm and target rank (a decision transformer's i-th target of
    each env; None for the target-free baselines): the IQM over the (seeds, datasets) matrix of
    the seeds finished on every dataset. Only with two or more datasets."""
    if len(datasets) < 2:
        return []
    by_key: dict[tuple[str, int | None], dict[str, dict]] = {}
    for cell in results:
        target = cell["target"]
        targets = datasets[cell["dataset"]]["targets"]
        rank = None if target is None else (targets.index(target) if target in targets else -1)
        by_key.setdefault((cell["algorithm"], rank), {})[cell["dataset"]] = cell
    rows = []
    for (algorithm, rank), per_dataset in sorted(
            by_key.items(), key=lambda kv: (_algorithm_order(kv[0][0]), kv[0][1] or 0)):
        if rank == -1 or set(per_dataset) != set(datasets):
            continue
        seeds = sorted(set.intersection(*(set(c["seeds"]) for c in per_dataset.values())))
        if not seeds:
            continue
        row = {"algorithm": algorithm, "target_rank": None if rank is None else rank + 1,
               "seeds": seeds, "datasets": sorted(per_dataset)}
        for which in ("last", "final", "best"):
            matrix = np.array([[c[which]["per_seed"][c["seeds"].index(s)]
                                for c in (per_dataset[d] for d in row["datasets"])]
                               for s in seeds])  # (seeds, datasets)
            row[which] = _stats(matrix.mean(axis=1), matrix, reps)
        rows.append(row)
    return rows


def _plots(out: Path, report: dict, cells: dict, datasets: dict, runs: list[dict]) -> list[str]:
    """Learning curves per dataset (score against step, mean ± std over seeds) and, where DT runs
    were calibrated, a calibration plot per dataset (one curve per seed)."""
    from dtlab.plots import calibration_plot, score_curves

    written = []
    for name, d in datasets.items():
        curves = []
        for (dataset, algorithm, target), by_seed in cells.items():
            if dataset != name:
                continue
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in by_seed.values())))
            values = np.array([[dict(c)[s] for s in steps] for c in by_seed.values()])
            label = algorithm if target is None else f"{algorithm} @ {target:g}"
            seeds = f"{len(by_seed)} seed{'s' if len(by_seed) != 1 else ''}"
            curves.append((f"{label} ({seeds})", steps, values.mean(0).tolist(),
                           values.std(0).tolist()))
        behaviour = d["behaviour"]["normalized" if d["score"] == "normalized" else "mean_return"]
        if curves:
            path = out / PLOTS_DIR / f"{name}-learning-curves.png"
            score_curves(curves, path, title=f"{name} ({d['env']})",
                         ylabel="normalized score" if d["score"] == "normalized" else "return",
                         reference=("behaviour policy (dataset mean)", behaviour))
            written.append(str(path.relative_to(out)))
        calibrated = [(f"seed {r['seed']}", r["calibration"]) for r in runs
                      if r["dataset"] == name and r.get("calibration")]
        if calibrated:
            path = out / PLOTS_DIR / f"{name}-calibration.png"
            calibration_plot(calibrated, path, episode_returns=d.get("episode_returns"),
                             title=f"{name}: achieved vs target return")
            written.append(str(path.relative_to(out)))
    return written


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _cell_text(stats: dict) -> tuple[str, str]:
    return (f"{_fmt(stats['mean'])} ± {_fmt(stats['std'])}",
            f"{_fmt(stats['iqm'])} [{_fmt(stats['ci95'][0])}, {_fmt(stats['ci95'][1])}]")


def results_markdown(report: dict) -> str:
    """results.md: the per-dataset table, the aggregate over datasets, the calibration table."""
    kinds = set(report["score"].values())
    score = ("normalized score, 100 * (return - random) / (expert - random) with the env's "
             "reference returns (D4RL's for MuJoCo)" if kinds == {"normalized"} else
             "normalized score where the env has reference returns, else the raw return (see "
             "results.json: score)")
    expected = report["runs_expected"]
    lines = ["# dtlab benchmark", "",
             f"Score: {score}. Runs finished: {report['runs_finished']}"
             + (f" of {expected}" if expected is not None else "") + ".",
             "last: the score at the final evaluation of each run; final: the mean of its last "
             f"{FINAL_EVALUATIONS} evaluations (less noisy where scores swing between "
             "evaluations); best: its highest score over all evaluations (optimistic). mean ± std "
             "over seeds; IQM: interquartile mean over seeds with a 95% stratified-bootstrap "
             "confidence interval (rliable). Target-free baselines ignore the target return.", "",
             "| dataset | algorithm | target | seeds | last: mean ± std | last: IQM [95% CI] "
             "| final: mean ± std | final: IQM [95% CI] | best: mean ± std | best: IQM [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        behaviour = d["behaviour"]["normalized" if d["score"] == "normalized" else "mean_return"]
        lines.append(f"| {name} | behaviour policy (dataset mean) | – | – | {_fmt(behaviour)} "
                     "| | | | | |")
        for cell in (c for c in report["results"] if c["dataset"] == name):
            target = "target-free" if cell["target"] is None else f"{cell['target']:g}"
            lines.append(f"| {name} | {cell['algorithm']} | {target} | {len(cell['seeds'])} | "
                         + " | ".join(_cell_text(cell["last"]) + _cell_text(cell["final"])
                                      + _cell_text(cell["best"])) + " |")
    if report["aggregate"]:
        lines += ["", "## All datasets", "",
                  "Per run, the mean over datasets (mean ± std over seeds); the IQM over every "
                  "(seed, dataset) score. Target rank i: each env's i-th target.", "",
                  "| algorithm | target | seeds | last: mean ± std | last: IQM [95% CI] "
                  "| final: mean ± std | final: IQM [95% CI] | best: mean ± std "
                  "| best: IQM [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
        for row in report["aggregate"]:
            target = "target-free" if row["target_rank"] is None else f"rank {row['target_rank']}"
            lines.append(f"| {row['algorithm']} | {target} | {len(row['seeds'])} | "
                         + " | ".join(_cell_text(row["last"]) + _cell_text(row["final"])
                                      + _cell_text(row["best"])) + " |")
    if report["calibration"]:
        lines += ["", "## Return-conditioning calibration (decision-transformer)", "",
                  "| dataset | seed | reliable maximum target | achieved there | rises from .. to "
                  "| saturated |", "|---|---|---|---|---|---|"]
        for c in report["calibration"]:
            rng = c["rising_range"]
            lines.append(f"| {c['dataset']} | {c['seed']} | {c['reliable_max_target']:g} | "
                         f"{_fmt(c['achieved_at_reliable_max'])} | "
                         + ("does not rise" if not rng else f"{rng[0]:g} .. {rng[1]:g}")
                         + f" | {'yes' if c['saturated'] else 'no (still rising)'} |")
    if report["plots"]:
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"])]
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from None


def _read_json_or_none(path: Path) -> Any:
    return _read_json(path) if path.is_file() else None
