"""LaMP / LongLaMP questions with their outputs -> records.

Questions: `{"id", "input", "profile": [{...}, ...]}` (a `.json` array as LaMP ships them, or one object per
line / Parquet row as LongLaMP does), optionally with `output` inline and a `user_id` (either set to null is
absent). Outputs: LaMP's `{"task": ..., "golds": [{"id", "output"}, ...]}` (or one `{"id", "output"}` per
line), matched to questions of the same split by `id`. The question's scalar fields other than `id` / `output`
are the context (the templates use `input`); every profile entry's scalar fields form one history entry (Topic
Writing: `summary`, `content`; abstract generation: `title`, `abstract`). Profiles are kept in the order given
and read as oldest first. The user is `user_id` when present, else the question `id`; a question without
`user_id` but with a field whose name is close to it (`userid`, `userId`, `user-id`) is read so and counted in
the prepared data's `notes`, with the fix. The category is the directory holding the questions file. An empty
or whitespace-only output or `user_id` is an invalid record (`empty_field`), and so is a number that is not
finite in the question or its profile (`wrong_type`, `records.require_finite`). A question whose id an earlier
question of the same split had, in any file of the run, is counted (`duplicate`) and skipped. A gold id given
twice in one split is counted (`gold_duplicate`) when both outputs are the same, else invalid
(`duplicate_id`); a gold whose id no question of its split has is counted (`gold_without_question`). A
question with an inline `output` is answered by it; a gold for it in the outputs files is then not used and is
counted (`gold_ignored_inline_output`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import NamedTuple

from nextquill_jax.data.sources.records import (
    HistoryEntry,
    InvalidRecordError,
    Issue,
    IssueLog,
    Record,
    collect_records,
    get_field,
    get_optional,
    missing_fields,
    require_fields,
    require_text,
    scalar_fields,
)
from nextquill_jax.data.sources.rows import Row, valid_rows
from nextquill_jax.data.templates import PromptTemplate


class Gold(NamedTuple):
    """A gold output and where it was read (`file:line`), which an error about it names."""

    output: str
    location: str


def read_lamp_outputs(files: list[tuple[Path, str]], log: IssueLog) -> dict[str, dict[str, Gold]]:
    """Gold outputs by split and question id, from the outputs files, each given with its split.

    A gold id repeated within a split (in the same file or another) with the same output is counted
    (`gold_duplicate`); with another output it is invalid (`duplicate_id`, naming both places: which one is
    the question's would be a guess), and under `on_error: skip` the first is kept.
    """
    outputs: dict[str, dict[str, Gold]] = {split: {} for _, split in files}
    for path, split in files:
        for row in valid_rows(path, log, list_key="golds"):
            try:
                qid = str(get_field(row.value, "id", (str, int), row.location))
                output = get_field(row.value, "output", (str,), row.location)
            except InvalidRecordError as e:
                log.error(e.issue)
                continue
            if qid not in outputs[split]:
                outputs[split][qid] = Gold(output, row.location)
            elif output == outputs[split][qid].output:
                log.drop("gold_duplicate")
            else:
                log.error(
                    Issue(
                        "duplicate_id",
                        row.location,
                        "id",
                        f"the {split} gold {qid!r} was given before, with another output, at "
                        f"{outputs[split][qid].location}; a question has one gold. Fix: remove the wrong "
                        "one, or correct its id",
                    )
                )
    return outputs


def read_lamp(
    files: list[tuple[Path, str]],
    outputs: dict[str, dict[str, Gold]],
    template: PromptTemplate,
    log: IssueLog,
) -> list[Record]:
    """Records of the questions files, each given with its split, in order; `outputs` holds the golds by
    split (empty for questions with inline outputs). A question whose id an earlier question of its split
    had, in the same file or another, is dropped and counted as `duplicate`; a gold whose id no question of
    its split has is counted as `gold_without_question`, and one for a question answered inline (the record
    kept for its id: the first read valid) as `gold_ignored_inline_output`, the inline output being used."""
    asked: set[tuple[str, str]] = set()
    inline: dict[tuple[str, str], bool] = {}
    records = collect_records(
        ((path, split, row) for path, split in files for row in valid_rows(path, log)),
        lambda file_row: _parse(*file_row, outputs.get(file_row[1], {}), template, log, asked, inline),
        log,
        key=lambda r: (r.split, r.id),
    )
    log.drop(
        "gold_without_question",
        sum((split, qid) not in asked for split, golds in outputs.items() for qid in golds),
    )
    log.drop(
        "gold_ignored_inline_output",
        sum(inline.get((split, qid), False) for split, golds in outputs.items() for qid in golds),
    )
    return records


def _parse(
    path: Path,
    split: str,
    row: Row,
    outputs: dict[str, Gold],
    template: PromptTemplate,
    log: IssueLog,
    asked: set[tuple[str, str]],
    inline: dict[tuple[str, str], bool],
) -> Record:
    """One question of the file `path` (holding `split`) as a record; `outputs`: the golds of the split.
    `asked` gets the (split, id) of the question as soon as its id is read, valid or not, so that only the
    golds no question names are counted as without one. `inline` gets, for the first valid question of each
    (split, id), the one `collect_records` keeps, whether its output was inline (so its gold went unused).

    Raises:
        InvalidRecordError: a missing or mistyped field, no output (inline or gold), an empty output or
            `user_id`, or fields the template needs that the question or its profile lacks.
    """
    category = path.parent.name
    loc = row.location
    qid = str(get_field(row.value, "id", (str, int), loc))
    asked.add((split, qid))
    get_field(row.value, "input", (str,), loc)
    profile = get_field(row.value, "profile", (list,), loc)
    inline_output = get_optional(row.value, "output", (str,), loc)
    if inline_output is not None:
        target, target_loc = inline_output, loc
    elif qid in outputs:
        target, target_loc = outputs[qid]  # an empty gold is named where it was read, in the outputs file
    else:
        raise InvalidRecordError(
            Issue(
                "missing_field",
                loc,
                "output",
                f"question {qid!r} has no inline `output` and no gold with this id in the {split}"
                " outputs files (data.meta)",
            )
        )
    require_text(
        target,
        target_loc,
        "output",
        "the example would learn only the end-of-text token. Fix: give the output text, or remove the "
        f"question{f' (question {qid!r} at {loc})' if target_loc != loc else ''}",
    )
    user_id = get_optional(row.value, "user_id", (str,), loc)
    if user_id is None:
        user_id = qid
        _note_near_user_id(row.value, path, loc, log)
    else:
        require_text(
            user_id,
            loc,
            "user_id",
            "an empty user names no one (reports show each example's user; compare pairs examples by user "
            "and target). Fix: give the user's id, or remove `user_id` (the question's id is then the user)",
        )
    context = {k: v for k, v in scalar_fields(row.value, loc, "").items() if k not in ("id", "output")}
    history = [
        HistoryEntry(fields=scalar_fields(entry, loc, f"profile[{i}]")) for i, entry in enumerate(profile)
    ]
    missing = missing_fields(context, template.context_fields, "")
    for i, entry in enumerate(history):
        missing += missing_fields(entry.fields, template.entry_fields, f"profile[{i}].")
    require_fields(missing, loc, template.name)
    inline.setdefault((split, qid), inline_output is not None)
    return Record(
        user_id=user_id,
        context=context,
        history=tuple(history),
        target=target,
        split=split,
        source=loc,
        category=category,
        id=qid,
        target_field="output",
    )


def _note_near_user_id(question: dict, path: Path, loc: str, log: IssueLog) -> None:
    """Count the question at `loc` (`file:line`) whose field names the user under a misspelt name
    (`userid`): read as a context field, it would leave each question a user of its own."""
    by_lower = {
        str(k).lower(): k for k in question if k not in ("id", "input", "output", "profile", "user_id")
    }
    close = difflib.get_close_matches("user_id", list(by_lower), n=1, cutoff=0.8)
    if close:
        log.note(
            f"{path}: field `{by_lower[close[0]]}` was read as context and the user is the question id; "
            f"if it names the user, rename it `user_id`",
            f"{loc}:{by_lower[close[0]]}",
        )
