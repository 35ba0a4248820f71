"""Checksums of files, to notice storage that corrupts them (gcsfuse, NFS, a failing disk).

BLAKE2b with a 16-byte digest (`hashlib`, no extra dependency): about 0.9 GB/s on one core of the
development machine, whatever the CPU's SHA extensions (`benchmarks/RESULTS.md`, "Checksums"). A
manifest maps each file's path, relative to a root directory, to {"size": bytes, "blake2b": hex digest}.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

ALGORITHM = "blake2b-128"
T = TypeVar("T")


class IntegrityError(ValueError):
    """Files are missing, differ from the sizes and checksums recorded when they were written, or hold what
    their writer never writes (the message names them and the fix)."""


def file_digest(path: str | Path) -> str:
    """The BLAKE2b-128 hex digest of the bytes of `path` (read in chunks; any size)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def describe_file(path: str | Path) -> dict[str, int | str]:
    """{"size": bytes, "blake2b": hex digest} of `path`."""
    return {"size": os.path.getsize(path), "blake2b": file_digest(path)}


def manifest(root: str | Path, names: Iterable[str] | None = None) -> dict[str, dict[str, int | str]]:
    """{relative path: describe_file} for `names` under `root` (None: every file below it), hashed on
    several threads (hashlib releases the GIL while it hashes)."""
    root = Path(root)
    if names is None:
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    names = list(names)
    return dict(zip(names, _on_threads(describe_file, root, names), strict=True))


def _on_threads(fn: Callable[[Path], T], root: Path, names: list[str]) -> list[T]:
    """[fn(root / name) for name in names], on several threads (hashlib releases the GIL while it hashes)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda name: fn(root / name), names))


def problems(root: str | Path, expected: Mapping[str, Mapping[str, int | str]]) -> list[str]:
    """What differs between the files under `root` and `expected` (a `manifest`): one line per missing
    file, wrong size, wrong checksum or file that cannot be read (a failing disk's read error, a permission),
    naming the file; [] when every file matches. Files that `expected` does not list are not checked. Sizes
    are compared first, so a truncated file costs no hashing."""
    root = Path(root)
    found, sized = [], []
    for name, want in expected.items():
        path = root / name
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError as e:
            found.append(unreadable(path, e))
            continue
        if size is None:
            found.append(f"{path}: missing")
        elif size != want["size"]:
            found.append(f"{path}: {size} bytes, expected {want['size']}")
        else:
            sized.append(name)
    for name, digest in zip(sized, _on_threads(_digest_or_error, root, sized), strict=True):
        if isinstance(digest, OSError):
            found.append(unreadable(root / name, digest))
        elif digest != (want := expected[name]["blake2b"]):
            found.append(f"{root / name}: {ALGORITHM} checksum {digest}, expected {want}")
    return found


def _digest_or_error(path: Path) -> str | OSError:
    """`file_digest(path)`, or the OSError reading it raised."""
    try:
        return file_digest(path)
    except OSError as e:
        return e


def unreadable(path: str | Path, error: OSError) -> str:
    """The problem line of a file that could not be read (`problems`', a checkpoint manifest's)."""
    return f"{path}: unreadable ({error.strerror or error})"
