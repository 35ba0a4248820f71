"""Records -> examples: the with- and without-history prompts of one target, fitted and tokenised.

The history is the `max_history` most recent entries, newest first (entry 1 is the most recent): a stable
sort by timestamp, descending, so entries with equal timestamps keep their order in the record, as the public
code's `sorted(profile, key=timestamp, reverse=True)` does (entries without timestamps: the record's order
reversed). While the with-history prompt has more than `max_prompt_tokens` tokens, the oldest remaining entry
is dropped: down to none (`history_fit: drop`; an example whose prompt does not fit even with no history is
dropped as `prompt_too_long`), or down to one (`history_fit: public`, the public code), after which a prompt
still too long is cut from the right to `max_prompt_tokens` tokens (its tail goes: what the template puts
after the history, such as `review`'s output rating and title, and the assistant header; counted as
`prompts_cut`). The target is cut at `max_target_tokens` tokens (counted as `targets_cut`) and the
tokenizer's EOS appended. Prompts and target are tokenised separately and without special tokens
(special-token text in a prompt, such as `<|im_start|>`, still maps to its id), so the target tokens are
exactly the labels; but a tokenizer that starts every text with its BOS (Llama 3's `<|begin_of_text|>`; not
Qwen's or SmolLM2's, which add none) gets its BOS at the start of both prompts, where the model always saw
it in training, counted in `max_prompt_tokens` (`prompt_start`). Tokenisation runs in batches through the fast
tokenizer.

Special-token text in a record's own values maps to its id too (a review quoting `<|endoftext|>` holds an
end-of-text token), as the public code's tokenizer call does, so it is kept, but counted: every example whose
target, or a value its prompts insert, holds the text of one of the tokenizer's special tokens is a `note` per
token and place (`summary.json`, with the first records' `file:line` in `note_places`, and a warning naming
the first). A target that is nothing but such text (and whitespace) is an invalid record (`empty_field`), as
an empty one is: the example would learn only control tokens.

The count of entries kept is the one dropping an entry at a time finds, but `FitSearch` finds it in
O(log max_history) rendered and tokenised prompts (galloping, then bisection) rather than one per dropped
entry (with thousands of entries, minutes per record); the same count wherever adding entries never lowers a
prompt's token count by more than `DIP_SLACK_TOKENS` (BPE merges across an entry's joins lower it by a few).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nextquill_jax.data.config import DataConfig
from nextquill_jax.data.prepared_split import TokenizedExample
from nextquill_jax.data.sources.records import HistoryEntry, Issue, IssueLog, Record
from nextquill_jax.data.templates import FieldFormatError, PromptTemplate, inserted_values, render_prompt


@dataclass(frozen=True)
class Example:
    """One rendered and tokenised example, and how its history was fitted."""

    record: Record
    prompt_with_history: str
    prompt_without_history: str
    history_used: int  # entries in the with-history prompt
    history_dropped_for_length: int  # recent entries (within max_history) dropped to fit max_prompt_tokens
    target_cut: bool  # the target had more than max_target_tokens tokens
    prompt_cut: bool  # a prompt was cut to max_prompt_tokens tokens (history_fit: public)
    tokens: TokenizedExample


@dataclass
class FittingStats:
    """What example building left out, summed over the examples it built (a record dropped whole counts in
    `IssueLog.dropped` instead)."""

    history_entries_beyond_max_history: int = 0
    history_entries_dropped_for_length: int = 0
    targets_cut: int = 0
    prompts_cut: int = 0


def build_examples(
    records: Sequence[Record],
    template: PromptTemplate,
    tokenizer: Any,
    cfg: DataConfig,
    log: IssueLog,
    stats: FittingStats,
) -> Iterator[Example]:
    """Examples of `records`, in order; records that cannot become one are counted in `log` (a field the
    template needs and the record lacks: `missing_field`; a value its placeholder cannot format, such as a
    string in `{rating:.1f}`: `wrong_type`; a target of special-token text alone: `empty_field`), and so is
    special-token text in the examples (`log.notes`).

    `tokenizer` is a fast Hugging Face tokenizer with an EOS token.

    Raises:
        ValueError: the tokenizer has no EOS token, or `cfg.chat_template` is set and it has no chat template
            or its chat template refuses a prompt (as Gemma's refuses a system message), with the template's
            own message.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"data.tokenizer {cfg.tokenizer!r} has no EOS token; targets end with EOS")
    chat, refused = _chat_tokenizer(tokenizer, template, cfg)
    special = _special_token_text(tokenizer)
    bos = prompt_start(tokenizer)
    try:
        for start in range(0, len(records), cfg.tokenize_batch_size):
            batch = records[start : start + cfg.tokenize_batch_size]
            yield from _build_batch(batch, template, tokenizer, chat, (bos, eos), special, cfg, log, stats)
    except refused as e:
        raise _refusal(e, template, cfg) from e


def check_records(
    records: Sequence[Record], template: PromptTemplate, tokenizer: Any, cfg: DataConfig, log: IssueLog
) -> None:
    """Count in `log` the records of `records` that `build_examples` would refuse (`missing_field`,
    `wrong_type`, `empty_field` for a target of special-token text alone), without tokenising any: for a
    run that builds nothing because reading found invalid records, so that its error lists these too.

    Raises:
        ValueError: as `build_examples` does for `cfg.chat_template`.
    """
    chat, refused = _chat_tokenizer(tokenizer, template, cfg)
    special = _special_token_text(tokenizer)
    try:
        for record in records:
            _rendered(record, template, chat, special, cfg, log)
    except refused as e:
        raise _refusal(e, template, cfg) from e


def _chat_tokenizer(
    tokenizer: Any, template: PromptTemplate, cfg: DataConfig
) -> tuple[Any, tuple[type[Exception], ...]]:
    """(the tokenizer whose chat template renders the prompts, or None for the template's frame; the errors
    by which that chat template refuses a prompt).

    Raises:
        ValueError: `cfg.chat_template` is set and `tokenizer` has no chat template.
    """
    if not cfg.chat_template:
        return None, ()
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"data.chat_template is true but tokenizer {cfg.tokenizer!r} has no chat template; set it to"
            f" false to use the frame of template {template.name!r}"
        )
    # Imported only here: jinja2 is transformers' optional dependency, which apply_chat_template needs.
    from jinja2 import TemplateError

    return tokenizer, (TemplateError,)


def _refusal(error: Exception, template: PromptTemplate, cfg: DataConfig) -> ValueError:
    """The error to raise when the chat template refused a prompt with `error`."""
    # The template's own message (raise_exception's text) is the cause; jinja2's traceback adds nothing.
    fix = "use a tokenizer whose chat template accepts a system message"
    if template.frame is not None:
        fix = f"set data.chat_template: false to use the frame of template {template.name!r}, or {fix}"
    return ValueError(
        f"data.chat_template: the chat template of data.tokenizer {cfg.tokenizer!r} refused the prompt (a"
        f" system and a user message): {error}; {fix}"
    )


def _rendered(
    record: Record,
    template: PromptTemplate,
    chat: Any,
    special: re.Pattern[str],
    cfg: DataConfig,
    log: IssueLog,
) -> tuple[list[dict], str, str] | None:
    """(the `max_history` most recent entries' fields, newest first; the prompt with them; the prompt without
    history) of `record`, or None when it cannot become an example: a target of special-token text alone, a
    field the template lacks or cannot format (counted in `log`).

    Raises:
        the chat template's refusal (`_chat_tokenizer`), which `_refusal` explains.
    """
    if special.search(record.target) and not special.sub("", record.target).strip():
        tokens = ", ".join(sorted(set(special.findall(record.target))))
        log.error(
            Issue(
                "empty_field",
                record.source,
                record.target_field,
                f"`{record.target_field}` holds nothing but the text of special tokens ({tokens}), which"
                " the tokenizer reads as those tokens: the example would learn only control tokens. Fix:"
                " write the target text, or remove the record",
            )
        )
        return None
    entries = [dict(e.fields) for e in recent_first(record.history)][: cfg.max_history]
    try:
        text_with = render_prompt(template, record.context, entries, chat_tokenizer=chat)
        text_without = render_prompt(template, record.context, None, chat_tokenizer=chat)
    except KeyError as e:
        log.error(
            Issue("missing_field", record.source, str(e.args[0]), f"template {template.name!r} needs it")
        )
        return None
    except FieldFormatError as e:
        log.error(Issue("wrong_type", record.source, e.field, str(e)))
        return None
    return entries, text_with, text_without


def _build_batch(
    records: Sequence[Record],
    template: PromptTemplate,
    tokenizer: Any,
    chat: Any,
    ends: tuple[int | None, int],
    special: re.Pattern[str],
    cfg: DataConfig,
    log: IssueLog,
    stats: FittingStats,
) -> Iterator[Example]:
    bos, eos = ends  # the prompts' first token (None: none), the targets' last

    def prompt_ids(texts: list[str]) -> list[list[int]]:
        # A chat template that writes the BOS's text already starts with its id.
        ids = _tokenize(tokenizer, texts)
        return ids if bos is None else [t if t[:1] == [bos] else [bos, *t] for t in ids]

    newest_first: list[list[dict]] = []
    with_texts: list[str] = []
    without: list[str] = []
    valid: list[Record] = []
    for record in records:
        rendered = _rendered(record, template, chat, special, cfg, log)
        if rendered is None:
            continue
        entries, text_with, text_without = rendered
        with_texts.append(text_with)
        without.append(text_without)
        newest_first.append(entries)
        valid.append(record)
    without_ids = prompt_ids(without)
    target_ids = _tokenize(tokenizer, [r.target for r in valid])
    kept = [len(e) for e in newest_first]
    floor = 1 if cfg.history_fit == "public" else 0  # entries kept however long the prompt
    with_ids = prompt_ids(with_texts)
    searches = {
        i: FitSearch(kept[i], floor, cfg.max_prompt_tokens)
        for i in range(len(valid))
        if len(with_ids[i]) > cfg.max_prompt_tokens and kept[i] > floor
    }
    fitted: dict[int, tuple[str, list[int]]] = {}  # the prompt of each search's best probe so far
    probes = _next_probes(searches)
    # The searches run in step, one tokenizer call per round for all of them (O(log max_history) rounds).
    while probes:
        texts = [
            render_prompt(template, valid[i].context, newest_first[i][:k], chat_tokenizer=chat)
            for i, k in probes.items()
        ]
        for i, text, ids in zip(probes, texts, prompt_ids(texts), strict=True):
            searches[i].observe(len(ids))
            if len(ids) <= cfg.max_prompt_tokens:  # a search's later probes are larger than a fitting one
                fitted[i] = (text, ids)
        probes = _next_probes(searches)
    for i, search in searches.items():
        kept[i] = search.best
        if i in fitted:
            with_texts[i], with_ids[i] = fitted[i]
    # A search with no fitting probe answers the floor, which it never probes.
    at_floor = [i for i in searches if i not in fitted]
    for i in at_floor:
        with_texts[i] = render_prompt(
            template, valid[i].context, newest_first[i][:floor], chat_tokenizer=chat
        )
    for i, ids in zip(at_floor, prompt_ids([with_texts[i] for i in at_floor]), strict=True):
        with_ids[i] = ids
    for i, record in enumerate(valid):
        too_long = len(with_ids[i]) > cfg.max_prompt_tokens or len(without_ids[i]) > cfg.max_prompt_tokens
        if too_long and cfg.history_fit == "drop":
            log.drop("prompt_too_long")
            continue
        if kept[i] == 0 and newest_first[i]:
            # Not one entry fits (`drop` only: `public` keeps one): the with-history prompt would hold an
            # empty history section, so the two prompts differ by a placeholder, not by the user's history.
            # (`max_history: 0` asks for no history, as a pre-training does: such examples are kept.)
            log.drop("no_history_fits")
            continue
        _note_special_text(
            record, inserted_values(template, record.context, newest_first[i][: kept[i]]), special, log
        )
        stats.prompts_cut += too_long
        stats.history_entries_beyond_max_history += max(0, len(record.history) - cfg.max_history)
        dropped = len(newest_first[i]) - kept[i]
        stats.history_entries_dropped_for_length += dropped
        target = target_ids[i]
        cut = len(target) > cfg.max_target_tokens
        stats.targets_cut += cut
        yield Example(
            record=record,
            prompt_with_history=with_texts[i],
            prompt_without_history=without[i],
            history_used=kept[i],
            history_dropped_for_length=dropped,
            target_cut=cut,
            prompt_cut=too_long,
            tokens=TokenizedExample(
                prompt_with=np.asarray(with_ids[i][: cfg.max_prompt_tokens], np.int32),
                prompt_without=np.asarray(without_ids[i][: cfg.max_prompt_tokens], np.int32),
                target=np.asarray([*target[: cfg.max_target_tokens], eos], np.int32),
            ),
        )


# How far a prompt's token count may fall below that of a prompt with fewer entries (see FitSearch). Adding
# text lowers a BPE count only where merges change across the join (a few tokens: at most 3 were seen on
# adversarial entries with SmolLM2's tokenizer); 64 is generous, and only costs probes near the limit.
DIP_SLACK_TOKENS = 64


class FitSearch:
    """The most history entries whose prompt fits the limit, as the one-entry-per-round scan would find it.

    The scan drops the oldest entry while the prompt is over the limit: its answer is the largest count in
    (floor, entries) whose prompt has at most `limit` tokens, else `floor` (the prompt with all `entries` is
    known not to fit). This search finds the same count in O(log entries) probes: it gallops up from the
    floor (counts floor+1, +2, +4, ...) and then bisects. The scan's answer is reproduced exactly whenever no
    prompt has more than `slack` fewer tokens than a prompt with fewer entries: a probe over `limit + slack`
    then proves that no larger count fits, and the counts above a probe over `limit` by at most `slack` are
    searched too, so the search is exact even where the count dips near the limit.

    Use: while `next_probe()` gives a count, render and tokenise that many entries and `observe(tokens)`;
    then `best` is the answer.
    """

    def __init__(self, entries: int, floor: int, limit: int, slack: int = DIP_SLACK_TOKENS) -> None:
        self.limit, self.slack = limit, slack
        self.best = floor  # the largest fitting count probed, else the floor
        # Open intervals (a, b) of counts still to search, each with its galloping step; disjoint, the
        # highest last, all above `best`.
        self._open: list[tuple[int, int, int]] = [(floor, entries, 1)]

    def next_probe(self) -> int | None:
        """The count to probe next, or None when `best` is the answer."""
        while self._open:
            a, b, step = self._open[-1]
            if b - a > 1:
                return min(a + step, (a + b) // 2)
            self._open.pop()
        return None

    def observe(self, tokens: int) -> None:
        """Record that the prompt with `next_probe()` entries has `tokens` tokens."""
        a, b, step = self._open.pop()
        probe = min(a + step, (a + b) // 2)
        if tokens <= self.limit:
            # Every interval left is below the probe: none can hold the answer.
            self.best, self._open = probe, [(probe, b, 2 * step)]
        elif tokens > self.limit + self.slack:
            self._open.append((a, probe, step))
        else:
            # Over the limit but within the slack: a larger count may still fit; search above first.
            self._open += [(a, probe, step), (probe, b, 2 * step)]


def _next_probes(searches: dict[int, FitSearch]) -> dict[int, int]:
    """The next count of every search that has not ended."""
    return {i: k for i, search in searches.items() if (k := search.next_probe()) is not None}


def recent_first(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """`history` (oldest first) newest first: by timestamp, descending, equal timestamps in their order in
    `history` (Python's sort is stable with `reverse=True` too); without timestamps, `history` reversed."""
    if history and all(e.timestamp is not None for e in history):
        return sorted(history, key=lambda e: e.timestamp, reverse=True)
    return list(reversed(history))


def _special_token_text(tokenizer: Any) -> re.Pattern[str]:
    """A pattern matching the text of `tokenizer`'s special tokens (`all_special_tokens`) and of every added
    token, special or not (Qwen's `<tool_call>`, `<|fim_prefix|>`, `<think>`: the tokenizer reads each whole,
    as one id, all the same), which its calls here map to the tokens' ids; longest first, so a token is never
    matched by a shorter one it starts with."""
    texts = {*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values())}
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def _note_special_text(
    record: Record, prompt_values: list[Any], special: re.Pattern[str], log: IssueLog
) -> None:
    """Count the example of `record` once per special token whose text its target, or one of the
    `prompt_values` its prompts insert, holds: kept, tokenised as the public code does, but probably not
    meant."""
    in_prompt = {t for v in prompt_values if isinstance(v, str) for t in special.findall(v)}
    for token in sorted(in_prompt):
        log.note(
            f"a prompt value (context or history) holds the text of the special token {token}, which is"
            " tokenised as that token (as the public code does); if it is meant as text, remove it from the"
            " data",
            record.source,
        )
    for token in sorted(set(special.findall(record.target))):
        log.note(
            f"a target holds the text of the special token {token}, which is tokenised as that token (as the"
            " public code does), so the model learns to write it; if it is meant as text, remove it from the"
            " data",
            f"{record.source}:{record.target_field}",
        )


def prompt_start(tokenizer: Any) -> int | None:
    """The BOS id `tokenizer` starts every text with when it adds its special tokens (Llama 3's
    `<|begin_of_text|>`), which a prompt starts with too; None for a tokenizer that adds none (Qwen,
    SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def example_row(index: int, example: Example) -> dict[str, Any]:
    """The rendered example as one JSON object of `<split>.jsonl`: the prompts and the record's target as
    text before any cut (`prompt_cut`, `target_cut` say which were cut), `tokens` the lengths of the token
    arrays the model sees."""
    r = example.record
    return {
        "index": index,
        "user_id": r.user_id,
        "id": r.id,
        "split": r.split,
        "category": r.category,
        "source": r.source,
        "prompt_with_history": example.prompt_with_history,
        "prompt_without_history": example.prompt_without_history,
        "target": r.target,
        "history_used": example.history_used,
        "history_available": len(r.history),
        "history_dropped_for_length": example.history_dropped_for_length,
        "target_cut": example.target_cut,
        "prompt_cut": example.prompt_cut,
        "tokens": {
            "prompt_with": int(example.tokens.prompt_with.size),
            "prompt_without": int(example.tokens.prompt_without.size),
            "target": int(example.tokens.target.size),
        },
        "meta": r.meta,
    }
