"""dtlab.locks: the exclusive lock behind one writer per run directory and one trainer per
benchmark run, checked against real processes (a second open file description stands in for a
second process where the kernel treats them alike: flock(2) locks belong to the open file)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest

from dtlab import locks
from dtlab.errors import DtlabWarning

HOST = socket.gethostname()


def test_the_holder_is_named_to_the_next_and_the_lock_is_free_after_release(tmp_path):
    path = tmp_path / "run.lock"
    fd = locks.acquire(path, "calibrating")
    assert path.read_text() == f"{os.getpid()}@{HOST} calibrating\n"
    with pytest.raises(locks.Held) as refused:
        locks.acquire(path, "training")
    assert (refused.value.pid, refused.value.activity) == (os.getpid(), "calibrating")
    assert refused.value.holder() == f"another process (pid {os.getpid()}, calibrating)"
    assert path.read_text() == f"{os.getpid()}@{HOST} calibrating\n"  # the refused one wrote nothing
    locks.release(fd)
    fd = locks.acquire(path, "training")
    assert path.read_text() == f"{os.getpid()}@{HOST} training\n"  # the old record replaced, whole
    locks.release(fd)


@pytest.mark.parametrize("content, holder", [
    ("", "another process"),
    (f"{os.getpid()}@{HOST}", f"another process (pid {os.getpid()})"),
    ("7@node7 training", "another process (pid 7 on node7, training)"),  # another host: unchecked
    ("not a pid\nnoise", "another process"),
    (f"{2**22 + 12345}@{HOST} training", "another process"),  # no such process here: stale
    ("4242 training", "another process"),  # not a record of this format (dtlab before it)
    (f"99999999999999999999@{HOST} x", "another process"),  # corrupt: no OverflowError
    (f"\u00b2@{HOST} x", "another process"),  # a digit to str.isdigit, not to int()
])
def test_what_a_holder_recorded_is_shown_as_far_as_it_goes(tmp_path, content, holder):
    import fcntl

    path = tmp_path / "run.lock"
    path.write_text(content)
    with open(path) as f:  # a holder that could not write its own record (read-only)
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(locks.Held) as refused:
            locks.acquire(path, "training")
    assert refused.value.holder() == holder


@pytest.mark.parametrize("recreated", [False, True])
def test_a_lock_file_removed_between_open_and_lock_is_replaced(tmp_path, monkeypatch, recreated):
    """Removed (and, with ``recreated``, made again by another process) between this open and
    this lock: the lock taken is on a file nobody else opens any more."""
    import fcntl

    path = tmp_path / "run.lock"
    real = fcntl.flock

    def removed_first(fd, op):
        path.unlink()
        if recreated:
            path.write_text("")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", removed_first)
    with pytest.raises(locks.Replaced):
        locks.acquire(path)
    monkeypatch.undo()
    with pytest.raises(locks.Replaced):  # its directory gone
        locks.acquire(tmp_path / "gone" / "run.lock")


def test_nothing_is_locked_where_nothing_can_be(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert locks.acquire(blocker / "run.lock") is None  # NotADirectoryError: no lock, no error
    real_open = os.open

    def no_write_permission(path, flags, *mode):  # a directory this user may not write
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *mode)

    monkeypatch.setattr(os, "open", no_write_permission)
    assert locks.acquire(tmp_path / "run.lock") is None  # not "removed or replaced"
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    assert locks.acquire(tmp_path / "run.lock") is None
    assert not (tmp_path / "run.lock").exists()


def test_a_file_system_that_cannot_lock_is_warned_about_once(tmp_path, monkeypatch):
    import errno
    import fcntl

    monkeypatch.setattr(locks, "_WARNED", set())

    def enolck(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", enolck)
    with pytest.warns(DtlabWarning, match=rf"{tmp_path}: this file system cannot lock \(No locks "
                                          r"available\); dtlab goes on without its locks"):
        assert locks.acquire(tmp_path / "run.lock") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file system again: no second warning
        assert locks.acquire(tmp_path / "other.lock") is None


def test_a_holder_killed_with_sigkill_leaves_the_lock_free(tmp_path):
    path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from dtlab import locks
        locks.acquire(__import__("pathlib").Path({str(path)!r}), "training")
        print("held", flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(locks.Held) as refused:
            locks.acquire(path)
        assert refused.value.pid == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    locks.release(locks.acquire(path, "training"))
