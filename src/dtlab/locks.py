"""Exclusive file locks taken without waiting: the one primitive behind "one process at a time"
(a run directory's writer, ``dtlab.rundir.RunDirectory.hold``).

``fcntl.flock`` on a regular file: advisory, released by the OS when the holder's process ends
however it ends (a SIGKILL too), and honoured across machines on NFS (Linux has emulated
``flock`` there with whole-file byte-range locks since 2.6.12: flock(2), NOTES). The holder
records a line in the file, ``<pid>@<host> <activity>``, for the refusal message of the next.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

from dtlab.errors import DtlabWarning


class Held(Exception):
    """Another process holds the lock. ``pid``, ``host`` and ``activity``: what the holder
    recorded, where the record is its own (None otherwise: a holder that could open the file
    read-only only leaves an earlier holder's record, whose process is then gone)."""

    def __init__(self, pid: int | None, host: str | None, activity: str | None) -> None:
        super().__init__(pid, host, activity)
        self.pid, self.host, self.activity = pid, host, activity

    def holder(self) -> str:
        """The holder in words: "another process (pid 12, training)", "another process (pid 12
        on node7, training)" for another host, or as much as is known."""
        known = []
        if self.pid is not None:
            known.append(f"pid {self.pid}" + (f" on {self.host}" if self.host != _HOST else ""))
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
    missing directory counts as Replaced (the directory was there a moment before). A file
    system that cannot lock gets a DtlabWarning (the caller goes on unlocked)."""
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
            _record(fd, f"{os.getpid()}@{_HOST} {activity}".strip())
            return fd
        problem = Replaced()
    except BlockingIOError:
        problem = Held(*_recorded(fd))
    except FileNotFoundError:  # the holder removed it between this open and this lock
        problem = Replaced()
    except OSError as exc:  # the file system cannot lock (ENOLCK; Lustre without flock: ENOSYS)
        device = os.fstat(fd).st_dev
        os.close(fd)
        if device not in _WARNED:  # once per file system and process, not once per lock file
            _WARNED.add(device)
            warnings.warn(f"{path.parent}: this file system cannot lock ({exc.strerror}); dtlab "
                          "goes on without its locks here, so nothing stops two processes from "
                          "writing one run at the same time", DtlabWarning, stacklevel=2)
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
    except PermissionError as denied:
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a directory this process may not write, without a lock file
            raise denied from None


def _record(fd: int, line: str) -> None:
    """Replace the file's content with ``line``; nothing where it is open read-only."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line + "\n").encode(), 0)
    except OSError:
        pass


def _recorded(fd: int) -> tuple[int | None, str | None, str | None]:
    """The (pid, host, activity) the holder recorded ("<pid>@<host> <activity>" on the file's
    first line); Nones for a record that is not dtlab's, or whose process on this host is gone
    (a stale record, left under a holder that could not write its own). Processes in another
    pid namespace under the same host name (containers) cannot be told apart from this one's."""
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace")
    except OSError:
        return None, None, None
    holder, _, activity = text.partition("\n")[0].strip().partition(" ")
    pid, at, host = holder.partition("@")
    if not (at and host and pid.isascii() and pid.isdigit() and 0 < int(pid) < 2**31):
        return None, None, None
    if host == _HOST and not _alive(int(pid)):
        return None, None, None
    return int(pid), host, (activity.strip() or None)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists
        pass
    return True


_HOST = socket.gethostname() or "localhost"
_WARNED: set[int] = set()  # devices already warned about (cannot lock)
