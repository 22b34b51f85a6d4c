"""Atomic file writes: write to a temporary name in the destination directory, fsync, rename.

A crash at any moment leaves either the previous file or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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


def write_text_atomic(path: str | Path, text: str) -> None:
    path = check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        give_default_mode(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
        raise


def replace_into_place(tmp: str | Path, path: str | Path) -> None:
    """Fsync a finished temporary file, give it default permissions and rename it to ``path``."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    give_default_mode(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
