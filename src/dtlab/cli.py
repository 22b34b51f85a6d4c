"""The ``dtlab`` command line (tyro subcommands); ``--help`` text comes from the config docstrings.

Every failure on bad input is a DtlabError: printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
from dataclasses import dataclass
from typing import Annotated, Union

import tyro

from dtlab.benchmark.plan import BenchmarkConfig
from dtlab.cli_errors import parse, train_defaults
from dtlab.behaviour.sac import BehaviourConfig
from dtlab.collect import CollectConfig
from dtlab.config import MAX_SEED, TrainConfig, check_number
from dtlab.data_commands import DataCommand, run_data
from dtlab.calibrate import CalibrateConfig
from dtlab.evaluate import EvalConfig
from dtlab.finetune import FinetuneConfig
from dtlab.errors import DtlabError, one_line_warning
from dtlab.quickstart import STEPS as QUICKSTART_STEPS
from dtlab.runs_table import RunsConfig


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
    from dtlab.distributed import World
    from dtlab.finetune import finetune

    with signals_received() as received:
        result = finetune(cfg, should_stop=lambda: bool(received))
    if not World.current().is_main:  # under torchrun, rank 0 reports
        return 128 + received[0] if result.interrupted and received else 0
    if result.interrupted:
        sig = received[0] if received else 0
        print(f"interrupted by signal {sig} at online env step {result.env_steps}; checkpoint "
              f"{result.checkpoint} (gradient step {result.gradient_step}); continue with the "
              "same command and --resume",
              file=sys.stderr)
        return 128 + sig
    if result.already_done:
        print(f"{cfg.out}: already at {result.env_steps} online env steps (--online-steps "
              f"{cfg.online_steps}); nothing to do (raise --online-steps to continue it)")
        return 0
    print(f"done: {result.env_steps} online env steps in {result.rollouts} rollouts, checkpoint "
          f"{result.checkpoint} (gradient step {result.gradient_step})")
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
    from dtlab.calibrate import calibrate_checkpoint

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
                                  trust=cfg.trust_pickle, medium_step=cfg.medium_step, **kwargs)
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


def parse_command(args: list[str]):
    """The command ``args`` name, its config built (and validated) by tyro; ``dtlab train`` with
    --preset, --config or --resume parses over those saved defaults. ConfigError for a parse
    error (one line), None for ``--version`` (printed)."""
    defaults = None
    if args[:1] == ["train"]:  # --preset, --config, --resume: saved defaults, overridable
        train_args, defaults = train_defaults(args[1:])
        args = ["train", *train_args]
    if args[:1] == ["--version"]:
        from dtlab._version import __version__

        print(f"dtlab {__version__}")
        return None
    if defaults is not None:  # a saved configuration: its values are the defaults
        return parse(TrainConfig, args[1:], prog="dtlab train", description=DESCRIPTION,
                     config=(tyro.conf.OmitSubcommandPrefixes,), default=defaults)
    return parse(Command, args, prog="dtlab", description=DESCRIPTION,
                 config=(tyro.conf.OmitSubcommandPrefixes,),
                 extra_flags={"train": ["--preset", "--config"]})


def run_export(cmd: ExportCommand) -> None:
    from dtlab.export import export_run

    out = export_run(cmd.run, cmd.out, cmd.dataset)
    print(f"{out}: policy.onnx, policy.json, README.md")


def run_interop(cmd: InteropCommand) -> None:
    from dtlab.interop import huggingface

    sub = cmd.command
    if isinstance(sub, InteropFromHF):
        out = huggingface.from_hf(sub.src, sub.out, dataset=sub.dataset, env=sub.env,
                                  obs_mean=sub.obs_mean, obs_std=sub.obs_std,
                                  return_scale=sub.return_scale, context_len=sub.context_len)
    else:
        out = huggingface.to_hf(sub.run, sub.out, push=sub.push)
    print(f"{out}: written")


def run_quickstart(cmd: QuickstartConfig) -> None:
    from dtlab.quickstart import quickstart

    quickstart(cmd.out, steps=cmd.steps, episodes=cmd.episodes, seed=cmd.seed,
               progress=cmd.progress, overwrite=cmd.overwrite)


def run_runs(cmd: RunsConfig) -> None:
    from dtlab.runs_table import list_runs

    list_runs(cmd)


# Each command's config type and what runs it; a runner's int return is the exit code.
RUNNERS = ((QuickstartConfig, run_quickstart), (TrainConfig, run_train),
           (EvalConfig, run_evaluate), (FinetuneConfig, run_finetune),
           (BenchmarkConfig, run_benchmark), (CalibrateConfig, run_calibrate),
           (RunsConfig, run_runs), (ExportCommand, run_export), (InteropCommand, run_interop),
           (TrainBehaviourCommand, run_train_behaviour), (CollectConfig, run_collect),
           (DataCommand, run_data))


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = one_line_warning
    if argv is None and hasattr(signal, "SIGPIPE"):  # `dtlab ... | head`: end quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        # Inside the try: config dataclasses validate themselves while tyro builds them, and a
        # parse error is one ConfigError line.
        cmd = parse_command(list(sys.argv[1:] if argv is None else argv))
        if cmd is None:
            return 0
        run = next(run for kind, run in RUNNERS if isinstance(cmd, kind))
        code = run(cmd)
    except DtlabError as exc:
        print(f"dtlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dtlab: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
