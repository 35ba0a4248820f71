"""Already-built DPL rows -> records.

A DPL row (the `SnowCharmQ/DPL-main` layout) is `{"user_id", "profile": [review, ...], "data": review}` with
reviews `{"rating", "title", "text", "asin", "timestamp"}`, the profile oldest first. Records carry the same
fields as `amazon2023`'s. Item metadata rows (`DPL-meta`) are `{"asin", "title", "description"}`. The split is
the file's (see `read.split_from_name`); the category is the name of the directory holding the file
(`DPL-main/Books/train.jsonl` -> `Books`). A row with an empty or whitespace-only `user_id` or review text
is an invalid record (`empty_field`): the protocol never builds one; so is one whose rating or timestamp is
not a finite number (`wrong_type`, `records.require_finite`). A repeat of an earlier row, in any file of the
run, is counted (`duplicate`) and skipped. A record's id is `<category>/<file name>/<user>/<n>`, `n` the row's
number among the readable rows of its file (its line in a `.jsonl` file without blank or unreadable lines; a
`.json` array may hold every row on one line): `compare` pairs examples by id. Two files of one name in two
directories of one name would give one id twice, an invalid record (`duplicate_id`) unless it repeats the
earlier row.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nextquill_jax.data.sources.amazon2023 import Item
from nextquill_jax.data.sources.records import (
    HistoryEntry,
    InvalidRecordError,
    Issue,
    IssueLog,
    Record,
    collect_records,
    get_field,
    repeat_key,
    require_text,
)
from nextquill_jax.data.sources.rows import Row, valid_rows


def read_dpl_items(meta_files: list[Path], log: IssueLog) -> dict[str, Item]:
    """Item title and description by `asin`; a repeated asin keeps the first row and is counted."""
    items: dict[str, Item] = {}
    for path in meta_files:
        for row in valid_rows(path, log):
            try:
                asin = get_field(row.value, "asin", (str,), row.location)
                title = get_field(row.value, "title", (str,), row.location)
                description = get_field(row.value, "description", (str,), row.location)
            except InvalidRecordError as e:
                log.error(e.issue)
                continue
            if asin in items:
                log.drop("item_duplicate")
                continue
            items[asin] = Item(title=title, description=description)
    return items


def read_dpl(files: list[tuple[Path, str]], items: dict[str, Item], log: IssueLog) -> list[Record]:
    """Records of the DPL split files, each given with its split, in order.

    A repeat of an earlier row (same category, user, split, target review and context), in the same file or
    another (a copy of a file), is dropped and counted as `duplicate`: the protocol never builds one, as it
    keeps one review per text for each user. Another row with an earlier record's id (the same file name in
    another directory of the category's name) is invalid (`duplicate_id`).
    """
    return collect_records(
        (
            (path, split, n, row)
            for path, split in files
            for n, row in enumerate(valid_rows(path, log), start=1)
        ),
        lambda file_row: _parse(*file_row, items),
        log,
        key=lambda r: (r.category, *repeat_key(r)),
        unique_ids=True,
        id_fix="rename one of the files (a DPL record's id is its category, file name, user and row number)",
    )


def _parse(path: Path, split: str, n: int, row: Row, items: dict[str, Item]) -> Record:
    """One DPL row, the `n`-th readable row of the file `path` (holding `split`), as a record.

    Raises:
        InvalidRecordError: a missing or mistyped field, an empty `user_id` or review text, or an item that is
            not in the metadata files.
    """
    category = path.parent.name
    user_id = require_text(
        get_field(row.value, "user_id", (str,), row.location),
        row.location,
        "user_id",
        "records are grouped and de-duplicated by user, and a record's id names its user. Fix: give the "
        "user's id, or remove the row",
    )
    profile = get_field(row.value, "profile", (list,), row.location)
    data = get_field(row.value, "data", (dict,), row.location)
    context, target_text, _ = _review(data, "data", row.location, items)
    history = tuple(_review(r, f"profile[{i}]", row.location, items)[2] for i, r in enumerate(profile))
    return Record(
        user_id=user_id,
        context=context,
        history=history,
        target=target_text,
        split=split,
        source=row.location,
        category=category,
        id=f"{category}/{path.name}/{user_id}/{n}",
        target_field="data.text",
    )


def _review(
    review: Any, path: str, location: str, items: dict[str, Item]
) -> tuple[dict[str, Any], str, HistoryEntry]:
    """(the review as a target's context, its text, the review as a history entry)."""
    if not isinstance(review, Mapping):
        raise InvalidRecordError(Issue("wrong_type", location, path, f"`{path}` must be an object"))
    rating = get_field(review, "rating", (int, float), location, path=f"{path}.rating")
    title = get_field(review, "title", (str,), location, path=f"{path}.title")
    text = require_text(
        get_field(review, "text", (str,), location, path=f"{path}.text"),
        location,
        f"{path}.text",
        "the DPL protocol keeps only reviews of at least dpl_min_review_chars characters. Fix: give the "
        "review's text, or remove it",
    )
    asin = get_field(review, "asin", (str,), location, path=f"{path}.asin")
    timestamp = get_field(review, "timestamp", (int, float), location, path=f"{path}.timestamp")
    item = items.get(asin)
    if item is None:
        raise InvalidRecordError(
            Issue(
                "unknown_item",
                location,
                f"{path}.asin",
                f"item {asin!r} is not in the metadata files (data.meta); add it or set data.on_error: skip",
            )
        )
    # Ratings print like Python floats (`5.0`), as in the public code's data.
    context = {
        "item_title": item.title,
        "item_description": item.description,
        "rating": float(rating),
        "title": title,
    }
    entry = HistoryEntry(fields={**context, "text": text}, timestamp=float(timestamp))
    return context, text, entry
