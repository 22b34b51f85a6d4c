"""Exclusive file locks taken without waiting: the one primitive behind "one process at a time"
(a run directory's writer, ``dtlab.prepare.one_writer``; a benchmark run's trainer,
``dtlab.benchmark.run_lock``).

``fcntl.flock`` on a regular file: advisory, released by the OS when the holder's process ends
however it ends (a SIGKILL too), and honoured across machines on NFS (Linux has emulated
``flock`` there with whole-file byte-range locks since 2.6.12: flock(2), NOTES). The holder
records a line in the file (its pid and what it does) for the refusal message of the next.
"""

from __future__ import annotations

import os
from pathlib import Path


class Held(Exception):
    """Another process holds the lock. ``pid`` and ``activity``: what the holder recorded (None
    when it recorded nothing, e.g. it could open the file read-only only)."""

    def __init__(self, pid: int | None, activity: str | None) -> None:
        super().__init__(pid, activity)
        self.pid, self.activity = pid, activity

    def holder(self) -> str:
        """The holder in words: another process (pid 12, training), or as much as it recorded."""
        known = [f"pid {self.pid}"] if self.pid is not None else []
        known += [self.activity] if self.activity else []
        return f"another process ({', '.join(known)})" if known else "another process"


class Replaced(Exception):
    """The lock file, or its directory, was removed or replaced between its open and its lock:
    the lock taken would be on a file no other process opens."""


def acquire(path: Path, activity: str = "") -> int | None:
    """Lock ``path`` (created if missing, mode 0666 less the umask) exclusively, and record this
    process's pid and ``activity`` in it. Returns the open file descriptor that holds the lock
    (``release`` it, or let the process end); None where nothing can be locked: no ``fcntl``
    (Windows), no permission to create the file or a file system that cannot lock (ENOLCK).

    Raises Held (another process holds it) or Replaced (see there); FileNotFoundError from a
    missing directory counts as Replaced (the directory was there a moment before)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        fd = _open(path)
    except FileNotFoundError:
        raise Replaced() from None
    except OSError:  # no permission, a read-only file system, a directory in the way
        return None
    problem: Exception
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held, now = os.fstat(fd), os.stat(path)
        if (held.st_ino, held.st_dev) == (now.st_ino, now.st_dev):
            _record(fd, f"{os.getpid()} {activity}".strip())
            return fd
        problem = Replaced()
    except BlockingIOError:
        problem = Held(*_recorded(fd))
    except FileNotFoundError:  # the holder removed it between this open and this lock
        problem = Replaced()
    except OSError:  # the file system cannot lock
        os.close(fd)
        return None
    os.close(fd)
    raise problem


def release(fd: int | None) -> None:
    """Give the lock back (close its descriptor); nothing for None."""
    if fd is not None:
        os.close(fd)


def _open(path: Path) -> int:
    """Open (creating it if missing) the lock file; read-only where another user's file may not
    be written (``flock`` needs no write access)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _record(fd: int, line: str) -> None:
    """Replace the file's content with ``line``; nothing where it is open read-only."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line + "\n").encode(), 0)
    except OSError:
        pass


def _recorded(fd: int) -> tuple[int | None, str | None]:
    """The (pid, activity) the holder recorded: "<pid> <activity>" on the file's first line."""
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace")
    except OSError:
        return None, None
    pid, _, activity = text.partition("\n")[0].strip().partition(" ")
    if not pid.isdigit():  # not a record of dtlab's
        return None, None
    return int(pid), (activity.strip() or None)
