"""Example building: history fitting in both modes (property test over random lengths), the order of history
entries with equal timestamps, target cut, EOS, tokens."""

from __future__ import annotations

import numpy as np
import pytest

from nextquill_jax.data.config import DataConfig
from nextquill_jax.data.examples import Example, FittingStats, build_examples, prompt_start
from nextquill_jax.data.sources.read import read_records
from nextquill_jax.data.sources.records import DataError, HistoryEntry, IssueLog, Record
from nextquill_jax.data.templates import load_template
from tests.shared import FIXTURES

WORDS = ["the", "story", "river", "pages", "quiet", "engine", "harbor", "lantern", "winter", "orchard"]


def _plain_prompt(context: str, newest_first: list[str] | None) -> str:
    """The `plain` template written out by hand."""
    if newest_first is None:
        history = "[History]:\nNone\n"
    else:
        history = (
            "[History]:\n"
            + "".join(f"[Entry {i + 1}]:\n[text]: {t}\n" for i, t in enumerate(newest_first))
            + "\n"
        )
    return f"Write the user's next text.\n[context]: {context}\n{history}[Response]:\n"


def _random_records(rng: np.random.Generator, n: int) -> list[Record]:
    records = []
    for r in range(n):
        history = tuple(
            HistoryEntry(
                fields={"text": f"m{r}x{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))},
                timestamp=float(i),
            )
            for i in range(int(rng.integers(0, 13)))
        )
        records.append(
            Record(
                user_id=f"u{r}",
                context={"context": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 25))))},
                history=history,
                target=" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))),
                split="train",
                source=f"random:{r}",
                id=str(r),
            )
        )
    return records


def _trial(seed: int, history_fit: str = "drop") -> tuple[DataConfig, list[Record]]:
    """Random max_history, prompt limit and records (40, in batches of 7)."""
    rng = np.random.default_rng(seed)
    max_history, limit = int(rng.integers(0, 9)), int(rng.integers(30, 700))
    cfg = DataConfig(
        template="plain",
        max_history=max_history,
        max_prompt_tokens=limit,
        tokenize_batch_size=7,
        history_fit=history_fit,
    )
    return cfg, _random_records(rng, 40)


@pytest.mark.parametrize(
    ("seed", "history_fit"), [*((s, "drop") for s in range(6)), *((s, "public") for s in (2, 3, 11))]
)
def test_history_fitting_drops_oldest_first_and_never_exceeds_the_limit(seed, history_fit, tiny_tokenizer):
    """drop: entries go oldest first down to none, then the example; an example left with no entry is dropped
    too (`no_history_fits`); public (the public code): down to one entry, then the prompt's tokens are cut
    from the right to the limit."""
    tok = tiny_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    cfg, records = _trial(seed, history_fit)
    max_history, limit = cfg.max_history, cfg.max_prompt_tokens
    floor = 1 if history_fit == "public" else 0
    log, stats = IssueLog(), FittingStats()
    examples = {e.record.id: e for e in build_examples(records, load_template("plain"), tok, cfg, log, stats)}

    expected_dropped_examples = expected_no_history = expected_dropped_entries = expected_cut = 0
    for record in records:
        texts = [e.fields["text"] for e in reversed(record.history)]  # newest first
        context = record.context["context"]
        k = min(max_history, len(texts))
        top = k
        while k > floor and len(ids(_plain_prompt(context, texts[:k]))) > limit:
            k -= 1
        full_with, full_without = ids(_plain_prompt(context, texts[:k])), ids(_plain_prompt(context, None))
        fits = len(full_with) <= limit and len(full_without) <= limit
        if not fits and history_fit == "drop":
            expected_dropped_examples += 1
            assert record.id not in examples
            continue
        if k == 0 and top > 0:  # drop only: public keeps one entry; max_history 0 asks for none
            expected_no_history += 1
            assert record.id not in examples
            continue
        expected_cut += not fits
        expected_dropped_entries += top - k
        example = examples[record.id]
        assert example.history_used == k and example.history_dropped_for_length == top - k
        assert example.prompt_with_history == _plain_prompt(context, texts[:k])
        assert example.prompt_without_history == _plain_prompt(context, None)
        assert example.prompt_cut == (not fits)
        np.testing.assert_array_equal(example.tokens.prompt_with, full_with[:limit])
        np.testing.assert_array_equal(example.tokens.prompt_without, full_without[:limit])
        # The kept entries are the k most recent; every older one is absent.
        for i, text in enumerate(texts):
            assert (text.split()[0] + " " in example.prompt_with_history) == (i < k)
    assert log.dropped.get("prompt_too_long", 0) == expected_dropped_examples
    assert stats.prompts_cut == expected_cut
    assert stats.history_entries_dropped_for_length == expected_dropped_entries
    assert stats.history_entries_beyond_max_history == sum(  # over the examples kept, as the other counts
        max(0, len(e.record.history) - max_history) for e in examples.values()
    )
    assert log.dropped.get("no_history_fits", 0) == expected_no_history
    assert len(examples) == len(records) - expected_dropped_examples - expected_no_history


def test_some_fitting_actually_happens_in_the_property_test(tiny_tokenizer):
    # Guards the property test against limits that never bind: across its seeds, entries are dropped for
    # length, some examples keep every entry, and some are dropped whole, too long or left with no entry.
    # With history_fit public (seeds 2, 3 and 11), prompts are cut: 32 in seed 3, where drop loses 2 examples.
    dropped_entries = kept_all = dropped_examples = no_history = 0
    for seed in range(6):
        cfg, records = _trial(seed)
        log, stats = IssueLog(), FittingStats()
        examples = list(build_examples(records, load_template("plain"), tiny_tokenizer(), cfg, log, stats))
        dropped_entries += stats.history_entries_dropped_for_length
        kept_all += sum(e.history_dropped_for_length == 0 and e.history_used > 0 for e in examples)
        dropped_examples += log.dropped.get("prompt_too_long", 0)
        no_history += log.dropped.get("no_history_fits", 0)
    assert dropped_entries > 20 and kept_all > 20 and dropped_examples > 0 and no_history > 0
    cut = 0
    for seed in (3, 11):
        cfg, records = _trial(seed, "public")
        stats = FittingStats()
        list(build_examples(records, load_template("plain"), tiny_tokenizer(), cfg, IssueLog(), stats))
        cut += stats.prompts_cut
    assert cut > 20


def _plain_example_of_history(times: dict[str, float | None], tokenizer) -> Example:
    """The one example of a record whose history entries are the texts of `times` (in the record's order),
    each with its timestamp, under the plain template and room for 8 entries."""
    record = Record(
        user_id="u",
        context={"context": "x"},
        history=tuple(HistoryEntry(fields={"text": t}, timestamp=ts) for t, ts in times.items()),
        target="y",
        split="train",
        source="s:1",
    )
    cfg = DataConfig(template="plain", max_history=8)
    (example,) = build_examples([record], load_template("plain"), tokenizer, cfg, IssueLog(), FittingStats())
    return example


def test_entries_with_equal_timestamps_keep_their_order_as_the_public_sort(tiny_tokenizer):
    # The public code: sorted(profile, key=timestamp, reverse=True), stable: ties keep the profile's order.
    times = {"a": 1.0, "b": 2.0, "c": 2.0, "d": 3.0, "e": 2.0}  # in the record's (oldest-first) order
    example = _plain_example_of_history(times, tiny_tokenizer())
    assert example.prompt_with_history == _plain_prompt("x", ["d", "b", "c", "e", "a"])


def test_a_history_with_some_entries_undated_is_taken_newest_first_by_the_records_order(tiny_tokenizer):
    """Timestamps order the history only when every entry has one: with one missing, the record's own
    (oldest-first) order is reversed, as for a history with none; the dated entries are not sorted around
    the undated one (which has no place among them: sorting by a None timestamp fails)."""
    times = {"a": 3.0, "b": None, "c": 1.0, "d": 2.0}  # by time, a is the newest; in the record, d
    example = _plain_example_of_history(times, tiny_tokenizer())
    assert example.prompt_with_history == _plain_prompt("x", ["d", "c", "b", "a"])


def test_a_record_without_a_field_its_template_inserts_is_skipped_as_missing_field(tiny_tokenizer):
    """`review_short` inserts the context's item_title, item_description, rating and title: a record without
    `rating` becomes no example and is counted as `missing_field`, naming the field, the template and the
    record's place (as reading counts a record without a field its format needs), not as another reason."""
    context = {"item_title": "a book", "item_description": "pages", "title": "good"}
    record = Record(
        user_id="u",
        context=context,
        history=(HistoryEntry(fields={"text": "h"}),),
        target="y",
        split="train",
        source="s:1",
    )
    log = IssueLog(on_error="skip")
    template, cfg = load_template("review_short"), DataConfig(template="review_short")
    assert list(build_examples([record], template, tiny_tokenizer(), cfg, log, FittingStats())) == []
    assert dict(log.errors) == {"missing_field": 1}
    (issue,) = log.skipped["missing_field"]
    assert (issue.location, issue.field, issue.message) == (
        "s:1",
        "rating",
        "template 'review_short' needs it",
    )


def test_target_cut_then_eos_and_tokens_match_the_text(tiny_tokenizer):
    tok = tiny_tokenizer()
    cfg = DataConfig(
        format="amazon2023",
        sources=[str(FIXTURES / "amazon2023" / "Books.jsonl")],
        meta=[str(FIXTURES / "amazon2023" / "meta_Books.jsonl")],
        max_target_tokens=20,
        dpl_min_item_users=2,
        dpl_min_user_reviews=5,
        dpl_num_targets=3,
        dpl_min_profile_item_users=2,
        dpl_min_profile_reviews=2,
    )
    log, stats = IssueLog(), FittingStats()
    template = load_template("review")
    examples = list(build_examples(read_records(cfg, template, log), template, tok, cfg, log, stats))
    assert len(examples) == 12
    eos = tok.eos_token_id
    for e in examples:
        full = tok(e.record.target, add_special_tokens=False)["input_ids"]
        assert len(full) > 20 and e.target_cut
        np.testing.assert_array_equal(e.tokens.target, [*full[:20], eos])
        # Prompt tokens are exactly the prompt text's, ChatML markers as their special-token ids.
        np.testing.assert_array_equal(
            e.tokens.prompt_with, tok(e.prompt_with_history, add_special_tokens=False)["input_ids"]
        )
        np.testing.assert_array_equal(
            e.tokens.prompt_without, tok(e.prompt_without_history, add_special_tokens=False)["input_ids"]
        )
        assert e.tokens.prompt_with[0] == tok.convert_tokens_to_ids("<|im_start|>")
        assert e.tokens.prompt_with.dtype == np.int32 and e.tokens.target.dtype == np.int32
    assert stats.targets_cut == 12

    long_cfg = DataConfig(**{**cfg.fingerprint_fields(), "max_target_tokens": 2048})
    short = list(
        build_examples(read_records(long_cfg, template, log), template, tok, long_cfg, log, FittingStats())
    )
    for e in short:
        assert not e.target_cut
        np.testing.assert_array_equal(
            e.tokens.target, [*tok(e.record.target, add_special_tokens=False)["input_ids"], eos]
        )


def test_tokenizer_without_eos_or_chat_template_is_refused(tiny_tokenizer):
    tok = tiny_tokenizer()
    records = _random_records(np.random.default_rng(0), 2)
    with pytest.raises(ValueError, match="has no chat template"):
        no_chat = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
        list(
            build_examples(
                records,
                load_template("plain"),
                no_chat,
                DataConfig(chat_template=True),
                IssueLog(),
                FittingStats(),
            )
        )
    with pytest.raises(ValueError, match="has no EOS token"):
        no_eos = tok.__class__(tokenizer_object=tok.backend_tokenizer)
        list(
            build_examples(records, load_template("plain"), no_eos, DataConfig(), IssueLog(), FittingStats())
        )


def test_chat_template_refusing_the_system_message_is_one_error(tiny_tokenizer):
    # Gemma's templates raise for a system message; the error is the template's message and the fix, not
    # jinja2's traceback.
    tok = tiny_tokenizer()
    no_system = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    no_system.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported')"
        " }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    records = _random_records(np.random.default_rng(0), 2)
    cfg = DataConfig(chat_template=True, tokenizer="tok_nosys")
    with pytest.raises(ValueError) as info:
        list(build_examples(records, load_template("plain"), no_system, cfg, IssueLog(), FittingStats()))
    assert str(info.value) == (
        "data.chat_template: the chat template of data.tokenizer 'tok_nosys' refused the prompt (a system"
        " and a user message): System role not supported; set data.chat_template: false to use the frame"
        " of template 'plain', or use a tokenizer whose chat template accepts a system message"
    )


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_value_the_template_cannot_format_is_an_invalid_record_under_on_error(
    on_error, tiny_tokenizer, tmp_path
):
    path = tmp_path / "fmt.yaml"
    path.write_text(
        'system: "S"\nframe: "{system}{user}"\nuser: "r={rating:.1f} {history}"\nhistory: "{entries}"\n'
        'no_history: "-"\nentry: "{text}"\n'
    )
    records = [
        Record(
            user_id="u",
            context={"rating": rating},
            history=(HistoryEntry({"text": "h"}),),
            target="t",
            split="train",
            source=f"recs.jsonl:{line}",
        )
        for line, rating in ((1, 4), (2, "five"), (3, 2.5))
    ]
    log = IssueLog(on_error=on_error)
    kept = list(
        build_examples(records, load_template(str(path)), tiny_tokenizer(), DataConfig(), log, FittingStats())
    )
    assert [e.record.source for e in kept] == ["recs.jsonl:1", "recs.jsonl:3"]
    assert log.errors == {"wrong_type": 1}
    if on_error == "skip":
        log.raise_if_failed()  # skipped and counted, nothing raised
        return
    with pytest.raises(DataError) as info:
        log.raise_if_failed()
    assert str(info.value) == (
        "1 invalid input record(s) (1 wrong_type); nothing was prepared:\n"
        "  recs.jsonl:2:rating: the template 'fmt' formats `rating` of the context as `{rating:.1f}` (its"
        " `user` string), which fails for str 'five': Unknown format code 'f' for object of type 'str'. Fix:"
        " give `rating` a value that format fits, or change the placeholder in the template\n"
        "Fix the records, or set `data.on_error: skip` to skip and count them."
    )


def _bos_adding_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with a BOS its post-processor puts before every text, as Llama 3's tokenizer.json
    does (`TemplateProcessing(single="<|begin_of_text|> $A")`)."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tiny_tokenizer()).backend_tokenizer
    backend.add_special_tokens(["<|begin_of_text|>"])
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>"
    )
    assert tok("Hi")["input_ids"][0] == bos and tok("Hi", add_special_tokens=False)["input_ids"][0] != bos
    return tok, bos


def _bos_naming_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with a BOS token named (`<|endoftext|>`) but no post-processor to add it, as
    SmolLM2's tokenizer names one and adds none: its texts start with no BOS."""
    import copy

    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tiny_tokenizer()).backend_tokenizer
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    assert tok.bos_token_id is not None
    assert tok("Hi")["input_ids"] == tok("Hi", add_special_tokens=False)["input_ids"]
    return tok


def _one_record(history: list[str], target: str = "a target") -> Record:
    return Record(
        user_id="u",
        context={"context": "the orchard"},
        history=tuple(HistoryEntry(fields={"text": t}, timestamp=float(i)) for i, t in enumerate(history)),
        target=target,
        split="train",
        source="r:1",
    )


def test_a_tokenizer_that_adds_a_bos_gets_it_first_in_both_prompts_counted_in_the_limit(tiny_tokenizer):
    """Llama 3 always saw `<|begin_of_text|>` at position 0; the prompts were tokenised without it. A chat
    template that writes the BOS itself (`{{ bos_token }}`, as Llama 3's does) gives it once, not twice. The
    tiny tokenizer (as Qwen's) adds none, and gets none; nor does one that names a BOS but adds none (as
    SmolLM2's: `prompt_start` asks what the tokenizer adds, not what it names)."""
    tok, bos = _bos_adding_tokenizer(tiny_tokenizer)
    template = load_template("plain")
    record = _one_record(["the quiet river", "pages of winter"])
    cfg = DataConfig(template="plain", max_history=2)
    (example,) = build_examples([record], template, tok, cfg, IssueLog(), FittingStats())
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(example.tokens.prompt_with, [bos, *ids(example.prompt_with_history)])
    np.testing.assert_array_equal(example.tokens.prompt_without, [bos, *ids(example.prompt_without_history)])
    np.testing.assert_array_equal(example.tokens.target, [*ids("a target"), tok.eos_token_id])
    # The limit counts it: a prompt of exactly the limit with the BOS keeps both entries, one token less
    # drops the older.
    exact = 1 + len(ids(example.prompt_with_history))
    for limit, kept in ((exact, 2), (exact - 1, 1)):
        fitted = DataConfig(template="plain", max_history=2, max_prompt_tokens=limit)
        (example,) = build_examples([record], template, tok, fitted, IssueLog(), FittingStats())
        assert example.history_used == kept and example.tokens.prompt_with.size <= limit
    plain = tiny_tokenizer()
    (example,) = build_examples([record], template, plain, cfg, IssueLog(), FittingStats())
    np.testing.assert_array_equal(example.tokens.prompt_with, ids(example.prompt_with_history))

    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    chat = DataConfig(template="plain", max_history=2, chat_template=True)
    (example,) = build_examples([record], template, tok, chat, IssueLog(), FittingStats())
    for prompt, text in (
        (example.tokens.prompt_with, example.prompt_with_history),
        (example.tokens.prompt_without, example.prompt_without_history),
    ):
        assert text.startswith("<|begin_of_text|>") and text.count("<|begin_of_text|>") == 1
        np.testing.assert_array_equal(prompt, ids(text))  # the text's own BOS, its id first
        assert prompt[0] == bos and int((prompt == bos).sum()) == 1

    named = _bos_naming_tokenizer(tiny_tokenizer)
    named_ids = lambda text: named(text, add_special_tokens=False)["input_ids"]
    assert prompt_start(named) is None
    (example,) = build_examples([record], template, named, cfg, IssueLog(), FittingStats())
    np.testing.assert_array_equal(example.tokens.prompt_with, named_ids(example.prompt_with_history))
    np.testing.assert_array_equal(example.tokens.prompt_without, named_ids(example.prompt_without_history))


def test_added_tokens_that_are_not_special_count_as_special_text(tiny_tokenizer):
    """Qwen's `<tool_call>`, `<|fim_prefix|>` and `<think>` are added tokens not marked special: the
    tokenizer reads their text as one id all the same, so a target of one alone is refused and one in a
    history value is noted, as for `<|im_end|>`."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_tokens(["<tool_call>"])  # special=False
    assert len(tok("<tool_call>", add_special_tokens=False)["input_ids"]) == 1
    template = load_template("plain")
    cfg = DataConfig(template="plain", max_history=2)
    log = IssueLog()
    records = [_one_record(["h"], target="<tool_call>"), _one_record(["calls <tool_call> x"])]
    examples = list(build_examples(records, template, tok, cfg, log, FittingStats()))
    assert len(examples) == 1 and dict(log.errors) == {"empty_field": 1}
    assert "holds nothing but the text of special tokens (<tool_call>)" in log.issues[0].message
    assert [n for n, _ in log.notes.items()] == [
        "a prompt value (context or history) holds the text of the special token <tool_call>, which is"
        " tokenised as that token (as the public code does); if it is meant as text, remove it from the data"
    ]


def test_special_token_text_in_an_entry_dropped_for_length_is_not_noted(tiny_tokenizer):
    """Only the values the prompts insert are checked for special-token text: the oldest entry, which holds
    `<|im_end|>`, noted while it is in the prompt, is dropped to fit `max_prompt_tokens` and then not."""
    tok = tiny_tokenizer()
    template = load_template("plain")
    record = _one_record(["an <|im_end|> old entry", "the newest entry"])  # oldest first
    newest_only = _one_record(["the newest entry"])
    cfg = DataConfig(template="plain", max_history=2, history_fit="drop")
    (example,) = build_examples([newest_only], template, tok, cfg, IssueLog(), FittingStats())
    limit = example.tokens.prompt_with.size  # the prompt with the newest entry alone
    log = IssueLog()
    (example,) = build_examples([record], template, tok, cfg, log, FittingStats())
    assert example.history_used == 2 and list(log.notes) == [
        "a prompt value (context or history) holds the text of the special token <|im_end|>, which is"
        " tokenised as that token (as the public code does); if it is meant as text, remove it from the data"
    ]
    fitted = DataConfig(template="plain", max_history=2, history_fit="drop", max_prompt_tokens=limit)
    log = IssueLog()
    (example,) = build_examples([record], template, tok, fitted, log, FittingStats())
    assert (example.history_used, example.history_dropped_for_length) == (1, 1)
    assert "<|im_end|>" not in example.prompt_with_history
    assert not log.notes


def test_entries_beyond_max_history_are_counted_over_the_examples_kept(tiny_tokenizer):
    """A record dropped for its prompt's length counted its entries beyond max_history, which the other
    counts of the summary (over the examples kept) left out."""
    tok = tiny_tokenizer()
    template = load_template("plain")
    long_context = " ".join(["lantern"] * 400)
    dropped = _one_record([f"entry {i}" for i in range(12)])
    dropped = Record(**{**dropped.__dict__, "context": {"context": long_context}})
    kept = _one_record(["a", "b", "c"])
    cfg = DataConfig(template="plain", max_history=2, max_prompt_tokens=200, history_fit="drop")
    log, stats = IssueLog(), FittingStats()
    examples = list(build_examples([dropped, kept], template, tok, cfg, log, stats))
    assert len(examples) == 1 and dict(log.dropped) == {"prompt_too_long": 1}
    assert stats.history_entries_beyond_max_history == 1  # the kept record's 3 entries, 2 used
