"""The validated record every reader produces, and the bookkeeping of invalid or dropped input.

A `Record` is one target text of one user with its context and the user's earlier texts (oldest first).
Readers report every problem as an `Issue` naming `file:line:field` and the fix; an `IssueLog` collects them
under the `on_error` policy and counts every record that is not kept, by reason, so nothing disappears without
a number.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Scalar = str | int | float
R = TypeVar("R")

# Why an input record is invalid (an error under `on_error: fail`, skipped and counted under `skip`).
ErrorReason = Literal[
    "malformed_json",
    "invalid_utf8",
    "missing_field",
    "wrong_type",
    "unknown_item",
    "unknown_field",
    "empty_field",
    "duplicate_id",
]


@dataclass(frozen=True)
class HistoryEntry:
    """One earlier text of the user: named scalar fields (free text is `text`) and an optional time."""

    fields: Mapping[str, Scalar]
    timestamp: float | None = None


@dataclass(frozen=True)
class Record:
    """One example before rendering.

    `context` holds the named fields the prompt template fills in (item title, rating, the question, ...);
    `history` is oldest first; `source` is the `file:line` the target came from, `target_field` the field
    there that holds it (for messages).
    """

    user_id: str
    context: Mapping[str, Scalar]
    history: tuple[HistoryEntry, ...]
    target: str
    split: str
    source: str
    category: str = ""
    id: str = ""
    meta: Mapping[str, Any] | None = None
    target_field: str = "target"


@dataclass(frozen=True)
class Issue:
    """One invalid input record: where it is, which field, what is wrong and how to fix it."""

    reason: ErrorReason
    location: str  # "file:line"
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.location}:{self.field}" if self.field else self.location
        return f"{where}: {self.message}"


class InvalidRecordError(Exception):
    """Raised inside a reader for one bad record; the reader hands `issue` to its `IssueLog`."""

    def __init__(self, issue: Issue) -> None:
        super().__init__(str(issue))
        self.issue = issue


class DataError(ValueError):
    """The input has invalid records and `on_error` is `fail`: lists them (the first `shown`) and the fix."""

    def __init__(self, issues: list[Issue], counts: Counter, shown: int) -> None:
        total = sum(counts.values())
        lines = [str(i) for i in issues[:shown]]
        if total > shown:
            lines.append(f"... and {total - shown} more")
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        super().__init__(
            f"{total} invalid input record(s) ({summary}); nothing was prepared:\n  "
            + "\n  ".join(lines)
            + "\nFix the records, or set `data.on_error: skip` to skip and count them."
        )
        self.issues = issues


# Places kept per skip reason (`IssueLog.skipped`) and per note (`IssueLog.note_places`): enough to find a
# pattern and fix it, while summary.json stays small however many records a large corpus skips.
# `data.on_error: fail` lists every invalid record (the first `data.max_errors_shown`).
PLACES_KEPT = 10


@dataclass
class IssueLog:
    """Counts rows read (`read`, by file), invalid records (`errors`), deliberate drops (`dropped`) and
    records read as given but probably not as meant (`notes`, by message: a field name close to a known one,
    special-token text in a record's values).

    With `on_error="skip"` an invalid record is skipped and counted, and the first `PLACES_KEPT` of each
    reason are kept in `skipped` (so summary.json can say which records went); with `"fail"` the first
    `max_shown` are kept in `issues` and `raise_if_failed` raises one `DataError` listing them and counting
    all by reason, so one run shows every kind of problem. `note_places` keeps the first `PLACES_KEPT` places
    (`file:line`, or `file:line:field`) of each note given one.
    """

    on_error: Literal["fail", "skip"] = "fail"
    max_shown: int = 20
    issues: list[Issue] = field(default_factory=list)
    read: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    skipped: dict[str, list[Issue]] = field(default_factory=dict)
    note_places: dict[str, list[str]] = field(default_factory=dict)

    def error(self, issue: Issue) -> None:
        """Count one invalid record by its reason; keep the first `max_shown` for the error (`on_error:
        fail`), or each reason's first `PLACES_KEPT` places (`on_error: skip`)."""
        self.errors[issue.reason] += 1
        if self.on_error == "fail":
            if len(self.issues) < self.max_shown:
                self.issues.append(issue)
        else:
            first = self.skipped.setdefault(issue.reason, [])
            if len(first) < PLACES_KEPT:
                first.append(issue)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count `n` records dropped for `reason` (a valid record the settings leave out)."""
        if n:
            self.dropped[reason] += n

    def note(self, message: str, where: str | None = None) -> None:
        """Count one record that `message` describes (kept, but probably not read as meant); `where`: its
        place (`file:line`, or `file:line:field`), kept among the note's first `PLACES_KEPT`."""
        self.notes[message] += 1
        if where is not None:
            places = self.note_places.setdefault(message, [])
            if len(places) < PLACES_KEPT:
                places.append(where)

    @property
    def failed(self) -> bool:
        """Whether `raise_if_failed` would raise: `on_error` is `fail` and a record was invalid."""
        return self.on_error == "fail" and bool(self.errors)

    def raise_if_failed(self) -> None:
        """Raises DataError when `on_error` is `fail` and any record was invalid."""
        if self.failed:
            raise DataError(self.issues, self.errors, self.max_shown)


def get_field(
    obj: Mapping[str, Any],
    name: str,
    kinds: tuple[type, ...],
    location: str,
    *,
    path: str | None = None,
    nullable: bool = False,
) -> Any:
    """`obj[name]` checked against `kinds` (bool never counts as a number, nor does a number that is not
    finite: `require_finite`).

    `path` is the field's name in messages (defaults to `name`, e.g. `profile[3].text` for nested fields).

    Raises:
        InvalidRecordError: `missing_field` when the key is absent (or null and not `nullable`),
            `wrong_type` when the value has another type or is NaN or infinite.
    """
    path = path or name
    if name not in obj:
        raise InvalidRecordError(
            Issue("missing_field", location, path, f"required field `{path}` is missing. Fix: add it")
        )
    value = obj[name]
    if value is None:
        if nullable:
            return None
        raise InvalidRecordError(
            Issue("missing_field", location, path, f"required field `{path}` is null. Fix: give its value")
        )
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        expected = " or ".join(_KIND_NAMES[k] for k in kinds)
        # A number or flag where text is wanted (an id written unquoted): the text it stands for, as JSON
        # spells it (`true`, not Python's `True`).
        unquoted = kinds == (str,) and isinstance(value, int | float)
        quoted = f" ({json.dumps(json.dumps(value))})" if unquoted else ""
        fix = f"write it as {expected}{quoted}" + (", or null" if nullable else "")
        raise InvalidRecordError(
            Issue(
                "wrong_type",
                location,
                path,
                f"`{path}` must be {expected}, got {describe_value(value)}. Fix: {fix}",
            )
        )
    return require_finite(value, location, path, "write a finite number")


def get_optional(
    obj: Mapping[str, Any], name: str, kinds: tuple[type, ...], location: str, *, path: str | None = None
) -> Any:
    """`obj[name]` checked as `get_field` does, or None when the optional field is absent or null: null
    means absent, as Parquet and other writers fill the rows that lack a column's value.

    Raises:
        InvalidRecordError: `wrong_type` when the value has another type.
    """
    if name not in obj:
        return None
    return get_field(obj, name, kinds, location, path=path, nullable=True)


def require_text(value: str, location: str, path: str, why: str) -> str:
    """`value`, the string field `path`, when it holds more than whitespace.

    Raises:
        InvalidRecordError: `empty_field` for an empty or whitespace-only `value`, saying `why` it needs text.
    """
    if not value.strip():
        raise InvalidRecordError(Issue("empty_field", location, path, f"`{path}` is empty; {why}"))
    return value


def require_finite(value: Any, location: str, path: str, fix: str) -> Any:
    """`value`, the field `path`, unless it is a float that is not finite or an integer too large for one.
    JSON has no NaN or Infinity, but Python's reader takes `NaN` and `Infinity` and reads a number too large
    for a float (`1e400`) as `inf`, and a Parquet float may be NaN; a prompt would show such a value as `nan`
    or `inf`, and a timestamp of NaN has no place in an order by time. An integer written without exponent
    stays an int of any size, which `float()` (a timestamp's, a rating's) cannot convert. Every reader checks
    its numbers here, so all refuse them alike.

    Raises:
        InvalidRecordError: `wrong_type` for NaN, inf, -inf or an integer beyond a float's range, saying
            `fix`.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRecordError(
            Issue(
                "wrong_type",
                location,
                path,
                f"`{path}` is {value!r}, not a finite number (the file holds NaN or Infinity, or a number "
                f"too large for a float, such as 1e400), which a prompt would show as `{value}`. Fix: {fix}",
            )
        )
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        raise InvalidRecordError(
            Issue(
                "wrong_type",
                location,
                path,
                f"`{path}` is an integer too large for a float (beyond {sys.float_info.max:.3g}). Fix: {fix}",
            )
        )
    return value


# The fix `require_finite` gives for a field the prompt shows (a context or history field), which the
# record may also go without.
FINITE_FIX = "write its text, or remove the key"


def scalar_fields(obj: Mapping[str, Any], location: str, path: str) -> dict[str, Scalar]:
    """The scalar (str / int / float) fields of the object at `path` (`""`: the row itself); nested lists,
    objects and nulls are left out.

    Raises:
        InvalidRecordError: `wrong_type` when `obj` is not an object, or a number of it is not finite
            (`require_finite`).
    """
    if not isinstance(obj, Mapping):
        raise InvalidRecordError(
            Issue("wrong_type", location, path, f"`{path}` must be an object, got {describe_value(obj)}")
        )
    return {
        k: require_finite(v, location, f"{path}.{k}" if path else k, FINITE_FIX)
        for k, v in obj.items()
        if isinstance(v, str | int | float) and not isinstance(v, bool)
    }


def missing_fields(fields: Mapping[str, Any], needed: frozenset[str], prefix: str) -> list[str]:
    """The `needed` field names that `fields` lacks, sorted, each as `prefix` + name (`context.rating`)."""
    return [f"{prefix}{name}" for name in sorted(needed - set(fields))]


def require_fields(missing: list[str], location: str, template: str) -> None:
    """Check that one record has every field the prompt template named `template` needs.

    `missing`: the record's lacking fields (`missing_fields` of its context and of each history entry), all
    named in one message (the first `_MAX_NAMED`, then how many more) so one fix mends the record.

    Raises:
        InvalidRecordError: `missing_field` when `missing` is not empty, its field the first missing one.
    """
    if not missing:
        return
    named = ", ".join(f"`{name}`" for name in missing[:_MAX_NAMED])
    if len(missing) > _MAX_NAMED:
        named += f" and {len(missing) - _MAX_NAMED} more"
    them = "them" if len(missing) > 1 else "it"
    raise InvalidRecordError(
        Issue(
            "missing_field",
            location,
            missing[0],
            f"the prompt template {template!r} needs {named}, which the record lacks; add {them} or choose"
            " another data.template (`plain` takes any fields)",
        )
    )


_MAX_NAMED = 10  # missing fields named in one message; a long history may lack one field per entry


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
    bool: "true/false",
}


def describe_value(value: Any) -> str:
    """A value for a message: its type and its repr, cut at 40 characters (`str 'five'`)."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def repeat_key(record: Record) -> tuple[str, ...]:
    """What makes a record a repeat of an earlier one: the same user, split, context and target."""
    return (record.user_id, record.split, json.dumps(dict(record.context), sort_keys=True), record.target)


def collect_records(
    rows: Iterable[R],
    parse: Callable[[R], Record],
    log: IssueLog,
    *,
    key: Callable[[Record], Any] | None = None,
    unique_ids: bool = False,
    id_fix: str = "give one of them another id",
) -> list[Record]:
    """The records parsed from `rows`, in order: what every reader keeps.

    A row `parse` rejects (`InvalidRecordError`) goes to `log.error`; a record whose `key` was seen before in
    `rows` is dropped as `duplicate` (no `key`: none are), so readers pass the rows of all their files at once
    to find a repeat in another file too. With `unique_ids`, a record that is no repeat but has the `id` of an
    earlier one is invalid (`duplicate_id`, naming both places and `id_fix`, the fix: a reader that makes the
    ids itself names what the user can change): `compare` pairs examples by id, so two examples under one id
    could not be told apart. A record without history is dropped as `empty_history` (an
    example needs a history to tell its effect) before either check: it claims no key and no id, so a later
    copy of it with a history is kept, not dropped as a repeat of a record that is not there.
    """
    records: list[Record] = []
    seen: set = set()
    id_source: dict[str, str] = {}  # the `source` of the first record with each id
    for row in rows:
        try:
            record = parse(row)
        except InvalidRecordError as e:
            log.error(e.issue)
            continue
        if not record.history:  # dropped before it claims its key or id: a later copy with history is kept
            log.drop("empty_history")
            continue
        if key is not None:
            if key(record) in seen:
                log.drop("duplicate")
                continue
            seen.add(key(record))
        if unique_ids and record.id:
            if record.id in id_source:
                log.error(
                    Issue(
                        "duplicate_id",
                        record.source,
                        "id",
                        f"the id {record.id!r} is already the id of the record at {id_source[record.id]}; "
                        "ids must be unique across all files and splits (compare pairs examples by id). Fix: "
                        f"{id_fix}",
                    )
                )
                continue
            id_source[record.id] = record.source
        records.append(record)
    return records
