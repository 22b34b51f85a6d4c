"""The ``dtlab`` command line (tyro subcommands); ``--help`` text comes from the config docstrings.

Every failure on bad input is a DtlabError: printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import tyro

from dtlab.config import BehaviourConfig, CollectConfig, EvalConfig, TrainConfig
from dtlab.errors import DtlabError


@dataclass(frozen=True)
class DataInfo:
    """Print episodes, transitions, return statistics and dims of a dataset."""

    path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """Dataset: D4RL or dtlab native HDF5 file, or minari:<dataset id>."""
    json: bool = False
    """Print machine-readable JSON instead of a table."""


@dataclass(frozen=True)
class DataValidate:
    """Run every load-time check on a dataset and report problems (exit 2 on the first error)."""

    path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """Dataset file (D4RL HDF5 or dtlab native)."""
    env: str | None = None
    """Also check the dataset against this Gymnasium env's spaces and action bounds."""


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
    steps: int = 3000
    """Training steps."""
    episodes: int = 10
    """Evaluation episodes per target."""
    seed: int = 0
    """Seed for data collection, training and evaluation."""
    progress: bool = True
    """Show a progress bar while training."""
    overwrite: bool = False
    """Replace the run in --out if one is there."""


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


Command = Union[
    Annotated[QuickstartConfig, tyro.conf.subcommand("quickstart")],
    Annotated[TrainConfig, tyro.conf.subcommand("train")],
    Annotated[EvalConfig, tyro.conf.subcommand("evaluate")],
    Annotated[DataCommand, tyro.conf.subcommand("data")],
    Annotated[CollectConfig, tyro.conf.subcommand("collect")],
    Annotated[TrainBehaviourCommand, tyro.conf.subcommand("train-behaviour")],
]


def run_train(cfg: TrainConfig) -> int:
    from dtlab.train import train

    result = train(cfg)
    if result.interrupted:
        print(f"interrupted by signal {result.signal} at step {result.steps}; checkpoint "
              f"{result.checkpoint}; continue with --resume", file=sys.stderr)
        return 128 + (result.signal or 0)
    skipped = f", {result.skipped_nonfinite} non-finite steps skipped" if result.skipped_nonfinite else ""
    print(f"done: {result.steps} steps, final loss {result.final_loss:.5f}{skipped}, "
          f"checkpoint {result.checkpoint}")
    return 0


def run_evaluate(cfg: EvalConfig) -> None:
    from dtlab.evaluate import evaluate_checkpoint

    evaluate_checkpoint(cfg, echo=True)


def run_collect(cfg: CollectConfig) -> None:
    import time

    from dtlab import collect
    from dtlab.data.formats import MINARI_PREFIX, save_episodes
    from dtlab.errors import ConfigError

    # Refuse conflicting or meaningless options before collecting anything.
    for flag, value in (("--episodes", cfg.episodes), ("--transitions", cfg.transitions)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    to_minari = cfg.out.startswith(MINARI_PREFIX)
    out_format = cfg.format or ("minari" if to_minari else "d4rl")
    if to_minari and out_format != "minari":
        raise ConfigError(f"--out {cfg.out} is a Minari dataset, but --format is {out_format}")
    if out_format == "minari" and not to_minari:
        raise ConfigError(f"--format minari writes a Minari dataset: give --out {MINARI_PREFIX}<id>, "
                          f"not {cfg.out}")
    if cfg.preset:
        if cfg.episodes is not None:
            raise ConfigError("presets are sized by --transitions (D4RL's 1M by default), not "
                              "--episodes")
        preset_env, _ = collect.parse_preset(cfg.preset)
        if cfg.env is not None and cfg.env != preset_env:
            raise ConfigError(f"--env {cfg.env} conflicts with --preset {cfg.preset} ({preset_env})")
    elif cfg.policy == "pendulum-mixed" and cfg.transitions is not None:
        raise ConfigError("policy pendulum-mixed collects whole episodes: give --episodes, not "
                          "--transitions")

    started = time.perf_counter()
    if cfg.preset:
        kwargs = {"num_transitions": cfg.transitions} if cfg.transitions else {}
        episodes = collect.preset_dataset(cfg.preset, seed=cfg.seed, behaviour_run=cfg.behaviour_run,
                                          trust=cfg.trust_pickle, **kwargs)
        env_id = episodes.metadata.get("env_id")
    elif cfg.env is None:
        raise ConfigError("give --env (or --preset)")
    elif cfg.policy == "pendulum-mixed":
        if cfg.env != "Pendulum-v1":
            raise ConfigError("policy pendulum-mixed is for Pendulum-v1")
        episodes = collect.pendulum_mixed_dataset(num_episodes=cfg.episodes or 300, seed=cfg.seed)
        env_id = cfg.env
    else:
        env_id = cfg.env
        space = collect.env_action_space(env_id)
        if cfg.policy == "random":
            policy = collect.RandomPolicy(space)
        elif cfg.policy.startswith("actor:"):
            policy = collect.ActorPolicy(cfg.policy[len("actor:"):], deterministic=cfg.deterministic)
        elif cfg.policy.startswith("sb3:"):
            policy = collect.SB3Policy(cfg.policy[len("sb3:"):], env_id, trust=cfg.trust_pickle,
                                       deterministic=cfg.deterministic)
        elif cfg.policy == "pendulum-swingup":
            if env_id != "Pendulum-v1":
                raise ConfigError("policy pendulum-swingup is for Pendulum-v1")
            policy = collect.PendulumSwingUp(quality=cfg.quality)
        else:
            raise ConfigError(f"unknown policy '{cfg.policy}' (random, actor:PATH, sb3:PATH, "
                              "pendulum-swingup, pendulum-mixed)")
        if cfg.episodes is None and cfg.transitions is None:
            raise ConfigError("give --episodes or --transitions")
        episodes = collect.collect_episodes(env_id, policy, num_episodes=cfg.episodes,
                                            num_transitions=cfg.transitions, seed=cfg.seed)
    options = {"env_id": env_id} if out_format == "minari" else {}
    save_episodes(episodes, cfg.out, out_format, **options)
    ret = episodes.summary()["episode_return"]
    print(f"wrote {cfg.out}: {episodes.num_episodes} episodes, {episodes.num_transitions} transitions, "
          f"return mean {ret['mean']:.1f} +- {ret['std']:.1f} (min {ret['min']:.1f}, max "
          f"{ret['max']:.1f}) in {time.perf_counter() - started:.1f} s")


def run_train_behaviour(cfg) -> None:
    from dtlab.behaviour import export_presets, train_behaviour

    if not cfg.export_only:
        train_behaviour(cfg.config, log=lambda m: print(m, flush=True))
    if cfg.export:
        manifest = export_presets(cfg.config.out, cfg.export, env_id=cfg.config.env,
                                  episodes=cfg.export_episodes, seed=cfg.config.seed)
        print(json.dumps(manifest, indent=2))


def run_data_info(cmd: DataInfo) -> None:
    from dtlab.data.formats import load_episodes

    summary = load_episodes(cmd.path).summary()
    if cmd.json:
        print(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(cmd.path), show_header=False)
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
        env_id = cmd.env or episodes.metadata.get("env_id")
        options = {"env_id": env_id if isinstance(env_id, str) else None, "overwrite": cmd.overwrite}
    save_episodes(episodes, cmd.dst, cmd.format, **options)
    print(f"wrote {cmd.dst}: {episodes.num_episodes} episodes, {episodes.num_transitions} transitions")


def run_data_validate(cmd: DataValidate) -> None:
    from dtlab.data.formats import load_episodes
    from dtlab.envs import actions_outside_bounds, make_env
    from dtlab.spaces import check_against_env

    episodes = load_episodes(cmd.path)
    print(f"{cmd.path}: {episodes.num_episodes} episodes, {episodes.num_transitions} transitions: "
          "keys, lengths, finiteness and episode flags OK")
    if cmd.env:
        env = make_env(cmd.env)
        check_against_env(env, episodes.observation_space, episodes.action_space,
                          what=f"dataset {cmd.path}", exact_n=False)
        outside = int(actions_outside_bounds(episodes.actions, env.action_space).sum())
        print(f"{cmd.path}: spaces match {cmd.env}; {outside} actions outside the action bounds")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"dtlab: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    try:
        # Inside the try: config dataclasses validate themselves while tyro builds them.
        cmd = tyro.cli(Command, args=argv, prog="dtlab",
                       description="dtlab: Decision Transformers for offline RL.",
                       config=(tyro.conf.OmitSubcommandPrefixes,))
        if isinstance(cmd, QuickstartConfig):
            from dtlab.quickstart import quickstart

            quickstart(cmd.out, steps=cmd.steps, episodes=cmd.episodes, seed=cmd.seed,
                       progress=cmd.progress, overwrite=cmd.overwrite)
        elif isinstance(cmd, TrainConfig):
            return run_train(cmd)
        elif isinstance(cmd, EvalConfig):
            run_evaluate(cmd)
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
