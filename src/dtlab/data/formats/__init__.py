"""Datasets: read any supported format into an EpisodeSet, write one back, convert between them.

A source or destination is a file path, or ``minari:<dataset id>`` for a Minari dataset in the
local Minari root (``$MINARI_DATASETS_PATH``, default ``~/.minari/datasets``; minari.py). A source
may also be ``dqn-replay:DIR[:buffers=A-B][:transitions=N]``: Dopamine replay logs, such as the
DQN Replay Dataset's, streamed (dqn_replay.py; read only).
``load_episodes`` recognizes a file's format from its contents, not its name:

- HDF5 with a root attribute ``dtlab_format``            -> dtlab's native format (native.py)
- HDF5 with a ``terminals`` or ``timeouts`` dataset       -> D4RL's layout (d4rl.py)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats._hdf5 import open_hdf5, renaming_hint, top_level_keys
from dtlab.data.formats.d4rl import episodes_from_d4rl, read_d4rl, write_d4rl
from dtlab.data.formats.dqn_replay import PREFIX as DQN_REPLAY_PREFIX
from dtlab.data.formats.dqn_replay import split_source as split_replay_source
from dtlab.data.formats.dqn_replay import read_dqn_replay
from dtlab.data.formats.minari import PREFIX as MINARI_PREFIX
from dtlab.data.formats.minari import read_minari
from dtlab.data.formats.minari_write import write_minari
from dtlab.data.formats.native import FORMAT_ATTR, episodes_from_native, read_native, write_native
from dtlab.errors import ConfigError, DatasetError

__all__ = ["load_episodes", "save_episodes", "absolute_source", "is_file_source", "missing_file", "convert", "read_d4rl", "write_d4rl", "read_native",
           "write_native", "read_minari", "write_minari", "read_dqn_replay"]

Format = Literal["native", "d4rl", "minari"]


def load_episodes(path: str | Path) -> EpisodeSet:
    """Load a dataset file in any supported format, ``minari:<id>`` or ``dqn-replay:DIR...``;
    failures: DatasetError."""
    if str(path).startswith(MINARI_PREFIX):
        return read_minari(str(path)[len(MINARI_PREFIX):])
    if str(path).startswith(DQN_REPLAY_PREFIX):
        return read_dqn_replay(str(path))
    return _load_hdf5(Path(path))


def is_file_source(path: str | Path) -> bool:
    """Whether ``path`` names a dataset file (HDF5), not ``minari:<id>`` or ``dqn-replay:...``."""
    return not str(path).startswith((MINARI_PREFIX, DQN_REPLAY_PREFIX))


def missing_file(path: str | Path) -> str | None:
    """For a dataset file, or a ``dqn-replay:`` source's directory, that is not there: how to
    name it in an error, its path and, for a relative one, the directory it was looked for from
    ("d.hdf5 (from /home/u)"); None when it is there, or is not local (``minari:<id>``)."""
    text = str(path)
    if text.startswith(DQN_REPLAY_PREFIX):
        text = split_replay_source(text)[0]
    elif not is_file_source(text):
        return None
    if Path(text).exists():
        return None
    return text if Path(text).is_absolute() else f"{text} (from {Path.cwd()})"


def absolute_source(path: str | Path) -> str:
    """``path`` as a run records it: an existing dataset file, or a ``dqn-replay:`` source's
    directory, made absolute (so the run finds it again from any working directory); anything
    else (Minari ids, missing files) as given."""
    text = str(path)
    if text.startswith(DQN_REPLAY_PREFIX):
        directory, rest = split_replay_source(text)  # the directory and its options, as given
        if Path(directory).is_dir():
            return f"{DQN_REPLAY_PREFIX}{os.path.abspath(directory)}{rest}"
        return text
    if is_file_source(text) and Path(text).is_file():
        return os.path.abspath(text)  # not resolve(): a link keeps the name it was given by
    return text


def _load_hdf5(path: Path) -> EpisodeSet:
    with open_hdf5(path) as f:
        if FORMAT_ATTR in f.attrs:
            return episodes_from_native(f, path)
        if "terminals" in f or "timeouts" in f:
            return episodes_from_d4rl(f, path)
        raise DatasetError(
            f"{path}: unrecognized HDF5 layout: missing root attribute '{FORMAT_ATTR}' (dtlab "
            f"native) and datasets 'terminals'/'timeouts' (D4RL); top-level keys: "
            f"{top_level_keys(f)}{renaming_hint(f, 'terminals') or renaming_hint(f, 'timeouts')}")


def save_episodes(episodes: EpisodeSet, dest: str | Path, format: Format | None = None,
                  **options: Any) -> None:
    """Write ``episodes`` to ``dest`` in the given format.

    ``format`` None: "minari" when ``dest`` is ``minari:<id>``, else "native". For "minari",
    ``dest`` is ``minari:<id>`` or the bare id. ``options`` are the writer's keyword arguments
    (``write_minari``: env_id, final_observations, overwrite, ...; ``write_d4rl``: metadata).
    Files are replaced atomically; an existing Minari dataset only with ``overwrite=True``.
    """
    is_minari_dest = str(dest).startswith(MINARI_PREFIX)
    if format is None:
        format = "minari" if is_minari_dest else "native"
    if format == "minari":
        dataset_id = str(dest)[len(MINARI_PREFIX):] if is_minari_dest else str(dest)
        write_minari(episodes, dataset_id, **options)
        return
    if is_minari_dest:
        raise ConfigError(f"destination {dest!r} is a Minari dataset but format is {format!r}")
    if format == "native":
        write_native(episodes, dest, **options)
    elif format == "d4rl":
        write_d4rl(episodes, dest, **options)
    else:
        raise ConfigError(f"unknown dataset format {format!r}; expected 'native', 'd4rl' or "
                         "'minari'")


def convert(src: str | Path, dst: str | Path, format: Format | None = None,
            **options: Any) -> EpisodeSet:
    """Read ``src`` (any supported source) and write it to ``dst``; returns the episodes.

    ``format`` and ``options`` as in :func:`save_episodes`, e.g.
    ``convert("hopper.hdf5", "minari:dtlab/hopper/medium-v0", env_id="Hopper-v5")``.
    """
    episodes = load_episodes(src)
    save_episodes(episodes, dst, format, **options)
    return episodes
