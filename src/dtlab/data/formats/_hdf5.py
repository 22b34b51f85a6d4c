"""HDF5 plumbing shared by the file formats: opening with clear errors, atomic writes, metadata."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dtlab.atomic import atomic_path
from dtlab.errors import DatasetError

# Compression for the per-transition arrays (gzip as in the D4RL files; level 4 is h5py's default).
COMPRESSION = "gzip"

# Image frames (N, H, W) uint8 are chunked by this many frames (about 450 kB of 84 x 84 frames per
# chunk), so that reading a range of frames decompresses only its chunks.
FRAME_CHUNK = 64


def write_observations(group: h5py.Group, key: str, observations: np.ndarray) -> None:
    """``observations`` as dataset ``key``, gzip-compressed: float32 vectors as they are, uint8
    frames (N, H, W) chunked by ``FRAME_CHUNK`` frames and kept uint8."""
    if observations.dtype == np.uint8:
        chunks = (min(FRAME_CHUNK, max(1, observations.shape[0])), *observations.shape[1:])
        group.create_dataset(key, data=observations, compression=COMPRESSION, chunks=chunks)
    else:
        group.create_dataset(key, data=observations.astype(np.float32), compression=COMPRESSION)


# Attribute marking a metadata dataset whose string value is JSON (lists, None, ...).
_JSON_ATTR = "dtlab_json"


@contextmanager
def open_hdf5(path: str | Path) -> Iterator[h5py.File]:
    """Open an HDF5 file for reading; every failure becomes a DatasetError naming the file."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, expected an HDF5 file")
    if not os.access(path, os.R_OK):
        raise DatasetError(f"{path}: permission denied")
    if not h5py.is_hdf5(path):
        raise DatasetError(f"{path}: not an HDF5 file (or truncated/corrupt)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:  # e.g. "truncated file: eof = ..."
        raise DatasetError(f"{path}: not an HDF5 file (or truncated/corrupt)") from e
    with f:
        try:
            yield f
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
            # Damaged object headers, heaps or chunks only show when they are read; h5py reports
            # them as OSError, KeyError ("Unable to open object (bad object header ...)"),
            # RuntimeError ("Object visitation failed ..."), ValueError or TypeError.
            if not isinstance(e, OSError) and not _raised_in_h5py(e):
                raise  # a bug in dtlab, not a bad file
            reason = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise DatasetError(f"{path}: reading failed, file truncated or corrupt ({reason})"
                               ) from e


def _raised_in_h5py(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside h5py (its innermost frame is h5py's code)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "h5py" in Path(tb.tb_frame.f_code.co_filename).parts


# Names other tools give the arrays a layout needs (Gymnasium's step API, singulars, short forms):
# a file holding one of them but not the name asked for gets a hint to rename it.
_OTHER_NAMES = {"observations": ("observation", "obs", "states", "state"),
                "actions": ("action", "acts"), "rewards": ("reward", "rews"),
                "terminals": ("dones", "done", "terminated", "terminations"),
                "timeouts": ("truncated", "truncations"),
                "terminations": ("terminals", "terminated", "dones", "done"),
                "truncations": ("timeouts", "truncated")}


def renaming_hint(f: h5py.File, key: str) -> str:
    """``"; rename 'X' to 'key'"`` when the file holds another common name ``X`` for the array
    ``key`` (``_OTHER_NAMES``), else ``""``."""
    other = next((name for name in _OTHER_NAMES.get(key, ()) if name in f), None)
    return f"; rename '{other}' to '{key}'" if other else ""


def top_level_keys(f: h5py.File) -> str:
    """The file's top-level keys, the first 10 quoted, for messages ("none" when empty)."""
    keys = sorted(f.keys())
    return ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "") or "none"


def read_array(f: h5py.File, key: str, path: str | Path, layout: str) -> np.ndarray:
    """The whole numeric dataset ``key``; missing or non-numeric -> DatasetError (a missing one
    listing the keys the file has, and a renaming hint where one fits)."""
    if key not in f:
        raise DatasetError(f"{path}: missing key '{key}' ({layout}; top-level keys: "
                           f"{top_level_keys(f)}){renaming_hint(f, key)}")
    try:
        dset = f[key]
    except KeyError as e:  # a dangling link, a damaged object header, ...
        raise DatasetError(f"{path}: cannot open '{key}' ({e.args[0] if e.args else e})") from e
    if not isinstance(dset, h5py.Dataset):
        what = "a group" if isinstance(dset, h5py.Group) else f"an HDF5 {type(dset).__name__}"
        raise DatasetError(f"{path}: '{key}' is {what}, expected a dataset")
    if dset.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: '{key}' has unsupported dtype {dset.dtype} (expected bool, "
                           "integer or float numbers)")
    if dset.shape is None:  # HDF5 null dataspace: h5py would return an h5py.Empty
        raise DatasetError(f"{path}: '{key}' has no data (null dataspace)")
    try:
        return dset[()]
    except OSError as e:  # a damaged or truncated chunk
        raise DatasetError(f"{path}: cannot read '{key}', file truncated or corrupt ({e})") from e
    except MemoryError as e:
        raise DatasetError(f"{path}: '{key}' of shape {dset.shape} and dtype {dset.dtype} does "
                           "not fit in memory") from e


@contextmanager
def atomic_hdf5(path: str | Path) -> Iterator[h5py.File]:
    """Write an HDF5 file atomically: a temp file in the same directory, fsync, then rename.

    On any exception the temp file is removed, any existing file at ``path`` is left untouched,
    and the exception propagates.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            yield f


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback for numpy values, paths and read-only mappings (an EpisodeSet's
    metadata)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value of type {type(value).__name__} cannot be stored")


def fixed_string(text: str) -> np.ndarray:
    """``text`` as a fixed-length UTF-8 HDF5 string (a numpy scalar array), as D4RL stores strings.

    dtlab writes no variable-length strings: those live in a global heap, and HDF5 2.0 hangs
    (a zero-size free-space object) or crashes on a damaged one when the string is read.
    Fixed-length strings are stored inline. (Length at least 1: HDF5 has no 0-byte strings.)
    """
    data = text.encode("utf-8")
    return np.array(data, dtype=h5py.string_dtype("utf-8", max(1, len(data))))


def write_metadata(group: h5py.Group, metadata: dict[str, Any]) -> None:
    """Store a metadata dict as scalar datasets under ``group``.

    Strings become fixed-length UTF-8 (``fixed_string``), numbers and bools stay numbers, nested
    dicts become subgroups (a key ``"a/b"`` does too), anything else (lists, None, strings with
    NUL characters, which a fixed-length string would drop at its end) a JSON string.
    """
    for key, value in metadata.items():
        if isinstance(value, dict):
            write_metadata(group.require_group(key), value)
        elif isinstance(value, str) and "\x00" not in value:
            group.create_dataset(key, data=fixed_string(value))
        elif isinstance(value, (bool, int, float, np.bool_, np.number)):
            group.create_dataset(key, data=value)
        else:
            group.create_dataset(key, data=fixed_string(json.dumps(value, default=json_default)))
            group[key].attrs[_JSON_ATTR] = True


def read_attributes(obj: h5py.HLObject) -> dict[str, Any]:
    """Scalar HDF5 attributes of ``obj`` (strings decoded, NumPy scalars as Python's); arrays are
    skipped."""
    out: dict[str, Any] = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (str, int, float, bool)):
            out[key] = value
    return out


def read_metadata(group: h5py.Group) -> dict[str, Any]:
    """Scalar datasets under ``group`` as a flat dict keyed ``"a/b"``; arrays are skipped.

    (D4RL files keep policy weights under ``metadata/policy/...``: provenance, not data we load.)
    """
    out: dict[str, Any] = {}

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset) or obj.shape != ():
            return
        value = obj[()]
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, np.generic):
            value = value.item()
        if obj.attrs.get(_JSON_ATTR, False) and isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                pass  # keep the raw string rather than refuse the whole dataset
        out[name] = value

    group.visititems(visit)
    return out
