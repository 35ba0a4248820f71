"""Prompt templates: the public code's review prompt character for character, LaMP and plain prompts, the
tokenizer-chat-template mode, and templates as data (YAML by path, validated)."""

from __future__ import annotations

import dataclasses

import pytest

from nextquill_jax.data.config import DataConfig
from nextquill_jax.data.examples import FittingStats, build_examples
from nextquill_jax.data.sources.read import read_records
from nextquill_jax.data.sources.records import IssueLog
from nextquill_jax.data.templates import (
    FieldFormatError,
    builtin_templates,
    inserted_values,
    load_template,
    render_messages,
    render_prompt,
)
from tests.shared import FIXTURES

AMAZON = FIXTURES / "amazon2023"

# Field values copied from tests/fixtures/amazon2023: U1's last review ("Second look", line 31 of
# Books.jsonl) and U1's two most recent earlier reviews (Lanterns at Noon, then Paper Kings), with their
# items' descriptions.
MAP_OF_BELLS = (
    "Tension hardcover war pages chapter twist detail journey hardcover river chapter ending pacing edition "
    "chapter author setting city prose friendship journey plot river."
)
LANTERNS = (
    "Illustrated detail mystery history humor memory mystery history hardcover journey plot plot pacing "
    "edition dialogue history journey city journey family ending mystery characters mystery edition history "
    "detail romance edition story."
)
LANTERNS_REVIEW = (
    "Quirk1 prose prose river river river writing history setting ending voice1 plot prose river chapter "
    "habit1 city pacing friendship romance romance chapter ending tension dialogue family voice habit1 "
    "pacing writing family mystery quirk1 quirk1 memory plot scene story quirk1 city memory."
)
PAPER_KINGS = (
    "Family edition writing writing hardcover river edition edition setting ending tension characters detail "
    "dialogue edition scene plot romance family tension plot setting ending dialogue family scene journey "
    "mystery."
)
PAPER_KINGS_REVIEW = (
    "Humor quirk1 dialogue story river chapter habit1 ending chapter voice1 dialogue chapter dialogue humor "
    "romance mystery river quirk1 friendship chapter voice1 prose pages history chapter tension detail "
    "dialogue setting voice story voice1 author quirk1 pacing characters romance."
)
HISTORY_BLOCK = (
    "[User's Past Reviews]:\n"
    "[Review 1]:\n"
    "- [Item Title]: Lanterns at Noon\n"
    f"- [Item Description]: {LANTERNS}\n"
    "- [Review Rating]: 4.0\n"
    "- [Review Title]: U1 on Lanterns at Noon\n"
    f"- [Review Text]: {LANTERNS_REVIEW}\n"
    "[Review 2]:\n"
    "- [Item Title]: Paper Kings\n"
    f"- [Item Description]: {PAPER_KINGS}\n"
    "- [Review Rating]: 3.0\n"
    "- [Review Title]: U1 on Paper Kings\n"
    f"- [Review Text]: {PAPER_KINGS_REVIEW}\n"
    "\n"
)
EXPECTED_WITH = (
    "<|im_start|>system\n"
    "Given the title and description of an item, along with the user's past reviews and the output review"
    " rating and review title, generate a personalized item review for the user.\n"
    "<|im_end|><|im_start|>user\n"
    "[Item Title]: A Map of Bells\n"
    f"[Item Description]: {MAP_OF_BELLS}\n"
    f"{HISTORY_BLOCK}"
    "[Output Review Rating]: 2.0\n"
    "[Output Review Title]: Second look\n"
    "<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _examples(cfg: DataConfig, tokenizer):
    log = IssueLog()
    template = load_template(cfg.template)
    records = read_records(cfg, template, log)
    return list(build_examples(records, template, tokenizer, cfg, log, FittingStats()))


def test_review_prompt_equals_the_public_layout_character_for_character(tiny_tokenizer, small_dpl):
    cfg = DataConfig(
        format="amazon2023",
        sources=[str(AMAZON / "Books.jsonl")],
        meta=[str(AMAZON / "meta_Books.jsonl")],
        max_history=2,
        **small_dpl,
    )
    example = next(
        e for e in _examples(cfg, tiny_tokenizer()) if e.record.user_id == "U1" and e.record.split == "test"
    )
    assert example.prompt_with_history == EXPECTED_WITH
    assert example.history_used == 2 and len(example.record.history) == 6
    # Without history: the same prompt except the history block, which becomes the None placeholder.
    expected_without = EXPECTED_WITH.replace(HISTORY_BLOCK, "[User's Past Reviews]:\nNone\n")
    assert example.prompt_without_history == expected_without
    prefix, suffix = EXPECTED_WITH.split(HISTORY_BLOCK)
    without = example.prompt_without_history
    assert without.startswith(prefix) and without.endswith(suffix)
    # The DPL rows of the same data give the same prompt.
    dpl = DataConfig(
        format="dpl",
        sources=[str(FIXTURES / "dpl" / "Books" / "test.jsonl")],
        meta=[str(FIXTURES / "dpl" / "meta" / "Books.jsonl")],
        max_history=2,
    )
    same = next(e for e in _examples(dpl, tiny_tokenizer()) if e.record.user_id == "U1")
    assert same.prompt_with_history == EXPECTED_WITH and same.prompt_without_history == expected_without


def test_lamp_topic_writing_prompt(tiny_tokenizer):
    tw = FIXTURES / "lamp" / "topic_writing"
    cfg = DataConfig(
        format="lamp",
        template="lamp_topic_writing",
        sources=[str(tw / "dev_questions.json")],
        meta=[str(tw / "dev_outputs.json")],
        max_history=2,
    )
    example = next(e for e in _examples(cfg, tiny_tokenizer()) if e.record.id == "tw-102")
    frame = "<|im_start|>system\n{}<|im_end|><|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    system = (
        "Given the user's past Reddit posts and the summary of a new post, write the content of the new post "
        "in the user's own style.\n"
    )
    request = "[Request]: Generate the content for a reddit post Why I switched from coffee to tea\n"
    history = (
        "[User's Past Posts]:\n"
        "[Post 1]:\n- [Summary]: Tried cold showers for a month\n"
        "- [Content]: Week one was misery. Week four I barely noticed. Ten out of ten would shiver again.\n"
        "[Post 2]:\n- [Summary]: Rebuilt an old bike\n"
        "- [Content]: New chain, new brakes, same rusty frame. It rides like a dream. Ten out of ten would"
        " wrench again.\n"
        "\n"
    )
    assert example.prompt_with_history == frame.format(system, history + request)
    assert example.prompt_without_history == frame.format(system, "[User's Past Posts]:\nNone\n" + request)


def test_plain_template_and_tokenizer_chat_template_mode(tiny_tokenizer):
    path = FIXTURES / "generic" / "records.jsonl"
    cfg = DataConfig(format="generic", template="plain", sources=[str(path)])
    example = next(
        e for e in _examples(cfg, tiny_tokenizer()) if e.record.user_id == "bob" and e.record.split == "test"
    )
    assert example.prompt_with_history == (
        "Write the user's next text.\n"
        "[context]: Describe your evening.\n"
        "[History]:\n"
        "[Entry 1]:\n[text]: Evenings are for chess.\n"
        "[Entry 2]:\n[text]: Coffee first, always.\n"
        "\n"
        "[Response]:\n"
    )
    assert example.prompt_without_history == (
        "Write the user's next text.\n[context]: Describe your evening.\n[History]:\nNone\n[Response]:\n"
    )
    # chat_template: the same system and user messages wrapped by the tokenizer's own template.
    chat = next(
        e
        for e in _examples(
            DataConfig(format="generic", template="plain", sources=[str(path)], chat_template=True),
            tiny_tokenizer(),
        )
        if e.record.user_id == "bob" and e.record.split == "test"
    )
    expected = (
        "<|im_start|>system\nWrite the user's next text.\n<|im_end|>\n"
        "<|im_start|>user\n[context]: Describe your evening.\n[History]:\nNone\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat.prompt_without_history == expected


def test_templates_are_data(tmp_path):
    assert {"review", "lamp_topic_writing", "lamp_abstract", "plain"} <= set(builtin_templates())
    custom = tmp_path / "mine.yaml"
    custom.write_text(
        'system: "S\\n"\nframe: "{system}|{user}|"\nuser: "Q={question} {history}"\n'
        'history: "H[{entries}]"\nno_history: "H[-]"\nentry: "({index}:{text})"\n'
    )
    t = load_template(str(custom))
    assert t.context_fields == {"question"} and t.entry_fields == {"text"}
    entries = [{"text": "new"}, {"text": "old {not a field}"}]
    assert render_prompt(t, {"question": "why?"}, entries) == "S\n|Q=why? H[(1:new)(2:old {not a field})]|"
    assert render_prompt(t, {"question": "why?"}, None) == "S\n|Q=why? H[-]|"
    assert render_messages(t, {"question": "q"}, None) == ("S\n", "Q=q H[-]")
    with pytest.raises(KeyError, match="question"):
        render_prompt(t, {}, None)


class _ChatTokenizer:
    """A tokenizer's chat template, as `render_prompt` calls it: `role: content` lines, then `assistant:`."""

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        assert not tokenize and add_generation_prompt
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@pytest.mark.parametrize("frame", ["", "frame: null\n"])
def test_a_template_without_a_frame_loads_and_renders_through_the_chat_template(tmp_path, frame):
    """`frame` may be left out or null (the tokenizer's chat template wraps the turns): such a template loads,
    renders through a chat template, and without one says to set `data.chat_template`."""
    path = tmp_path / "frameless.yaml"
    path.write_text(
        f'system: "S"\n{frame}user: "Q={{question}} {{history}}"\nhistory: "H[{{entries}}]"\n'
        'no_history: "-"\nentry: "({index}:{text})"\n'
    )
    t = load_template(str(path))
    assert t.frame is None
    got = render_prompt(t, {"question": "q"}, [{"text": "a"}], chat_tokenizer=_ChatTokenizer())
    assert got == "system: S\nuser: Q=q H[(1:a)]\nassistant:"
    with pytest.raises(ValueError, match=r"has no frame: set `data.chat_template: true`"):
        render_prompt(t, {"question": "q"}, None)


def test_the_reserved_placeholders_win_over_record_fields_of_the_same_name():
    """A record field named like a reserved placeholder (`history`, `index`, `entries`) cannot replace it
    (module docstring): the history block and the entry's 1-based index are rendered, not the fields."""
    t = load_template("plain")
    custom = dataclasses.replace(t, user="{history}", entry="<{index}>", history="[{entries}]")
    _, user = render_messages(custom, {"history": "X"}, [{"index": 99, "entries": "E"}, {"index": 98}])
    assert user == "[<1><2>]"
    _, user = render_messages(custom, {"history": "X"}, None)
    assert user == custom.no_history


def test_inserted_values_are_every_field_the_prompt_formats():
    """The values `render_messages` inserts: each field the `user` string names (every context field with
    {context_fields}) and each field the `entry` string names, of every entry; written out by hand."""
    t = load_template("plain")
    named = dataclasses.replace(t, user="{a}{b} {history}", entry="{x}-{y}")
    context = {"a": "A", "b": "B", "unused": "U"}
    entries = [{"x": "x1", "y": "y1", "z": "z1"}, {"x": "x2", "y": "y2"}]
    assert sorted(inserted_values(named, context, entries)) == ["A", "B", "x1", "x2", "y1", "y2"]
    every = dataclasses.replace(t, user="{context_fields}{history}", entry="{entry_fields}")
    assert sorted(inserted_values(every, context, entries)) == ["A", "B", "U", "x1", "x2", "y1", "y2", "z1"]


@pytest.mark.parametrize(
    ("placeholder", "value"),
    [("{text[5]}", "ab"), ("{text.no_such_attribute}", "ab"), ("{text[0]}", 3)],
)
def test_an_index_or_attribute_a_value_lacks_is_a_field_format_error(tmp_path, placeholder, value):
    """`{text[5]}` of a 2-character string (IndexError), an attribute the value lacks (AttributeError) and an
    index of an int (TypeError) make the record invalid, naming the field, like a format spec that does not
    fit (they escaped as other exceptions)."""
    path = tmp_path / "idx.yaml"
    path.write_text(
        f'system: "S"\nframe: "{{system}}{{user}}"\nuser: "{placeholder} {{history}}"\n'
        'history: "{entries}"\nno_history: "-"\nentry: ""\n'
    )
    t = load_template(str(path))
    assert t.context_fields == {"text"}  # the field a placeholder names: before `[` and `.`
    with pytest.raises(FieldFormatError) as info:
        render_prompt(t, {"text": value}, None)
    assert info.value.field == "text"


@pytest.mark.parametrize(
    ("user", "loads"),
    [
        ("{title!a}{history}", True),  # !a is a conversion str.format knows
        ("{title!r:>8}{history}", True),  # the repr is a str: a str spec fits
        ("{title!r:d}{history}", False),  # the repr is a str, which `d` never fits (an int field would)
        ("{0}{history}", False),  # positional, by number
    ],
)
def test_conversions_and_numbered_placeholders_at_load(tmp_path, user, loads):
    """A conversion's result is a str whatever the value, so its format spec is checked against a str alone;
    !a is accepted like !r and !s; a numbered placeholder is refused as positional."""
    path = tmp_path / "conv.yaml"
    path.write_text(f'system: "S"\nuser: "{user}"\nhistory: "{{entries}}"\nno_history: "-"\nentry: ""\n')
    if loads:
        load_template(str(path))
    else:
        with pytest.raises(ValueError, match=r"fits no value \(str: |positional placeholders"):
            load_template(str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'system: "s"\nuser: "{history}"\nhistory: "{entries}"\nno_history: ""\n',
            r"missing keys \['entry'\]",
        ),
        (
            'system: "s"\nuser: "x"\nhistory: "{entries}"\nno_history: ""\nentry: ""\n',
            r"`user` must contain \{history\}",
        ),
        (
            'system: "s"\nframe: "{user}"\nuser: "{history}"\nhistory: "{entries}"\n'
            'no_history: ""\nentry: ""\n',
            r"`frame` must contain \{system\}",
        ),
        (
            'system: "s"\nuser: "{history} {"\nhistory: "{entries}"\nno_history: ""\nentry: ""\n',
            r"`user` is not a valid format string",
        ),
        (
            'system: "s"\nuser: "{history}"\nhistory: "{entries}"\nno_history: ""\nentry: ""\nextra: 1\n',
            r"unknown keys \['extra'\]",
        ),
        # A format spec no str, int or float value takes: every record would fail.
        (
            'system: "s"\nuser: "{rating:zz}{history}"\nhistory: "{entries}"\nno_history: ""\nentry: ""\n',
            r"bad.yaml: `user`: the format spec of `\{rating:zz\}` fits no value \(str: Unknown format code"
            r" 'z' for object of type 'str'; int: Unknown format code 'z' for object of type 'int'; float:"
            r" Unknown format code 'z' for object of type 'float'\); correct it, or remove it to print the"
            r" value as str\(\) does$",
        ),
        # `index` is always an int, the reserved texts always strings: a spec that fits another type only.
        (
            'system: "s"\nuser: "{history}"\nhistory: "{entries}"\nno_history: ""\nentry: "{index:.1s}"\n',
            r"`entry`: the format spec of `\{index:.1s\}` fits no value \(int: Unknown format code 's'",
        ),
        (
            'system: "s"\nuser: "{history:d}"\nhistory: "{entries}"\nno_history: ""\nentry: ""\n',
            r"`user`: the format spec of `\{history:d\}` fits no value \(str: Unknown format code 'd'",
        ),
        (
            'system: "s"\nuser: "{title!x}{history}"\nhistory: "{entries}"\nno_history: ""\nentry: ""\n',
            r"`user`: `\{title!x\}` has the unknown conversion `!x`; use !r, !s or !a$",
        ),
        (
            'system: "s"\nuser: "{title:>{w}}{history}"\nhistory: "{entries}"\nno_history: ""\nentry: ""\n',
            r"`user`: `\{title:>\{w\}\}`: a format spec may not hold a placeholder; write it out$",
        ),
    ],
)
def test_bad_templates_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_template(str(path))


def test_a_value_its_format_spec_does_not_fit_names_the_field_placeholder_and_type(tmp_path):
    path = tmp_path / "fmt.yaml"
    path.write_text(
        'system: "S"\nframe: "{system}{user}"\nuser: "r={rating:.1f} {history}"\nhistory: "{entries}"\n'
        'no_history: "-"\nentry: "[{index}] {stars:d} {text!r:.4}"\n'
    )
    t = load_template(str(path))  # each spec fits some type, so the template itself is fine
    assert render_prompt(t, {"rating": 4}, [{"stars": 5, "text": "good"}]) == "Sr=4.0 [1] 5 'goo"
    with pytest.raises(FieldFormatError) as info:
        render_prompt(t, {"rating": "five"}, None)
    assert info.value.field == "rating"
    assert str(info.value) == (
        "the template 'fmt' formats `rating` of the context as `{rating:.1f}` (its `user` string), which"
        " fails for str 'five': Unknown format code 'f' for object of type 'str'. Fix: give `rating` a value"
        " that format fits, or change the placeholder in the template"
    )
    with pytest.raises(FieldFormatError) as info:
        render_prompt(t, {"rating": 4}, [{"stars": 5, "text": "a"}, {"stars": 4.5, "text": "b"}])
    assert info.value.field == "stars"
    assert str(info.value) == (
        "the template 'fmt' formats `stars` of history entry 2 (1 = the most recent) as `{stars:d}` (its"
        " `entry` string), which fails for float 4.5: Unknown format code 'd' for object of type 'float'."
        " Fix: give `stars` a value that format fits, or change the placeholder in the template"
    )


def test_unknown_template_name_lists_the_builtins():
    with pytest.raises(ValueError, match=r"unknown template 'reveiw'; built-in: .*review"):
        load_template("reveiw")
    # and names the fix, with the nearest built-in when there is one (there was neither)
    with pytest.raises(
        ValueError, match=r"\. Fix: set data\.template to one of them \(did you mean 'review'\?\)\.$"
    ):
        load_template("reveiw")
    with pytest.raises(ValueError, match=r"\. Fix: set data\.template to one of them\.$"):
        load_template("zzz")


def test_a_missing_template_file_lists_the_builtins_too(tmp_path, monkeypatch):
    with pytest.raises(
        ValueError, match=r"mytpl.yaml does not exist; built-in: .*review.*, or give the path"
    ):
        load_template(str(tmp_path / "mytpl.yaml"))
    monkeypatch.chdir(tmp_path)  # a relative path: the folder it is read from is named, as for data.sources
    with pytest.raises(ValueError) as e:
        load_template("tpl/t.yaml")
    assert str(e.value).startswith(f"data.template: tpl/t.yaml does not exist (relative to {tmp_path}); ")
