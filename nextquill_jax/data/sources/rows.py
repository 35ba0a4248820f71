"""Streaming rows out of `.jsonl`, `.jsonl.gz`, `.json` (an array, or an object holding one) and Parquet.

Each row comes with its location (`file:line`; for Parquet the 1-based row number) so that every later message
can name where a bad record is; a `.json` row that starts on the same line as another (a one-line array, as
`json.dump` writes it) adds its 1-based position in the array, `file:1 (row 3)`. Rows that cannot be decoded
are yielded as `Issue`s, not raised, so a reader can list all of them under `on_error: fail` or skip and count
them under `skip`. A UTF-8 byte order mark at the start of a text file is skipped.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import sys
import zlib
from collections import Counter
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextquill_jax.data.sources.records import Issue, IssueLog

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): the only way a lone one, which has no UTF-8 form,
# gets into a decoded string (UTF-8 bytes cannot spell one; Parquet strings are valid UTF-8). Searched in the
# raw text first, so that only the rare line that holds one is scanned string by string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(_SURROGATE_ESCAPE.pattern.encode())


@dataclass(frozen=True)
class Row:
    """One decoded JSON object and where it came from."""

    location: str  # "file:line", or "file:line (row N)" (see the module docstring)
    # 0-based position among the file's rows (blank lines are none): unique within the file, which a line
    # number is not (every row of a one-line `.json` array is on line 1), so a second pass can find a row.
    index: int
    value: Any


def file_kind(path: str | Path) -> str:
    """The format of `path` by suffix: one of SUFFIXES.

    Raises:
        ValueError: for any other suffix, naming the file and the supported ones.
    """
    name = str(path)
    for suffix in (".jsonl.gz", ".jsonl", ".json", ".parquet"):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")


def file_stem(path: str | Path) -> str:
    """The file name without its data suffix: `meta_Books.jsonl.gz` -> `meta_Books`."""
    name = Path(path).name
    return name[: -len(file_kind(path))]


def iter_rows(
    path: str | Path, *, list_key: str | None = None, only: Container[int] | None = None
) -> Iterator[Row | Issue]:
    """Yield every record of `path` as a `Row`, or an `Issue` for a line that cannot be decoded.

    `.json` files hold one array of objects, or an object whose `list_key` entry is that array (LaMP's
    `{"task": ..., "golds": [...]}`); their rows are located by the line their element starts on.
    `only`: only the rows at these positions (`Row.index`); in `.jsonl` files the others are not even decoded.

    Raises:
        ValueError: for an unsupported suffix, a `.json` file that is not valid JSON as a whole (its
            records cannot be told apart, so it cannot be skipped record by record) or holds more than one
            value, or a `.jsonl.gz` or Parquet file that cannot be decompressed or decoded (cut short,
            damaged, or not of its kind), naming the file and the line or row reading stopped after.
        FileNotFoundError: when `path` does not exist.
    """
    kind = file_kind(path)
    if kind == ".parquet":
        rows = _parquet_rows(path)
    elif kind == ".json":
        rows = _json_array_rows(path, list_key)
    else:
        rows = _jsonl_rows(path, gzipped=kind == ".jsonl.gz", only=only)
    if only is None or kind in (".jsonl", ".jsonl.gz"):
        yield from rows
    else:
        yield from (r for r in rows if isinstance(r, Row) and r.index in only)


def valid_rows(path: str | Path, log: IssueLog, *, list_key: str | None = None) -> Iterator[Row]:
    """The decodable rows of `path`; every undecodable one goes to `log` (see `iter_rows` for what raises).

    `log.read` counts the rows by file, a file without any as 0 (so an empty source can be named)."""
    log.read[str(path)] += 0
    for row in iter_rows(path, list_key=list_key):
        log.read[str(path)] += 1
        if isinstance(row, Issue):
            log.error(row)
        else:
            yield row


def _jsonl_rows(path: str | Path, gzipped: bool, only: Container[int] | None) -> Iterator[Row | Issue]:
    opener = gzip.open if gzipped else open
    index, line_no = -1, 0
    with opener(path, "rb") as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                if line_no == 1:
                    # Editors on Windows start UTF-8 files with a byte order mark; it is not part of the JSON.
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if not raw.strip():
                    continue
                index += 1
                if only is None or index in only:
                    yield _decode_line(raw, f"{path}:{line_no}", index)
        # Not gzip (BadGzipFile), cut short (EOFError) or corrupt inside (zlib.error): the rest of the file
        # cannot be read, so no record can be skipped past it.
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise ValueError(
                f"{path}: cannot be decompressed ({e}){_after('line', line_no)}; the file is cut short, "
                f"damaged or not gzip. Fix: download or compress it again (`gzip -t {path}` checks it), or "
                "name a plain JSON-lines file .jsonl"
            ) from e


def _after(unit: str, n: int) -> str:
    """Where in a damaged file reading stopped: `after line 3`, or nothing when nothing was read."""
    return f" after {unit} {n}" if n else ""


_TOO_MANY_DIGITS = (
    f"not readable JSON: it holds an integer of more than {sys.get_int_max_str_digits()} digits, which "
    f"Python's reader refuses. Fix: write that number as text (quoted), or remove it"
)


def _decode_line(raw: bytes, location: str, index: int) -> Row | Issue:
    bad_utf8: UnicodeDecodeError | None = None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # Decoded to lone surrogates instead, so the JSON still parses and the broken field can be named.
        text = raw.decode("utf-8", errors="surrogateescape")
        bad_utf8 = e
    try:
        value = json.loads(text.rstrip("\r\n"))  # a column past the line's end would name the next line
    except json.JSONDecodeError as e:
        if bad_utf8 is not None:
            return _utf8_issue(bad_utf8, location, None)
        cr = (
            " (the line holds carriage returns (CR) alone: a file whose lines end in CR only, as old Mac "
            "editors wrote, reads as one line; convert its line endings to LF)"
            if "\r" in text.rstrip("\r\n")
            else ""
        )
        return Issue("malformed_json", location, None, f"not valid JSON ({_json_problem(e)}){cr}")
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        return Issue("malformed_json", location, None, _TOO_MANY_DIGITS)
    if not isinstance(value, dict):
        return Issue(
            "wrong_type",
            location,
            None,
            f"each line must be a JSON object, got {type(value).__name__}. Fix: write each record as an "
            "object ({...}) on a line of its own",
        )
    if bad_utf8 is not None:
        return _utf8_issue(bad_utf8, location, _field_with_surrogates(value, ""))
    row = Row(location, index, value)
    return _without_lone_surrogates(row) if _SURROGATE_ESCAPE_BYTES.search(raw) else row


def _json_problem(error: json.JSONDecodeError) -> str:
    """The decoder's complaint and column, e.g. `Expecting value at column 3`. Some of its messages end in
    "at" themselves (`Unterminated string starting at`), which would otherwise read "at at"."""
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"


def _utf8_issue(error: UnicodeDecodeError, location: str, field: str | None) -> Issue:
    byte, column = error.object[error.start], error.start + 1
    message = f"byte {byte:#04x} at column {column} is not UTF-8; re-encode the file as UTF-8"
    return Issue("invalid_utf8", location, field, message)


def _field_with_surrogates(value: Any, path: str, low: str = "\udc80", high: str = "\udcff") -> str | None:
    """The path of the first string (key or value) holding a character in [low, high], or None; by default
    the surrogates that stand for undecodable bytes (`surrogateescape`)."""
    if isinstance(value, str):
        return path if any(low <= c <= high for c in value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else k
            if _field_with_surrogates(k, sub, low, high) is not None:
                return sub
            found = _field_with_surrogates(v, sub, low, high)
            if found is not None:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _field_with_surrogates(v, f"{path}[{i}]", low, high)
            if found is not None:
                return found
    return None


def _without_lone_surrogates(row: Row) -> Row | Issue:
    """`row`, or an `invalid_utf8` issue where its JSON spelt a lone UTF-16 surrogate (`"\\ud83d"`: half of
    an emoji cut off), which decodes but has no UTF-8 form, so tokenizing or writing it would fail."""
    field = _field_with_surrogates(row.value, "", "\ud800", "\udfff")
    if field is None:
        return row
    message = (
        "holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair, such as half of a cut-off "
        "emoji), which is not text; repair or remove the escape"
    )
    return Issue("invalid_utf8", row.location, field, message)


def _json_array_rows(path: str | Path, list_key: str | None) -> Iterator[Row | Issue]:
    # A leading byte order mark (Windows editors write one) is not part of the JSON.
    raw = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: byte {raw[e.start]:#04x} is not UTF-8; re-encode the file as UTF-8"
        ) from e
    decoder = json.JSONDecoder()
    escapes = _SURROGATE_ESCAPE.search(text) is not None  # else no element can hold a lone surrogate
    begin = _skip_space(text, 0)
    try:
        top, end = decoder.raw_decode(text, begin)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({_json_problem(e)})") from e
    except ValueError as e:  # an integer of more digits than Python converts: the decoder names no place
        raise ValueError(f"{path}: {_TOO_MANY_DIGITS}") from e
    # raw_decode stops at the end of the first value; what follows would be lost without a word.
    extra = _skip_space(text, end)
    if extra < len(text):
        raise ValueError(
            f"{path}:{_line_at(text, extra)}: more text after the JSON value that ends on line "
            f"{_line_at(text, end)}; a .json file holds one value (an array of objects, or an object holding "
            "one). Fix: put all the records in one array, or write one object per line in a .jsonl file"
        )
    if isinstance(top, dict) and list_key is not None and isinstance(top.get(list_key), list):
        items = top[list_key]
        start = _member_start(text, begin, list_key, decoder)
    elif isinstance(top, list):
        items = top
        start = begin
    else:
        want = f"an array of objects{f' or an object with a `{list_key}` list' if list_key else ''}"
        raise ValueError(f"{path}: expected {want}, got {type(top).__name__}")
    lines = _element_lines(text, start, len(items), decoder)
    per_line = Counter(lines)
    for index, (value, line) in enumerate(zip(items, lines, strict=True)):
        location = f"{path}:{line}" if per_line[line] == 1 else f"{path}:{line} (row {index + 1})"
        if isinstance(value, dict):
            row = Row(location, index, value)
            yield _without_lone_surrogates(row) if escapes else row
        else:
            yield Issue(
                "wrong_type", location, None, f"array elements must be objects, got {type(value).__name__}"
            )


def _member_start(text: str, start: int, key: str, decoder: json.JSONDecoder) -> int:
    """Where the value of member `key` of the (valid) JSON object at `text[start]` starts: of its last one, as
    the decoder keeps the last of repeated keys. The members are walked, as searching the text for the key
    would find it inside a nested object or a string first."""
    found = -1
    pos = _skip_space(text, start + 1)
    while text[pos] != "}":
        name, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, _skip_space(text, pos) + 1)  # past the ":"
        if name == key:
            found = pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, pos)
        if text[pos] == ",":
            pos = _skip_space(text, pos + 1)
    return found


def _element_lines(text: str, start: int, n: int, decoder: json.JSONDecoder) -> list[int]:
    """The 1-based line each of the `n` elements of the (valid) JSON array at `text[start]` starts on: the
    array is walked again with raw_decode, as the decoder does not report positions."""
    lines = []
    pos, line, counted = start + 1, 1, 0
    for _ in range(n):
        pos = _skip_space(text, pos)
        if text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
    return lines


def _line_at(text: str, pos: int) -> int:
    """The 1-based line of `text[pos]`."""
    return text.count("\n", 0, pos) + 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parquet_rows(path: str | Path) -> Iterator[Row | Issue]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_no = 0
    with pa.OSFile(str(path)) as f:  # opened here, so that a missing file stays a FileNotFoundError
        try:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for value in batch.to_pylist():
                    row_no += 1
                    yield Row(f"{path}:{row_no}", row_no - 1, value)
        # A missing footer (cut short, or not Parquet) is ArrowInvalid; a corrupt page an OSError.
        except (pa.ArrowException, OSError) as e:
            raise ValueError(
                f"{path}: cannot be read as Parquet ({e}){_after('row', row_no)}; the file is cut short, "
                "damaged or not Parquet. Fix: download or write it again"
            ) from e
