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
