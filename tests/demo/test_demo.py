"""The demo at test size: a few synthetic users, a 2-step base, 2 fine-tuning steps per variant.

The numbers mean nothing at this size; what is checked is that the table's files are complete and that every
number in them is traceable to the file of the run that produced it (and recomputed here where it is ours).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from nextquill_jax.config_schema import ConfigError
from nextquill_jax.demo.run import DemoPlan, load_demo_config, run_demo, write_pretrain_documents
from nextquill_jax.eval.compare_table import METRICS, interval_text
from nextquill_jax.eval.preference_recall import preference_recall, signature_recall

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ["sft", "context_sft", "nextquill"]
FINETUNE_STEPS = 2


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _training(model: dict, data: dict, variant: str, steps: int) -> dict:
    return {
        "model": {**model, "compute_dtype": "float32"},
        "data": {"format": "generic", **data},
        "loss": {"variant": variant, "token_chunk": 256, "vocab_chunk": 512},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 1, "weight_decay": 0.0},
        "train": {"max_steps": steps},
        "checkpoint": {"every_steps": 0, "on_epoch_end": False, "keep": 1, "best_metric": None},
        "eval": {"max_batches": 1},
        "logging": {"every_steps": 1, "tensorboard": False, "progress_bar": False},
    }


def tiny_demo_config(path: Path) -> Path:
    batching = {"mode": "pack", "length_multiple": 32, "rows_per_batch": 2, "read_threads": 0,
                "prefetch_batches": 0, "num_epochs": 20}  # fmt: skip
    arch = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
            "num_kv_heads": 1, "head_dim": 16, "max_position_embeddings": 1024, "rope_theta": 10000.0,
            "bos_token_id": 0, "eos_token_ids": [0], "pad_token_id": 0}  # fmt: skip
    cfg = {
        "demo": {
            "users": 6,
            "variants": VARIANTS,
            "split": "test",
            "eval_examples": 4,
            "eval_batch_size": 4,
            "max_new_tokens": 8,
            "effect_examples": 3,
        },
        "pretrain": _training(
            {"preset": "qwen2.5-0.5b", "overrides": arch},
            {
                "template": "plain",
                "max_history": 0,
                "batching": {**batching, "seq_len_with": 1024, "too_long": "truncate"},
            },
            "sft",
            2,
        ),
        "finetune": _training(
            {"path": "unused: the demo sets it"},
            {"template": "review_short", "max_history": 3, "batching": {**batching, "seq_len_with": 768}},
            "nextquill",
            FINETUNE_STEPS,
        ),
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = load_demo_config(tiny_demo_config(root / "demo.yaml"), root / "out", seed=3)
    results = run_demo(cfg, echo=lambda _: None)
    return root / "out", results


def test_files_and_table_structure(demo_run):
    out, results = demo_run
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = out / "seed3" / "nextquill" / "effects" / "index.html"
    assert Path(results["effect_report"]) == report.absolute()
    assert Path(results["effect_report"]).exists()
    assert [r["variant"] for r in results["rows"]] == VARIANTS
    assert results["baseline"] == "context_sft"
    assert sorted(results["differences"]) == ["nextquill", "sft"]
    markdown = (out / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    headers = [h for _, h, _ in METRICS] + ["BLEU", "DCE AUROC"]
    assert table[0] == "| variant | " + " | ".join(headers) + " |"
    for row in results["rows"]:
        line = next(t for t in table if t.startswith(f"| {row['variant']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        for (metric, _, _), cell in zip(METRICS, cells, strict=False):
            expected = "-" if row.get(metric) is None else f"{row[metric]:.4f}"
            assert cell == expected, (row["variant"], metric)
    assert f"Reading: {results['reading']}" in markdown
    study = (REPO / "benchmarks" / "STUDY.md").read_text()
    recorded = study[study.index("### Table") :].splitlines()[2]  # the study table's header row
    assert "configs/study/smollm2_synthetic.yaml" in markdown and recorded in markdown


def _predictions(out: Path, variant: str) -> list[dict]:
    return read_jsonl(out / "seed3" / variant / "eval" / "test" / "predictions.jsonl")


def test_text_metrics_are_means_of_each_runs_predictions(demo_run):
    out, results = demo_run
    for row in results["rows"]:
        eval_dir = out / "seed3" / row["variant"] / "eval" / "test"
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        predictions = _predictions(out, row["variant"])
        assert metrics["examples"] == len(predictions) == 4
        for key in ("rouge1", "rougeL", "meteor"):
            assert row[key] == pytest.approx(np.mean([p[key] for p in predictions]), abs=1e-12)
        assert row["bleu"] == metrics["overall"]["bleu"]
        expected_prompt = "prompt_without_history" if row["variant"] == "sft" else "prompt_with_history"
        assert metrics["prompt"] == expected_prompt
        assert metrics["generation"]["repetition_penalty"] == 1.2
        assert metrics["generation"]["do_sample"] is False


def test_preference_recall_recomputed_from_predictions_and_ground_truth(demo_run):
    out, results = demo_run
    truth = {
        r["user_id"]: (r["target"], r["meta"]["signature_words"])
        for r in read_jsonl(out / "data" / "synthetic.jsonl")
        if r["split"] == "test"
    }
    for row in results["rows"]:
        got = []
        for p in _predictions(out, row["variant"]):
            target, words = truth[p["user_id"]]
            assert p["reference"] == target
            tokens = re.split(r"[^A-Za-z]+", p["prediction"])
            got.append(np.mean([w in tokens for w in words]))
        assert row["preference_recall"] == pytest.approx(np.mean(got), abs=1e-12)


def test_dce_auroc_is_that_of_each_effect_report(demo_run):
    out, results = demo_run
    for row in results["rows"]:
        summary = json.loads((out / "seed3" / row["variant"] / "effects" / "summary.json").read_text())
        assert row["dce_auroc"] == summary["ground_truth"]["auroc"]
        assert 0.0 <= row["dce_auroc"] <= 1.0
        assert len(summary["examples"]) == 3


def test_reading_follows_the_intervals(demo_run):
    _, results = demo_run
    headers = {metric: (header, higher) for metric, header, higher in METRICS}
    for name, metrics in results["differences"].items():
        for metric in ("rouge1", "preference_recall", "preference_nll_with"):
            d = metrics[metric]
            header, higher = headers[metric]
            excludes_zero = d["low"] > 0 or d["high"] < 0
            if not excludes_zero:
                clause = f"{name} no significant difference from context_sft on {header}"
            elif math.isclose(d["low"], d["high"], rel_tol=1e-9):  # no width: says nothing
                clause = (
                    f"{name} vs context_sft on {header}: no verdict: the examples' differences agree exactly"
                )
            else:
                verdict = "better than" if (d["mean"] > 0) == higher else "worse than"
                clause = f"{name} {verdict} context_sft on {header}"
            assert f"{clause} ({interval_text(d)})" in results["reading"]


def test_variants_share_the_base_and_train_the_same_steps(demo_run):
    out, _ = demo_run
    base_rows = read_jsonl(out / "runs" / "base" / "metrics.jsonl")
    assert max(r["step"] for r in base_rows) == 2
    assert (out / "base" / "config.json").exists()
    for variant in VARIANTS:
        config = yaml.safe_load((out / "seed3" / variant / "config.yaml").read_text())
        assert config["model"]["path"] == str(out / "base")
        assert config["loss"]["variant"] == variant
        assert config["train"]["seed"] == 3 and config["data"]["batching"]["seed"] == 3
        steps = [r["step"] for r in read_jsonl(out / "seed3" / variant / "metrics.jsonl")]
        assert max(steps) == FINETUNE_STEPS


def test_pretraining_documents_hold_no_validation_or_test_target(tmp_path):
    from nextquill_jax.data.sources.synth import generate_synthetic

    generate_synthetic(tmp_path, users=3, seed=1)
    count = write_pretrain_documents(tmp_path / "synthetic.jsonl", tmp_path / "docs.jsonl")
    records = read_jsonl(tmp_path / "synthetic.jsonl")
    docs = {d["user_id"]: d for d in read_jsonl(tmp_path / "docs.jsonl")}
    assert count == len(docs) == 3
    for r in records:
        text = "\n".join([*docs[r["user_id"]]["history"], docs[r["user_id"]]["target"]])
        assert (r["target"] in text) == (r["split"] == "train"), r["id"]


def test_signature_recall_counts_whole_lowercase_words():
    assert signature_recall("The Gentle River felt bold to me.", ["gentle", "bold"]) == 0.5
    assert signature_recall("boldly, gentleness", ["gentle", "bold"]) == 0.0
    assert signature_recall("gentle... bold!", ["gentle", "bold", "stark"]) == pytest.approx(2 / 3)
    # A non-ASCII letter is part of the word (it ended the word before: "crispé" counted "crisp").
    assert signature_recall("crispé écrisp", ["crisp"]) == 0.0
    assert signature_recall("crisp's bold2 gentle_", ["crisp", "bold", "gentle"]) == 1.0
    assert signature_recall("Ça crisp, «cozy»", ["crisp", "cozy", "ça"]) == pytest.approx(2 / 3)
    # Words holding other characters than letters (a record's own meta.signature_words) count too.
    assert signature_recall("a well-made, 5-star chair", ["well-made", "5-star", "made"]) == 1.0
    assert signature_recall("unwell-made 5-stars", ["well-made", "5-star"]) == 0.0
    assert signature_recall("a", ["a", "a", "b"]) == pytest.approx(2 / 3)  # a word listed twice counts twice
    with pytest.raises(ValueError, match="empty"):
        signature_recall("text", [])
    with pytest.raises(ValueError, match="blank word ' '"):
        signature_recall("text", ["text", " "])


def test_preference_recall_joins_each_prediction_to_its_row_by_index(tmp_path):
    """By hand, on files written here (no demo run): rows 3 and 7 of a split, the predictions in another
    order. Row 3's words warm, tidy: its prediction holds "warm" (1/2), its reference both (1); row 7's word
    bold: its prediction holds it (1), its reference only "boldly" (0). A word with a regex metacharacter
    is matched literally ("a.b" is not in "axb")."""
    split, predictions = tmp_path / "test.jsonl", tmp_path / "predictions.jsonl"
    rows = [
        {"index": 3, "meta": {"signature_words": ["warm", "tidy"]}},
        {"index": 7, "meta": {"signature_words": ["bold"]}},
        {"index": 8, "meta": {"signature_words": ["a.b"]}},
        {"index": 9, "meta": {}},
    ]
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def recall(*preds: tuple[int, str, str]) -> dict:
        lines = [{"index": i, "prediction": p, "reference": r} for i, p, r in preds]
        predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return preference_recall(predictions, split)

    got = recall((7, "Bold? bold.", "boldly"), (3, "a warm day", "warm and tidy"), (8, "axb", "a.b"))
    assert got["per_example"] == {7: 1.0, 3: 0.5, 8: 0.0}
    assert got["prediction"] == pytest.approx((1.0 + 0.5 + 0.0) / 3, abs=1e-12)
    assert got["reference"] == pytest.approx((0.0 + 1.0 + 1.0) / 3, abs=1e-12)
    assert got["examples"] == 3
    for index in (9, 4):  # a row without signature words, an index the split does not hold
        with pytest.raises(ValueError, match=f"index {index} has no meta.signature_words"):
            recall((index, "x", "y"))
    with pytest.raises(ValueError, match="holds no predictions"):
        recall()


@pytest.mark.parametrize("name", ["demo.yaml", "demo_quick.yaml"])
def test_shipped_demo_configs_load(name, tmp_path):
    cfg = load_demo_config(REPO / "configs" / name, tmp_path, seed=0)
    assert cfg.variant_config("sft").loss.variant == "sft"
    assert cfg.finetune_config.model.path == str(tmp_path / "base")
    assert cfg.pretrain.model.model_config().eos_token_ids == (0,)


def test_bad_demo_configs_are_named(tmp_path):
    good = yaml.safe_load(tiny_demo_config(tmp_path / "good.yaml").read_text())
    bad = dict(good, extra={})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="exactly the sections"):
        load_demo_config(tmp_path / "bad.yaml", tmp_path)
    bad = dict(good, demo={**good["demo"], "variants": ["sft", "contextsft"]})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"demo\.variants"):
        load_demo_config(tmp_path / "bad.yaml", tmp_path)
    bad = dict(good, finetune={**good["finetune"], "optim": {"learning_rat": 1.0}})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    lines = (tmp_path / "bad.yaml").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip().startswith("learning_rat:"))
    with pytest.raises(ConfigError) as e:  # the line, as a training config's errors give it
        load_demo_config(tmp_path / "bad.yaml", tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'bad.yaml'}, line {line}: unknown key "), e.value
    assert "`finetune.optim.learning_rat`. Did you mean `finetune.optim.learning_rate`?" in str(e.value)


def test_the_reading_gives_no_verdict_on_an_interval_of_no_width_away_from_zero():
    """One pair, or pairs that all differ by the same amount, give an interval of no width: it excludes 0 by
    the letter but says nothing of the uncertainty, so the reading names no winner; one at 0 (every pair
    equal) stays "no significant difference"."""
    from nextquill_jax.demo.report import reading

    def difference(low, high):
        return {"mean": low, "low": low, "high": high, "significant": False}

    result = {
        "baseline": "context_sft",
        "differences": {
            "a": {"rouge1": difference(0.1, 0.1), "preference_recall": difference(0.0, 0.0)},
            "b": {"rouge1": {"mean": 0.2, "low": 0.1, "high": 0.3, "significant": True}},
        },
    }
    assert reading(result) == (
        "a vs context_sft on ROUGE-1: no verdict: the examples' differences agree exactly "
        "(+0.1000 [+0.1000, +0.1000]); a no significant difference from context_sft on pref. recall "
        "(+0.0000 [+0.0000, +0.0000]); b better than context_sft on ROUGE-1 (+0.2000 [+0.1000, +0.3000])."
    )


def test_a_demo_with_cudnn_attention_reads_its_vocabulary_with_packed_mode_unresolved(tmp_path, monkeypatch):
    """A demo file that sets `attention_impl: cudnn` (whose `cudnn_max_segments` default, `auto`, training
    resolves later) gets through the stages that read the model's vocabulary and EOS ids; it raised a
    ValueError for the unresolved `auto` there. Stopped at data preparation, the stage after them."""
    from nextquill_jax.data import prepare as prepare_module
    from nextquill_jax.demo.run import _run_demo

    raw = yaml.safe_load(tiny_demo_config(tmp_path / "demo.yaml").read_text())
    for section in ("pretrain", "finetune"):
        raw[section]["model"].update(attention_impl="cudnn", compute_dtype="bfloat16")
    (tmp_path / "cudnn.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_demo_config(tmp_path / "cudnn.yaml", tmp_path / "out", seed=0)
    assert cfg.pretrain.model.cudnn_max_segments == "auto"

    class PreparedError(Exception):
        pass

    def stop(*args, **kwargs):
        raise PreparedError

    monkeypatch.setattr(prepare_module, "prepare", stop)
    lines = []
    with pytest.raises(PreparedError):
        _run_demo(cfg, lines.append)
    assert any("tokenizer:" in line and "(model vocabulary 512)" in line for line in lines), lines


@pytest.mark.parametrize(
    "name", ["users", "eval_examples", "eval_batch_size", "max_new_tokens", "effect_examples"]
)
@pytest.mark.parametrize("value", [0, -1, True, 2.0])
def test_a_demo_plan_count_is_an_integer_of_at_least_one(name, value):
    """Each count of the `demo` section, built directly: 0, a negative number, a bool and a float are refused
    by name; 1 is the smallest taken."""
    message = rf"^demo\.{name} must be an integer >= 1, got {re.escape(repr(value))}$"
    with pytest.raises(ValueError, match=message):
        DemoPlan(**{name: value})
    assert getattr(DemoPlan(**{name: 1}), name) == 1


@pytest.mark.parametrize(
    ("variants", "baseline", "message"),
    [
        ((), "context_sft", r"^demo\.variants must be distinct names from \[.*\], got \[\]$"),
        (
            ("sft", "context_sft", "sft"),
            "context_sft",
            r"^demo\.variants .* got \['sft', 'context_sft', 'sft'\]",
        ),
        (("sft", "contextsft", "context_sft"), "context_sft", r"^demo\.variants must be distinct names"),
        (("sft", "nextquill"), "context_sft", r"^demo\.baseline 'context_sft' must be one of demo\.variants"),
    ],
)
def test_demo_plan_variants_are_distinct_known_names_holding_the_baseline(variants, baseline, message):
    """An empty list, a variant twice, an unknown name (with the baseline among the variants, so only the
    name check can refuse it) and a baseline that is not a variant are each refused with their own message."""
    with pytest.raises(ValueError, match=message):
        DemoPlan(variants=variants, baseline=baseline)
    every = ("sft", "context_sft", "mce", "dce", "js", "nextquill")  # the loss variants a demo may train
    assert DemoPlan(variants=every, baseline="js").variants == every


@pytest.mark.parametrize("missing", ["demo", "pretrain", "finetune"])
def test_a_demo_config_without_one_of_its_sections_is_named(missing, tmp_path):
    good = yaml.safe_load(tiny_demo_config(tmp_path / "good.yaml").read_text())
    del good[missing]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(good))
    with pytest.raises(ConfigError, match=r"exactly the sections \['demo', 'pretrain', 'finetune'\], found"):
        load_demo_config(tmp_path / "bad.yaml", tmp_path)


def test_a_demo_base_that_is_not_a_preset_is_refused(tmp_path):
    """The base is trained from scratch, so `pretrain.model` names a preset, not a checkpoint path."""
    raw = yaml.safe_load(tiny_demo_config(tmp_path / "demo.yaml").read_text())
    raw["pretrain"]["model"] = {"path": str(tmp_path / "some_model"), "compute_dtype": "float32"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    message = r"`pretrain\.model` must name a preset \(the base is trained from scratch\)$"
    with pytest.raises(ConfigError, match=message):
        load_demo_config(tmp_path / "bad.yaml", tmp_path)


def test_pretraining_documents_by_hand(tmp_path):
    """Records written here, two users interleaved, each record's history its user's earlier reviews (oldest
    first): each user's document is its last training record's reviews, oldest first, the first as the
    history and the rest (ending with that record's target) joined by newlines as the target. Validation and
    test records, and a user with no training record, give nothing; a file without training records is
    refused."""

    def record(user, split, history, target):
        return {"user_id": user, "split": split, "history": [{"text": t} for t in history], "target": target}

    records = [
        record("u1", "train", [], "a1"),
        record("u2", "train", ["b0"], "b1 é"),
        record("u1", "train", ["a1"], "a2"),
        record("u1", "train", ["a1", "a2"], "a3"),
        record("u2", "val", ["b0", "b1 é"], "b2"),
        record("u1", "val", ["a1", "a2", "a3"], "a4"),
        record("u1", "test", ["a1", "a2", "a3", "a4"], "a5"),
        record("u3", "test", ["c0"], "c1"),
    ]
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert write_pretrain_documents(source, tmp_path / "docs.jsonl") == 2
    docs = {d["user_id"]: d for d in read_jsonl(tmp_path / "docs.jsonl")}
    assert docs == {
        "u1": {"user_id": "u1", "context": {}, "history": ["a1"], "target": "a2\na3", "split": "train"},
        "u2": {"user_id": "u2", "context": {}, "history": ["b0"], "target": "b1 é", "split": "train"},
    }
    source.write_text("".join(json.dumps(r) + "\n" for r in records[4:]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"has no training records to build the pre-training corpus from$"):
        write_pretrain_documents(source, tmp_path / "docs.jsonl")


def test_a_date_where_a_demo_config_takes_text_is_one_config_error_naming_its_line(tmp_path):
    """YAML reads an unquoted 2024-01-01 as a date. In a training section of a demo file it is refused as a
    training config refuses it (naming the key, its line and the quoting fix); copying the section to set the
    demo's paths raised a TypeError (a date is not JSON) instead."""
    raw = yaml.safe_load(tiny_demo_config(tmp_path / "demo.yaml").read_text())
    raw["finetune"]["logging"]["tensorboard_dir"] = "DATE"
    text = yaml.safe_dump(raw, sort_keys=False).replace("DATE", "2024-01-01")
    (tmp_path / "bad.yaml").write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.strip() == "tensorboard_dir: 2024-01-01")
    with pytest.raises(ConfigError) as e:
        load_demo_config(tmp_path / "bad.yaml", tmp_path)
    assert str(e.value).startswith(
        f"{tmp_path / 'bad.yaml'}, line {line}: `finetune.logging.tensorboard_dir` expects a str, got "
    ), e.value
    assert "put the value in quotes" in str(e.value)


def _stub_stages(monkeypatch, calls: dict, clock: list) -> None:
    """Replace the demo's training, evaluation and reporting stages by stubs that record their arguments in
    `calls` and advance the demo's clock (`clock[0]`, its only `time.perf_counter`) by a known number of
    seconds; the data and the tokenizer stay real (a few users: fast), their arguments recorded too."""
    from types import SimpleNamespace

    from nextquill_jax.data import prepare as prepare_module
    from nextquill_jax.data.sources import synth
    from nextquill_jax.demo import report
    from nextquill_jax.demo import run as run_module
    from nextquill_jax.demo import tokenizer as tokenizer_module
    from nextquill_jax.eval import compare, compare_table
    from nextquill_jax.train import export as export_module
    from nextquill_jax.train import loop

    def advance(seconds):
        clock[0] += seconds

    real_synth = synth.generate_synthetic

    def generate(data_dir, **kwargs):
        calls["synth"] = (data_dir, kwargs)
        advance(2.0)
        return real_synth(data_dir, **kwargs)

    real_texts, real_tokenizer = tokenizer_module.record_texts, tokenizer_module.train_tokenizer

    def record_texts(path, template, **kwargs):
        calls["texts"] = (path, template, kwargs)
        return real_texts(path, template, **kwargs)

    def train_tokenizer(texts, out_dir, **kwargs):
        calls["tokenizer"] = (out_dir, kwargs)
        return real_tokenizer(texts, out_dir, **kwargs)

    def prepare(data, out_dir, **kwargs):
        calls.setdefault("prepare", []).append((list(data.sources), data.tokenizer, out_dir))
        advance(3.0)

    def train_to_the_end(cfg, workdir, **kwargs):
        calls["base"] = (cfg, workdir)
        advance(7.0)
        return SimpleNamespace(step=2)

    def run_variant(comparison, variant, seed, echo):
        calls.setdefault("variants", []).append((variant, seed, comparison.run_config(variant, seed)))
        advance(10.0 + len(calls["variants"]))
        return {"variant": variant}

    def plot(runs, path, *, base=None):
        calls["plot"] = (runs, path, base)
        advance(0.5)

    monkeypatch.setattr(synth, "generate_synthetic", generate)
    monkeypatch.setattr(tokenizer_module, "record_texts", record_texts)
    monkeypatch.setattr(tokenizer_module, "train_tokenizer", train_tokenizer)
    monkeypatch.setattr(prepare_module, "prepare", prepare)
    monkeypatch.setattr(loop, "train_to_the_end", train_to_the_end)
    monkeypatch.setattr(export_module, "export", lambda *a: (calls.__setitem__("export", a), advance(1.0)))
    monkeypatch.setattr(compare, "run_variant", run_variant)
    monkeypatch.setattr(
        compare_table,
        "write_results",
        lambda comparison, rows: {"config": comparison.source, "split": "test", "rows": rows},
    )
    monkeypatch.setattr(compare_table, "markdown", lambda result: "TABLE\n")
    monkeypatch.setattr(report, "plot_training_curves", plot)
    monkeypatch.setattr(report, "reading", lambda result: "READING")
    monkeypatch.setattr(report, "study_table", lambda: "STUDY\n")
    fake_time = SimpleNamespace(perf_counter=lambda: clock[0], strftime=time.strftime)
    monkeypatch.setattr(run_module, "time", fake_time)


@pytest.mark.parametrize(
    ("variants", "effect_variant"),
    [(["nextquill", "context_sft", "sft"], "nextquill"), (["sft", "context_sft"], "context_sft")],
)
def test_a_demo_sets_its_paths_and_seeds_and_writes_its_results_as_stated(
    variants, effect_variant, tmp_path, monkeypatch
):
    """By hand, from `load_demo_config`'s and `run_demo`'s statements, with the expensive stages stubbed
    (`_stub_stages`) and --out given relative: every path the demo sets lies under --out, the data is
    generated with the demo's seed, both trainings get it as `train.seed` and `data.batching.seed`, the data
    is prepared with absolute paths, and results.json / results.md hold the stated fields. The fine-tuning
    section has no `train` mapping here: the demo's `train.data_dir` creates it. The effect report is
    nextquill's, or the last variant's without one."""
    import datetime

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(tiny_demo_config(tmp_path / "demo.yaml").read_text())
    raw["demo"]["variants"] = variants
    del raw["finetune"]["train"]
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_demo_config(tmp_path / "demo.yaml", Path("out"), seed=5)
    calls, clock, lines = {}, [100.0], []
    _stub_stages(monkeypatch, calls, clock)
    day = datetime.date.today().isoformat()
    results = run_demo(cfg, echo=lines.append)
    out, absolute = Path("out"), tmp_path / "out"

    assert calls["synth"] == (out / "data", {"users": 6, "seed": 5})
    # The tokenizer: trained on the fine-tuning data as its template renders it (3 history entries), with
    # the base's vocabulary (512).
    assert calls["texts"] == (out / "data" / "synthetic.jsonl", "review_short", {"max_history": 3})
    assert calls["tokenizer"] == (out / "tokenizer", {"vocab_size": 512})
    tokenizer = str(absolute / "tokenizer")
    assert calls["prepare"] == [
        ([str(absolute / "data" / "pretrain.jsonl")], tokenizer, str(out / "prepared_base")),
        ([str(absolute / "data" / "synthetic.jsonl")], tokenizer, str(out / "prepared")),
    ]
    base, workdir = calls["base"]
    assert workdir == out / "runs" / "base" and base.train.workdir == str(out / "runs" / "base")
    assert (base.train.seed, base.data.batching.seed, base.data.tokenizer) == (5, 5, str(out / "tokenizer"))
    assert calls["export"] == (out / "runs" / "base", out / "base")
    assert [(v, seed) for v, seed, _ in calls["variants"]] == [(v, 5) for v in variants]
    for variant, _, run in calls["variants"]:  # the run configs hold some paths absolute (`run_config`)
        assert run.loss.variant == variant and Path(run.model.path).absolute() == absolute / "base"
        assert Path(run.train.workdir).absolute() == absolute / "seed5" / variant
        assert Path(run.train.data_dir).absolute() == absolute / "prepared"
        assert [Path(s).absolute() for s in run.data.sources] == [absolute / "data" / "synthetic.jsonl"]
        assert Path(run.data.tokenizer).absolute() == absolute / "tokenizer"
        assert (run.train.seed, run.data.batching.seed) == (5, 5)
    runs = {v: out / "seed5" / v for v in variants}
    assert calls["plot"] == (runs, out / "training_curves.png", out / "runs" / "base")
    # 6 users, each with 4 training, 1 validation and 1 test record (`DemoPlan.users`); a document per user.
    data_line = "synthetic benchmark: 36 records (train 24, val 6, test 6); 6 pre-training documents"
    assert f"[    2 s] {data_line}" in lines
    assert "[    2 s] data: 2.0 s" in lines

    stages = {"data": 2.0, "tokenizer and prepared data": 6.0, "base pre-training": 8.0}
    for k, v in enumerate(variants, start=1):
        stages[f"{v}: training, evaluation and effect report"] = 10.0 + k
    expected = {
        "config": str(tmp_path / "demo.yaml"),
        "split": "test",
        "rows": [{"variant": v} for v in variants],
        "date": day,
        "seed": 5,
        "plan": dict(
            users=6,
            variants=variants,
            split="test",
            eval_examples=4,
            eval_batch_size=4,
            max_new_tokens=8,
            effect_examples=3,
            baseline="context_sft",
            resamples=2000,
        ),
        "reading": "READING",
        "effect_report": str(absolute / "seed5" / effect_variant / "effects" / "index.html"),
        "training_curves": str(absolute / "training_curves.png"),
        "seconds": {**stages, "total": sum(stages.values()) + 0.5},
    }
    assert results == expected
    assert json.loads((out / "results.json").read_text()) == expected
    assert (out / "results.md").read_text() == (
        f"# NextQuill demo ({day}, seed 5, {tmp_path / 'demo.yaml'})\n\nTABLE\n\n"
        "The first 4 test examples; greedy decoding, repetition penalty 1.2. pref. recall: share of the "
        "user's signature words in the generation. pref. NLL: teacher-forced NLL of the ground-truth "
        "preference tokens with the history (first 3 examples). DCE AUROC: how well DCE separates the "
        "preference tokens from context and noise tokens (0.5 = chance).\n\n"
        "Reading: READING\n\n"
        f"Effect report: {expected['effect_report']}\n"
        f"Training curves: {expected['training_curves']}\n\n"
        "STUDY\n"
    )


def test_a_demo_whose_model_does_not_end_on_the_tokenizers_eos_is_refused_before_preparing(
    tmp_path, monkeypatch
):
    """The demo tokenizer's EOS is id 0 (`demo.tokenizer`); a base whose eos_token_ids leave it out is refused
    by name, before any data is prepared."""
    raw = yaml.safe_load(tiny_demo_config(tmp_path / "demo.yaml").read_text())
    raw["pretrain"]["model"]["overrides"]["eos_token_ids"] = [1]
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_demo_config(tmp_path / "demo.yaml", tmp_path / "out", seed=0)
    calls = {}
    _stub_stages(monkeypatch, calls, [0.0])
    with pytest.raises(ConfigError) as e:
        run_demo(cfg, echo=lambda _: None)
    assert str(e.value) == (
        f"{tmp_path / 'demo.yaml'}: pretrain.model.overrides.eos_token_ids [1] must hold the demo "
        "tokenizer's EOS id 0"
    )
    assert "synth" in calls and "prepare" not in calls
