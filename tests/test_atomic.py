"""dtlab.atomic.atomic_path: the one temp-then-rename primitive every writer uses."""

import os
import stat

import pytest

from dtlab.atomic import atomic_path, write_text_atomic
from dtlab.errors import ConfigError


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_file_appears_whole_with_default_permissions(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".bin" and not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and leftovers(target.parent) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_a_failure_keeps_the_previous_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="simulated"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("simulated")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_a_directory_replaces_the_previous_one_whole(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a").write_text("1")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "c").write_text("3")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["b"] and leftovers(tmp_path) == []


def test_unwritable_destinations_are_one_line_config_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a directory"):
        with atomic_path(tmp_path):
            pass
    with pytest.raises(ConfigError, match="parent .* is not a directory"):
        write_text_atomic(tmp_path / "file" / "out.txt", "x")


def test_a_failed_directory_rename_puts_the_previous_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "w").write_text("old")
    real = os.replace

    def failing(src, dst):
        if str(src).startswith(str(tmp_path / ".ckpt.tmp-")) and dst == target:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(ConfigError, match="No space left on device"):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "old" and leftovers(tmp_path) == []
