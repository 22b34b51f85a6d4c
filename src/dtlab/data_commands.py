"""``dtlab data info | validate | convert``: the data subcommands' configs (their field docstrings
are the ``--help``) and what each runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

import tyro

from dtlab.atomic import dumps_json


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


def run_data(cmd: DataCommand) -> None:
    """Run the data subcommand ``cmd`` holds."""
    if isinstance(cmd.command, DataInfo):
        run_data_info(cmd.command)
    elif isinstance(cmd.command, DataConvert):
        run_data_convert(cmd.command)
    else:
        run_data_validate(cmd.command)


def _load_with_findings(path: str, env_id: str | None):
    """Load ``path``; its DtlabWarnings (kind "read") and ``diagnose``'s findings, for the time
    limit and return scale of ``env_id`` (None: the dataset's recorded env id; neither, or an env
    with no registered scale: no time limit and a return scale fitted to the data, as training
    would use)."""
    import warnings

    from dtlab.data.diagnostics import Finding, default_return_scale, diagnose
    from dtlab.data.formats import load_episodes
    from dtlab.envs import time_limit
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
    scale, fitted = default_return_scale(env_id, episodes)
    findings += diagnose(episodes, time_limit=limit, return_scale=scale)
    context = (f"{env_id + ': ' if env_id else ''}time limit "
               f"{limit if limit is not None else 'unknown'}, return scale {scale:g}"
               f"{' (fitted to the data: no scale is registered for the env)' if fitted else ''}")
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
    from dtlab.envs import actions_outside_bounds, check_same_env, env_advice, make_env
    from dtlab.spaces import check_against_env

    episodes, findings, context = _load_with_findings(cmd.path, cmd.env)
    print(f"{cmd.path}: {episodes.num_episodes} episodes, {episodes.num_transitions} transitions: "
          "keys, lengths, finiteness and episode flags OK")
    if cmd.env:
        env = make_env(cmd.env)
        check_against_env(env, episodes.observation_space, episodes.action_space,
                          what=f"dataset {cmd.path}", exact_n=False,
                          advice=env_advice(episodes.provenance.env_id, cmd.env))
        check_same_env(episodes.provenance.env_id, cmd.env, what=cmd.path,
                       advice=f"validate against --env {episodes.provenance.env_id}")
        outside = int(actions_outside_bounds(episodes.actions, env.action_space).sum())
        print(f"{cmd.path}: spaces match {cmd.env}; {outside} actions outside the action bounds")
    for finding in findings:
        print(f"{cmd.path}: warning [{finding.kind}]: {finding.message}")
    print(f"{cmd.path}: {len(findings)} finding{'' if len(findings) == 1 else 's'} ({context})")
