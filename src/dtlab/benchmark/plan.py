"""The benchmark's plan: its config and the grid of cells (its datasets and their targets:
dtlab.benchmark.datasets).

A cell is one dataset x algorithm x seed: a plain ``TrainConfig`` whose run directory is
``OUT/runs/<dataset>/<algorithm>/seed<k>/``, run as ``dtlab train <its flags>`` (``train_argv``),
then, for a decision-transformer cell with ``--calibrate``, ``dtlab calibrate <its run>``.
``dtlab benchmark --plan`` prints these command lines; the runner runs the same ones.

What a cell's ``dtlab train`` writes is all the report needs: its evaluations.jsonl records
(``read_evaluations``; the cell is finished when one is at its last step) and, once calibrated,
its final checkpoint's calibration.json.

Layout of OUT::

    benchmark.json                       the settings every cell shares (checked when continuing)
    runs/<dataset>/dataset.json          source, env, targets, episode returns, behaviour score
    runs/<dataset>/<algorithm>/seed<k>/  a dtlab training run
    logs/<dataset>/<algorithm>-seed<k>.log   what the runner's cell processes printed
    results.json, results.md, plots/     the report, rebuilt from the finished cells
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from dtlab.atomic import write_json
from dtlab.benchmark import datasets
from dtlab.benchmark.datasets import RUNS_DIR, DatasetEntry, dataset_record
from dtlab.config import (MAX_SEED, DataConfig, EvalDuringTraining, ModelConfig, OptimConfig,
                          RunConfig, TrainConfig, check_number, check_targets, setting_differences)
from dtlab.calibrate import CalibrateConfig
from dtlab.errors import ConfigError

PLOTS_DIR, LOGS_DIR = "plots", "logs"
SETTINGS_FILE, DATASET_FILE = "benchmark.json", "dataset.json"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"

Algorithm = Literal["decision-transformer", "transformer-bc", "mlp-bc", "percentile-bc"]
ALGORITHMS: tuple[Algorithm, ...] = ("decision-transformer", "transformer-bc", "mlp-bc",
                                     "percentile-bc")
TARGET_FREE = frozenset({"transformer-bc", "mlp-bc", "percentile-bc"})

@dataclass(frozen=True)
class BenchmarkConfig:
    """The DT paper's protocol as one command: for every dataset x algorithm x seed (a cell), run
    dtlab train for the given steps, evaluating every --eval-every steps, and report the last,
    final (mean of the last 3 evaluations) and best normalized scores, the swing between
    evaluations and the best-minus-last gap (mean +- std over seeds, interquartile mean with a
    95% stratified-bootstrap CI). Each cell is its own dtlab train process (--jobs at a time);
    --plan prints their command lines for another scheduler, --report-only builds the report
    from whatever finished. Resumable: run it again with the same arguments to continue."""

    datasets: tuple[str, ...] = ()
    """Datasets: D4RL or native HDF5 files, or minari:<id>; each is evaluated in --env or, without
    it, in the env_id its metadata records."""
    env: str | None = None
    """Gymnasium env id for every dataset (default: each dataset's recorded env_id)."""
    algorithms: tuple[Algorithm, ...] = ALGORITHMS
    """decision-transformer; transformer-bc (no return-to-go tokens); mlp-bc (an MLP on single
    states); percentile-bc (mlp-bc on the best --top-fraction of the data, the DT paper's %BC)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds (each replaces --seed; evaluation episode i of seed k resets its env with
    seed k x --eval-episodes + i, the same for every algorithm); the DT paper averages 3 seeds."""
    steps: int = 100_000
    """Gradient steps per cell (DT code: 10 iterations x 10,000 steps)."""
    eval_every: int = 10_000
    """Evaluate every this many steps, and at the end (DT code: every 10,000 steps)."""
    eval_episodes: int = 100
    """Episodes per target per evaluation (DT code: num_eval_episodes 100)."""
    eval_targets: tuple[float, ...] = ()
    """Target returns of the decision-transformer cells, for every dataset (default: the env's
    paper targets, e.g. Hopper 3600 1800, plus the dataset's best episode return, rounded to 3
    significant digits, when a paper target exceeds that best by more than half of max(|best|,
    best - worst): 1.5x the best for returns from about 0). The target-free baselines are
    evaluated once per evaluation."""
    top_fraction: float = 0.1
    """percentile-bc: fraction of the transitions, best episodes first (DT paper: 10%BC)."""
    out: str = "benchmark"
    """Output directory: runs/<dataset>/<algorithm>/seed<k>/, results.json, results.md, plots/."""
    calibrate: bool = False
    """After each decision-transformer cell, calibrate its return conditioning (dtlab calibrate)
    and store the reliable maximum target in its final checkpoint."""
    calibrate_points: int = 10
    """--calibrate: targets in the sweep."""
    calibrate_episodes: int = 10
    """--calibrate: episodes per target, at least 2 (the calibration compares targets by the
    standard errors of their mean returns)."""
    plan: bool = False
    """Check the inputs, record the settings in --out, and print one shell command line per cell
    not finished yet (dtlab train, with --resume where the cell has started; && dtlab calibrate
    with --calibrate), for a shell loop, a Slurm array or GNU parallel; train nothing. Then
    --report-only builds the report."""
    report_only: bool = False
    """Rebuild results.json, results.md and the plots from the finished cells under --out; train
    nothing (--datasets may then be left out)."""
    bootstrap_reps: int = 2000
    """Bootstrap resamples for the interquartile mean's confidence interval (seeded: a rebuilt
    report gives the same numbers)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model hyperparameters of the transformer cells (mlp-bc uses embed_dim, n_layers, activation
    and dropout, with context_len 1)."""
    optim: Annotated[OptimConfig, tyro.conf.arg(name="")] = field(default_factory=OptimConfig)
    """Optimization, the same for every algorithm (--seed is replaced by each of --seeds)."""
    device: str = "auto"
    """torch device of every cell: auto (cuda if available, else cpu), cpu, cuda, ..."""
    threads: int | None = None
    """CPU threads for torch, per cell (default: OMP_NUM_THREADS if set, else the number of
    cores, divided by --jobs)."""
    jobs: int = 1
    """Cells trained at the same time, each a dtlab train process (cells are independent: at the
    same --threads their results do not depend on --jobs)."""
    progress: bool = True
    """Show progress: cells done / total and an estimate of the time left."""

    def __post_init__(self) -> None:
        check_number("--jobs", self.jobs, minimum=1, integer=True)
        if not self.datasets and not self.report_only:
            raise ConfigError("--datasets must name at least one dataset (unless --report-only)")
        if self.plan and self.report_only:
            raise ConfigError("--plan and --report-only: give one of them")
        if self.model.architecture != "decision-transformer":
            raise ConfigError(f"--model.architecture is set per cell by --algorithms, not to "
                              f"{self.model.architecture} for all")
        if not self.algorithms or len(set(self.algorithms)) != len(self.algorithms):
            raise ConfigError(f"--algorithms must be distinct and not empty, got "
                              f"{self.algorithms!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct and not empty, got {self.seeds!r}")
        for seed in self.seeds:
            check_number("--seeds", seed, minimum=0, maximum=MAX_SEED, integer=True)
        for name in ("steps", "eval_every", "eval_episodes", "bootstrap_reps"):
            check_number("--" + name.replace("_", "-"), getattr(self, name), minimum=1,
                         integer=True)
        check_targets("--eval-targets", self.eval_targets)
        if len(set(self.eval_targets)) != len(self.eval_targets):
            raise ConfigError(f"--eval-targets must be distinct, got {self.eval_targets!r}")
        check_number("--calibrate-episodes", self.calibrate_episodes, minimum=2, integer=True)
        check_number("--calibrate-points", self.calibrate_points, minimum=2, integer=True)
        check_number("--top-fraction", self.top_fraction, above=0, maximum=1)
        check_number("--threads", self.threads, minimum=1, integer=True)


def load_datasets(cfg: BenchmarkConfig) -> list[DatasetEntry]:
    """Every dataset of ``cfg`` loaded, with its env and targets (``datasets.load``)."""
    return datasets.load(cfg.datasets, cfg.env, cfg.eval_targets)


# ---- cells ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One dataset x algorithm x seed: its training run and, for a decision-transformer cell with
    --calibrate, the calibration of that run's final checkpoint."""

    dataset: str
    algorithm: str
    seed: int
    train: TrainConfig
    calibrate: CalibrateConfig | None

    @property
    def directory(self) -> Path:
        return Path(self.train.run.out)

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.algorithm}/seed{self.seed}"

    def log_file(self, out: Path) -> Path:
        return out / LOGS_DIR / self.dataset / f"{self.algorithm}-seed{self.seed}.log"


def run_dir(out: Path, dataset: str, algorithm: str, seed: int) -> Path:
    return Path(out) / RUNS_DIR / dataset / algorithm / f"seed{seed}"


def cell_train_config(cfg: BenchmarkConfig, entry: DatasetEntry, algorithm: str, seed: int
                      ) -> TrainConfig:
    """The training run of one cell: the benchmark's model and optim groups with the algorithm's
    architecture (mlp-bc and percentile-bc: an MLP, context_len 1), this seed, evaluation every
    eval_every steps at the dataset's targets (one, unread, for the target-free baselines), a
    checkpoint at every evaluation."""
    architecture = "mlp-bc" if algorithm in ("mlp-bc", "percentile-bc") else algorithm
    model = dataclasses.replace(cfg.model, architecture=architecture,
                                **({"context_len": 1} if architecture == "mlp-bc" else {}))
    targets = entry.targets[:1] if algorithm in TARGET_FREE else entry.targets
    return TrainConfig(
        data=DataConfig(dataset=entry.source, env=entry.env,
                        top_fraction=cfg.top_fraction if algorithm == "percentile-bc" else None),
        model=model, optim=dataclasses.replace(cfg.optim, seed=seed),
        run=RunConfig(out=str(run_dir(Path(cfg.out), entry.name, algorithm, seed)),
                      steps=cfg.steps, checkpoint_every=cfg.eval_every, keep_checkpoints=2,
                      log_every=min(100, cfg.steps), device=cfg.device, threads=cfg.threads,
                      progress=False, tensorboard=False),
        evaluation=EvalDuringTraining(eval_every=cfg.eval_every, eval_episodes=cfg.eval_episodes,
                                      eval_targets=targets, eval_seed=seed * cfg.eval_episodes))


def plan_cells(cfg: BenchmarkConfig, entries: list[DatasetEntry]) -> list[Cell]:
    """Every cell, seed-major: each seed covers every dataset x algorithm before the next seed, so
    a benchmark stopped early already compares every algorithm on the seeds it finished."""
    cells = []
    for seed in cfg.seeds:
        for entry in entries:
            for algorithm in cfg.algorithms:
                train = cell_train_config(cfg, entry, algorithm, seed)
                calibrate = (CalibrateConfig(checkpoint=train.run.out, points=cfg.calibrate_points,
                                             episodes=cfg.calibrate_episodes, device=cfg.device,
                                             threads=cfg.threads)
                             if cfg.calibrate and algorithm == "decision-transformer" else None)
                cells.append(Cell(entry.name, algorithm, seed, train, calibrate))
    return cells


# ---- a cell's command lines -----------------------------------------------------------------------
_NESTED_GROUPS = frozenset({"model"})  # TrainConfig groups with prefixed flags (--model.embed-dim)


def train_argv(cfg: TrainConfig) -> list[str]:
    """``dtlab train`` arguments (after ``train``) that parse back to ``cfg``: every field that
    differs from its default, or has none, as its flag (data, optim, run and evaluation fields
    flat, e.g. --steps; model fields as --model.<field>)."""
    args = ["train"]
    for group in dataclasses.fields(cfg):
        prefix = f"--{group.name}." if group.name in _NESTED_GROUPS else "--"
        args += _changed_flags(getattr(cfg, group.name), prefix)
    return args


def calibrate_argv(cfg: CalibrateConfig) -> list[str]:
    """``dtlab calibrate`` arguments that parse back to ``cfg``."""
    return ["calibrate", cfg.checkpoint, *_changed_flags(cfg, "--", skip=("checkpoint",))]


def _changed_flags(obj: Any, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    args: list[str] = []
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else
                   dataclasses.MISSING)
        if value == default:
            continue
        flag = prefix + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else prefix + "no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            args += [flag, *map(_flag_value, value)]
        else:
            args += [flag, _flag_value(value)]
    return args


def _flag_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # repr: floats round-trip


def has_run(directory: Path) -> bool:
    """A cell's run directory holds a run to continue (dtlab train wrote its settings there)."""
    from dtlab.rundir import RunDirectory

    run = RunDirectory(directory)
    return run.is_run() or run.has_checkpoint()


def read_evaluations(directory: Path, targets: tuple[float, ...]) -> list[dict]:
    """A run's evaluations from its evaluations.jsonl (``dtlab.rundir``), in step order:
    ``{"step": int, "results": [{"target": float, "mean": float, "normalized_mean": float |
    None}, ...]}`` for each of ``targets`` the record holds. [] without a record."""
    from dtlab.rundir import RunDirectory

    wanted = {float(t) for t in targets}
    evaluations = {}
    for evaluation in RunDirectory(directory).evaluations():
        results = [{"target": float(r.target), "mean": float(r.mean),
                    "normalized_mean": r.normalized_mean}
                   for r in evaluation.results if float(r.target) in wanted]
        if results:
            evaluations[evaluation.step] = {"step": evaluation.step, "results": results}
    return [evaluations[s] for s in sorted(evaluations)]


def trained(cell: Cell) -> bool:
    """The cell's training has finished: its final evaluation (at its last step) is recorded."""
    evaluations = read_evaluations(cell.directory, cell.train.evaluation.eval_targets)
    return bool(evaluations) and evaluations[-1]["step"] == cell.train.run.steps


def calibrated(cell: Cell) -> bool:
    """The cell needs no calibration, or its final checkpoint holds one."""
    from dtlab.checkpoint import load_calibration

    return cell.calibrate is None or (trained(cell)
                                      and load_calibration(cell.directory) is not None)


def cell_commands(cell: Cell) -> list[list[str]]:
    """What is left to run of a cell, as dtlab argument lists: its training (with --resume when
    its directory holds a run), then its calibration; [] when finished."""
    commands = []
    if not trained(cell):
        train = cell.train
        if has_run(cell.directory):
            train = dataclasses.replace(train, run=dataclasses.replace(train.run, resume=True))
        commands.append(train_argv(train))
    if cell.calibrate is not None and not calibrated(cell):
        commands.append(calibrate_argv(cell.calibrate))
    return commands


def shell_line(commands: list[list[str]], program: str = "dtlab") -> str:
    """One shell line running ``commands`` in order, each only if the one before succeeded."""
    return " && ".join(shlex.join([program, *c]) for c in commands)


# ---- the benchmark directory ----------------------------------------------------------------------
def settings(cfg: BenchmarkConfig) -> dict[str, Any]:
    """What every cell of one benchmark directory must share (benchmark.json); datasets,
    algorithms and seeds may be added in later calls."""
    optim = dataclasses.asdict(cfg.optim)
    del optim["seed"]  # each cell's seed
    return json.loads(json.dumps({
        "steps": cfg.steps, "eval_every": cfg.eval_every, "eval_episodes": cfg.eval_episodes,
        "eval_targets": list(cfg.eval_targets), "top_fraction": cfg.top_fraction,
        "model": dataclasses.asdict(cfg.model), "optim": optim}))


def check_settings(out: Path, cfg: BenchmarkConfig, entries: list[DatasetEntry]) -> None:
    """Refuse to continue a benchmark directory with other settings or another file under a
    dataset's name (ConfigError naming the differences). Writes nothing."""
    path = out / SETTINGS_FILE
    if path.is_file():
        saved = {"eval_targets": [], **read_json(path)}  # recorded before --eval-targets existed
        differ = setting_differences(saved, settings(cfg))
        if differ:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ)
            raise ConfigError(f"{path}: this benchmark ran with other settings ({shown}); continue "
                              "with the same settings or give another --out")
    for entry in entries:
        file = out / RUNS_DIR / entry.name / DATASET_FILE
        if file.is_file() and read_json(file).get("source") != entry.source:
            raise ConfigError(f"{file}: cells under the name {entry.name} used "
                              f"{read_json(file).get('source')}, not {entry.source} (--datasets)")


def prepare_benchmark(cfg: BenchmarkConfig) -> tuple[list[DatasetEntry], list[Cell]]:
    """Check every input that can be checked before a cell runs (the datasets, their envs and
    targets, each dataset against the cells' settings with dtlab train's own checks, the
    directory's recorded settings), then record the settings (benchmark.json) and the datasets
    (dataset.json) in --out. Returns the datasets and the cells. DtlabError subclasses for bad
    input, before anything is written."""
    from dtlab.prepare import prepare

    out = Path(cfg.out)
    entries = load_datasets(cfg)
    cells = plan_cells(cfg, entries)
    by_name = {e.name: e for e in entries}
    for entry in entries:  # once per dataset: the data, env and model checks of dtlab train
        first = next(c for c in cells if c.dataset == entry.name)
        prepare(first.train, entry.episodes)
    check_settings(out, cfg, entries)
    if not (out / SETTINGS_FILE).is_file():
        write_json(out / SETTINGS_FILE, settings(cfg))
    for name, entry in by_name.items():
        write_json(out / RUNS_DIR / name / DATASET_FILE, dataset_record(entry))
    return entries, cells


def read_json(path: Path) -> Any:
    """A benchmark record; ConfigError naming the file when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from None
