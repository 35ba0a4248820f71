"""Generic records (README, "Your own data"; the synthetic benchmark writes it) -> records.

One object per JSON line (`.jsonl`, `.jsonl.gz`), per element of a `.json` array or per Parquet row: `user_id`
(string), `context` (a string, or an object of named string / number fields), `history` (a list of strings or
of objects with `text`, optional `timestamp` and other named fields), `target` (string), optional `category`,
`split` (train / val / test; else `data.default_split`), `id` and `meta` (any object, carried through
untouched); an optional field (an entry's `timestamp` too) set to null is absent, and so is a null field of a
context or entry object (Parquet gives a struct every key of its column, null where a row has none), which a
template that needs it then names as missing. A string context becomes the field `context`, a string entry the
field `text`. History is oldest first, or sorted by `timestamp` when the entries carry one (then all must).
Any other top-level key is an invalid record (`unknown_field`; a misspelt `split` would silently train on a
test record), and so is an empty or whitespace-only `user_id`, `target` or history entry text (`empty_field`)
and an `id` that an earlier record of any file or split has (`duplicate_id`); extra data belongs in `meta`.
Records with an empty history and repeats of an earlier record (same user, split, context and target) in any
file of the run are counted and skipped.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from nextquill_jax.data.config import SPLIT_WORDS, SPLITS
from nextquill_jax.data.sources.records import (
    FINITE_FIX,
    HistoryEntry,
    InvalidRecordError,
    Issue,
    IssueLog,
    Record,
    collect_records,
    describe_value,
    get_field,
    get_optional,
    missing_fields,
    repeat_key,
    require_fields,
    require_finite,
    require_text,
)
from nextquill_jax.data.sources.rows import valid_rows
from nextquill_jax.data.templates import PromptTemplate

# Every top-level key a generic record may have; any other is an invalid record (`unknown_field`).
FIELDS = ("user_id", "context", "history", "target", "category", "split", "id", "meta")
REQUIRED = ("user_id", "context", "history", "target")


def read_generic(
    paths: list[Path], default_split: str, template: PromptTemplate, log: IssueLog
) -> list[Record]:
    """Records of the generic files, in order; a repeat of an earlier record, in the same file or another
    (a copy of a file, say), is dropped and counted as `duplicate`, and another record with an earlier
    record's `id` is invalid (`duplicate_id`)."""
    return collect_records(
        (row for path in paths for row in valid_rows(path, log)),
        lambda row: parse_generic(row.value, row.location, default_split, template),
        log,
        key=repeat_key,
        unique_ids=True,
    )


def parse_generic(obj: dict[str, Any], location: str, default_split: str, template: PromptTemplate) -> Record:
    """One validated record.

    Raises:
        InvalidRecordError: an unknown top-level key, missing fields (all named), a mistyped field, an
            empty `user_id`, `target` or entry text, an unknown split, a history entry without `text`, a
            timestamp on some entries but not all, or fields the template needs that the record lacks.
    """
    _check_keys(obj, location)
    absent = [name for name in REQUIRED if name not in obj]
    if len(absent) > 1:  # all named at once, so that one fix mends the record; one alone: get_field's error
        raise InvalidRecordError(
            Issue(
                "missing_field",
                location,
                absent[0],
                f"required fields {', '.join(f'`{name}`' for name in absent)} are missing; a generic record "
                f"needs {', '.join(REQUIRED)}",
            )
        )
    user_id = require_text(
        get_field(obj, "user_id", (str,), location),
        location,
        "user_id",
        "records are grouped and de-duplicated by user. Fix: give the user's id, or remove the record",
    )
    target = require_text(
        get_field(obj, "target", (str,), location),
        location,
        "target",
        "the example would learn only the end-of-text token. Fix: write the target text, or remove the"
        " record",
    )
    raw_context = get_field(obj, "context", (str, dict), location)
    context = (
        {"context": raw_context}
        if isinstance(raw_context, str)
        else _scalars(raw_context, location, "context")
    )
    split = get_optional(obj, "split", (str,), location)
    if split is None:
        split = default_split
    if split not in SPLITS:
        named = SPLIT_WORDS.get(split)  # a file name's word for a split (`dev`), which a record does not use
        fix = f"write {named}" if named else f"write one of {', '.join(SPLITS)}, or leave it out"
        message = f"`split` must be one of {SPLITS}, got {split!r}. Fix: {fix}"
        raise InvalidRecordError(Issue("wrong_type", location, "split", message))
    entries = _history(get_field(obj, "history", (list,), location), location)
    missing = missing_fields(context, template.context_fields, "context.")
    for i, entry in enumerate(entries):  # file order, so `history[i]` names the entry as written
        missing += missing_fields(entry.fields, template.entry_fields, f"history[{i}].")
    require_fields(missing, location, template.name)
    # Entries carry a timestamp all or none (`_history`); with timestamps they are sorted oldest first.
    history = (
        tuple(sorted(entries, key=lambda e: e.timestamp))
        if all(e.timestamp is not None for e in entries)
        else entries
    )
    meta = get_optional(obj, "meta", (dict,), location)
    category = get_optional(obj, "category", (str,), location)
    record_id = get_optional(obj, "id", (str,), location)
    return Record(
        user_id=user_id,
        context=context,
        history=history,
        target=target,
        split=split,
        source=location,
        category=category if category is not None else "",
        id=record_id if record_id is not None else "",
        meta=meta,
    )


def _history(raw: list[Any], location: str) -> tuple[HistoryEntry, ...]:
    """The entries in file order.

    Raises:
        InvalidRecordError: an entry that is not a string or an object with `text`, an empty text, a mistyped
            field, or a timestamp on some entries but not all.
    """
    entries = []
    for i, item in enumerate(raw):
        path = f"history[{i}]"
        if isinstance(item, str):
            fields: dict[str, Any] = {"text": require_text(item, location, path, _EMPTY_ENTRY)}
            timestamp = None
        elif isinstance(item, dict):
            text = get_field(item, "text", (str,), location, path=f"{path}.text")
            require_text(text, location, f"{path}.text", _EMPTY_ENTRY)
            fields = _scalars({k: v for k, v in item.items() if k != "timestamp"}, location, path)
            raw_time = get_optional(item, "timestamp", (int, float), location, path=f"{path}.timestamp")
            timestamp = None if raw_time is None else float(raw_time)
        else:
            raise InvalidRecordError(
                Issue(
                    "wrong_type",
                    location,
                    path,
                    f"`{path}` must be a string or an object, got {type(item).__name__}",
                )
            )
        entries.append(HistoryEntry(fields=fields, timestamp=timestamp))
    timed = [e.timestamp is not None for e in entries]
    if any(timed) and not all(timed):
        i = timed.index(False)
        raise InvalidRecordError(
            Issue(
                "missing_field",
                location,
                f"history[{i}].timestamp",
                "some history entries carry a timestamp and this one does not; give all or none",
            )
        )
    return tuple(entries)


_EMPTY_ENTRY = "an entry without text tells nothing about the user. Fix: remove the entry, or give its text"


def _check_keys(obj: dict[str, Any], location: str) -> None:
    """Raises InvalidRecordError (`unknown_field`) naming every key that is not one of FIELDS, with the
    nearest unused valid key: a misspelt `split` would otherwise put the record in the default split."""
    unknown = [key for key in obj if key not in FIELDS]
    if not unknown:
        return
    unused = [name for name in FIELDS if name not in obj]
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, unused, n=1, cutoff=0.6)
        named.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    raise InvalidRecordError(
        Issue(
            "unknown_field",
            location,
            unknown[0],
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(named)}; a generic record has "
            f"{', '.join(FIELDS)}. Fix: rename {'them' if len(unknown) > 1 else 'it'}, or move extra data "
            "into `meta` (carried through untouched)",
        )
    )


def _scalars(obj: dict[str, Any], location: str, path: str) -> dict[str, Any]:
    """The fields of `obj` (the object at `path`) that are not null (absent: module docstring), which must be
    strings or numbers.

    Raises:
        InvalidRecordError: `wrong_type` for the first other value (a list, an object, true/false, or a
            number that is not finite: `require_finite`), saying what it is and the fix.
    """
    fields = {key: value for key, value in obj.items() if value is not None}
    for key, value in fields.items():
        field = f"{path}.{key}"
        require_finite(value, location, field, FINITE_FIX)
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise InvalidRecordError(
                Issue(
                    "wrong_type",
                    location,
                    field,
                    f"`{field}` must be a string or a number, got {describe_value(value)}; the prompt inserts"
                    " it as text. Fix: write it as one string (a list joined, say), or move it into the "
                    "record's `meta` (carried through, not in the prompt)",
                )
            )
    return fields
