"""`nextquill-jax data prepare / show / synth`: every fixture format, bad input, fingerprint reuse (by
content), damaged token arrays refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from nextquill_jax.cli import main
from nextquill_jax.config_paths import absolute_data_paths
from nextquill_jax.data import checksums
from nextquill_jax.data import prepare as prepare_module
from nextquill_jax.data.checksums import IntegrityError
from nextquill_jax.data.config import DataConfig
from nextquill_jax.data.prepare import prepare
from nextquill_jax.data.prepared_split import PreparedSplit, TokenizedExample, write_split
from nextquill_jax.data.sources.records import PLACES_KEPT, DataError
from nextquill_jax.data.templates import load_template
from tests.reference.quantile import linear_quantile
from tests.shared import FIXTURES

F = FIXTURES
EXPECTED_EXAMPLES = {
    "amazon2023": {"train": 4, "val": 4, "test": 4},
    "dpl": {"train": 4, "val": 4, "test": 4},
    "lamp_topic_writing": {"val": 2},
    "lamp_abstract": {"train": 2},
    "generic": {"train": 2, "val": 1, "test": 1},
}


def test_every_fixture_format_has_its_expected_counts(formats):
    assert list(formats) == list(EXPECTED_EXAMPLES)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, save_tiny_tokenizer):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _config_file(path, tok_dir, **data):
    path.write_text(yaml.safe_dump({"data": {"tokenizer": str(tok_dir), **data}, "train": {"steps": 1}}))
    return path


@pytest.mark.parametrize("name", list(EXPECTED_EXAMPLES))
def test_every_format_goes_through_data_prepare(tmp_path, tok_dir, name, capsys, formats, tiny_tokenizer):
    config = _config_file(tmp_path / "config.yaml", tok_dir, **formats[name])
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == EXPECTED_EXAMPLES[name]
    assert summary["errors"] == {} and summary["notes"] == {}
    tok = tiny_tokenizer()
    for split, n in summary["examples"].items():
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        arrays = PreparedSplit(out, split)
        assert len(rows) == len(arrays) == n
        for i, row in enumerate(rows):
            assert {
                "user_id",
                "prompt_with_history",
                "prompt_without_history",
                "target",
                "history_used",
                "category",
                "meta",
            } <= set(row)
            ex = arrays[i]
            # The arrays hold exactly the rendered text's tokens, the target ends with EOS.
            assert tok.decode(ex["prompt_with"]) == row["prompt_with_history"]
            assert tok.decode(ex["prompt_without"]) == row["prompt_without_history"]
            assert ex["target"][-1] == tok.eos_token_id and tok.decode(ex["target"][:-1]) == row["target"]
            assert row["tokens"] == {k: int(ex[k].size) for k in ("prompt_with", "prompt_without", "target")}
            assert 1 <= row["history_used"] <= 8
        stats = summary["tokens"][split]["prompt_with"]
        lengths = arrays.lengths("prompt_with")
        assert (
            stats["total"] == lengths.sum()
            and stats["max"] == lengths.max()
            and stats["min"] == lengths.min()
        )
    if name == "generic":
        val = json.loads((out / "val.jsonl").read_text())
        assert val["meta"] == {
            "target_spans": [[0, 12, "context"], [14, 19, "preference"]],
            "note": "kept as is",
        }
        assert summary["dropped"] == {"duplicate": 1, "empty_history": 1}


def test_the_summarys_token_statistics_and_row_indices_are_those_of_the_written_examples(
    tmp_path, formats, tiny_tokenizer
):
    """summary.json's `tokens`, per split and field, describe the lengths the token arrays hold (and the
    history entries `<split>.jsonl` says each prompt used), stated here in plain Python: total, min, mean to
    2 decimals, p50, p95 (linear between ranks) and max; each row's `index` is its line's position."""
    summary = prepare(DataConfig(**formats["dpl"]), tmp_path, tokenizer=tiny_tokenizer(), echo=lambda _: None)
    for split in summary["splits"]:
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert [row["index"] for row in rows] == list(range(len(rows)))
        arrays = PreparedSplit(tmp_path, split)
        lengths = {
            field: arrays.lengths(field).tolist() for field in ("prompt_with", "prompt_without", "target")
        }
        lengths["history_used"] = [row["history_used"] for row in rows]
        for field, values in lengths.items():
            want = {
                "total": sum(values),
                "min": min(values),
                "mean": round(sum(values) / len(values), 2),
                "p50": linear_quantile(values, 0.5),
                "p95": linear_quantile(values, 0.95),
                "max": max(values),
            }
            assert summary["tokens"][split][field] == pytest.approx(want, abs=1e-9), (split, field)


def test_the_split_records_the_eos_its_targets_end_with_for_a_tokenizer_whose_eos_is_not_id_0(
    tmp_path, formats, tiny_tokenizer
):
    """evaluate and effects read where a target ends from its split's meta.json `eos_token_id`: with the tiny
    tokenizer's EOS (id 0) a recorded 0 could not be told from the real id, so here the EOS is <|im_end|>
    (id 2) and meta.json, the summary and every target's last token say 2."""
    tiny = tiny_tokenizer()
    tok = tiny.__class__(tokenizer_object=tiny.backend_tokenizer, eos_token="<|im_end|>")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos == tok.eos_token_id != 0
    summary = prepare(DataConfig(**formats["generic"]), tmp_path, tokenizer=tok, echo=lambda _: None)
    assert summary["eos_token_id"] == eos
    for split in summary["splits"]:
        data = PreparedSplit(tmp_path, split)
        assert data.meta["eos_token_id"] == eos
        assert [int(data[i]["target"][-1]) for i in range(len(data))] == [eos] * len(data)


def test_a_non_finite_number_in_a_records_meta_is_written_null(tmp_path, tok_dir):
    """`meta` is carried through untouched, but a NaN or Infinity there (Python's json writes them; a
    Parquet float column holds them) was written as bare NaN into <split>.jsonl, which is not JSON: strict
    readers (jq, JavaScript) refused the file."""
    records = [json.loads(line) for line in (F / "generic" / "records.jsonl").read_text().splitlines()]
    for r in records:
        r["meta"] = {"score": float("nan"), "bounds": [1.5, float("inf")], "kept": "as is"}
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN / Infinity, as json.dumps writes
    config = _config_file(
        tmp_path / "config.yaml", tok_dir, format="generic", template="plain", sources=[str(source)]
    )
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--config", str(config), "--out", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    rows = [
        json.loads(line, parse_constant=refuse)
        for split in ("train", "val", "test")
        for line in (out / f"{split}.jsonl").read_text().splitlines()
    ]
    assert rows and all(r["meta"] == {"score": None, "bounds": [1.5, None], "kept": "as is"} for r in rows)


def test_bad_input_fail_stops_and_skip_counts_each_reason(tmp_path, tok_dir, capsys, small_dpl):
    bad = dict(
        format="amazon2023",
        sources=[f"{F}/amazon2023_bad/Books.jsonl"],
        meta=[f"{F}/amazon2023_bad/meta_Books.jsonl"],
        **small_dpl,
    )
    out = tmp_path / "prepared"
    config = _config_file(tmp_path / "fail.yaml", tok_dir, **bad)
    assert main(["data", "prepare", "--config", str(config), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    reviews = f"{F}/amazon2023_bad/Books.jsonl"
    for where in (
        f"{reviews}:5:",
        f"{reviews}:12:user_id:",
        f"{reviews}:20:text:",
        f"{reviews}:44:parent_asin:",
    ):
        assert where in err
    assert not (out / "summary.json").exists()

    config = _config_file(tmp_path / "skip.yaml", tok_dir, on_error="skip", **bad)
    assert main(["data", "prepare", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == {
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "unknown_item": 1,
    }
    assert summary["read"] == {f"{F}/amazon2023_bad/meta_Books.jsonl": 14, reviews: 44}
    assert summary["examples"] == {"train": 4, "val": 4, "test": 4}
    # Each record kept became an example (none is dropped while building here); the 4 invalid lines were
    # never records, so they are not taken off the count again.
    assert summary["records_kept"] == 12
    # The same 5 items and 12 reviews as without the bad lines (test_data_readers spells them out).
    assert summary["dropped"]["review_duplicate_item"] == 1 and sum(summary["dropped"].values()) == 17


def test_prepare_help_names_the_output_directory_as_its_options_do(capsys):
    """`--force`'s help spoke of DIR while the usage line called the --out value OUT."""
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out DIR output directory --force prepare again even when DIR is up to date" in text


def test_config_errors_name_the_key(tmp_path, tok_dir, capsys, formats):
    config = _config_file(tmp_path / "c.yaml", tok_dir, max_histroy=3, **formats["generic"])
    assert main(["data", "prepare", "--config", str(config), "--out", str(tmp_path / "o")]) == 1
    assert "unknown key `data.max_histroy`. Did you mean `data.max_history`?" in capsys.readouterr().err
    config = _config_file(tmp_path / "c.yaml", tok_dir, on_error="ignore", **formats["generic"])
    assert main(["data", "prepare", "--config", str(config), "--out", str(tmp_path / "o")]) == 1
    assert "on_error" in capsys.readouterr().err


def test_fingerprint_reuses_and_redoes(tmp_path, tok_dir, tiny_tokenizer):
    source = tmp_path / "records.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    out = tmp_path / "prepared"
    quiet = lambda _: None
    lines = []
    again_because = lambda: lines[-2].removesuffix(
        ": preparing again, replacing its contents"
    )  # [-1]: counts
    base = dict(format="generic", template="plain", sources=[str(source)])
    tok = tiny_tokenizer()
    first = prepare(DataConfig(**base), out, tokenizer=tok, echo=quiet)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = prepare(DataConfig(**base), out, tokenizer=tok, echo=quiet)
    assert not first["reused"] and again["reused"] and again["fingerprint"] == first["fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes  # nothing rewritten
    # The batching section does not change the prepared data.
    assert prepare(
        DataConfig(**base, batching=DataConfig().batching.__class__(rows_per_batch=3)),
        out,
        tokenizer=tok,
        echo=quiet,
    )["reused"]

    changed_cfg = prepare(DataConfig(**base, max_history=1), out, tokenizer=tok, echo=lines.append)
    assert not changed_cfg["reused"] and changed_cfg["fingerprint"] != first["fingerprint"]
    assert (
        again_because()
        == f"{out} was prepared with other settings (data.max_history: {DataConfig().max_history} -> 1)"
    )
    assert json.loads((out / "train.jsonl").read_text().splitlines()[0])["history_used"] == 1

    other_tok = tiny_tokenizer(vocab_size=500)
    changed_tok = prepare(DataConfig(**base, max_history=1), out, tokenizer=other_tok, echo=lines.append)
    assert not changed_tok["reused"] and changed_tok["fingerprint"] != changed_cfg["fingerprint"]
    assert (
        again_because()
        == (  # the tokenizer's content is not recorded, only its fingerprint
            f"{out}: its fingerprint {changed_cfg['fingerprint'][:12]} differs from this config's "
            f"{changed_tok['fingerprint'][:12]} (the template's text or the tokenizer changed)"
        )
    )

    size_before = source.stat().st_size
    with open(source, "a") as f:
        f.write(
            json.dumps(
                {"user_id": "zoe", "context": "Hi.", "history": ["Yo."], "target": "Hey.", "split": "test"}
            )
            + "\n"
        )
    size = source.stat().st_size
    changed_src = prepare(DataConfig(**base, max_history=1), out, tokenizer=other_tok, echo=lines.append)
    assert not changed_src["reused"] and changed_src["examples"]["test"] == 2
    assert again_because() == (
        f"{out} was prepared with other settings ({source.resolve()} changed ({size_before} -> {size} bytes))"
    )
    assert prepare(DataConfig(**base, max_history=1), out, tokenizer=other_tok, echo=quiet)["reused"]
    # A directory whose split files vanished is prepared again, not trusted.
    os.remove(out / "test.jsonl")
    assert not prepare(DataConfig(**base, max_history=1), out, tokenizer=other_tok, echo=lines.append)[
        "reused"
    ]
    assert again_because() == f"{out}: some of its split files are missing"


def test_data_show_prints_one_example(tmp_path, tok_dir, capsys, formats):
    config = _config_file(tmp_path / "config.yaml", tok_dir, **formats["amazon2023"])
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--config", str(config), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "show", str(out), "--index", "1", "--split", "val"]) == 0
    text = capsys.readouterr().out
    row = json.loads((out / "val.jsonl").read_text().splitlines()[1])
    ex = PreparedSplit(out, "val")[1]
    assert f"example 1 of val (4 examples) | user {row['user_id']}" in text
    assert (
        f"tokens: prompt with history {ex['prompt_with'].size}, prompt without history"
        f" {ex['prompt_without'].size}, target {ex['target'].size}" in text
    )
    for title, key in (
        ("prompt with history", "prompt_with_history"),
        ("prompt without history", "prompt_without_history"),
    ):
        assert f"----- {title} -----\n{row[key].rstrip()}" in text
    assert f"----- target -----\n{row['target']}" in text
    assert main(["data", "show", str(out), "--index", "99", "--split", "val"]) == 1
    assert capsys.readouterr().err == (  # was "index 99 outside DIR/val with 4 examples", without the fix
        f"error: --index 99: {out} holds 4 val example(s). Fix: pass an index from 0 to 3.\n"
    )


@pytest.mark.parametrize("template", ["plain", "review"])
def test_data_synth_then_prepare(tmp_path, tok_dir, template, capsys, tiny_tokenizer):
    synth = tmp_path / "synth"
    args = ["--users", "4", "--seed", "3", "--reviews-per-user", "6", "--targets-per-user", "3"]
    assert main(["data", "synth", "--out", str(synth), *args]) == 0
    sources = [str(synth / "synthetic.jsonl")]
    config = _config_file(tmp_path / "c.yaml", tok_dir, format="generic", template=template, sources=sources)
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == {"train": 4, "val": 4, "test": 4} and summary["dropped"] == {}
    row = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    spans = row["meta"]["target_spans"]
    assert spans and all(0 <= s < e <= len(row["target"]) for s, e, _ in spans)
    assert row["history_used"] == 3  # reviews 1-3 precede the first target
    np.testing.assert_array_equal(PreparedSplit(out, "train")[0]["target"][-1], tiny_tokenizer().eos_token_id)


def test_data_synth_says_what_it_wrote(tmp_path, capsys):
    for users, said in ((1, "1 user"), (2, "2 users")):  # it said "1 users"
        assert main(["data", "synth", "--out", str(tmp_path / str(users)), "--users", str(users)]) == 0
        counts = json.loads((tmp_path / str(users) / "manifest.json").read_text())["records"]
        assert capsys.readouterr().out == (
            f"wrote {tmp_path / str(users) / 'synthetic.jsonl'}: "
            f"{', '.join(f'{s} {n}' for s, n in counts.items())} records ({said})\n"
        )


def test_the_tokenizer_batch_size_and_errors_shown_change_no_byte_and_are_not_fingerprinted(
    tmp_path, formats, tiny_tokenizer
):
    # A prompt limit that makes history fitting search, so its probes run in batches too.
    base = dict(formats["amazon2023"], max_prompt_tokens=400)
    tok = tiny_tokenizer()
    whole = prepare(DataConfig(**base), tmp_path / "whole", tokenizer=tok, echo=lambda _: None)
    one = DataConfig(**base, tokenize_batch_size=1, max_errors_shown=1)
    single = prepare(one, tmp_path / "single", tokenizer=tok, echo=lambda _: None)
    assert whole["fitting"]["history_entries_dropped_for_length"] == 34
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    assert files(tmp_path / "single") == files(tmp_path / "whole")  # summaries and fingerprints too
    assert single["fingerprint"] == whole["fingerprint"]
    out = tmp_path / "whole"
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    lines: list[str] = []
    assert prepare(one, out, tokenizer=tok, protected="WHY", echo=lines.append)["reused"]
    assert lines == [f"{out}: prepared data up to date (fingerprint {whole['fingerprint'][:12]}), reusing it"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes


def _fingerprint_of_earlier_versions(summary: dict, template: str, tok) -> str:
    """The fingerprint versions before RESULT_NEUTRAL_FIELDS left it recorded: `prepare._fingerprint` as it
    was, with `summary`'s config (which then held tokenize_batch_size and max_errors_shown)."""
    key = {
        "format_version": summary["format_version"],
        "config": summary["config"],
        "template": dataclasses.asdict(load_template(template)),
        "tokenizer": [
            hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
            tok.eos_token_id,
            tok.chat_template,
        ],
        "inputs": summary["inputs"],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def test_data_prepared_while_the_batch_size_was_fingerprinted_is_still_reused(tmp_path, tiny_tokenizer):
    source = tmp_path / "records.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    out = tmp_path / "prepared"
    base = dict(format="generic", template="plain", sources=[str(source)])
    tok = tiny_tokenizer()
    prepare(DataConfig(**base), out, tokenizer=tok, echo=lambda _: None)
    # The summary as the earlier version wrote it: prepared at tokenize_batch_size 512, max_errors_shown 20.
    summary = json.loads((out / "summary.json").read_text())
    summary["config"].update(tokenize_batch_size=512, max_errors_shown=20)
    summary["fingerprint"] = old = _fingerprint_of_earlier_versions(summary, "plain", tok)
    (out / "summary.json").write_text(json.dumps(summary))
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lines: list[str] = []
    cfg = DataConfig(**base, tokenize_batch_size=256, max_errors_shown=5)
    assert prepare(cfg, out, tokenizer=tok, protected="WHY", echo=lines.append)["reused"]
    assert lines == [f"{out}: prepared data up to date (fingerprint {old[:12]}), reusing it"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # A setting that does change the data is still refused, and the recorded batch size is not listed.
    with pytest.raises(ValueError) as refused:
        prepare(DataConfig(**base, max_history=1), out, tokenizer=tok, protected="WHY", echo=lambda _: None)
    assert str(refused.value) == (
        f"{out} was prepared with other settings (data.max_history: {DataConfig().max_history} -> 1); it is "
        "not replaced: WHY"
    )


def test_public_history_fit_warns_with_the_count_of_cut_prompts(tmp_path, tiny_tokenizer):
    source = tmp_path / "records.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    lines: list[str] = []
    base = dict(format="generic", template="plain", sources=[str(source)], max_prompt_tokens=90)
    dropped = prepare(DataConfig(**base), tmp_path / "drop", tokenizer=tiny_tokenizer(), echo=lines.append)
    public = prepare(
        DataConfig(**base, history_fit="public"),
        tmp_path / "public",
        tokenizer=tiny_tokenizer(),
        echo=lines.append,
    )
    cut = public["fitting"]["prompts_cut"]
    # public keeps one entry where drop would go down to none, so it cuts at least the prompts drop drops
    # (too long even without history, or left with no entry)
    gone = dropped["dropped"].get("prompt_too_long", 0) + dropped["dropped"].get("no_history_fits", 0)
    assert cut >= gone > 0 and not {"prompt_too_long", "no_history_fits"} & public["dropped"].keys()
    assert public["examples"]["train"] > dropped["examples"]["train"]
    # what the cut loses is the template's (here `plain`: no output rating or title), not `review`'s
    assert lines[-1].splitlines()[-1] == (
        f"  warning: {cut} prompts longer than max_prompt_tokens even with one history entry were cut from "
        "the right (history_fit: public), losing their end, where the plain template puts what follows the "
        "history and the cue to answer"
    )
    rows = [json.loads(x) for x in (tmp_path / "public" / "train.jsonl").read_text().splitlines()]
    assert all(r["tokens"]["prompt_with"] <= 90 for r in rows) and any(r["prompt_cut"] for r in rows)


def test_cut_targets_are_counted_on_the_console_and_kept_whole_in_the_rendered_rows(tmp_path, tiny_tokenizer):
    """Targets longer than max_target_tokens are cut in the token arrays: the console says how many (it used
    to say so only in summary.json), and `<split>.jsonl` keeps the record's whole target, marked cut."""
    source = tmp_path / "records.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    lines: list[str] = []
    cfg = DataConfig(format="generic", template="plain", sources=[str(source)], max_target_tokens=4)
    summary = prepare(cfg, tmp_path / "out", tokenizer=tiny_tokenizer(), echo=lines.append)
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    cut = summary["fitting"]["targets_cut"]
    assert cut == sum(summary["examples"].values()) == 4
    assert lines[-1].splitlines()[-1] == (
        f"  warning: {cut} targets longer than max_target_tokens were cut to that many tokens (the model "
        "learns only their start; `target_cut` marks them in <split>.jsonl)"
    )
    tok = tiny_tokenizer()
    for row, ex in zip(rows, PreparedSplit(tmp_path / "out", "train"), strict=True):
        assert row["target_cut"] and row["tokens"]["target"] == ex["target"].size == 4 + 1  # with EOS
        assert len(tok(row["target"], add_special_tokens=False)["input_ids"]) > 4
    whole = prepare(
        DataConfig(format="generic", template="plain", sources=[str(source)]),
        tmp_path / "whole",
        tokenizer=tok,
        echo=lines.append,
    )
    assert whole["fitting"]["targets_cut"] == 0 and "targets longer" not in lines[-1]


def test_records_read_but_probably_not_as_meant_are_counted_in_the_summary_and_warned(
    tmp_path, tiny_tokenizer
):
    source = tmp_path / "train_questions.jsonl"
    question = {"id": "q", "input": "i", "output": "o", "profile": [{"summary": "s", "content": "c"}]}
    source.write_text(
        "".join(json.dumps({**question, "id": f"q{i}", "userid": "u1"}) + "\n" for i in range(3))
    )
    lines: list[str] = []
    cfg = DataConfig(format="lamp", template="lamp_topic_writing", sources=[str(source)])
    summary = prepare(cfg, tmp_path / "out", tokenizer=tiny_tokenizer(), echo=lines.append)
    message = (
        f"{source}: field `userid` was read as context and the user is the question id; if it names the "
        "user, rename it `user_id`"
    )
    assert summary["notes"] == {message: 3} and summary["examples"] == {"train": 3}
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["notes"] == {message: 3}
    # Which questions: each line and the field (no record is named in the message, which is per file).
    places = [f"{source}:{line}:userid" for line in (1, 2, 3)]
    assert summary["note_places"] == written["note_places"] == {message: places}
    assert f"  warning: {message} (3 records: {', '.join(places)})" in lines[-1].splitlines()


SPECIAL_NOTE = {
    "prompt": (
        "a prompt value (context or history) holds the text of the special token {}, which is tokenised as"
        " that token (as the public code does); if it is meant as text, remove it from the data"
    ),
    "target": (
        "a target holds the text of the special token {}, which is tokenised as that token (as the public"
        " code does), so the model learns to write it; if it is meant as text, remove it from the data"
    ),
}


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_special_token_text_in_records_is_tokenised_as_the_public_code_does_and_counted(
    tmp_path, tiny_tokenizer, on_error
):
    source = tmp_path / "records.jsonl"
    rows = [
        # Targets of special-token text alone (and whitespace) would teach only control tokens.
        {"user_id": "u1", "context": "c", "history": ["h"], "target": "<|im_end|>"},
        {"user_id": "u2", "context": "c", "history": ["h"], "target": " <|endoftext|>\n<|im_start|> "},
        {
            "user_id": "u3",
            "context": "c",
            "history": ["h <|im_end|><|im_start|>x"],
            "target": "Fine<|endoftext|>",
        },
        # Only the newest entry is in the prompt (max_history 1): the older one's token is not counted.
        {"user_id": "u4", "context": "<|im_end|>", "history": ["<|im_start|>", "new"], "target": "Ok"},
        {"user_id": "u5", "context": "c", "history": ["h"], "target": "Plain"},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        format="generic", template="plain", sources=[str(source)], max_history=1, on_error=on_error
    )
    tok = tiny_tokenizer()
    lines: list[str] = []
    if on_error == "fail":
        with pytest.raises(DataError) as info:
            prepare(cfg, tmp_path / "out", tokenizer=tok, echo=lines.append)
        why = (
            "which the tokenizer reads as those tokens: the example would learn only control tokens. Fix:"
            " write the target text, or remove the record"
        )
        assert str(info.value) == (
            "2 invalid input record(s) (2 empty_field); nothing was prepared:\n"
            f"  {source}:1:target: `target` holds nothing but the text of special tokens (<|im_end|>),"
            f" {why}\n"
            f"  {source}:2:target: `target` holds nothing but the text of special tokens (<|endoftext|>,"
            f" <|im_start|>), {why}\n"
            "Fix the records, or set `data.on_error: skip` to skip and count them."
        )
        assert not (tmp_path / "out").exists()
        return
    summary = prepare(cfg, tmp_path / "out", tokenizer=tok, echo=lines.append)
    assert summary["errors"] == {"empty_field": 2} and summary["examples"] == {"train": 3}
    assert summary["records_kept"] == 3  # the two skipped while building are errors, not kept
    notes = {
        SPECIAL_NOTE["prompt"].format("<|im_end|>"): 2,
        SPECIAL_NOTE["prompt"].format("<|im_start|>"): 1,
        SPECIAL_NOTE["target"].format("<|endoftext|>"): 1,
    }
    assert summary["notes"] == notes
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["notes"] == notes
    # Where: the first records of each note (line 3's history and line 4's context hold <|im_end|>), and of
    # each skip reason, which used to be counts alone.
    places = {
        SPECIAL_NOTE["prompt"].format("<|im_end|>"): [f"{source}:3", f"{source}:4"],
        SPECIAL_NOTE["prompt"].format("<|im_start|>"): [f"{source}:3"],
        SPECIAL_NOTE["target"].format("<|endoftext|>"): [f"{source}:3:target"],
    }
    assert summary["note_places"] == written["note_places"] == places
    empty = [
        {
            "location": f"{source}:{line}",
            "field": "target",
            "message": f"`target` holds nothing but the text of special tokens ({tokens}), which the"
            " tokenizer reads as those tokens: the example would learn only control tokens. Fix: write the"
            " target text, or remove the record",
        }
        for line, tokens in ((1, "<|im_end|>"), (2, "<|endoftext|>, <|im_start|>"))
    ]
    assert summary["skipped"] == written["skipped"] == {"empty_field": empty}
    said = {m: "1 record" if n == 1 else f"{n} records" for m, n in notes.items()}  # "1 records" before
    assert lines[-1].splitlines()[1:] == [
        "  skipped invalid records: empty_field 2 (the first of each below; the first 10 of each,"
        f' file:line:field and why, in {tmp_path / "out" / "summary.json"}, "skipped")',
        f"    empty_field: {source}:1:target: {empty[0]['message']}",
        *(f"  warning: {m} ({said[m]}: {', '.join(places[m])})" for m in sorted(notes)),
    ]
    # Tokenised as the public code's tokenizer call does: the text maps to the special tokens' ids.
    eos = tok.eos_token_id
    fine = PreparedSplit(tmp_path / "out", "train")[0]
    assert fine["target"].tolist() == [*tok("Fine", add_special_tokens=False)["input_ids"], eos, eos]
    im_end, im_start = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert [im_end, im_start] == [t for t in fine["prompt_with"].tolist() if t in (im_end, im_start)]


def test_skipped_records_and_noted_ones_are_named_by_place_up_to_a_cap(tmp_path, tiny_tokenizer):
    """`on_error: skip` used to leave counts alone (`wrong_type 12`) and a note `(12 records)`: nothing said
    which records. Now summary.json keeps the first PLACES_KEPT of each reason (file:line, field, message)
    and of each note (`note_places`), the console names the first of each and where the others are, and
    says how to list them all when a reason has more; the counts stay whole."""
    source = tmp_path / "records.jsonl"
    wrong = [
        {"user_id": f"w{i}", "context": {"title": ["a"]}, "history": ["h"], "target": "t"} for i in range(12)
    ]
    noted = [
        {"user_id": f"n{i}", "context": "c", "history": ["h"], "target": "t<|endoftext|>"} for i in range(12)
    ]
    source.write_text(
        "".join(json.dumps(r) + "\n" for r in wrong)
        + '{"user_id": "x",}\n'
        + "".join(json.dumps(r) + "\n" for r in noted)
    )
    cfg = DataConfig(format="generic", template="plain", sources=[str(source)], on_error="skip")
    lines: list[str] = []
    summary = prepare(cfg, tmp_path / "out", tokenizer=tiny_tokenizer(), echo=lines.append)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["errors"] == written["errors"] == {"malformed_json": 1, "wrong_type": 12}
    why = (
        "`context.title` must be a string or a number, got list ['a']; the prompt inserts it as text. Fix:"
        " write it as one string (a list joined, say), or move it into the record's `meta` (carried through,"
        " not in the prompt)"
    )
    json_why = "not valid JSON (Expecting property name enclosed in double quotes at column 17)"
    assert (
        summary["skipped"]
        == written["skipped"]
        == {
            "malformed_json": [{"location": f"{source}:13", "field": None, "message": json_why}],
            "wrong_type": [
                {"location": f"{source}:{line}", "field": "context.title", "message": why}
                for line in range(1, 11)
            ],
        }
    )
    message = SPECIAL_NOTE["target"].format("<|endoftext|>")
    assert summary["notes"] == {message: 12}
    assert summary["note_places"] == {message: [f"{source}:{line}:target" for line in range(14, 24)]}
    at = tmp_path / "out" / "summary.json"
    assert lines[-1].splitlines()[1:] == [
        "  skipped invalid records: malformed_json 1, wrong_type 12 (the first of each below; the first 10 of"
        f' each, file:line:field and why, in {at}, "skipped")',
        f"    malformed_json: {source}:13: {json_why}",
        f"    wrong_type: {source}:1:context.title: {why}",
        "    (to list more: data.on_error: fail lists each invalid record, the first data.max_errors_shown,"
        " and prepares nothing)",
        f"  warning: {message} (12 records: {source}:14:target, {source}:15:target, {source}:16:target, ...;"
        f' the first 10 in {at} ("note_places"))',
    ]

    # With no example left nothing is written: the error itself names the first record of each reason.
    source.write_text("".join(json.dumps(r) + "\n" for r in wrong[:2]) + '{"user_id": "x",}\n')
    with pytest.raises(ValueError) as e:
        prepare(cfg, tmp_path / "none", tokenizer=tiny_tokenizer(), echo=lines.append)
    assert str(e.value).endswith(
        f"\n  first malformed_json: {source}:3: {json_why}"
        f"\n  first wrong_type: {source}:1:context.title: {why}"
    )


def test_a_reason_and_a_note_of_exactly_the_places_kept_say_every_place_is_listed(tmp_path, tiny_tokenizer):
    """At PLACES_KEPT records of a reason and of a note, summary.json holds every place: the note's warning
    says "all" are there, not "the first 10", and the console offers no way to list more invalid records
    (the test above has 12 of each, past the cap)."""
    source = tmp_path / "records.jsonl"
    wrong = {"context": {"title": ["a"]}, "history": ["h"], "target": "t"}
    noted = {"context": "c", "history": ["h"], "target": "t<|endoftext|>"}
    source.write_text(
        "".join(json.dumps({"user_id": f"w{i}", **wrong}) + "\n" for i in range(PLACES_KEPT))
        + "".join(json.dumps({"user_id": f"n{i}", **noted}) + "\n" for i in range(PLACES_KEPT))
    )
    cfg = DataConfig(format="generic", template="plain", sources=[str(source)], on_error="skip")
    lines: list[str] = []
    summary = prepare(cfg, tmp_path / "out", tokenizer=tiny_tokenizer(), echo=lines.append)
    message = SPECIAL_NOTE["target"].format("<|endoftext|>")
    assert summary["errors"] == {"wrong_type": PLACES_KEPT} and summary["notes"] == {message: PLACES_KEPT}
    assert len(summary["skipped"]["wrong_type"]) == len(summary["note_places"][message]) == PLACES_KEPT
    console = lines[-1].splitlines()
    assert not [line for line in console if "to list more" in line]
    first = ", ".join(f"{source}:{PLACES_KEPT + k}:target" for k in (1, 2, 3))
    at = tmp_path / "out" / "summary.json"
    assert (
        console[-1]
        == f'  warning: {message} ({PLACES_KEPT} records: {first}, ...; all in {at} ("note_places"))'
    )


class _NoTokenising:
    """A tokenizer that refuses to tokenise: everything else is the wrapped one's."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenised")


class _NoChatTemplate(_NoTokenising):
    """The wrapped tokenizer without its chat template (the tiny one is shared: not changed in place)."""

    chat_template = None


def test_one_failing_run_lists_the_invalid_records_of_reading_and_of_building_alike(tmp_path, tiny_tokenizer):
    """A `duplicate_id` (found reading) and a target of special-token text alone or a value its placeholder
    cannot format (found building examples) used to take two runs: reading's errors stopped the run before
    examples were built. Now the records read are checked as building would check them, without tokenising,
    and one error lists all three; `on_error: skip` counts the same."""
    template = tmp_path / "fmt.yaml"
    template.write_text(
        'system: "S"\nframe: "{system}{user}"\nuser: "r={rating:.1f} {history}"\nhistory: "{entries}"\n'
        'no_history: "-"\nentry: "{text}"\n'
    )
    source = tmp_path / "records.jsonl"
    rows = [
        {"id": "a", "target": "one"},
        {"id": "a", "target": "two"},
        {"id": "b", "target": "<|im_end|>"},
        {"id": "c", "target": "four", "context": {"rating": "five"}},
        {"id": "d", "target": "five"},
    ]
    base = {"user_id": "u", "context": {"rating": 4}, "history": ["h"]}
    source.write_text("".join(json.dumps({**base, **row}) + "\n" for row in rows))
    cfg = DataConfig(format="generic", template=str(template), sources=[str(source)])
    with pytest.raises(DataError) as info:
        prepare(cfg, tmp_path / "out", tokenizer=_NoTokenising(tiny_tokenizer()), echo=lambda _: None)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "3 invalid input record(s) (1 duplicate_id, 1 empty_field, 1 wrong_type); nothing was prepared:"
    )
    assert [line.split(": ")[0] for line in lines[1:4]] == [
        f"  {source}:2:id",
        f"  {source}:3:target",
        f"  {source}:4:rating",
    ]
    assert not (tmp_path / "out").exists()
    # A tokenizer without the chat template `data.chat_template` asks for is the setting's error, which
    # building raises (the next run): the records' errors are not hidden behind it.
    with pytest.raises(DataError, match=r"^1 invalid input record\(s\) \(1 duplicate_id\); nothing was"):
        prepare(
            dataclasses.replace(cfg, chat_template=True),
            tmp_path / "out",
            tokenizer=_NoChatTemplate(tiny_tokenizer()),
        )
    skipped = prepare(
        dataclasses.replace(cfg, on_error="skip"), tmp_path / "out", tokenizer=tiny_tokenizer(), echo=print
    )
    assert skipped["errors"] == {"duplicate_id": 1, "empty_field": 1, "wrong_type": 1}
    assert skipped["examples"] == {"train": 2}


def test_a_target_of_special_token_text_alone_names_the_format_s_target_field(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer()
    rows = (F / "dpl" / "Books" / "train.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    first["data"]["text"] = "<|endoftext|>"
    dpl = tmp_path / "Books" / "train.jsonl"
    dpl.parent.mkdir()
    dpl.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    meta = str(F / "dpl" / "meta" / "Books.jsonl")
    with pytest.raises(DataError) as info:
        prepare(DataConfig(format="dpl", sources=[str(dpl)], meta=[meta]), tmp_path / "d", tokenizer=tok)
    assert (
        f"\n  {dpl}:1:data.text: `data.text` holds nothing but the text of special tokens (<|endoftext|>),"
        in str(info.value)
    )
    questions = tmp_path / "train_questions.jsonl"
    question = {
        "id": "q1",
        "input": "i",
        "output": "<|im_end|>",
        "profile": [{"summary": "s", "content": "c"}],
    }
    questions.write_text(json.dumps(question) + "\n")
    cfg = DataConfig(format="lamp", template="lamp_topic_writing", sources=[str(questions)])
    with pytest.raises(DataError) as info:
        prepare(cfg, tmp_path / "l", tokenizer=tok)
    assert (
        f"\n  {questions}:1:output: `output` holds nothing but the text of special tokens (<|im_end|>),"
        in str(info.value)
    )


def test_sources_are_fingerprinted_by_content_so_a_change_that_keeps_size_and_mtime_is_noticed(
    tmp_path, tiny_tokenizer
):
    source = tmp_path / "records.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    cfg, out, tok = (
        DataConfig(format="generic", template="plain", sources=[str(source)]),
        tmp_path / "p",
        tiny_tokenizer(),
    )
    first = prepare(cfg, out, tokenizer=tok, echo=lambda _: None)
    raw = source.read_bytes()
    assert first["inputs"] == [
        {"path": str(source), "size": len(raw), "blake2b": hashlib.blake2b(raw, digest_size=16).hexdigest()}
    ]
    stat = source.stat()
    source.write_bytes(
        raw.replace(b'"target": "', b'"target": "X', 1)[:-1]
    )  # same size: one byte in, one out
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size and source.stat().st_mtime_ns == stat.st_mtime_ns
    again = prepare(cfg, out, tokenizer=tok, echo=lambda _: None)
    assert not again["reused"] and again["fingerprint"] != first["fingerprint"]


def test_a_split_deleted_after_preparation_is_named_as_such_not_as_one_without_examples(
    tmp_path, write_random_data
):
    """summary.json records the split's examples: its missing files were deleted or moved, and preparing
    again restores them (the message for a split without examples said the opposite: that it would not)."""
    import shutil

    from nextquill_jax.data.prepared_split import PreparedSplit, check_split

    data = write_random_data(tmp_path / "data", train=4, val=2)
    shutil.rmtree(data / "val")
    expected = (
        f"--data {data} lacks its prepared 'val' split: its summary.json records 2 val examples, but "
        f"{data / 'val' / 'meta.json'} is missing (deleted or moved?). Fix: run `nextquill-jax data prepare "
        f"--config FILE --out {data}` again."
    )
    with pytest.raises(FileNotFoundError) as e:
        check_split(data, "val", "--data")
    assert str(e.value) == expected
    with pytest.raises(FileNotFoundError, match=r"lacks its prepared 'val' split: its summary\.json"):
        PreparedSplit(data, "val")
    with pytest.raises(FileNotFoundError, match="no 'test' example was prepared there"):
        check_split(data, "test")  # never prepared: the message as before


def test_a_damaged_prepared_split_is_refused_naming_the_file(tmp_path, write_random_data):
    data = write_random_data(tmp_path / "data", train=8, val=0)
    split = data / "train"
    meta = json.loads((split / "meta.json").read_text())
    for name, entry in meta["checksums"].items():
        raw = (split / name).read_bytes()
        assert entry == {"size": len(raw), "blake2b": hashlib.blake2b(raw, digest_size=16).hexdigest()}, name
    assert sorted(meta["checksums"]) == sorted(p.name for p in split.glob("*.npy"))
    assert len(PreparedSplit(data, "train")) == 8

    target = split / "target.npy"
    good = target.read_bytes()
    target.write_bytes(good[:-4] + bytes(b ^ 0xFF for b in good[-4:]))  # the last token changed
    with pytest.raises(
        IntegrityError, match=rf"{split} is damaged: {target}: blake2b-128 checksum \w+, expected"
    ):
        PreparedSplit(data, "train")
    target.write_bytes(good[:-4])
    with pytest.raises(IntegrityError, match=f"{target}: {len(good) - 4} bytes, expected {len(good)}"):
        PreparedSplit(data, "train")
    target.unlink()
    with pytest.raises(IntegrityError, match=f"{target}: missing.*--force"):
        PreparedSplit(data, "train")
    target.write_bytes(good)
    del meta["checksums"]
    (split / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="lists no checksums"):
        PreparedSplit(data, "train")


def _edit_meta(split: Path, edit: Callable[[dict], object]) -> None:
    meta = json.loads((split / "meta.json").read_text())
    edit(meta)
    (split / "meta.json").write_text(json.dumps(meta))


def _replace(split: Path, name: str, content: np.ndarray | bytes) -> None:
    """`content` as file `name` of `split`, its checksum in meta.json updated: damage that the checksums do
    not see (files written together wrongly, or changed with their manifest)."""
    if isinstance(content, bytes):
        (split / name).write_bytes(content)
    else:
        np.save(split / name, content)
    _edit_meta(split, lambda meta: meta["checksums"].update({name: checksums.describe_file(split / name)}))


def _offsets(split: Path, field: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    _replace(split, f"{field}_offsets.npy", change(np.load(split / f"{field}_offsets.npy")))


def _tokens(split: Path, field: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    _replace(split, f"{field}.npy", change(np.load(split / f"{field}.npy")))


def _bump_at(offsets: np.ndarray, i: int, by: int) -> np.ndarray:
    changed = offsets.copy()
    changed[i] += by
    return changed


# (damage of the split directory, the file the message names, what it says); every split has 8 examples.
LAYOUT_DAMAGES = {
    "meta.json cut in half": (
        lambda s: (s / "meta.json").write_text((s / "meta.json").read_text()[:200]),
        "meta.json",
        "cannot be read (",
    ),
    "meta.json a list": (
        lambda s: (s / "meta.json").write_text("[]"),
        "meta.json",
        "holds list, not an object",
    ),
    "num_examples smaller": (
        lambda s: _edit_meta(s, lambda m: m.update(num_examples=6)),
        "meta.json",
        "num_examples is 6, but the offsets files hold 8 examples",
    ),
    "num_examples larger": (
        lambda s: _edit_meta(s, lambda m: m.update(num_examples=11)),
        "meta.json",
        "num_examples is 11, but the offsets files hold 8 examples",
    ),
    "num_examples not a count": (
        lambda s: _edit_meta(s, lambda m: m.update(num_examples="8")),
        "meta.json",
        "num_examples is '8', not an integer >= 0",
    ),
    "fields without target": (
        lambda s: _edit_meta(s, lambda m: m["fields"].remove("target")),
        "meta.json",
        "fields is ['prompt_with', 'prompt_without', 'reference_dce'], not",
    ),
    "checksums without a file": (
        lambda s: _edit_meta(s, lambda m: m["checksums"].pop("target_offsets.npy")),
        "meta.json",
        "checksums lists no target_offsets.npy",
    ),
    "target offsets past the array": (
        lambda s: _offsets(s, "target", lambda o: _bump_at(o, -1, 5)),
        "target_offsets.npy",
        "ends at",
    ),
    "offsets not from 0": (
        lambda s: _offsets(s, "prompt_with", lambda o: _bump_at(o, 0, 1)),
        "prompt_with_offsets.npy",
        "starts at 1, not 0",
    ),
    "offsets falling": (
        lambda s: _offsets(s, "prompt_without", lambda o: _bump_at(o, 3, 100)),
        "prompt_without_offsets.npy",
        "falls 1 time, where it must not",
    ),
    "offsets too short": (
        lambda s: _offsets(s, "prompt_with", lambda o: o[:-2]),
        "prompt_with_offsets.npy",
        "holds 7 offsets, not num_examples + 1 = 9",
    ),
    "offsets float": (
        lambda s: _offsets(s, "target", lambda o: o.astype(np.float64)),
        "target_offsets.npy",
        "is 1-D float64, not 1-D integers",
    ),
    "tokens float32": (
        lambda s: _tokens(s, "prompt_with", lambda a: a.astype(np.float32)),
        "prompt_with.npy",
        "is 1-D float32, not 1-D int32",
    ),
    "tokens int64": (
        lambda s: _tokens(s, "target", lambda a: a.astype(np.int64)),
        "target.npy",
        "is 1-D int64, not 1-D int32",
    ),
    "tokens 2-D": (
        lambda s: _tokens(s, "prompt_without", lambda a: np.stack([a, a])),
        "prompt_without.npy",
        "is 2-D int32, not 1-D int32",
    ),
    "reference_dce float64": (
        lambda s: _tokens(s, "reference_dce", lambda a: a.astype(np.float64)),
        "reference_dce.npy",
        "is 1-D float64, not 1-D float32",
    ),
    "reference_dce offsets not the target's": (
        lambda s: _offsets(s, "reference_dce", lambda o: _bump_at(o, 1, 1)),
        "reference_dce_offsets.npy",
        "differs from target_offsets.npy",
    ),
    ".npy shorter than its header says": (
        lambda s: _replace(s, "target.npy", (s / "target.npy").read_bytes()[:-8]),
        "target.npy",
        "cannot be read as a .npy array (",
    ),
    "not an .npy": (
        lambda s: _replace(s, "prompt_with_offsets.npy", b"not an array"),
        "prompt_with_offsets.npy",
        "cannot be read as a .npy array (",
    ),
}


@pytest.mark.parametrize(("damage", "named", "said"), LAYOUT_DAMAGES.values(), ids=LAYOUT_DAMAGES)
def test_a_prepared_split_whose_files_disagree_is_refused_naming_the_file(damage, named, said, tmp_path):
    # The checksums agree with the files here, so each was read silently misaligned (labels of other
    # examples, examples left out), or failed later with numpy's message naming no file.
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(8):
        target = rng.integers(1, 100, rng.integers(2, 6)).astype(np.int32)
        examples.append(
            TokenizedExample(
                prompt_with=rng.integers(1, 100, rng.integers(3, 9)).astype(np.int32),
                prompt_without=rng.integers(1, 100, rng.integers(1, 4)).astype(np.int32),
                target=target,
                reference_dce=rng.random(len(target)).astype(np.float32),
            )
        )
    write_split(tmp_path, "train", examples)
    split = tmp_path / "train"
    assert len(PreparedSplit(tmp_path, "train")) == 8
    damage(split)
    with pytest.raises(IntegrityError) as refused:
        PreparedSplit(tmp_path, "train")
    message = str(refused.value)
    assert message.startswith(f"prepared split {split} is damaged: {split / named}"), message
    assert said in message, message
    fix = f"Fix: prepare it again (`nextquill-jax data prepare --config FILE --out {tmp_path} --force`)."
    assert message.endswith(fix), message


def test_prepare_takes_data_overrides_as_train_does(tmp_path, tok_dir, capsys):
    """`data prepare --config FILE ... data.key=value`: the overrides replace the file's values (here a source
    that does not exist and the template), a key outside the data section or misspelt is refused naming the
    command line, and so is a value the section's check refuses."""
    config = _config_file(tmp_path / "c.yaml", tok_dir, format="generic", sources=["missing.jsonl"])
    out = tmp_path / "prepared"
    argv = ["data", "prepare", "--config", str(config), "--out", str(out)]
    records = f"{F}/generic/records.jsonl"
    assert main([*argv, f"data.sources=[{records}]", "data.template=plain"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == EXPECTED_EXAMPLES["generic"]
    capsys.readouterr()
    assert main([*argv, "data.sourcez=[x]"]) == 1
    said = capsys.readouterr().err
    assert "error: command line: unknown key `data.sourcez` (in `data.sourcez=[x]`). Did you mean" in said
    assert "`data.sources`?" in said
    assert main([*argv, "train.max_steps=3"]) == 1
    assert "error: command line: unknown key `train.max_steps`" in capsys.readouterr().err
    assert main([*argv, "data.max_history=-3"]) == 1
    said = capsys.readouterr().err.rstrip()  # the file alone is valid: the override is what to fix
    assert said.startswith("error: command line: data.max_history must be an integer >= 0, got -3"), said
    assert said.endswith(" (overrides: data.max_history=-3)"), said


def test_protected_data_prepared_with_other_settings_is_refused_and_left_as_it_was(tmp_path, tiny_tokenizer):
    source = tmp_path / "records.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    out = tmp_path / "prepared"
    base = dict(format="generic", template="plain", sources=[str(source)])
    tok = tiny_tokenizer()
    first = prepare(DataConfig(**base, max_history=1), out, tokenizer=tok, echo=lambda _: None)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as refused:
        prepare(DataConfig(**base), out, tokenizer=tok, protected="WHY. Fix: X.", echo=lambda _: None)
    assert str(refused.value) == (
        f"{out} was prepared with other settings (data.max_history: 1 -> {DataConfig().max_history}); it is "
        "not replaced: WHY. Fix: X."
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # The same settings are reused, and missing split files are written again: neither changes the data.
    same = DataConfig(**base, max_history=1)
    assert prepare(same, out, tokenizer=tok, protected="WHY", echo=lambda _: None)["reused"]
    os.remove(out / "test.jsonl")
    again = prepare(same, out, tokenizer=tok, protected="WHY", echo=lambda _: None)
    assert not again["reused"] and again["fingerprint"] == first["fingerprint"]


def test_a_failed_preparation_does_not_announce_replacing_the_directory(tmp_path, tok_dir, capsys):
    """`preparing again, replacing its contents` is said only when it happens: a run that stops on its
    configuration, on invalid records or with no example left says only why, and leaves the data as it was."""
    source = tmp_path / "records.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    config = _config_file(
        tmp_path / "c.yaml", tok_dir, format="generic", template="plain", sources=[str(source)]
    )
    out = tmp_path / "prepared"
    argv = ["data", "prepare", "--config", str(config), "--out", str(out)]
    assert main(argv) == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for override, error in (
        ("data.sources=[]", "error: data.sources is empty"),
        (f"data.sources=[{bad}]", "1 invalid input record(s)"),
        (f"data.sources=[{empty}]", f"error: no examples to prepare: {empty} holds no records. Fix:"),
    ):
        capsys.readouterr()
        assert main([*argv, override]) == 1
        said = capsys.readouterr()
        assert error in said.err and "replacing its contents" not in said.out + said.err, said
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert main([*argv, "data.max_history=1"]) == 0
    assert f"{out} was prepared with other settings" in capsys.readouterr().out


def test_a_source_without_records_is_named(tmp_path, tok_dir, capsys):
    """An empty source file (or one of blank lines) is named with its 0 records: in the error when nothing
    is left to prepare (which says plainly that the files hold no records when all are empty), else as a
    warning and in the summary's rows read per file. Each error ends with its fix."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("")
    # carol's record, the only one with an empty history: dropped, so it leaves no example either
    carol = [line for line in (F / "generic" / "records.jsonl").read_text().splitlines() if "carol" in line]
    (tmp_path / "carol.jsonl").write_text(carol[0] + "\n")
    records = f"{F}/generic/records.jsonl"
    config = _config_file(
        tmp_path / "c.yaml", tok_dir, format="generic", template="plain", sources=[str(empty)]
    )
    argv = ["data", "prepare", "--config", str(config), "--out", str(tmp_path / "prepared")]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"error: no examples to prepare: {empty} holds no records. Fix: point data.sources at files that "
        "hold records.\n"
    )
    assert main([*argv, f"data.sources=[{empty}, {blank}]"]) == 1
    assert f"error: no examples to prepare: {empty}, {blank} hold no records. Fix:" in capsys.readouterr().err
    assert main([*argv, f"data.sources=[{empty}, {tmp_path / 'carol.jsonl'}]"]) == 1
    assert capsys.readouterr().err == (
        f"error: no examples left to prepare: {empty}: 0 records; errors {{}}, dropped "
        "{'empty_history': 1}. Fix: give the records histories (an example learns from what its user's "
        "history changes).\n"
    )  # (it advised relaxing data.* settings, of which none governs an empty history)
    assert main([*argv, f"data.sources=[{empty}, {records}]"]) == 0
    said = capsys.readouterr().out
    assert f"  warning: {empty}: 0 records\n" in said
    # one example of a split is said as such (it was "test 1 examples")
    assert f"prepared {tmp_path / 'prepared'}: train 2 examples, val 1 example, test 1 example\n" in said
    assert main(["data", "show", str(tmp_path / "prepared"), "--split", "val", "--index", "0"]) == 0
    assert capsys.readouterr().out.startswith("example 0 of val (1 example) | user ")
    summary = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert summary["read"] == {str(empty): 0, records: 6}


def test_an_out_dir_holding_a_source_is_refused_before_anything_is_read(tmp_path, tok_dir, capsys):
    """`data prepare --out mydata` with `data.sources=[mydata/train.jsonl]` used to replace the source with
    the rendered rows: a source that is a file prepare writes there is refused, naming the source, the
    directory and the fix, and the directory is left as it was; a directory beside the source is fine."""
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    source = mydata / "train.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    config = _config_file(tmp_path / "c.yaml", tok_dir, format="generic", template="plain")
    argv = ["data", "prepare", "--config", str(config), f"data.sources=[{source}]"]
    assert main([*argv, "--out", str(mydata)]) == 1
    assert capsys.readouterr().err == (
        f"error: data.sources file {source} would be lost: preparing into {mydata} replaces {source} (the "
        f"rendered train examples). Fix: prepare into a directory that holds no source (such as "
        f"{mydata / 'prepared'}), or move {source} out of {mydata} and name its new path in data.sources.\n"
    )
    # Nothing was logged, so no logs/ either: an empty one left here read as a failed preparation
    assert sorted(p.name for p in mydata.iterdir()) == ["train.jsonl"]
    assert source.read_bytes() == (F / "generic" / "records.jsonl").read_bytes()
    assert main([*argv, "--out", str(mydata / "prepared")]) == 0
    assert source.read_bytes() == (F / "generic" / "records.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("key", "where", "lost"),
    [
        ("sources", "val/records.jsonl", "{out}/val/ (the val token arrays) whole"),
        ("meta", "summary.json", "{out}/summary.json (the summary)"),
    ],
)
def test_an_input_where_prepare_writes_is_refused_naming_it(tmp_path, tiny_tokenizer, key, where, lost):
    """A metadata file is an input too, and a file in a split's token-array directory (removed whole)."""
    out = tmp_path / "out"
    path = out / where
    path.parent.mkdir(parents=True)
    path.write_text("{}\n")
    other = {"sources": [f"{F}/amazon2023/Books.jsonl"], "meta": [f"{F}/amazon2023/meta_Books.jsonl"]}
    cfg = DataConfig(format="amazon2023", **{**other, key: [str(path)]})
    with pytest.raises(ValueError) as refused:
        prepare(cfg, out, tokenizer=tiny_tokenizer(), echo=lambda _: None)
    assert str(refused.value).startswith(
        f"data.{key} file {path} would be lost: preparing into {out} replaces {lost.format(out=out)}. Fix:"
    )
    assert path.read_text() == "{}\n"


def test_a_link_to_a_file_prepare_replaces_is_refused(tmp_path, tiny_tokenizer):
    """Paths are compared resolved: a source reached through a link is still the file it points to."""
    out = tmp_path / "out"
    out.mkdir()
    real = out / "test.jsonl"
    real.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    link = tmp_path / "records.jsonl"
    link.symlink_to(real)
    cfg = DataConfig(format="generic", template="plain", sources=[str(link)])
    with pytest.raises(ValueError, match=rf"^data.sources file {link} \(a link to {real}\) would be lost: "):
        prepare(cfg, out, tokenizer=tiny_tokenizer(), echo=lambda _: None)
    assert real.read_bytes() == (F / "generic" / "records.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("where", "what"),
    [
        ("train.jsonl", "the rendered train examples"),
        ("train/prompt_with.npy", "the train token arrays"),
    ],
)
def test_a_hard_link_to_a_source_where_prepare_writes_is_refused(tmp_path, tiny_tokenizer, where, what):
    """A hard link in `out` to a source is the source under another name, which comparing paths does not
    see: files are compared by identity too (a token array is written in place, through the link). The
    refusal names both names and the fix; the source is left as it was."""
    source = tmp_path / "records.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    out = tmp_path / "out"
    link = out / where
    link.parent.mkdir(parents=True)
    os.link(source, link)
    cfg = DataConfig(format="generic", template="plain", sources=[str(source)])
    with pytest.raises(ValueError) as refused:
        prepare(cfg, out, tokenizer=tiny_tokenizer(), echo=lambda _: None)
    assert str(refused.value) == (
        f"data.sources file {source} is also {link} (a hard link to it), which preparing into {out} replaces"
        f" ({what}). Fix: prepare into a directory that holds no source (such as {out / 'prepared'}), or"
        f" remove {link} (its contents stay in {source})."
    )
    assert source.read_bytes() == (F / "generic" / "records.jsonl").read_bytes()
    assert link.samefile(source)


class _KilledError(Exception):
    """Stands for a kill -9 of `data prepare` part way through writing."""


def test_an_interrupted_preparation_is_refused_by_every_reader(
    tmp_path, tiny_tokenizer, monkeypatch, capsys, tiny_config, write_config
):
    """`data prepare` stopped after the train split (here replacing an earlier preparation) leaves the train
    token arrays without summary.json (the old one is removed first) and without val/test: train, data
    show, effects, evaluate's reader and the effect report refuse it, naming the fix, where they used to
    train or report on the partial data. Preparing again finishes it."""
    from nextquill_jax.eval.effect_report import build_effect_report, compute_example_effects
    from nextquill_jax.eval.evaluate import read_split
    from nextquill_jax.loss import LossConfig

    source = tmp_path / "records.jsonl"
    source.write_bytes((F / "generic" / "records.jsonl").read_bytes())
    out = tmp_path / "prepared"
    base = dict(format="generic", template="plain", sources=[str(source)])
    tok = tiny_tokenizer()
    prepare(DataConfig(**base, max_history=1), out, tokenizer=tok, echo=lambda _: None)
    write_split = prepare_module.write_split

    def killed_after_train(out_dir, split, *args, **kwargs):
        if split != "train":
            raise _KilledError
        return write_split(out_dir, split, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "write_split", killed_after_train)
    with pytest.raises(_KilledError):
        prepare(DataConfig(**base), out, tokenizer=tok, echo=lambda _: None)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["train", "train.jsonl"]

    unfinished = (
        f"{out} was not finished (no summary.json; it holds the train token arrays): an interrupted `data "
        f"prepare`? Its data may be partial or missing. Fix: run `nextquill-jax data prepare --config FILE "
        f"--out {out}` again."
    )
    config = write_config(tiny_config(out, tmp_path / "run"), tmp_path / "train.yaml")
    for argv, named in (
        (["train", "--config", str(config)], "train.data_dir "),
        (["data", "show", str(out), "--index", "0"], ""),
        (
            [
                "effects",
                "--model",
                "smollm2",
                "--data",
                str(out),
                "--split",
                "train",
                "--out",
                str(tmp_path / "r"),
            ],
            "--data ",
        ),
    ):
        assert main(argv) == 1, argv
        assert capsys.readouterr().err == f"error: {named}{unfinished}\n", argv
    for read in (
        lambda: read_split(out, "train"),
        lambda: build_effect_report(None, tok, out, "train", tmp_path / "report"),
        lambda: compute_example_effects(None, tok, out, "train", [0], LossConfig()),
    ):
        with pytest.raises(FileNotFoundError) as refused:
            read()
        assert str(refused.value) == unfinished

    prepare(DataConfig(**base), out, tokenizer=tok, echo=lambda _: None)
    assert (
        len(read_split(out, "train")[0])
        == json.loads((out / "summary.json").read_text())["examples"]["train"]
    )
    assert main(["data", "show", str(out), "--index", "0"]) == 0


def test_data_prepared_with_relative_paths_is_reused_under_their_absolute_spelling(
    tmp_path, monkeypatch, tiny_tokenizer
):
    """`train` and `data prepare` join a config's relative paths to the current directory; data an earlier
    version prepared from the same config and directory (its summary spells them relative) is the same data.
    The files are still compared by content: the same spelling from another directory is other data."""
    a, c = tmp_path / "a", tmp_path / "c"
    records = (F / "generic" / "records.jsonl").read_text().splitlines(keepends=True)
    for where, lines in ((a, records), (c, records[:-1])):  # in c, other records under the same name
        where.mkdir()
        (where / "records.jsonl").write_text("".join(lines))
    cfg, tok = DataConfig(format="generic", template="plain", sources=["records.jsonl"]), tiny_tokenizer()
    monkeypatch.chdir(a)
    first = prepare(cfg, "prep", tokenizer=tok, echo=lambda _: None)
    summary = json.loads((a / "prep" / "summary.json").read_text())
    del summary["source_files"], summary["input_names"]  # as an earlier version wrote it
    (a / "prep" / "summary.json").write_text(json.dumps(summary))
    files = {p: p.read_bytes() for p in (a / "prep").rglob("*") if p.is_file()}
    lines: list[str] = []
    absolute = absolute_data_paths(cfg, a)
    assert absolute.sources == [str(a / "records.jsonl")]
    assert prepare(absolute, a / "prep", tokenizer=tok, protected="WHY", echo=lines.append)["reused"]
    assert lines == [
        f"{a / 'prep'}: prepared data up to date (fingerprint {first['fingerprint'][:12]}), reusing it"
    ]
    assert {p: p.read_bytes() for p in (a / "prep").rglob("*") if p.is_file()} == files
    monkeypatch.chdir(c)
    with pytest.raises(ValueError) as refused:
        prepare(absolute_data_paths(cfg, c), a / "prep", tokenizer=tok, protected="WHY", echo=lambda _: None)
    assert str(refused.value) == (
        f"{a / 'prep'} was prepared with other settings ({a / 'records.jsonl'} no longer read; "
        f"{c / 'records.jsonl'} newly read); it is not replaced: WHY"
    )


def test_data_prepared_from_record_files_that_moved_since_is_reused_where_they_are_the_same_files(
    monkeypatch, tmp_path, tiny_tokenizer
):
    """The summary records each input's path, size and BLAKE2b, and the layout formats read from the paths as
    spelled (`_input_layout`: each file's folder and name, how many are data.sources'): the same files moved
    (the same content in the same order, the same layout) prepare the same data, which is reused and the
    move named (it was refused as other settings). Not the same files: a renamed folder (LaMP reads the
    category from it) or file (the split from its name: dev is val, test is test), a link of another name
    to a moved file (the readers read the link's name), files in other settings (an outputs file read as
    questions), or files a summary of an earlier version names (it records no layout). A moved file beside a
    changed tokenizer names the tokenizer, not the paths."""
    import shutil

    old, new = tmp_path / "a" / "topic_writing", tmp_path / "b" / "c" / "topic_writing"
    shutil.copytree(FIXTURES / "lamp" / "topic_writing", old)
    q, o = "dev_questions.json", "dev_outputs.json"

    def cfg(root: Path, sources=(q,), meta=(o,)) -> DataConfig:
        files = lambda names: [str(root / name) for name in names]
        return DataConfig(
            format="lamp", template="lamp_topic_writing", sources=files(sources), meta=files(meta)
        )

    tok, out = tiny_tokenizer(), tmp_path / "prep"
    first = prepare(cfg(old), out, tokenizer=tok, echo=lambda _: None)
    assert first["source_files"] == 1 and first["examples"] == {"val": 2}
    assert first["input_names"] == [["topic_writing", q], ["topic_writing", o]]
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    new.parent.mkdir(parents=True)
    old.rename(new)
    lines: list[str] = []
    assert prepare(cfg(new), out, tokenizer=tok, protected="WHY", echo=lines.append)["reused"]
    assert lines == [
        f"{out}: prepared data up to date (fingerprint {first['fingerprint'][:12]}), reusing it; its record "
        f"files moved, the same content: {old / q} -> {new / q}; {old / o} -> {new / o}"
    ]
    # Reported once: the summary adds where the files were found, and keeps the paths its fingerprint holds.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs_found_at"] == [str(new / q), str(new / o)]
    assert [i["path"] for i in summary["inputs"]] == [str(old / q), str(old / o)]
    assert {k: v for k, v in summary.items() if k != "inputs_found_at"} == {
        k: v for k, v in first.items() if k != "reused"
    }
    lines.clear()
    assert prepare(cfg(new), out, tokenizer=tok, protected="WHY", echo=lines.append)["reused"]
    assert lines == [f"{out}: prepared data up to date (fingerprint {first['fingerprint'][:12]}), reusing it"]
    further = tmp_path / "d" / "topic_writing"
    further.parent.mkdir()
    new.rename(further)
    lines.clear()
    assert prepare(cfg(further), out, tokenizer=tok, protected="WHY", echo=lines.append)["reused"]
    assert lines[0].endswith(f"the same content: {new / q} -> {further / q}; {new / o} -> {further / o}")
    further.rename(new)

    def read_only(*_):  # as on a read-only file system (root here writes through chmod)
        raise PermissionError(13, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "write_text_atomic", read_only)
        for _ in range(2):  # reused all the same; not recorded, so the move is said again
            lines.clear()
            assert prepare(cfg(new), out, tokenizer=tok, protected="WHY", echo=lines.append)["reused"]
            assert lines[0].endswith(
                f"the same content: {further / q} -> {new / q}; {further / o} -> {new / o}"
            )
    assert prepare(cfg(new), out, tokenizer=tok, echo=lambda _: None)["inputs_found_at"][0] == str(new / q)

    def refused(config: DataConfig, tokenizer=tok) -> str:
        with pytest.raises(ValueError) as info:
            prepare(config, out, tokenizer=tokenizer, protected="WHY", echo=lambda _: None)
        assert str(info.value).endswith("; it is not replaced: WHY")
        return str(info.value)

    not_moved = "counts as the same files only with each file's name, its folder's name"
    renamed = new.rename(new.parent / "abstract")
    assert not_moved in refused(cfg(renamed))
    new = renamed.rename(new)
    (new / q).rename(new / "test_questions.json")
    assert not_moved in refused(cfg(new, sources=("test_questions.json",)))
    (new / "test_questions.json").rename(new / q)
    links = tmp_path / "links" / "topic_writing"
    links.mkdir(parents=True)
    (links / "test_questions.json").symlink_to(new / q)
    (links / o).symlink_to(new / o)
    assert not_moved in refused(cfg(links, sources=("test_questions.json",)))
    assert "data.meta: " in refused(cfg(new, sources=(q, o), meta=()))
    other_tokenizer = refused(cfg(new), tokenizer=tiny_tokenizer(vocab_size=500))
    assert "(the template's text or the tokenizer changed)" in other_tokenizer
    assert "no longer read" not in other_tokenizer
    summary = json.loads((out / "summary.json").read_text())
    del summary["source_files"], summary["input_names"]
    (out / "summary.json").write_text(json.dumps(summary))
    earlier = refused(cfg(new))
    assert f"{old / q} no longer read" in earlier
    assert "the summary, of an earlier version, does not record the file names a move must keep" in earlier
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "summary.json"} == {
        p: b for p, b in files.items() if p.name != "summary.json"
    }


def test_data_prepare_records_the_sources_absolute(tmp_path, tok_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "records.jsonl").write_bytes((F / "generic" / "records.jsonl").read_bytes())
    _config_file(
        tmp_path / "cfg.yaml", tok_dir, format="generic", template="plain", sources=["records.jsonl"]
    )
    assert main(["data", "prepare", "--config", "cfg.yaml", "--out", "prep"]) == 0
    summary = json.loads((tmp_path / "prep" / "summary.json").read_text())
    assert summary["config"]["sources"] == [str(tmp_path / "records.jsonl")]


def test_nothing_left_names_a_fix_per_cause():
    """Every record skipped for a template's missing fields: the fix names data.template (it said only
    "correct the sources", and following its skip option left nothing); drops no setting governs get their own
    fix; only the others are 'relax the data.* settings behind' them, named."""
    from collections import Counter

    from nextquill_jax.data.prepare import _nothing_left
    from nextquill_jax.data.sources.records import IssueLog

    log = IssueLog(on_error="skip", read=Counter({"r.jsonl": 3}), errors=Counter({"missing_field": 3}))
    assert _nothing_left(log).endswith(
        "Fix: correct the sources (data.on_error: fail lists each invalid record); or for fields a prompt "
        "template needs, choose another data.template (`plain` takes any)."
    )
    log = IssueLog(read=Counter({"r.jsonl": 4}), dropped=Counter({"duplicate": 1, "prompt_too_long": 3}))
    assert _nothing_left(log).endswith(
        "Fix: remove the repeated records; or relax the data.* settings behind prompt_too_long (README's "
        '"Your own data" says what each drop means).'
    )


def test_a_tokenizer_that_does_not_load_is_named_by_the_setting_that_named_it(tmp_path):
    """The reader's message named the value, not `data.tokenizer` (or an effects report's `--tokenizer`)."""
    from nextquill_jax.data.prepare import load_fast_tokenizer

    with pytest.raises(
        ValueError, match=r"^data\.tokenizer: no tokenizer 'nope': it is not a local directory"
    ):
        load_fast_tokenizer("nope")
    with pytest.raises(ValueError, match=rf"^--tokenizer: {tmp_path} holds no tokenizer files"):
        load_fast_tokenizer(str(tmp_path), "--tokenizer")


def test_a_tokenizer_without_an_eos_token_is_refused_by_its_setting_as_it_loads(tmp_path, tiny_tokenizer):
    """Targets end with the tokenizer's EOS: the commands that load a tokenizer by a setting (`--tokenizer`,
    through `load_fast_tokenizer`) refuse one without, naming that setting, before any data is read."""
    from nextquill_jax.data.prepare import load_fast_tokenizer

    tok = tiny_tokenizer()
    tok.__class__(tokenizer_object=tok.backend_tokenizer).save_pretrained(tmp_path)  # its vocabulary, no EOS
    with pytest.raises(
        ValueError, match=rf"^--tokenizer '{tmp_path}' has no EOS token; targets end with EOS$"
    ):
        load_fast_tokenizer(str(tmp_path), "--tokenizer")


def test_a_link_of_another_name_to_the_unmoved_record_file_is_not_the_same_files(tmp_path, tiny_tokenizer):
    """A link resolves to the file it names, so its content and resolved path are the recorded file's; but
    the readers read the link's name (a split from it: dev is val, test is test), so the data is not reused
    and a preparation from the link gives other splits."""
    import shutil

    folder = tmp_path / "topic_writing"
    shutil.copytree(FIXTURES / "lamp" / "topic_writing", folder)
    q, o = "dev_questions.json", "dev_outputs.json"
    cfg = lambda root, split: DataConfig(
        format="lamp",
        template="lamp_topic_writing",
        sources=[str(root / f"{split}_questions.json")],
        meta=[str(root / f"{split}_outputs.json")],
    )
    tok, out = tiny_tokenizer(), tmp_path / "prep"
    assert prepare(cfg(folder, "dev"), out, tokenizer=tok, echo=lambda _: None)["examples"] == {"val": 2}
    links = tmp_path / "links" / "topic_writing"
    links.mkdir(parents=True)
    (links / "test_questions.json").symlink_to(folder / q)
    (links / "test_outputs.json").symlink_to(folder / o)
    with pytest.raises(ValueError, match="counts as the same files only with each file's name"):
        prepare(cfg(links, "test"), out, tokenizer=tok, protected="WHY", echo=lambda _: None)
    fresh = prepare(cfg(links, "test"), tmp_path / "fresh", tokenizer=tok, echo=lambda _: None)
    assert fresh["examples"] == {"test": 2} and not fresh["reused"]


def test_a_manifest_of_a_tree_and_the_problems_found_against_it(tmp_path, monkeypatch):
    """`checksums.manifest` of a folder with a subfolder and an empty file, against hashlib's BLAKE2b-128;
    then a directory where a file was is missing, and a file whose status cannot be read is unreadable while
    the files after it are still checked."""
    import errno

    root = tmp_path / "root"
    contents = {"a.bin": b"abc", "empty": b"", "sub/b.bin": bytes(range(256)) * 40}
    for name, data in contents.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    expected = {
        name: {"size": len(data), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}
        for name, data in contents.items()
    }
    assert checksums.manifest(root) == expected  # every file below root, none of its folders
    assert checksums.problems(root, expected) == []
    (root / "a.bin").unlink()
    (root / "a.bin").mkdir()
    (root / "sub" / "b.bin").write_bytes(bytes(256) * 40)  # same size, other bytes
    is_file = Path.is_file

    def failing_is_file(path):
        if path == root / "empty":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", failing_is_file)
    digest = hashlib.blake2b(bytes(256) * 40, digest_size=16).hexdigest()
    assert checksums.problems(root, expected) == [
        f"{root / 'a.bin'}: missing",
        f"{root / 'empty'}: unreadable (Input/output error)",
        f"{root / 'sub/b.bin'}: blake2b-128 checksum {digest}, expected {expected['sub/b.bin']['blake2b']}",
    ]
