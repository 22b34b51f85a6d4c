"""Dataset files: read any supported format into an EpisodeSet, write one back.

``load_episodes`` recognizes the format from the file's contents, not its name:

- HDF5 with a root attribute ``dtlab_format``            -> dtlab's native format (native.py)
- HDF5 with a ``terminals`` or ``timeouts`` dataset       -> D4RL's layout (d4rl.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats._hdf5 import open_hdf5
from dtlab.data.formats.d4rl import episodes_from_d4rl, read_d4rl, write_d4rl
from dtlab.data.formats.native import FORMAT_ATTR, episodes_from_native, read_native, write_native
from dtlab.errors import DatasetError

__all__ = ["load_episodes", "save_episodes", "read_d4rl", "write_d4rl", "read_native",
           "write_native"]


def load_episodes(path: str | Path) -> EpisodeSet:
    """Load a dataset file in any supported format; every failure is a DatasetError."""
    # Non-file sources (e.g. a "minari:<dataset id>" prefix) get their branch here.
    return _load_hdf5(Path(path))


def _load_hdf5(path: Path) -> EpisodeSet:
    with open_hdf5(path) as f:
        if FORMAT_ATTR in f.attrs:
            return episodes_from_native(f, path)
        if "terminals" in f or "timeouts" in f:
            return episodes_from_d4rl(f, path)
        keys = sorted(f.keys())
        shown = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "") or "none"
        raise DatasetError(
            f"{path}: unrecognized HDF5 layout: missing root attribute '{FORMAT_ATTR}' (dtlab "
            f"native) and datasets 'terminals'/'timeouts' (D4RL); top-level keys: {shown}")


def save_episodes(episodes: EpisodeSet, path: str | Path,
                  format: Literal["native", "d4rl"] = "native") -> None:
    """Write ``episodes`` to ``path`` atomically in the given format."""
    if format == "native":
        write_native(episodes, path)
    elif format == "d4rl":
        write_d4rl(episodes, path)
    else:
        raise ValueError(f"unknown dataset format {format!r}; expected 'native' or 'd4rl'")
