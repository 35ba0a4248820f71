"""The layout of a GGUF file (llama.cpp's checkpoint format, versions 2 and 3, little-endian): its key/value
metadata and its tensor table, with each tensor's raw bytes as a view of the memory-mapped file.

The `gguf` package's `GGUFReader` builds NumPy views for every part of every field, which takes 4.9 s for
SmolLM2-135M's 49k-token vocabulary and 49k merges on a 2-core VM; this reads the same values with `struct`
from the memory-mapped file in 0.15 s (benchmarks/RESULTS.md, "GGUF metadata"). Dequantization stays with
`gguf.quants` (`models.gguf`).

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:  key (string) | value type u32 | value
    tensors:   name (string) | n_dims u32 | dims u64 x n_dims (innermost first) | ggml type u32 | offset u64
    padding to `general.alignment` (default 32), then the tensor data (offsets relative to its start)

A string is a u64 byte count and UTF-8 bytes; an array is an item type u32, a count u64 and the items.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_STRING, _ARRAY = 8, 9
# value type -> struct format of one little-endian item (strings and arrays are read apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF file: its name, ggml type (`gguf.GGMLQuantizationType` value), `dims` innermost
    first as the file lists them, and `data`: its bytes as uint8 rows [*reversed(dims[1:]), row bytes], a
    read-only view of the memory-mapped file (the form `gguf.quants.dequantize` takes)."""

    name: str
    ggml_type: int
    dims: tuple[int, ...]
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape outermost first (NumPy's order): reversed `dims`."""
        return tuple(reversed(self.dims))


@dataclasses.dataclass(frozen=True)
class GGUFContents:
    """A GGUF file's `metadata` (key -> int, float, bool, str or list of them, in file order) and `tensors`
    (in file order)."""

    metadata: dict[str, Any]
    tensors: list[TensorEntry]


class _Cursor:
    """Sequential little-endian reads from the file's bytes; a read past the end names the file and offset."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer, self.path, self.offset = buffer, path, 0

    def unpack(self, fmt: str) -> Any:
        """The next value of struct format `fmt` at the read position, which moves past it.

        Raises:
            ValueError: the file ends before it (truncated, or not GGUF), naming the byte.
        """
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.buffer):
            raise ValueError(
                f"{self.path}: the GGUF header ends early (a {size}-byte read at byte {self.offset} of "
                f"{len(self.buffer)}); the file is truncated or not a GGUF file"
            )
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def string(self, what: str) -> str:
        """A string; `what` names it in errors ("metadata key", "metadata 'general.name'", ...)."""
        size = self.unpack("<Q")
        start, end = self.offset, self.offset + size
        if end > len(self.buffer):
            raise ValueError(
                f"{self.path}: GGUF {what}: a string of {size} bytes at byte {start} runs past the end of "
                f"the file ({len(self.buffer)} bytes); the file is truncated or damaged"
            )
        self.offset = end
        try:
            return self.buffer[start:end].decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{self.path}: GGUF {what}: the string at byte {start} is not valid UTF-8 ({err.reason} at "
                f"byte {start + err.start}); the file is damaged"
            ) from None

    def value_type(self, key: str, what: str) -> int:
        """A value type (`what`: "value type" or "array item type") of metadata `key`, checked before
        anything of that type is read: an array of an unknown type is refused even when empty, as llama.cpp
        refuses it."""
        at = self.offset
        value_type = self.unpack("<I")
        if value_type not in _SCALARS and value_type not in (_STRING, _ARRAY):
            raise ValueError(
                f"{self.path}: GGUF metadata {key!r} has {what} {value_type} at byte {at}, which is not one "
                f"of GGUF's types (0-12); the file is damaged or from a newer GGUF version"
            )
        return value_type

    def value(self, value_type: int, key: str) -> Any:
        """The next metadata value, of GGUF type `value_type`: a string, a scalar or a list (`key`: the
        entry, for messages)."""
        if value_type == _STRING:
            return self.string(f"metadata {key!r}")
        if value_type == _ARRAY:
            item_type, count = self.value_type(key, "array item type"), self.unpack("<Q")
            if item_type in _SCALARS:  # one read for the whole array
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt) * count
                if self.offset + size > len(self.buffer):
                    raise ValueError(
                        f"{self.path}: GGUF metadata {key!r}: an array of {count} items runs past the end "
                        f"of the file; the file is truncated or damaged"
                    )
                items = struct.unpack_from(f"<{count}{fmt[1:]}", self.buffer, self.offset)
                self.offset += size
                return list(items)
            return [self.value(item_type, key) for _ in range(count)]
        return self.unpack(_SCALARS[value_type])


def read_gguf_file(path: str | Path) -> GGUFContents:
    """The metadata and tensor table of the GGUF file at `path`, tensors as views of the mapped file.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a file shorter than a GGUF header (empty, say), not a GGUF file (magic), a version other
            than 2 or 3 (a big-endian file reads as a huge version and is named as such), a truncated header,
            an unknown value, array item or tensor type, a string that is not UTF-8, a metadata key or tensor
            name listed twice, a bad `general.alignment`, or tensor data past the end of the file; the
            message names the file and, where there is one, the key or tensor, and the byte offset of a
            damaged part.
    """
    import gguf

    path = Path(path)
    with open(path, "rb") as f:
        # mmap refuses an empty file with an error that names no file
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER_BYTES:
            raise ValueError(
                f"{path}: {size} bytes, shorter than a GGUF header ({_HEADER_BYTES} bytes); the file is "
                "truncated or not a GGUF file: download or copy it again"
            )
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer, path)
    if buffer[:4] != MAGIC:
        raise ValueError(f"{path}: not a GGUF file (it starts with {bytes(buffer[:4])!r}, not {MAGIC!r})")
    cursor.offset = 4
    version = cursor.unpack("<I")
    if version not in VERSIONS:
        raise ValueError(
            f"{path}: GGUF version {version} is not supported (read little-endian; supported: "
            f"{list(VERSIONS)}; a big-endian file reads as a huge version): convert it with llama.cpp's "
            "current tools"
        )
    tensor_count, metadata_count = cursor.unpack("<Q"), cursor.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(metadata_count):
        key = cursor.string("metadata key")
        if key in metadata:
            raise ValueError(f"{path}: GGUF metadata {key!r} is listed twice")
        metadata[key] = cursor.value(cursor.value_type(key, "value type"), key)
    table = []
    for _ in range(tensor_count):
        name = cursor.string("tensor name")
        dims = tuple(cursor.unpack("<Q") for _ in range(cursor.unpack("<I")))
        table.append((name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: GGUF metadata 'general.alignment' is {alignment!r}, not a power of two")
    data_start = -(-cursor.offset // alignment) * alignment
    whole = np.frombuffer(buffer, dtype=np.uint8)
    tensors, seen = [], set()
    for name, dims, ggml_type, offset in table:
        if name in seen:
            raise ValueError(f"{path}: GGUF tensor {name!r} is listed twice")
        seen.add(name)
        # (values per block, bytes per block); plain types (F32, F16, I8, ...) are blocks of one value
        sizes = gguf.GGML_QUANT_SIZES.get(ggml_type)
        if sizes is None:
            raise ValueError(
                f"{path}: GGUF tensor {name!r} has ggml type {ggml_type}, which gguf {gguf_version()} does "
                "not know (a newer or a removed type). Fix: convert or quantize the model again with a "
                "llama.cpp of the same date as this gguf, or load its Hugging Face directory"
            )
        tensors.append(_tensor(whole, path, name, dims, ggml_type, sizes, data_start + offset))
    return GGUFContents(metadata, tensors)


def _tensor(
    whole: np.ndarray,
    path: Path,
    name: str,
    dims: tuple[int, ...],
    ggml_type: int,
    sizes: tuple[int, int],
    start: int,
) -> TensorEntry:
    """The entry of one tensor of `sizes` (values, bytes) per block whose data starts at byte `start` of the
    file `whole` (uint8)."""
    block, block_bytes = sizes
    inner = dims[0] if dims else 1
    if inner % block:
        raise ValueError(
            f"{path}: GGUF tensor {name!r} has rows of {inner} values, not a multiple of its type's block "
            f"of {block}"
        )
    rows = tuple(reversed(dims[1:]))
    row_bytes = inner // block * block_bytes
    size = row_bytes * int(np.prod(rows, dtype=np.int64))
    if start + size > whole.size:
        raise ValueError(
            f"{path}: GGUF tensor {name!r} ({size} bytes at byte {start}) runs past the end of the file "
            f"({whole.size} bytes); the file is truncated"
        )
    return TensorEntry(name, ggml_type, dims, whole[start : start + size].reshape(*rows, row_bytes))


def gguf_version() -> str:
    """The installed `gguf` package's version, which messages about the types it knows name."""
    return importlib.metadata.version("gguf")
