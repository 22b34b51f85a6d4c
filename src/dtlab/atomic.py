"""Atomic writes, one primitive for every writer: ``atomic_path`` hands out a temporary name in
the destination's directory; when the block succeeds the result is fsynced, given the permissions
a plain ``open``/``mkdir`` would have, and renamed over the destination; when it fails the
temporary is removed and any previous file stays as it was.

A crash at any moment leaves either the previous file (or directory) or the new one, never a
half-written one. Used by the HDF5 writers, checkpoints, Minari staging, JSON, plots and manifests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dtlab.errors import ConfigError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by setting and
    restoring it (a moment in which other threads would create files with mode 022)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str | Path) -> None:
    """Give a finished temporary file or directory the permissions a plain ``open``/``mkdir``
    would have (``mkstemp``, ``mkdtemp`` and safetensors create them private: 0600/0700)."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every platform or file system can
    fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str | Path) -> Path:
    """Fail early, with a one-line ConfigError, when ``path`` cannot be a file we write."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a file path to write")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{path}: parent {parent} is not a directory")
    return path


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in paths:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        give_default_mode(p)
    if path.is_dir():
        for d in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
            give_default_mode(d)
            fsync_dir(d)
        give_default_mode(path)


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; rename it to ``path`` when the block ends.

    ``directory``: the temporary is an empty directory (a checkpoint, a Minari dataset) and an
    existing directory at ``path`` is replaced (moved aside, then removed once the new one is in
    place; put back if that rename fails); otherwise the temporary is an empty file with the
    destination's suffix, for a writer that (re)creates it (h5py, matplotlib, safetensors,
    ``open``): a block that writes nothing replaces the destination with an empty file.
    Raises ConfigError when the destination's directory cannot be created or written.
    """
    path = Path(path) if directory else check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        else:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-",
                                        suffix=path.suffix)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if directory and path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)  # the previous directory goes back
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (ConfigError when it cannot be written)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as strict JSON (RFC 8259: no NaN/Infinity tokens) atomically.

    Non-finite floats are written as null; every JSON file dtlab writes goes through here.
    """
    write_text_atomic(path, dumps_json(data))


def dumps_json(data: Any, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> str:
    """``json.dumps`` that writes non-finite floats as null (strict JSON); ``default`` converts
    other types (e.g. numpy scalars), and its results are made strict too."""
    strict_default = None if default is None else (lambda value: _finite(default(value)))
    return json.dumps(_finite(data), indent=indent, allow_nan=False, default=strict_default)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
