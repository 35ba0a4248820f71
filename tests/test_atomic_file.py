"""`write_text_atomic`: the file is replaced whole, and a write that fails part-way (a full disk) leaves the
old file as it was and no temporary file behind."""

from __future__ import annotations

import errno
import os

import pytest

from nextquill_jax import atomic_file
from nextquill_jax.atomic_file import write_text_atomic


def test_the_file_is_made_then_replaced_whole(tmp_path):
    path = tmp_path / "record.json"
    write_text_atomic(path, "first, and longer\n")
    write_text_atomic(path, "é second\n")
    assert path.read_bytes() == "é second\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_a_full_disk_while_writing_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    path.write_text("old\n")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_file.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "new and much longer\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_two_writers_of_one_path_never_share_a_temporary_file(tmp_path, monkeypatch):
    """A second writer (another process of a multi-process compare) starts while the first has written its
    temporary file but not yet renamed it. With one shared `<path>.tmp` the second truncated and renamed the
    first's file, whose rename then failed (FileNotFoundError). Each now renames a whole file of its own."""
    path = tmp_path / "compare_done.json"
    fsync = os.fsync
    second = []

    def second_writer_starts(fd: int) -> None:
        fsync(fd)
        if not second:
            second.append(1)
            write_text_atomic(path, '{"by": "second"}\n')

    monkeypatch.setattr(atomic_file.os, "fsync", second_writer_starts)
    write_text_atomic(path, '{"by": "first", "longer": true}\n')
    assert path.read_text() == '{"by": "first", "longer": true}\n'  # the last rename wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare_done.json"]


def test_the_flush_needs_no_write_permission_on_the_temporary_file(tmp_path, monkeypatch):
    """The file is flushed through a read-only descriptor: a reopening for writing failed (EACCES) for a user
    whose umask leaves new files unwritable to their owner (root, who runs these tests, is never refused, so
    the descriptor's mode is what is checked)."""
    import fcntl

    modes, fsync = [], os.fsync

    def recording(fd: int) -> None:
        modes.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
        fsync(fd)

    monkeypatch.setattr(atomic_file.os, "fsync", recording)
    write_text_atomic(tmp_path / "record.json", "text\n")
    assert modes == [os.O_RDONLY]


def test_a_ctrl_c_while_writing_leaves_the_old_file_and_no_temporary_one(tmp_path):
    """A KeyboardInterrupt (not an Exception) inside the block is cleaned up like a full disk: the old file
    stays and no `<name>.<random>.tmp` is left behind for every Ctrl-C."""
    path = tmp_path / "record.json"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_file.replaced_atomically(path) as tmp:
        tmp.write_text("new, half written")
        raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
