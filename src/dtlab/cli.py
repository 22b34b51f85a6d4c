"""The ``dtlab`` command line (tyro subcommands); ``--help`` text comes from the config docstrings.

Every failure on bad input is a DtlabError: printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import tyro

from dtlab.atomic import dumps_json
from dtlab.benchmark.plan import BenchmarkConfig
from dtlab.cli_errors import parse
from dtlab.behaviour.sac import BehaviourConfig
from dtlab.collect import CollectConfig
from dtlab.config import MAX_SEED, TrainConfig, check_number
from dtlab.evaluate import CalibrateConfig, EvalConfig
from dtlab.finetune import FinetuneConfig
from dtlab.errors import DtlabError, one_line_warning
from dtlab.quickstart import STEPS as QUICKSTART_STEPS
from dtlab.runs_table import RunsConfig


@dataclass(frozen=True)
class DataInfo:
    """Print episodes, transitions, return statistics and dims of a dataset."""

    path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """Dataset: D4RL or dtlab native HDF5 file, or minari:<dataset id>."""
    json: bool = False
    """Print machine-readable JSON instead of a table."""


@dataclass(frozen=True)
class DataValidate:
    """Run every load-time check on a dataset and report problems (exit 2 on the first error),
    then list every valid-but-suspicious finding, one line each (exit 0)."""

    path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """Dataset file (D4RL HDF5 or dtlab native), or minari:<dataset id>."""
    env: str | None = None
    """Also check the dataset against this Gymnasium env's spaces, action bounds and time limit
    (default for the time limit: the dataset's recorded env id, if any)."""


@dataclass(frozen=True)
class DataConvert:
    """Convert a dataset between formats: D4RL HDF5, dtlab native HDF5, Minari (minari:<id>)."""

    src: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="IN")]
    """Source: a D4RL or native HDF5 file, or minari:<dataset id>."""
    dst: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """Destination: an HDF5 path, or minari:<namespace/name-vN> (written under MINARI_DATASETS_PATH)."""
    format: Literal["d4rl", "native", "minari"] | None = None
    """Output format (default: minari for minari:<id>, else native)."""
    env: str | None = None
    """Gymnasium env id whose spaces a Minari dataset records (default: the source's env_id)."""
    overwrite: bool = False
    """Replace an existing Minari dataset with the same id."""


@dataclass(frozen=True)
class DataCommand:
    """Inspect and check dataset files."""

    command: Union[
        Annotated[DataInfo, tyro.conf.subcommand("info")],
        Annotated[DataValidate, tyro.conf.subcommand("validate")],
        Annotated[DataConvert, tyro.conf.subcommand("convert")],
    ]


@dataclass(frozen=True)
class QuickstartConfig:
    """Build a mixed-quality Pendulum-v1 dataset, train a DT, evaluate it at several targets."""

    out: str = "dtlab-quickstart"
    """Output directory: dataset, checkpoint, results.json, achieved-vs-target plot."""
    steps: int = QUICKSTART_STEPS
    """Training steps."""
    episodes: int = 10
    """Evaluation episodes per target."""
    seed: int = 0
    """Seed for data collection, training and evaluation."""
    progress: bool = True
    """Show a progress bar while training."""
    overwrite: bool = False
    """Replace the run in --out if one is there (refused while a quickstart still trains in it)."""

    def __post_init__(self) -> None:
        check_number("steps", self.steps, minimum=10, integer=True)
        check_number("episodes", self.episodes, minimum=1, integer=True)
        check_number("seed", self.seed, minimum=0, maximum=MAX_SEED, integer=True)


@dataclass(frozen=True)
class TrainBehaviourCommand:
    """Train a SAC behaviour agent (resumable), then optionally export its medium and expert actors."""

    config: Annotated[BehaviourConfig, tyro.conf.arg(name="")]
    export: str | None = None
    """Export the medium and expert actors (safetensors) and a manifest to this directory, e.g.
    src/dtlab/presets/hopper-v5."""
    export_episodes: int = 20
    """Episodes to measure each exported policy (and the random policy) over."""
    export_only: bool = False
    """Skip training; export from the run as it is."""

    def __post_init__(self) -> None:
        check_number("export_episodes", self.export_episodes, minimum=1, integer=True)


@dataclass(frozen=True)
class ExportCommand:
    """Write a trained run as a deploy artifact: policy.onnx (one exact step of the policy,
    normalization and action mapping inside), policy.json and a model card (README.md), run by
    dtlab.deploy with numpy and onnxruntime alone (docs/deploy.md)."""

    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """Run directory (its latest checkpoint) or checkpoint directory."""
    out: str
    """Artifact directory to write (must not exist, or be empty)."""
    dataset: str | None = None
    """Dataset whose observation ranges policy.json records for the runtime's out-of-range
    warning (default: the dataset the checkpoint records, when the file is still there)."""


@dataclass(frozen=True)
class InteropFromHF:
    """Convert a Hugging Face Transformers DecisionTransformerModel directory (config.json +
    model.safetensors, or pytorch_model.bin read with weights_only) into a dtlab run directory,
    mapping every difference exactly or refusing it (docs/usage.md, "Deploying and Hugging Face")."""

    src: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="HF_DIR")]
    """The Transformers model directory, or hub:REPO_ID to download it from the Hub."""
    out: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """dtlab run directory to write (must not exist, or be empty)."""
    dataset: str | None = None
    """Dataset to compute the observation statistics from (as dtlab train does)."""
    env: str | None = None
    """Gymnasium env id: action bounds, space checks, default return scale (needed unless
    config.json carries the dtlab record that dtlab interop to-hf writes)."""
    obs_mean: tuple[float, ...] | None = None
    """Observation means the model was trained with (instead of --dataset)."""
    obs_std: tuple[float, ...] | None = None
    """Observation standard deviations the model was trained with (instead of --dataset)."""
    return_scale: float | None = None
    """Return-to-go divisor the model was trained with (default: the env registry's, 1000 for
    MuJoCo locomotion, as the Hugging Face DT blog's training)."""
    context_len: int | None = None
    """K, the context length it was trained with (Transformers' config does not record it;
    default 20, the DT paper's gym setting)."""


@dataclass(frozen=True)
class InteropToHF:
    """Write a dtlab run (continuous actions, vector observations) in the Hugging Face
    Transformers DecisionTransformerModel layout, normalization statistics in its config.json."""

    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """Run directory (its latest checkpoint) or checkpoint directory."""
    out: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """Directory to write (must not exist, or be empty)."""
    push: str | None = None
    """Also upload it to this Hugging Face Hub repository id (huggingface_hub's login)."""


@dataclass(frozen=True)
class InteropCommand:
    """Other libraries' model layouts in and out (Hugging Face Transformers)."""

    command: Union[
        Annotated[InteropFromHF, tyro.conf.subcommand("from-hf")],
        Annotated[InteropToHF, tyro.conf.subcommand("to-hf")],
    ]

DESCRIPTION = "dtlab: Decision Transformers for offline RL. `dtlab --version` prints the version."

Command = Union[
    Annotated[QuickstartConfig, tyro.conf.subcommand("quickstart")],
    Annotated[TrainConfig, tyro.conf.subcommand("train")],
    Annotated[EvalConfig, tyro.conf.subcommand("evaluate")],
    Annotated[FinetuneConfig, tyro.conf.subcommand("finetune")],
    Annotated[DataCommand, tyro.conf.subcommand("data")],
    Annotated[CollectConfig, tyro.conf.subcommand("collect")],
    Annotated[TrainBehaviourCommand, tyro.conf.subcommand("train-behaviour")],
    Annotated[BenchmarkConfig, tyro.conf.subcommand("benchmark")],
    Annotated[CalibrateConfig, tyro.conf.subcommand("calibrate")],
    Annotated[RunsConfig, tyro.conf.subcommand("runs")],
    Annotated[ExportCommand, tyro.conf.subcommand("export")],
    Annotated[InteropCommand, tyro.conf.subcommand("interop")],
]


@contextlib.contextmanager
def signals_received():
    """Record SIGINT/SIGTERM in the yielded list instead of raising, while the block runs (a
    long job polls it to stop cleanly); the previous handlers come back afterwards."""
    import signal
    import threading

    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_train(cfg: TrainConfig) -> int:
    """Train; SIGINT/SIGTERM stop the run at the next step with a checkpoint (exit 128 + signal)."""
    from dtlab.distributed import World
    from dtlab.train import train

    with signals_received() as received:
        result = train(cfg, should_stop=lambda: bool(received))
    if not World.current().is_main:  # under torchrun, rank 0 reports
        return 128 + received[0] if result.interrupted and received else 0
    if result.interrupted:
        sig = received[0] if received else 0
        print(f"interrupted by signal {sig} at step {result.steps}; checkpoint "
              f"{result.checkpoint}; continue with: dtlab train --out {shlex.quote(cfg.run.out)} "
              "--resume", file=sys.stderr)
        return 128 + sig
    if result.already_done:
        print(f"{cfg.run.out}: already at step {result.steps} of --steps {cfg.run.steps}; nothing "
              "to do (raise --steps to continue it)")
        return 0
    skipped = f", {result.skipped_nonfinite} non-finite steps skipped" if result.skipped_nonfinite else ""
    print(f"done: {result.steps} steps, final loss {result.final_loss:.5f}{skipped}, "
          f"checkpoint {result.checkpoint}")
    return 0


def run_finetune(cfg: FinetuneConfig) -> int:
    """Finetune online; SIGINT/SIGTERM stop it after the current iteration with a checkpoint
    (exit 128 + signal)."""
    from dtlab.finetune import finetune

    with signals_received() as received:
        result = finetune(cfg, should_stop=lambda: bool(received))
    if result.interrupted:
        sig = received[0] if received else 0
        print(f"interrupted by signal {sig} at online env step {result.env_steps}; checkpoint "
              f"{result.checkpoint}; continue with the same command and --resume",
              file=sys.stderr)
        return 128 + sig
    print(f"done: {result.env_steps} online env steps in {result.rollouts} rollouts, checkpoint "
          f"{result.checkpoint}")
    return 0


def run_benchmark(cfg: BenchmarkConfig) -> int:
    """Benchmark: --plan prints the cells' command lines, --report-only rebuilds the report,
    else the cells run; SIGINT/SIGTERM stop the running cells at their next step with checkpoints
    and rebuild the report from the finished ones (exit 128 + signal; run again to continue)."""
    from pathlib import Path

    if cfg.plan:
        from dtlab.benchmark.plan import cell_commands, prepare_benchmark, shell_line

        entries, cells = prepare_benchmark(cfg)
        for entry in entries:
            print(f"{entry.name} ({entry.env}): decision-transformer targets {entry.why}",
                  file=sys.stderr)
        left = [commands for cell in cells if (commands := cell_commands(cell))]
        for commands in left:
            print(shell_line(commands))
        print(f"{len(left)} of {len(cells)} cells to run (one line each; print the plan again "
              f"after an interruption: started cells continue with --resume); then: dtlab "
              f"benchmark --out {cfg.out} --report-only", file=sys.stderr)
        return 0
    if cfg.report_only:
        from dtlab.benchmark.report import build_report

        build_report(Path(cfg.out), cfg, echo=True)
        return 0
    from dtlab.benchmark.runner import run_benchmark as benchmark

    with signals_received() as received:
        result = benchmark(cfg, should_stop=lambda: bool(received), echo=True)
    if result.interrupted:
        sig = received[0] if received else 0
        print(f"interrupted by signal {sig}: {result.report['runs_finished']} cells finished; run "
              "the same command again to continue", file=sys.stderr)
        return 128 + sig
    return 0


def run_calibrate(cfg: CalibrateConfig) -> None:
    from dtlab.evaluate import calibrate_checkpoint

    calibrate_checkpoint(cfg, echo=True)


def run_evaluate(cfg: EvalConfig) -> None:
    from dtlab.evaluate import evaluate_checkpoint

    evaluate_checkpoint(cfg, echo=True)


def _behaviour_policy(cfg: CollectConfig):
    """The BehaviourPolicy that ``cfg.policy`` names (not pendulum-mixed: a dataset recipe)."""
    from dtlab.behaviour.policies import ActorPolicy, RandomPolicy, SB3Policy
    from dtlab.behaviour.scripted import PendulumSwingUp, PointMazeGoalSeeker

    spec = cfg.policy_spec
    if spec.kind == "random":
        return RandomPolicy.for_env(cfg.env)
    if spec.kind == "actor":
        return ActorPolicy(spec.path, deterministic=cfg.deterministic)
    if spec.kind == "sb3":
        return SB3Policy(spec.path, cfg.env, trust=cfg.trust_pickle, deterministic=cfg.deterministic,
                         vecnormalize=cfg.vecnormalize)
    if spec.kind == "pendulum-swingup":
        return PendulumSwingUp(quality=cfg.quality)
    if spec.kind == "pointmaze-goal":
        return PointMazeGoalSeeker(quality=cfg.quality)
    raise ValueError(f"policy {spec.kind} is a dataset recipe, not a policy")


def run_collect(cfg: CollectConfig) -> None:
    import time

    from dtlab.data.formats import save_episodes
    from dtlab.errors import ConfigError

    # CollectConfig has refused conflicting options already; only the preset's env is left.
    if cfg.preset:
        from dtlab.presets import parse_preset, preset_dataset

        preset_env, _ = parse_preset(cfg.preset)
        if cfg.env is not None and cfg.env != preset_env:
            raise ConfigError(f"--env {cfg.env} conflicts with --preset {cfg.preset} ({preset_env})")
    started = time.perf_counter()
    if cfg.preset:
        kwargs = {"num_transitions": cfg.transitions} if cfg.transitions else {}
        episodes = preset_dataset(cfg.preset, seed=cfg.seed, behaviour_run=cfg.behaviour_run,
                                  trust=cfg.trust_pickle, **kwargs)
        env_id = episodes.metadata.get("env_id")
    elif cfg.policy_spec.kind == "pendulum-mixed":
        from dtlab.behaviour.scripted import pendulum_mixed_dataset

        episodes = pendulum_mixed_dataset(num_episodes=cfg.episodes or 300, seed=cfg.seed)
        env_id = cfg.env
    else:
        from dtlab.collect import collect_episodes

        env_id = cfg.env
        episodes = collect_episodes(env_id, _behaviour_policy(cfg), num_episodes=cfg.episodes,
                                    num_transitions=cfg.transitions, seed=cfg.seed)
    options = {"env_id": env_id} if cfg.out_format == "minari" else {}
    save_episodes(episodes, cfg.out, cfg.out_format, **options)
    ret = episodes.return_stats
    print(f"wrote {cfg.out}: {episodes.num_episodes} episodes, {episodes.num_transitions} transitions, "
          f"return mean {ret.mean:.1f} +- {ret.std:.1f} (min {ret.min:.1f}, max "
          f"{ret.max:.1f}) in {time.perf_counter() - started:.1f} s")


def run_train_behaviour(cfg) -> None:
    from dtlab.behaviour.sac import train_behaviour
    from dtlab.presets import export_presets

    if not cfg.export_only:
        train_behaviour(cfg.config, log=lambda m: print(m, flush=True))
    if cfg.export:
        manifest = export_presets(cfg.config.out, cfg.export, env_id=cfg.config.env,
                                  episodes=cfg.export_episodes, seed=cfg.config.seed)
        print(manifest.to_json())


def _load_with_findings(path: str, env_id: str | None):
    """Load ``path``; its DtlabWarnings (kind "read") and ``diagnose``'s findings, for the time
    limit and return scale of ``env_id`` (None: the dataset's recorded env id; neither: no time
    limit and dtlab's default return scale, as training would use for an unknown env)."""
    import warnings

    from dtlab.data.diagnostics import Finding, diagnose
    from dtlab.data.formats import load_episodes
    from dtlab.envs import env_info, time_limit
    from dtlab.errors import DtlabWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        episodes = load_episodes(path)
    findings = []
    for w in caught:
        if issubclass(w.category, DtlabWarning):
            findings.append(Finding("read", str(w.message).removeprefix(f"{path}: ")))
        else:  # not ours: shown as usual
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    recorded = episodes.provenance.env_id
    env_id = env_id or (recorded if isinstance(recorded, str) and recorded else None)
    limit = time_limit(env_id)
    scale = env_info(env_id or "").return_scale
    findings += diagnose(episodes, time_limit=limit, return_scale=scale)
    context = (f"{env_id + ': ' if env_id else ''}time limit "
               f"{limit if limit is not None else 'unknown'}, return scale {scale:g}")
    return episodes, findings, context


def run_data_info(cmd: DataInfo) -> None:
    import warnings

    from dtlab.errors import DtlabWarning

    episodes, findings, _ = _load_with_findings(cmd.path, None)
    for finding in findings:
        if finding.kind == "read":  # what loading warned about, shown as it would be anywhere
            warnings.warn(f"{cmd.path}: {finding.message}", DtlabWarning, stacklevel=2)
    summary = episodes.summary()
    summary["findings"] = len(findings)  # listed by `dtlab data validate`
    if cmd.json:
        print(dumps_json(summary))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(cmd.path), show_header=False)
    summary["findings"] = f"{summary['findings']} (listed by dtlab data validate)"
    summary["env_id"] = summary["env_id"] or "(not recorded)"
    metadata = summary.pop("metadata")
    summary.update({f"metadata/{k}": v for k, v in metadata.items()})  # one row per key
    for key, value in summary.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in value.items())
        table.add_row(key, str(value))
    Console().print(table)


def run_data_convert(cmd: DataConvert) -> None:
    from dtlab.data.formats import MINARI_PREFIX, load_episodes, save_episodes

    episodes = load_episodes(cmd.src)
    options = {}
    if cmd.dst.startswith(MINARI_PREFIX) or cmd.format == "minari":
        env_id = cmd.env or episodes.provenance.env_id
        options = {"env_id": env_id if isinstance(env_id, str) else None, "overwrite": cmd.overwrite}
    save_episodes(episodes, cmd.dst, cmd.format, **options)
    print(f"wrote {cmd.dst}: {episodes.num_episodes} episodes, {episodes.num_transitions} transitions")


def run_data_validate(cmd: DataValidate) -> None:
    from dtlab.envs import actions_outside_bounds, check_same_env, make_env
    from dtlab.spaces import check_against_env

    episodes, findings, context = _load_with_findings(cmd.path, cmd.env)
    print(f"{cmd.path}: {episodes.num_episodes} episodes, {episodes.num_transitions} transitions: "
          "keys, lengths, finiteness and episode flags OK")
    if cmd.env:
        env = make_env(cmd.env)
        check_against_env(env, episodes.observation_space, episodes.action_space,
                          what=f"dataset {cmd.path}", exact_n=False)
        check_same_env(episodes.provenance.env_id, cmd.env, what=cmd.path,
                       advice=f"validate against --env {episodes.provenance.env_id}")
        outside = int(actions_outside_bounds(episodes.actions, env.action_space).sum())
        print(f"{cmd.path}: spaces match {cmd.env}; {outside} actions outside the action bounds")
    for finding in findings:
        print(f"{cmd.path}: warning [{finding.kind}]: {finding.message}")
    print(f"{cmd.path}: {len(findings)} finding{'' if len(findings) == 1 else 's'} ({context})")


def _flag_value(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``) in ``args`` and ``args`` without it."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2:]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], args[:i] + args[i + 1:]
    return None, args


def train_defaults(args: list[str]) -> tuple[list[str], TrainConfig | None]:
    """``dtlab train``'s defaults that the other flags override: ``--preset NAME``
    (``dtlab.config.train_preset``), ``--config FILE`` (a train_config.json or a run directory:
    a new run from its settings, with ``--resume`` off and precision ``auto`` again), or with
    ``--resume`` the run's own train_config.json in ``--out`` (so ``--resume`` needs no other
    flag). Returns the arguments without ``--preset``/``--config`` and the defaults (None:
    parse as usual; also for a run saved in the flat format of dtlab before issue 9, resumed by
    giving its flags). ConfigError for an unreadable file, or ``--resume`` on a directory
    without a run and no ``--dataset``."""
    import dataclasses

    from dtlab.config import train_preset
    from dtlab.errors import ConfigError
    from dtlab.rundir import TRAIN_CONFIG_FILE, RunDirectory, read_train_config

    preset, args = _flag_value(args, "--preset")
    file, args = _flag_value(args, "--config")
    given_dataset = any(a == "--dataset" or a.startswith("--dataset=") for a in args)
    if preset is not None and (file is not None or "--resume" in args):
        raise ConfigError("--preset starts a new run: give it without --config and --resume")
    if preset is not None:
        return args, train_preset(preset)
    if file is not None:
        path = Path(file) / TRAIN_CONFIG_FILE if Path(file).is_dir() else Path(file)
        saved = read_train_config(path, flag="--config")
        return args, dataclasses.replace(
            saved, run=dataclasses.replace(saved.run, resume=False),
            optim=dataclasses.replace(saved.optim, precision="auto"))
    if "--resume" not in args:
        return args, None
    out = _flag_value(args, "--out")[0] or "runs/dt"
    run = RunDirectory(out)
    if run.is_run():
        if given_dataset and not isinstance(run.saved_config_json().get("optim"), dict):
            return args, None  # the flat format of older runs: resumed from the flags given
        return args, run.saved_config()
    if not given_dataset:
        raise ConfigError(f"{out}: --resume found no run here (no {TRAIN_CONFIG_FILE}); give the "
                          "--out of a run, or --dataset and --env to start one")
    return args, None


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = one_line_warning
    if argv is None and hasattr(signal, "SIGPIPE"):  # `dtlab ... | head`: end quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        defaults = None
        if args[:1] == ["train"]:  # --preset, --config, --resume: saved defaults, overridable
            train_args, defaults = train_defaults(args[1:])
            args = ["train", *train_args]
        if args[:1] == ["--version"]:
            from dtlab._version import __version__

            print(f"dtlab {__version__}")
            return 0
        # Inside the try: config dataclasses validate themselves while tyro builds them, and a
        # parse error is one ConfigError line (--preset is expanded above, before tyro).
        if defaults is not None:  # a saved configuration: its values are the defaults
            cmd = parse(TrainConfig, args[1:], prog="dtlab train", description=DESCRIPTION,
                        config=(tyro.conf.OmitSubcommandPrefixes,), default=defaults)
        else:
            cmd = parse(Command, args, prog="dtlab", description=DESCRIPTION,
                        config=(tyro.conf.OmitSubcommandPrefixes,),
                        extra_flags={"train": ["--preset", "--config"]})
        if isinstance(cmd, QuickstartConfig):
            from dtlab.quickstart import quickstart

            quickstart(cmd.out, steps=cmd.steps, episodes=cmd.episodes, seed=cmd.seed,
                       progress=cmd.progress, overwrite=cmd.overwrite)
        elif isinstance(cmd, TrainConfig):
            return run_train(cmd)
        elif isinstance(cmd, EvalConfig):
            run_evaluate(cmd)
        elif isinstance(cmd, FinetuneConfig):
            return run_finetune(cmd)
        elif isinstance(cmd, BenchmarkConfig):
            return run_benchmark(cmd)
        elif isinstance(cmd, CalibrateConfig):
            run_calibrate(cmd)
        elif isinstance(cmd, RunsConfig):
            from dtlab.runs_table import list_runs

            list_runs(cmd)
        elif isinstance(cmd, ExportCommand):
            from dtlab.export import export_run

            out = export_run(cmd.run, cmd.out, cmd.dataset)
            print(f"{out}: policy.onnx, policy.json, README.md")
        elif isinstance(cmd, InteropCommand):
            from dtlab.interop import huggingface

            sub = cmd.command
            if isinstance(sub, InteropFromHF):
                out = huggingface.from_hf(sub.src, sub.out, dataset=sub.dataset, env=sub.env,
                                          obs_mean=sub.obs_mean, obs_std=sub.obs_std,
                                          return_scale=sub.return_scale,
                                          context_len=sub.context_len)
            else:
                out = huggingface.to_hf(sub.run, sub.out, push=sub.push)
            print(f"{out}: written")
        elif isinstance(cmd, TrainBehaviourCommand):
            run_train_behaviour(cmd)
        elif isinstance(cmd, CollectConfig):
            run_collect(cmd)
        elif isinstance(cmd, DataCommand):
            if isinstance(cmd.command, DataInfo):
                run_data_info(cmd.command)
            elif isinstance(cmd.command, DataConvert):
                run_data_convert(cmd.command)
            else:
                run_data_validate(cmd.command)
    except DtlabError as exc:
        print(f"dtlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dtlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
