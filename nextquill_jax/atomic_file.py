"""Replacing a file whole, so that a crash while writing it (SIGKILL, a full disk, power loss) leaves the old
file or the new one, never a torn or truncated one.

Imports nothing of this package, so any layer may name it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the block to write (by any writer: `open`, safetensors'
    `save_file`, ...); when the block ends without an error, the file is flushed to disk and renamed over
    `path` (made if missing; a rename within one directory is atomic on POSIX file systems). The temporary
    name is this call's own (`<name>.<random>.tmp`): writers of one path in several processes (every
    process of a multi-process `compare` writes its records) or threads each rename a whole file of theirs,
    the last one wins, and none renames or truncates another's.

    Raises:
        OSError: the flush or rename failed (e.g. ENOSPC), or the block wrote no file there
            (FileNotFoundError); what the block raises, unchanged. `path` is then as it was, and the temporary
            file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)  # read-only: a umask may leave it unwritable to its owner
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` (made if missing) by `text`, whole (`replaced_atomically`).

    Raises:
        OSError: the write, flush or rename failed (e.g. ENOSPC); `path` is then as it was, and the temporary
            file is removed.
    """
    with replaced_atomically(path) as tmp, open(tmp, "w", encoding=encoding, newline="\n") as f:
        f.write(text)
