"""History fitting by search (`FitSearch`) reproduces the one-entry-per-round scan it replaced exactly: the
search alone on token-count sequences that dip, and whole examples (texts, token arrays, the jsonl rows,
fitting statistics, drops) on every fixture format and on generated records with many entries of varied and
adversarial lengths; and a record with 2,000 entries is fitted with O(log n) tokenised prompts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import yaml

from nextquill_jax.data.config import DataConfig
from nextquill_jax.data.examples import (
    Example,
    FitSearch,
    FittingStats,
    build_examples,
    example_row,
    recent_first,
)
from nextquill_jax.data.prepared_split import TokenizedExample
from nextquill_jax.data.sources.read import read_records
from nextquill_jax.data.sources.records import HistoryEntry, IssueLog, Record
from nextquill_jax.data.templates import PromptTemplate, load_template, render_prompt

# ------------------------------------------------------------------------------------------------------------
# The reference: the scan the search replaced, one record at a time, written plainly.


def _reference_examples(
    records: Sequence[Record], template: PromptTemplate, tok: Any, cfg: DataConfig
) -> tuple[list[Example], FittingStats, dict[str, int]]:
    """(examples, stats, examples dropped by reason) as the scan made them: drop the oldest entry, render and
    tokenise the whole prompt again, while it is over the limit and more than the floor is left; an example
    still too long (`drop`) or left with no entry is dropped."""
    chat = tok if cfg.chat_template else None
    floor = 1 if cfg.history_fit == "public" else 0
    limit = cfg.max_prompt_tokens

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    examples, stats, dropped = [], FittingStats(), {"prompt_too_long": 0, "no_history_fits": 0}
    for record in records:
        entries = [dict(e.fields) for e in recent_first(record.history)][: cfg.max_history]
        kept = len(entries)
        with_text = render_prompt(template, record.context, entries, chat_tokenizer=chat)
        with_ids = ids(with_text)
        while len(with_ids) > limit and kept > floor:
            kept -= 1
            with_text = render_prompt(template, record.context, entries[:kept], chat_tokenizer=chat)
            with_ids = ids(with_text)
        without_text = render_prompt(template, record.context, None, chat_tokenizer=chat)
        without_ids = ids(without_text)
        too_long = len(with_ids) > limit or len(without_ids) > limit
        if too_long and cfg.history_fit == "drop":
            dropped["prompt_too_long"] += 1
            continue
        if kept == 0 and entries:
            dropped["no_history_fits"] += 1
            continue
        target = ids(record.target)
        stats.prompts_cut += too_long
        stats.history_entries_beyond_max_history += max(0, len(record.history) - cfg.max_history)
        stats.history_entries_dropped_for_length += len(entries) - kept
        stats.targets_cut += len(target) > cfg.max_target_tokens
        examples.append(
            Example(
                record=record,
                prompt_with_history=with_text,
                prompt_without_history=without_text,
                history_used=kept,
                history_dropped_for_length=len(entries) - kept,
                target_cut=len(target) > cfg.max_target_tokens,
                prompt_cut=too_long,
                tokens=TokenizedExample(
                    prompt_with=np.asarray(with_ids[:limit], np.int32),
                    prompt_without=np.asarray(without_ids[:limit], np.int32),
                    target=np.asarray([*target[: cfg.max_target_tokens], tok.eos_token_id], np.int32),
                ),
            )
        )
    return examples, stats, dropped


def _assert_same_as_reference(
    records: Sequence[Record], template: PromptTemplate, tok: Any, cfg: DataConfig
) -> list[Example]:
    """build_examples equals the reference: jsonl rows, token arrays (values and dtype), stats, drops."""
    log, stats = IssueLog(), FittingStats()
    got = list(build_examples(records, template, tok, cfg, log, stats))
    want, want_stats, want_dropped = _reference_examples(records, template, tok, cfg)
    assert [example_row(i, e) for i, e in enumerate(got)] == [example_row(i, e) for i, e in enumerate(want)]
    for g, w in zip(got, want, strict=True):
        for name in ("prompt_with", "prompt_without", "target"):
            a, b = getattr(g.tokens, name), getattr(w.tokens, name)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert stats == want_stats
    assert {reason: log.dropped.get(reason, 0) for reason in want_dropped} == want_dropped
    return got


# ------------------------------------------------------------------------------------------------------------
# The search alone.


def _scan_answer(lengths: Sequence[int], floor: int, limit: int) -> int:
    """The scan's count, given the token count of the prompt with k entries at lengths[k]."""
    k = len(lengths) - 1
    while k > floor and lengths[k] > limit:
        k -= 1
    return k


def _searched(lengths: Sequence[int], floor: int, limit: int, slack: int) -> tuple[int, int]:
    """(the search's count, how many counts it probed) on the prompt lengths `lengths`."""
    search = FitSearch(len(lengths) - 1, floor, limit, slack)
    probes = 0
    while (k := search.next_probe()) is not None:
        assert floor < k < len(lengths) - 1  # the floor and the full history are never probed
        search.observe(lengths[k])
        probes += 1
    return search.best, probes


def test_search_finds_the_scans_count_on_sequences_that_dip_by_up_to_the_slack():
    # Counts that rise by 0..6 tokens per entry and now and then fall by up to the slack (below every earlier
    # count by at most the slack), with limits all along the sequence, many near a dip.
    rng = np.random.default_rng(0)
    slack = 5
    near_dips = 0
    for _ in range(3000):
        n = int(rng.integers(2, 60))
        lengths = [int(rng.integers(0, 20))]
        for _ in range(n):
            top = max(lengths)
            step = int(rng.integers(-slack, 1)) if rng.random() < 0.3 else int(rng.integers(0, 7))
            lengths.append(max(top - slack, lengths[-1] + step))
        floor = int(rng.integers(0, 2))
        for limit in rng.integers(min(lengths), max(lengths) + 1, size=4):
            if lengths[-1] <= limit or n <= floor:
                continue  # the scan starts only when the full prompt is over the limit
            near_dips += any(lengths[k] > limit >= lengths[k + 1] for k in range(n))
            assert _searched(lengths, floor, int(limit), slack)[0] == _scan_answer(lengths, floor, int(limit))
    assert near_dips > 1000  # the limits do fall where a larger count fits and a smaller one does not


def test_search_probes_o_log_n_counts_when_counts_rise():
    # Galloping then bisection: at most 2 log2(answer) + 2 probes to find the count, plus, where counts
    # within the slack of the limit follow the answer, the probes that check them (here: none, 10 per entry).
    for n in (2, 10, 1000, 100_000):
        lengths = [10 * k for k in range(n + 1)]
        for answer in {0, 1, n // 3, n - 1}:
            limit = lengths[answer] + 5
            best, probes = _searched(lengths, 0, limit, slack=4)
            assert best == answer
            assert probes <= 2 * math.log2(answer + 2) + 2


# ------------------------------------------------------------------------------------------------------------
# Whole examples against the reference.


@pytest.fixture(scope="module")
def fixture_records(formats) -> dict[str, tuple[list[Record], PromptTemplate, dict]]:
    """Per fixture format: its records, template and the data settings that read them."""
    out = {}
    for name, data in formats.items():
        cfg = DataConfig(**data)
        template = load_template(cfg.template)
        records = list(read_records(cfg, template, IssueLog()))
        assert records
        out[name] = (records, template, data)
    return out


@pytest.mark.parametrize("name", ["amazon2023", "dpl", "lamp_topic_writing", "lamp_abstract", "generic"])
def test_fixtures_prepare_as_the_scan_did(name, fixture_records, tiny_tokenizer):
    # Limits from where nothing fits to where everything does, in both fitting modes; the generic fixture
    # also with the tokenizer's chat template.
    tok = tiny_tokenizer()
    records, template, data = fixture_records[name]
    full = [
        len(tok(render_prompt(template, r.context, [e.fields for e in r.history]))["input_ids"])
        for r in records
    ]
    limits = sorted({int(x) for x in np.linspace(min(full) // 3, max(full) + 1, 9)})
    fitted = 0
    for chat_template in (False, True) if name == "generic" else (False,):
        for history_fit in ("drop", "public"):
            for limit in limits:
                cfg = DataConfig(
                    **data,
                    chat_template=chat_template,
                    history_fit=history_fit,
                    max_history=100,
                    max_prompt_tokens=limit,
                    max_target_tokens=16,
                    tokenize_batch_size=3,
                )
                got = _assert_same_as_reference(records, template, tok, cfg)
                fitted += sum(e.history_dropped_for_length > 0 and e.history_used > 0 for e in got)
    assert fitted > 0  # some limit kept part of a history


_BARE = {  # entries run together with nothing between them: merges across entry joins can lower counts
    "system": "",
    "frame": "{system}{user}",
    "user": "{history}",
    "history": "{entries}",
    "no_history": "",
    "entry": "{text}",
}
# Fragments of words the tiny tokenizer holds whole (" the", " illustrated", "Literature", "000000006") and
# awkward text: joined across entries they merge into fewer tokens.
_PIECES = [
    " ",
    "th",
    "e",
    "in",
    "g",
    "er",
    "d",
    " illustr",
    "ated",
    "Literatur",
    "0000",
    "6",
    "\n",
    "é",
    "\u0301",
    "",
    "<|im_start|>",
]


def _many_entry_record(rng: np.random.Generator, r: int, n: int, adversarial: bool) -> Record:
    """A record with `n` entries, from empty to ~30 words, or (adversarial) runs of awkward pieces."""
    words = ["story", "river", "quiet", "harbor", "lantern", "winter", "a", "==", "\n"]

    def text() -> str:
        if adversarial:
            return "".join(rng.choice(_PIECES, size=int(rng.integers(0, 5))))
        return " ".join(rng.choice(words, size=int(rng.integers(0, 30))))

    history = tuple(
        HistoryEntry(fields={"text": text()}, timestamp=float(rng.integers(0, n // 2 + 1))) for _ in range(n)
    )
    return Record(
        user_id=f"u{r}",
        context={"context": text()},
        history=history,
        target="x y",
        split="train",
        source=f"g:{r}",
    )


@pytest.mark.parametrize("adversarial", [False, True])
def test_many_entries_of_varied_lengths_prepare_as_the_scan_did(adversarial, tiny_tokenizer, tmp_path):
    # Per record, limits where the count is close to a dip (a larger count fitting where a smaller one does
    # not) when there is one, and elsewhere; the adversarial records also with the bare template, whose
    # entries join with no separator.
    tok = tiny_tokenizer()
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(_BARE))
    templates = [load_template("plain")]
    if adversarial:
        templates.append(load_template(str(tmp_path / "bare.yaml")))
    rng = np.random.default_rng(1 + adversarial)
    dips_at_limit = 0
    for template in templates:
        for r in range(3):
            record = _many_entry_record(rng, r, int(rng.integers(60, 130)), adversarial)
            entries = [dict(e.fields) for e in recent_first(record.history)]
            lengths = [
                len(x)
                for x in tok(
                    [render_prompt(template, record.context, entries[:k]) for k in range(len(entries) + 1)],
                    add_special_tokens=False,
                )["input_ids"]
            ]
            dips = [k for k in range(len(entries)) if lengths[k + 1] < lengths[k]]
            limits = {int(x) for x in rng.integers(lengths[0], lengths[-1] + 1, size=3)}
            limits |= {lengths[k + 1] for k in dips[:3]}
            dips_at_limit += len(dips[:3])
            for history_fit in ("drop", "public"):
                for limit in limits:
                    cfg = DataConfig(
                        template="plain",
                        max_history=100_000,
                        max_prompt_tokens=limit,
                        history_fit=history_fit,
                    )
                    _assert_same_as_reference([record], template, tok, cfg)
    if adversarial:
        assert dips_at_limit > 0  # the tiny tokenizer's counts do dip on these records


def test_records_in_one_batch_fit_independently_as_the_scan_did(tiny_tokenizer):
    # Searches of several records run in step in one batch, some ending early, one with no entries.
    tok = tiny_tokenizer()
    rng = np.random.default_rng(7)
    records = [_many_entry_record(rng, r, n, adversarial=False) for r, n in enumerate([0, 1, 2, 40, 150, 3])]
    for limit in (1, 30, 200, 900):
        for history_fit in ("drop", "public"):
            cfg = DataConfig(
                template="plain",
                max_history=120,
                max_prompt_tokens=limit,
                history_fit=history_fit,
                tokenize_batch_size=4,
            )
            _assert_same_as_reference(records, load_template("plain"), tok, cfg)


# ------------------------------------------------------------------------------------------------------------
# Cost.


class _CountingTokenizer:
    """A tokenizer that counts the texts it tokenises; everything else is the wrapped tokenizer's."""

    def __init__(self, tok: Any):
        self._tok, self.texts = tok, 0

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.texts += len(texts)
        return self._tok(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


@pytest.mark.parametrize("history_fit", ["drop", "public"])
def test_two_thousand_entries_are_fitted_with_o_log_n_prompts(history_fit, tiny_tokenizer):
    # The scan tokenised one prompt per dropped entry (1,974 here); the search a few per halving.
    tok = _CountingTokenizer(tiny_tokenizer())
    n = 2000
    history = tuple(HistoryEntry(fields={"text": f"w{i % 7}"}, timestamp=float(i)) for i in range(n))
    record = Record(
        user_id="u", context={"context": "c"}, history=history, target="t", split="train", source="s"
    )
    cfg = DataConfig(template="plain", max_history=100_000, max_prompt_tokens=500, history_fit=history_fit)
    (example,) = build_examples([record], load_template("plain"), tok, cfg, IssueLog(), FittingStats())
    assert 0 < example.history_used < n
    # Without and with history, the target, then the probes: 2 log2(n) + 2, plus those for counts within the
    # slack (64 tokens) of the limit, here at most 64 / 17 + 1 (an entry is 17 tokens). It takes 15.
    assert tok.texts <= 3 + 2 * math.log2(n) + 2 + 64 // 17 + 1
    # The count is the scan's where it stops: it fits, one more entry does not.
    entries = [dict(e.fields) for e in recent_first(history)]
    ids = lambda k: tiny_tokenizer()(render_prompt(load_template("plain"), record.context, entries[:k]))
    assert (
        len(ids(example.history_used)["input_ids"]) <= 500 < len(ids(example.history_used + 1)["input_ids"])
    )
