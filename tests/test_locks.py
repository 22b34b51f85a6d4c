"""dtlab.locks: the exclusive lock behind one writer per run directory and one trainer per
benchmark run, checked against real processes (a second open file description stands in for a
second process where the kernel treats them alike: flock(2) locks belong to the open file)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dtlab import locks


def test_the_holder_is_named_to_the_next_and_the_lock_is_free_after_release(tmp_path):
    path = tmp_path / "run.lock"
    fd = locks.acquire(path, "training")
    assert path.read_text() == f"{os.getpid()} training\n"
    with pytest.raises(locks.Held) as refused:
        locks.acquire(path, "calibrating")
    assert (refused.value.pid, refused.value.activity) == (os.getpid(), "training")
    assert refused.value.holder() == f"another process (pid {os.getpid()}, training)"
    assert path.read_text() == f"{os.getpid()} training\n"  # the refused one wrote nothing
    locks.release(fd)
    fd = locks.acquire(path, "calibrating")
    assert path.read_text() == f"{os.getpid()} calibrating\n"  # the old record replaced, whole
    locks.release(fd)


@pytest.mark.parametrize("content, holder", [
    ("", "another process"),
    ("7", "another process (pid 7)"),
    ("not a pid\nnoise", "another process"),
])
def test_what_a_holder_recorded_is_shown_as_far_as_it_goes(tmp_path, content, holder):
    import fcntl

    path = tmp_path / "run.lock"
    path.write_text(content)
    with open(path) as f:  # a holder that recorded this much (read-only, as for another user)
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(locks.Held) as refused:
            locks.acquire(path, "training")
    assert refused.value.holder() == holder


def test_a_lock_file_removed_between_open_and_lock_is_replaced(tmp_path, monkeypatch):
    import fcntl

    path = tmp_path / "run.lock"
    real = fcntl.flock

    def removed_first(fd, op):
        path.unlink()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", removed_first)
    with pytest.raises(locks.Replaced):
        locks.acquire(path)
    with pytest.raises(locks.Replaced):  # its directory gone
        locks.acquire(tmp_path / "gone" / "run.lock")


def test_nothing_is_locked_where_nothing_can_be(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert locks.acquire(blocker / "run.lock") is None  # NotADirectoryError: no lock, no error
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    assert locks.acquire(tmp_path / "run.lock") is None
    assert not (tmp_path / "run.lock").exists()


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
