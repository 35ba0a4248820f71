"""The check of a directory a command writes into (`--out`, `--workdir`, a compare file's `out:`), made before
any work: neither it nor a folder above it may be an existing file. Without it a mistyped path surfaces as a
traceback from the first `mkdir` or `open` under it, often after the work was done.

Imports nothing of this package, so any layer may name it (`third_party_logs.log_to` does).
"""

from __future__ import annotations

from pathlib import Path


def check_output_dir(path: str | Path, named: str) -> Path:
    """`path` as a Path, once nothing stands in the way of writing into it: it is a directory, or it and
    possibly some folders above it are missing and can be made. `named` says where `path` came from (a flag
    such as `--out`, or `FILE: compare.out`) for the message.

    Raises:
        NotADirectoryError: `path`, or the nearest existing folder above it, is a file; the message names
            `named`, the file and the fix.
    """
    path = Path(path)
    # The nearest existing one decides: a missing path under a file (afile/run) cannot be made either.
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return path
    where = f"{named} {path}" if existing == path else f"{named} {path}: {existing}"
    raise NotADirectoryError(
        f"{where} is a file, not a directory. Fix: pass a directory (a missing one is made) or move the file."
    )
