"""The evaluation job on a real (tiny) training run, the session's `trained_run` (tests/conftest.py):
records -> `data prepare` -> 2 training steps of a tiny random model (the TRAIN loop, variant context_sft) ->
evaluate. Checked against independent paths: the checkpoint exported by `nextquill-jax export` and loaded
with `load_pretrained`, generation from that model, float64 cross-entropies from its logits, and
`metrics.score_predictions` on the written predictions."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from nextquill_jax.cli import main
from nextquill_jax.config import load_config
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.prepare import load_fast_tokenizer
from nextquill_jax.data.prepared_split import PreparedSplit, TokenizedExample, write_split
from nextquill_jax.eval import evaluate as evaluate_module
from nextquill_jax.eval.evaluate import choose_stream, evaluate, replacing_line
from nextquill_jax.eval.text_metrics import score_predictions
from nextquill_jax.models import load_pretrained
from nextquill_jax.models.generate import GenerationConfig, generate
from tests.conftest import as_saved_with
from tests.shared import TINY_EOS_ID

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py

GEN = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory):
    """A copy of the session's trained run (evaluation writes into its workdir), and the model of its last
    checkpoint loaded from the export."""
    workdir = tmp_path_factory.mktemp("eval_run") / "run"
    shutil.copytree(trained_run.workdir, workdir)
    return workdir, load_pretrained(trained_run.exported), trained_run.exported


@pytest.fixture(scope="module")
def evaluated(run):
    workdir, _, _ = run
    metrics = evaluate(workdir, "test", generation=GEN, echo=lambda _: None)
    out = workdir / "eval" / "test"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, predictions, json.loads((out / "metrics.json").read_text())


def test_predictions_file_pairs_every_example(run, evaluated):
    workdir, _, _ = run
    _, predictions, _ = evaluated
    rendered = [json.loads(line) for line in (workdir / "prepared" / "test.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rendered) == 5
    for p, r in zip(predictions, rendered, strict=True):
        assert {"user_id", "prompt", "prediction", "reference", "category"} <= set(p)
        assert (p["user_id"], p["reference"], p["category"], p["id"]) == (
            r["user_id"],
            r["target"],
            r["category"],
            r["id"],
        )
        assert p["prompt"] == r["prompt_with_history"]  # context_sft trains with the history
        assert p["stopped_by"] in ("eos", "max_new_tokens")


def test_predictions_equal_generation_from_the_exported_checkpoint(run, evaluated):
    workdir, model, exported = run
    _, predictions, saved = evaluated
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    split = PreparedSplit(workdir / "prepared", "test")
    prompts = [split[i]["prompt_with"].tolist() for i in range(len(split))]
    ids = generate(model, prompts, GEN, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=0, batch_size=8)
    assert [p["prediction"] for p in predictions] == [
        tokenizer.decode(x, skip_special_tokens=True) for x in ids
    ]
    assert saved["stopped_at_max_new_tokens"] == sum(len(x) == GEN.max_new_tokens for x in ids)
    assert saved["generation"]["repetition_penalty"] == 1.2 and saved["generation"]["do_sample"] is False


def test_the_without_history_prompt_and_max_examples_reach_generation_and_the_losses(
    run, tmp_path, monkeypatch
):
    """`prompt="without"` generates from each example's prompt without history (only the with-history path
    was evaluated; the tiny model's greedy text is often the same from either prompt, so the prompts decoding
    receives are compared, with the prepared split's), and `max_examples` 2 limits the losses too
    (documented: generation and loss alike), against the first two examples' target tokens."""
    import nextquill_jax.eval.evaluate as evaluate_module

    workdir, _, _ = run
    decoded = []
    generate_ids = evaluate_module.generate
    monkeypatch.setattr(
        evaluate_module,
        "generate",
        lambda model, prompts, *a, **kw: decoded.extend(prompts) or generate_ids(model, prompts, *a, **kw),
    )
    metrics = evaluate(
        workdir,
        "test",
        generation=GEN,
        prompt="without",
        max_examples=2,
        out_dir=tmp_path,
        echo=lambda _: None,
    )
    split = PreparedSplit(workdir / "prepared", "test")
    assert decoded == [split[i]["prompt_without"].tolist() for i in range(2)]
    assert decoded != [split[i]["prompt_with"].tolist() for i in range(2)]
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    rendered = [json.loads(line) for line in (workdir / "prepared" / "test.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in predictions] == [r["prompt_without_history"] for r in rendered[:2]]
    assert metrics["loss"]["tokens"] == sum(len(split[i]["target"]) for i in range(2))


def test_generation_also_stops_at_an_end_token_of_the_models_own_config(run, evaluated, tmp_path):
    """The tiny run's end token is its data's (`stop_token_ids` that one id). Given a model config whose
    end tokens name another id X, which the first example's generation holds at position k, that example's
    prediction is its generation cut before X, stopped by it ("eos"), and metrics.json lists both ids."""
    from nextquill_jax.train.workdir import restore_model

    workdir, model, _ = run
    _, _, saved = evaluated
    assert saved["stop_token_ids"] == [saved["eos_token_id"]] == [TINY_EOS_ID]
    long = dataclasses.replace(GEN, max_new_tokens=12)
    prompt = PreparedSplit(workdir / "prepared", "test")[0]["prompt_with"].tolist()
    ids = generate(model, [prompt], long, eos_token_ids=[TINY_EOS_ID], pad_token_id=0)[0]
    assert len(ids) >= 3, "the first example's generation is too short to cut"
    other = ids[2]
    cut = ids[: ids.index(other)]
    loaded = restore_model(workdir)
    loaded.model.cfg = dataclasses.replace(loaded.model.cfg, eos_token_ids=(other,))
    metrics = evaluate(
        workdir, "test", generation=long, max_examples=1, loaded=loaded, out_dir=tmp_path, echo=lambda _: None
    )
    written = json.loads((tmp_path / "predictions.jsonl").read_text())
    tokenizer = load_fast_tokenizer(load_config(workdir / "config.yaml").data.tokenizer)
    assert written["prediction"] == tokenizer.decode(cut, skip_special_tokens=True)
    assert written["stopped_by"] == "eos" and metrics["stop_token_ids"] == [TINY_EOS_ID, other]


def test_the_export_has_its_tokenizers_special_ids_and_loads_in_transformers_without_a_warning(run):
    _, _, exported = run
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(exported)
    written = json.loads((exported / "config.json").read_text())
    assert written["eos_token_id"] == written["bos_token_id"] == tokenizer.eos_token_id == TINY_EOS_ID
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    hf_logging.warning_once.cache_clear()  # a warning given earlier in the session would not be given again
    hf_logging.get_logger().addHandler(handler)
    try:
        AutoModelForCausalLM.from_pretrained(exported)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert [w for w in warnings if "token_id" in w] == []


def test_metrics_equal_score_predictions_on_the_written_predictions(evaluated):
    metrics, predictions, saved = evaluated
    expected = score_predictions(
        [p["prediction"] for p in predictions],
        [p["reference"] for p in predictions],
        [p["category"] for p in predictions],
    )
    for key in ("overall", "per_category", "meteor_wordnet", "settings"):
        assert saved[key] == expected[key]
    assert set(saved["per_category"]) == {"notes", "posts"}
    assert saved["step"] == 2 and saved["examples"] == 5 and saved["prompt"] == "prompt_with_history"
    assert metrics["overall"] == saved["overall"]


def test_loss_terms_equal_float64_cross_entropy_of_the_exported_model(run, evaluated):
    """ce_with / ce_without: mean CE over all target tokens, each example alone in a row of the exported
    model's input (right-padded, float64 log-softmax); the run's own loss (context_sft, computed through
    LOSSES with its own config) equals the value derived from the terms."""
    workdir, model, _ = run
    _, _, saved = evaluated
    examples = [PreparedSplit(workdir / "prepared", "test")[i] for i in range(5)]
    for stream, key in (("prompt_with", "ce_with"), ("prompt_without", "ce_without")):
        ids = np.zeros((len(examples), 160), np.int32)  # one example per row, right-padded
        for row, ex in enumerate(examples):
            seq = np.concatenate([ex[stream], ex["target"]])
            ids[row, : len(seq)] = seq
        logits = np.asarray(model(ids), np.float64)  # [5, 160, V]
        nll = []
        for row, ex in enumerate(examples):
            start = len(ex[stream]) - 1  # the position that predicts the first target token
            z = logits[row, start : start + len(ex["target"])]  # [L, V]
            shifted = z - z.max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            nll.extend(-logp[np.arange(len(ex["target"])), ex["target"]])
        assert saved["loss"]["terms"][key] == pytest.approx(np.mean(nll), rel=1e-5), key
    count = len(nll)
    assert saved["loss"]["tokens"] == count
    assert type(saved["loss"]["tokens"]) is int  # a count: 154, not 154.0
    assert saved["loss"]["variant"] == "context_sft"
    assert saved["loss"]["loss"] == pytest.approx(saved["loss"]["variants"]["context_sft"], rel=1e-6)


def test_cli_evaluates_a_checkpoint_and_a_model_path(run, evaluated, tmp_path, capsys):
    workdir, _, exported = run
    _, predictions, _ = evaluated
    args = [
        "evaluate",
        "--workdir",
        str(workdir),
        "--split",
        "test",
        "--max-examples",
        "2",
        "--max-new-tokens",
        "6",
    ]
    assert main([*args, "--out", str(tmp_path / "ckpt")]) == 0
    from_cli = [
        json.loads(line) for line in (tmp_path / "ckpt" / "predictions.jsonl").read_text().splitlines()
    ]
    assert from_cli == predictions[:2]
    assert json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["examples"] == 2

    assert main([*args, "--model", str(exported)]) == 0  # the same weights through load_pretrained
    base = workdir / "eval" / f"test-{exported.name}"
    from_path = [json.loads(line) for line in (base / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in from_path] == [p["prediction"] for p in predictions[:2]]
    assert json.loads((base / "metrics.json").read_text())["step"] is None

    capsys.readouterr()
    assert main([*args, "--step", "99"]) == 1
    assert "complete ones: [2]" in capsys.readouterr().err


def test_max_new_tokens_0_measures_the_same_losses_and_no_text(run, evaluated, tmp_path, monkeypatch, capsys):
    """`--max-new-tokens 0`: nothing is decoded; the loss terms equal those of the evaluation that generated
    (`evaluated`, whose terms the float64 test above ties to the exported model), and metrics.json holds no
    text metric, not even 0; the stale predictions.jsonl of that evaluation in --out is deleted."""
    from nextquill_jax.eval import evaluate as evaluate_module

    workdir, _, _ = run
    _, _, generated = evaluated
    out = tmp_path / "out"
    shutil.copytree(workdir / "eval" / "test", out)
    monkeypatch.setattr(evaluate_module, "generate", lambda *a, **k: pytest.fail("decoded"))
    capsys.readouterr()
    assert main(["evaluate", "--workdir", str(workdir), "--max-new-tokens", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["loss"] == generated["loss"]
    assert saved["examples"] == generated["examples"] == 5 and saved["step"] == 2
    assert saved["generation"] == {**generated["generation"], "max_new_tokens": 0}
    text_keys = {"overall", "per_category", "meteor_wordnet", "meteor_wordnet_source", "warnings", "settings"}
    assert text_keys <= set(generated)
    assert set(saved) == set(generated) - text_keys - {"stopped_at_max_new_tokens"}
    assert not (out / "predictions.jsonl").exists()
    assert (
        printed[-1] == f"test: generation skipped (max_new_tokens 0): losses only, no text metrics -> {out}"
    )
    assert not any("stopped at max_new_tokens" in line or "generated" in line for line in printed), printed


def test_data_evaluates_a_run_whose_prepared_data_moved(trained_run, evaluated, tmp_path, capsys):
    """A run's prepared data moved away: evaluate fails naming the run's data and `--data`, and `--data`
    at the new place gives the predictions of the evaluation in place; metrics.json records the data."""
    _, predictions, _ = evaluated
    workdir, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(trained_run.workdir, workdir)
    (workdir / "prepared").rename(moved)
    args = ["evaluate", "--workdir", str(workdir), "--max-examples", "2", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{workdir}'s data {workdir / 'prepared'} does not exist. Fix: pass --data with a directory" in err
    assert main([*args, "--data", str(moved)]) == 0
    out = workdir / "eval" / "test"
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert written == predictions[:2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == str(moved) and metrics["examples"] == 2
    assert "note:" not in capsys.readouterr().out  # the same tokenizer the run's data was prepared with


def test_data_that_does_not_hold_the_split_is_refused_before_a_model_is_loaded(
    trained_run, tmp_path, monkeypatch, capsys
):
    from nextquill_jax.eval import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "restore_model", lambda *a, **k: pytest.fail("model loaded"))
    args = ["evaluate", "--workdir", str(trained_run.workdir), "--out", str(tmp_path / "out")]
    assert main([*args, "--data", str(tmp_path / "nowhere")]) == 1
    assert f"--data {tmp_path / 'nowhere'} does not exist. Fix: pass --data" in capsys.readouterr().err
    partial = tmp_path / "partial"
    shutil.copytree(trained_run.workdir / "prepared", partial)
    (partial / "summary.json").unlink()  # an interrupted `data prepare`
    assert main([*args, "--data", str(partial)]) == 1
    assert f"--data {partial} was not finished" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_data_prepared_with_another_tokenizer_is_noted_and_decoded_with_the_runs(
    trained_run, evaluated, tmp_path, monkeypatch
):
    """The data's summary.json names the tokenizer its ids came from and records its content's digest: where
    that is another tokenizer's, a note names both; the same tokenizer at another path (a copy, or one that
    moved, its recorded path gone) is no other. The run's tokenizer decodes, as the model reads the ids as
    its own. A summary of an earlier version, without the digest, is judged by its path: a copy elsewhere
    is noted, the same path spelt relative to the current directory (as the demo recorded it) is not."""
    _, predictions, _ = evaluated
    data, tokenizer = tmp_path / "data", tmp_path / "tokenizer_copy"
    shutil.copytree(trained_run.workdir / "prepared", data)
    summary = json.loads((data / "summary.json").read_text())
    assert (
        summary["tokenizer_sha256"]
        == hashlib.sha256(
            load_fast_tokenizer(summary["tokenizer"]).backend_tokenizer.to_str().encode()
        ).hexdigest()
    )
    shutil.copytree(summary["tokenizer"], tokenizer)
    lines, out = [], tmp_path / "out"
    on_data = functools.partial(
        evaluate, trained_run.workdir, "test", out_dir=out, max_examples=2, generation=GEN, data_dir=data
    )
    notes = lambda: [line for line in lines if line.startswith("note:")]

    def evaluated_with(**recorded) -> list[str]:
        (data / "summary.json").write_text(json.dumps({**summary, **recorded}))
        lines.clear()
        on_data(echo=lines.append)
        return notes()

    assert evaluated_with(tokenizer=str(tokenizer)) == []  # the same content elsewhere
    assert evaluated_with(tokenizer=str(tmp_path / "gone")) == []  # ... where it was before it moved
    other = evaluated_with(tokenizer="smollm2", tokenizer_sha256="0" * 64)  # another tokenizer's content
    assert other == [
        f"note: {data} was prepared with the tokenizer 'smollm2', the run's data with "
        f"{summary['tokenizer']!r}: the model reads these ids as its own tokenizer's, which decodes them "
        "(the same vocabulary at another path is fine; another vocabulary gives meaningless results)"
    ]
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert written == predictions[:2]

    del summary["tokenizer_sha256"]  # an earlier version's summary: judged by the path it names
    shutil.rmtree(tokenizer)  # the run's tokenizer decodes: the data's need not be there
    assert len(evaluated_with(tokenizer=str(tokenizer))) == 1
    original = Path(summary["tokenizer"])
    monkeypatch.chdir(original.parent.parent)
    assert evaluated_with(tokenizer=str(original.relative_to(original.parent.parent))) == []
    monkeypatch.chdir(tmp_path)  # relative to a directory unknown here: cannot be told apart, not reported
    assert evaluated_with(tokenizer=str(original.relative_to(original.parent.parent))) == []
    assert "prepared with the tokenizer 'smollm2'" in evaluated_with(tokenizer="smollm2")[0]


def test_a_run_whose_tokenizer_moved_is_evaluated_naming_its_new_place_with_tokenizer(
    run, evaluated, tmp_path, capsys, monkeypatch
):
    """The checkpoint's config names the run's tokenizer; once that path is gone, `evaluate` failed with no
    way to name where it went. The error now names `--tokenizer`, which decodes as the run's own did: the
    predictions equal the evaluation before the move, and metrics.json records it."""
    from nextquill_jax.train.workdir import restore_model

    workdir, _, _ = run
    _, predictions, saved = evaluated
    moved = tmp_path / "moved_tok"
    shutil.copytree(saved["tokenizer"], moved)
    gone = str(tmp_path / "gone_tok")
    loaded = restore_model(workdir)  # its config as if the run's tokenizer had been at `gone`
    config = dataclasses.replace(loaded.config, data=dataclasses.replace(loaded.config.data, tokenizer=gone))
    loaded = dataclasses.replace(loaded, config=config)
    at = functools.partial(evaluate, workdir, "test", generation=GEN, loaded=loaded, echo=lambda _: None)
    with pytest.raises(ValueError) as e:
        at(out_dir=tmp_path / "refused")
    assert str(e.value).startswith(f"data.tokenizer: no tokenizer {gone!r}: ")
    assert str(e.value).endswith(
        "; it is the run's tokenizer (data.tokenizer of the run's config): where it moved, pass --tokenizer "
        "with its new place"
    )
    with pytest.raises(ValueError) as e:  # compare, which has no such flag
        at(out_dir=tmp_path / "refused", tokenizer_setting=None)
    assert str(e.value).endswith(
        "where it moved, put it back, or a symbolic link to its new place at that path"
    )
    (tmp_path / "gone_tok").mkdir()  # there, but holding no tokenizer: nothing moved, no such fix
    with pytest.raises(ValueError) as e:
        at(out_dir=tmp_path / "refused")
    assert str(e.value).startswith("data.tokenizer: ") and "where it moved" not in str(e.value)
    monkeypatch.chdir(tmp_path)  # a relative --tokenizer is recorded absolute
    metrics = at(out_dir=tmp_path / "out", tokenizer="moved_tok")
    written = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert written == predictions and metrics["tokenizer"] == str(moved)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["tokenizer"] == str(moved)

    args = ["evaluate", "--workdir", str(workdir), "--out", str(tmp_path / "cli"), "--max-new-tokens", "6"]

    def never_restored(*args, **kwargs):  # a typo is named before the checkpoint is read
        raise AssertionError("restored before --tokenizer was loaded")

    monkeypatch.setattr(evaluate_module, "restore_model", never_restored)
    assert main([*args, "--tokenizer", str(tmp_path / "nowhere")]) == 1
    assert f"error: --tokenizer: no tokenizer {str(tmp_path / 'nowhere')!r}: " in capsys.readouterr().err


def test_an_evaluation_says_which_earlier_results_it_replaces(run, evaluated, tmp_path):
    workdir, _, _ = run
    _, _, full = evaluated
    out = tmp_path / "out"
    assert replacing_line(out, full) is None  # nothing there yet: no line
    shutil.copytree(workdir / "eval" / "test", out)
    lines = []
    evaluate(workdir, "test", out_dir=out, max_examples=1, generation=GEN, echo=lines.append)
    assert (
        f"replacing {out / 'metrics.json'} (step 2, {full['examples']} examples) with step 2, 1 example; "
        "pass --out DIR to keep both"
    ) in lines
    assert any(line.startswith("evaluating ") and " on 1 test example (" in line for line in lines), lines
    (out / "metrics.json").unlink()  # only predictions left: the line names that file
    assert replacing_line(out, full) == (
        f"replacing {out / 'predictions.jsonl'} with step 2, {full['examples']} examples; pass --out DIR to "
        "keep both"
    )
    # No advice where the caller has no --out (compare: `keep_hint=None`).
    assert replacing_line(out, full, None) == f"replacing {out / 'predictions.jsonl'} with step 2, " + (
        f"{full['examples']} examples"
    )


def test_an_evaluation_that_generates_nothing_says_it_deletes_the_earlier_predictions(
    run, evaluated, tmp_path, monkeypatch
):
    """`--max-new-tokens 0` deletes an earlier predictions.jsonl (it would stand beside metrics that measured
    no text): the replacing line must say so, not only name metrics.json."""
    from nextquill_jax.eval import evaluate as evaluate_module

    workdir, _, _ = run
    _, _, full = evaluated
    out = tmp_path / "out"
    shutil.copytree(workdir / "eval" / "test", out)
    monkeypatch.setattr(evaluate_module, "generate", lambda *a, **k: pytest.fail("decoded"))
    lines = []
    loss_only = dataclasses.replace(GEN, max_new_tokens=0)
    evaluate(workdir, "test", out_dir=out, max_examples=2, generation=loss_only, echo=lines.append)
    assert (
        f"replacing {out / 'metrics.json'} (step 2, {full['examples']} examples) with step 2, 2 examples and "
        f"deleting {out / 'predictions.jsonl'} (max_new_tokens 0 writes no predictions); pass --out DIR to "
        "keep both"
    ) in lines, lines
    assert not (out / "predictions.jsonl").exists()
    # Predictions alone (an evaluation killed before its metrics.json): the line names their deletion.
    shutil.copy(workdir / "eval" / "test" / "predictions.jsonl", out)
    (out / "metrics.json").unlink()
    assert replacing_line(out, {**full, "generation": {**full["generation"], "max_new_tokens": 0}}) == (
        f"deleting {out / 'predictions.jsonl'}: this evaluation (step 2, {full['examples']} examples) has "
        "max_new_tokens 0 and writes none; pass --out DIR to keep both"
    )
    (out / "predictions.jsonl").unlink()  # metrics alone: nothing is deleted beyond what is replaced
    (out / "metrics.json").write_text(json.dumps(full))
    assert "deleting" not in replacing_line(out, {**full, "generation": {"max_new_tokens": 0}})


def test_an_evaluation_cut_short_leaves_no_earlier_metrics_beside_its_predictions(
    run, evaluated, tmp_path, monkeypatch
):
    """metrics.json marks a finished evaluation: a kill after the new predictions are written must not leave
    the earlier run's metrics.json to stand for them."""
    from nextquill_jax.eval import evaluate as evaluate_module

    workdir, _, _ = run
    out = tmp_path / "out"
    shutil.copytree(workdir / "eval" / "test", out)
    real = evaluate_module.write_text_atomic

    def killed_at_metrics(path, text):
        if path.name == "metrics.json":
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(evaluate_module, "write_text_atomic", killed_at_metrics)
    with pytest.raises(KeyboardInterrupt):
        evaluate(workdir, "test", out_dir=out, max_examples=1, generation=GEN, echo=lambda _: None)
    assert not (out / "metrics.json").exists()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1


def test_a_batch_size_below_1_is_refused_before_a_model_is_loaded(tmp_path):
    # Not a workdir: loading a model first would raise FileNotFoundError instead.
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        evaluate(tmp_path / "no_run", "test", batch_size=0)


def test_a_decoding_override_out_of_range_is_refused_before_a_model_is_loaded(tmp_path):
    # Not a workdir: loading a model first would raise FileNotFoundError instead.
    with pytest.raises(ValueError) as e:
        evaluate(tmp_path / "no_run", "test", generation_overrides={"temperature": 0.0})
    assert str(e.value) == (
        "GenerationConfig.temperature must be > 0, got 0.0; for greedy decoding set do_sample=False"
    )


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        ({"generation_overrides": {"max_new_tokenz": 3}},
         "generation_overrides: no GenerationConfig field max_new_tokenz; its fields: max_new_tokens, "),
        ({"generation_overrides": {"max_new_tokens": 3}, "generation": GenerationConfig()},
         "evaluate: pass `generation` (the whole decoding) or `generation_overrides` (fields replacing the "
         "run's eval.generation), not both"),
    ],
)  # fmt: skip
def test_a_decoding_override_that_cannot_apply_is_refused_before_a_model_is_loaded(tmp_path, arguments, said):
    """A misspelt field was a TypeError from GenerationConfig; overrides beside `generation` were ignored."""
    with pytest.raises(ValueError) as e:
        evaluate(tmp_path / "no_run", "test", **arguments)
    assert str(e.value).startswith(said)


def test_effects_names_a_low_flag_above_the_runs_high(trained_run, tmp_path, capsys):
    """--low alone against the run's loss.high (0.8), read from its config.yaml before the restore (and from
    the restored checkpoint's config after it): its flag named, where LossConfig's field names were."""
    out = tmp_path / "report"
    assert main(["effects", "--workdir", str(trained_run.workdir), "--low", "0.85", "--out", str(out)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --low 0.85 is above the run's loss.high 0.8: preference-bearing tokens must not weigh less "
        "than the others. Fix: pass --high too, or a --low <= 0.8"
    )
    assert not (out / "summary.json").exists()


def test_a_batch_size_that_does_not_split_over_the_batch_shards_is_refused_before_the_loss_pass(
    trained_run, tmp_path, monkeypatch
):
    """As on a mesh of 4 batch shards (data x fsdp): generation would refuse --batch-size 3, after the loss
    pass over the whole split."""
    from nextquill_jax.eval import evaluate as module

    monkeypatch.setattr(module, "batch_shard_count", lambda mesh: 4)
    monkeypatch.setattr(module, "split_losses", lambda *a: pytest.fail("ran the loss pass"))
    with pytest.raises(
        ValueError, match=r"^--batch-size 3 is not a multiple of the 4 batch shards of the mesh"
    ):
        evaluate(trained_run.workdir, "test", batch_size=3, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_prompt_batch_size_is_not_checked_against_the_mesh_when_nothing_is_generated(
    trained_run, tmp_path, monkeypatch
):
    """With `max_new_tokens` 0 no prompt is decoded, so a --batch-size the batch shards would refuse is
    unused, not an error: the losses are evaluated as with a fitting one."""
    from nextquill_jax.eval import evaluate as module

    losses_only = {"max_new_tokens": 0}
    fitting = evaluate(trained_run.workdir, "test", generation_overrides=losses_only, out_dir=tmp_path / "a")
    monkeypatch.setattr(module, "batch_shard_count", lambda mesh: 4)
    metrics = evaluate(
        trained_run.workdir, "test", batch_size=3, generation_overrides=losses_only, out_dir=tmp_path / "b"
    )
    assert metrics["loss"] == fitting["loss"] and "overall" not in metrics


def test_metrics_json_records_the_runs_loss_settings_and_weighting_or_null(trained_run, tmp_path):
    """metrics.json's `loss` names the `loss.weighting` its weighted terms (loss_n, the variants table) were
    computed with: null for the paper's λ / ε (the trained run), the function's name for a run that sets one
    (the same checkpoint under a nextquill config with `tests.loss.custom_weighting:soft_weights`)."""
    from nextquill_jax.train.workdir import restore_model

    soft = "tests.loss.custom_weighting:soft_weights"
    loaded = restore_model(trained_run.workdir)
    weighted_loss = dataclasses.replace(loaded.config.loss, variant="nextquill", weighting=soft)
    # as `restore_model` finds it when the module changed since the checkpoint (tests/train/test_resume.py)
    note = "warning: loss.weighting tests.loss.custom_weighting:soft_weights: its module ... has changed"
    weighted = dataclasses.replace(
        loaded, config=dataclasses.replace(loaded.config, loss=weighted_loss), weighting_note=note
    )
    saved, printed = {}, {}
    for name, model in (("paper", loaded), ("soft", weighted)):
        out = tmp_path / name
        printed[name] = []
        evaluate(
            trained_run.workdir,
            "test",
            loaded=model,
            generation_overrides={"max_new_tokens": 0},
            out_dir=out,
            echo=printed[name].append,
        )
        saved[name] = json.loads((out / "metrics.json").read_text())["loss"]
    assert printed["soft"][0] == note and note not in printed["paper"]  # said before the evaluation runs
    assert saved["paper"]["weighting"] is None and saved["soft"]["weighting"] == soft
    # and which code was behind the name: the SHA-256 of the function's module file (null without one)
    module = Path(__file__).parents[1] / "loss" / "custom_weighting.py"
    assert saved["paper"]["weighting_sha256"] is None
    assert saved["soft"]["weighting_sha256"] == hashlib.sha256(module.read_bytes()).hexdigest()
    assert saved["soft"]["terms"]["loss_n"] != saved["paper"]["terms"]["loss_n"]  # the weighting took effect
    # The run's α, δ, λ, ε beside it, as its config.yaml has them; α is the one in the variants table.
    written = load_config(trained_run.workdir / "config.yaml").loss
    for key in ("alpha", "threshold", "high", "low"):
        assert saved["paper"][key] == getattr(written, key), key
    terms, variants = saved["paper"]["terms"], saved["paper"]["variants"]
    expected = terms["loss_n"] + saved["paper"]["alpha"] * terms["loss_p"]
    assert abs(variants["nextquill"] - expected) <= 1e-6 * abs(expected)


def test_prompt_choice_follows_the_variant(run):
    workdir, _, _ = run
    cfg = load_config(workdir / "config.yaml")
    assert choose_stream(cfg, "auto") == "with"
    assert choose_stream(load_config(workdir / "config.yaml", ["loss.variant=sft"]), "auto") == "without"
    assert choose_stream(cfg, "without") == "without"
    with pytest.raises(ValueError, match="prompt must be"):
        choose_stream(cfg, "both")


def test_a_hint_names_generations_that_run_out_or_repeat_one_token():
    from nextquill_jax.eval.evaluate import generation_hint

    healthy = [[5, 6, 7, 2], [8, 9, 2], [5, 7, 9, 11, 12, 13]]
    assert generation_hint(healthy, max_new_tokens=6) is None
    stuck = [[4] * 6, [4, 4, 4, 4, 4, 9], [5, 6, 2]]
    hint = generation_hint(stuck, max_new_tokens=6)
    assert hint is not None and "2/3 generations stopped at max_new_tokens (6)" in hint
    assert "2/3 repeat one token" in hint and "(raise --max-new-tokens)" in hint
    # References of at most 5 tokens: a limit of 6 was not what cut them short.
    hint = generation_hint(stuck, max_new_tokens=6, longest_reference=5)
    assert "max_new_tokens already exceeds the longest reference (5 tokens)" in hint
    assert "raise --max-new-tokens" not in hint
    assert "raise --max-new-tokens" in generation_hint(stuck, max_new_tokens=6, longest_reference=6)
    # `compare` has no --max-new-tokens: its hint names its key.
    hint = generation_hint(stuck, max_new_tokens=6, setting="compare.max_new_tokens")
    assert "(raise compare.max_new_tokens)" in hint and "--max-new-tokens" not in hint
    # Over 80% of its length, not 80%: 4 of 5 tokens alike is no repetition (by hand).
    assert generation_hint([[4, 4, 4, 4, 9]] * 3, max_new_tokens=10) is None
    assert generation_hint([[4, 4, 4, 4, 4, 9]] * 3, max_new_tokens=10) is not None


def test_split_losses_raise_a_too_small_cudnn_max_segments_of_model_and_reference_to_the_split_rows(
    tmp_path, monkeypatch, write_random_data, write_config, tiny_config
):
    """A model whose config runs cuDNN's packed attention with at most M=1 example per row (as a run trained
    on unpacked rows records; the private API emulated on CPU) is evaluated on a split that packs more, with
    itself as the frozen reference model of `dce: fixed` (as a workdir reference keeps its saved M): the
    losses are finite and equal those of the same parameters with a bound that holds (M=8), where without
    raising M, the model's or the reference's, the rows over it would make them NaN under jit."""
    import jax
    from flax import nnx
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from nextquill_jax.data.pipeline import BatchPipeline
    from nextquill_jax.eval.evaluate import split_losses
    from nextquill_jax.models import attention
    from nextquill_jax.train import model_setup
    from nextquill_jax.train.setup import planned_examples_per_row
    from nextquill_jax.train.workdir import LoadedModel, build_mesh
    from tests.models.cudnn_emulation import emulated_packed_attention

    monkeypatch.setattr(
        fused, "dot_product_attention", emulated_packed_attention(kv_offsets_use_kv_heads=True)
    )
    monkeypatch.setattr(attention, "check_attention_backend", lambda impl: None)
    data = write_random_data(tmp_path / "data", train=8, val=8)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    split = PreparedSplit(data, "val")

    def losses(bound: int) -> dict:
        cudnn = ["model.attention_impl=cudnn", "model.compute_dtype=bfloat16"]
        cfg = load_config(path, [*cudnn, f"model.cudnn_max_segments={bound}", "loss.dce=fixed"])
        mesh = build_mesh(cfg)
        graphdef, params = model_setup.load_params(cfg.model, mesh, seed=0)  # the same random parameters
        loaded = LoadedModel(nnx.merge(graphdef, params), cfg, mesh, None, "tiny")
        assert loaded.model.cfg.cudnn_max_segments == bound
        with jax.set_mesh(mesh):
            return split_losses(loaded, split, len(split), reference=(graphdef, params))

    cfg = load_config(path)
    batching = dataclasses.replace(cfg.data.batching, shuffle=False, num_epochs=1, drop_remainder=False)
    most, _ = planned_examples_per_row(BatchPipeline(split, batching))  # as split_losses batches the split
    assert 1 < most < 8  # the evaluated rows hold more examples than M=1, fewer than M=8
    small, large = losses(1), losses(8)
    # The effects are the reference's DCE statistics: a NaN DCE would only shift the loss's weights.
    values = lambda r: [r["loss"], *r["terms"].values(), *r["variants"].values(), *r["effects"].values()]
    assert all(np.isfinite(values(small)))
    np.testing.assert_allclose(values(small), values(large), rtol=1e-5)
    assert small["tokens"] == large["tokens"]


def test_a_run_saved_with_an_attention_this_backend_lacks_is_read_with_xla(trained_run, tmp_path, capsys):
    """A GPU run's checkpoint (model.attention_impl: cudnn in bfloat16, cuDNN's packed mode with at most 1
    example per row) evaluated on CPU: read with `xla` and a note naming the saved setting, its predictions
    and loss equal those of the same checkpoint saved with `xla`. It was refused after the restore, with a
    fix no flag could apply. Training such a config still refuses it (tests/test_config.py)."""
    from nextquill_jax.eval.evaluate import load_model_path
    from nextquill_jax.train.workdir import initial_model

    workdirs = {}
    for impl, segments in (("xla", None), ("cudnn", 1)):
        workdirs[impl] = tmp_path / impl
        shutil.copytree(trained_run.workdir, workdirs[impl])
        as_saved_with(
            workdirs[impl], compute_dtype="bfloat16", attention_impl=impl, cudnn_max_segments=segments
        )
    capsys.readouterr()
    results = {
        impl: evaluate(workdir, "test", generation=GEN, out_dir=workdir / "out", echo=lambda _: None)
        for impl, workdir in workdirs.items()
    }
    checkpoint = workdirs["cudnn"] / "checkpoints" / "2"
    backend = "JAX cannot run on 'cpu'; reading the model with model.attention_impl='xla'"
    same = "the same attention computed blockwise in XLA"
    assert capsys.readouterr().err.splitlines() == [
        f"note: the config saved with checkpoint {checkpoint} sets model.attention_impl='cudnn', which "
        f"{backend} (without its model.cudnn_max_segments: 1), {same}"
    ]
    predictions = {
        impl: (workdir / "out" / "predictions.jsonl").read_text() for impl, workdir in workdirs.items()
    }
    assert predictions["cudnn"] == predictions["xla"] and predictions["xla"].count("\n") == 5
    xla, cudnn = results["xla"]["loss"], results["cudnn"]["loss"]
    assert cudnn["tokens"] == xla["tokens"] > 0
    assert cudnn["loss"] == pytest.approx(xla["loss"], abs=1e-6)
    assert cudnn["terms"] == pytest.approx(xla["terms"], abs=1e-6)

    # The run's untrained model (step 0, from config.yaml) and a --model path run with its settings.
    config_file = workdirs["cudnn"] / "config.yaml"
    note = f"note: {config_file} sets model.attention_impl='cudnn', which {backend} (without its "
    assert initial_model(workdirs["cudnn"]).model.cfg.attention_impl == "xla"
    assert capsys.readouterr().err.startswith(note)
    loaded = load_model_path(workdirs["cudnn"], str(trained_run.exported))
    assert (loaded.model.cfg.attention_impl, loaded.model.cfg.cudnn_max_segments) == ("xla", None)
    assert loaded.config.model.compute_dtype == "bfloat16"
    assert capsys.readouterr().err.startswith(note)


@pytest.mark.parametrize(
    ("param_dtype", "base_dtype", "expected"),
    [("float32", "bfloat16", "bfloat16"), ("bfloat16", "float32", "float32"), ("float32", "nf4", "bfloat16")],
)
def test_a_model_path_beside_a_lora_run_is_stored_as_its_base(
    trained_run, tmp_path, param_dtype, base_dtype, expected
):
    """`evaluate --workdir <LoRA run> --model PATH` loaded PATH in `model.param_dtype`, the adapters' dtype:
    a bfloat16 base (as the run trained on) was read in float32, or a merged export's float32 kernels rounded
    to bfloat16. PATH is stored as the run's frozen base, as the `dce: fixed` reference path is; but a PATH
    whose config.json declares float32 (a merged export of such a run) is read in float32: rounded to
    bfloat16, a small trained update is mostly lost (69% of its RMS in the audit)."""
    from nextquill_jax.eval.evaluate import load_model_path

    workdir = tmp_path / "lora"
    shutil.copytree(trained_run.workdir, workdir)
    as_saved_with(workdir, param_dtype=param_dtype, lora={"rank": 2, "base_dtype": base_dtype})
    base = tmp_path / "declared_bfloat16"
    shutil.copytree(trained_run.exported, base)
    config = json.loads((base / "config.json").read_text())
    assert config["dtype"] == "float32"  # as `export` writes it for the float32 run
    (base / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    for path, want in ((base, expected), (trained_run.exported, "float32")):
        loaded = load_model_path(workdir, str(path))
        dtypes = {str(p.dtype) for p in jax.tree.leaves(nnx.state(loaded.model, nnx.Param))}
        assert dtypes == {want}, path


def test_a_nan_loss_is_written_null_in_metrics_json(run, tmp_path, monkeypatch):
    """A diverged checkpoint's NaN loss: metrics.json stays JSON (null, as metrics.jsonl writes it), where
    `json.dumps` would write a bare NaN; the returned metrics keep the number."""
    from nextquill_jax.eval import evaluate as evaluate_module

    real = evaluate_module.split_losses

    def nan_losses(*args, **kwargs):
        losses = real(*args, **kwargs)
        return {**losses, "loss": float("nan"), "terms": {**losses["terms"], "ce_with": float("inf")}}

    monkeypatch.setattr(evaluate_module, "split_losses", nan_losses)
    workdir, _, _ = run
    out = tmp_path / "out"
    metrics = evaluate(workdir, "test", out_dir=out, max_examples=1, generation=GEN, echo=lambda _: None)

    def not_json(constant: str):
        raise AssertionError(f"metrics.json holds {constant}, which is not JSON")

    saved = json.loads((out / "metrics.json").read_text(), parse_constant=not_json)
    assert saved["loss"]["loss"] is None and saved["loss"]["terms"]["ce_with"] is None
    assert saved["loss"]["terms"]["ce_without"] == metrics["loss"]["terms"]["ce_without"]  # finite: kept
    assert math.isnan(metrics["loss"]["loss"])


def test_a_split_with_ids_outside_the_models_vocabulary_is_refused_before_compiling(
    trained_run, tmp_path, compilations, capsys
):
    """The run's model has vocab_size 704 (model.overrides); a test example holding id 704 (a tokenizer
    larger than the model's) would index past the embedding and make the loss NaN. evaluate (a checkpoint or
    --model) and effects (--workdir or --model) refuse the split before anything is compiled, naming the
    split, the id, the vocab_size and where it comes from, and the fix; nothing is written."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_run.workdir, workdir)
    prepared, exported = workdir / "prepared", trained_run.exported
    meta = json.loads((prepared / "test" / "meta.json").read_text())
    old = PreparedSplit(prepared, "test")
    examples = [{k: np.array(v) for k, v in old[i].items()} for i in range(len(old))]
    examples[1]["target"][0] = 704
    kept = {k: v for k, v in meta.items() if k not in ("num_examples", "fields", "checksums")}
    write_split(prepared, "test", (TokenizedExample(**e) for e in examples), **kept)
    split = re.escape(f"prepared split {prepared / 'test'} (prepared with tokenizer {meta['tokenizer']!r}) ")
    fix = r": ids >= 704 have no embedding .* Fix: set data.tokenizer to the model's own tokenizer .*"
    from_run = rf"\(from model.overrides.vocab_size in the config of {re.escape(str(workdir))}.*\)"

    with pytest.raises(
        ConfigError, match=rf"^{split}holds token id 704, but the model's vocab_size is 704 {from_run}{fix}"
    ):
        evaluate(workdir, "test", generation=GEN, echo=lambda _: None)
    assert compilations == [], "compiled before reporting the config error"
    assert not (workdir / "eval").exists()

    from_model = re.escape(f"(from the config.json or GGUF header of '{exported}')")
    args = ["evaluate", "--workdir", str(workdir), "--split", "test", "--model", str(exported)]
    assert main(args) == 1
    assert re.search(rf"^error: {split}holds token id 704, .* 704 {from_model}{fix}", capsys.readouterr().err)

    out = tmp_path / "effects"
    assert main(["effects", "--workdir", str(workdir), "--split", "test", "--out", str(out)]) == 1
    assert re.search(rf"^error: {split}holds token id 704, .* 704 {from_run}{fix}", capsys.readouterr().err)
    args = [
        "effects",
        "--model",
        str(exported),
        "--data",
        str(prepared),
        "--split",
        "test",
        "--out",
        str(out),
    ]
    assert main(args) == 1
    from_flag = re.escape(f"(from the config.json or GGUF header of --model '{exported}')")
    assert re.search(rf"^error: {split}holds token id 704, .* 704 {from_flag}{fix}", capsys.readouterr().err)
    assert compilations == [], "compiled before reporting the config error"
    assert not (out / "summary.json").exists()


def test_evaluate_as_two_processes_writes_what_one_process_writes(trained_run, programs, tmp_path):
    """`evaluate` run as two hosts (gloo, 4 CPU devices each) on a finished run: each process starts JAX's
    multi-host runtime before anything starts its backend (reading the saved config and opening the
    checkpoints did, and it failed with "jax.distributed.initialize() must be called before any JAX calls");
    its predictions equal one process's (8 devices) and its losses agree to float32 rounding."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_run.workdir, workdir)
    evaluate_into = lambda out: [
        "evaluate", "--workdir", str(workdir), "--split", "test", "--max-new-tokens", "4", "--out",
        str(tmp_path / out),
    ]  # fmt: skip
    programs.finish(programs.start("cli_run.py", *evaluate_into("one"), devices=8, fast_compile=True), 300)
    hosts = [
        programs.start("cli_run.py", *evaluate_into("two"), devices=4, fast_compile=True, env=host)
        for host in programs.hosts(2)
    ]
    for process in hosts:
        programs.finish(process, 300)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "predictions.jsonl").read_bytes() == (one / "predictions.jsonl").read_bytes()

    def losses(out):
        loss = json.loads((out / "metrics.json").read_text())["loss"]
        return {"loss": loss["loss"], **loss["terms"], **loss["variants"]}

    assert losses(two) == pytest.approx(losses(one), rel=1e-5)


def test_a_run_read_on_more_devices_than_its_rows_split_over_gets_the_same_losses(
    trained_run, programs, tmp_path
):
    """A run of 4 rows a batch (here: its step 0, which config.yaml alone gives), read in a process of 8
    devices, where the run's mesh (fsdp -1) spans all 8: the loss pass batched the run's 4 rows, which do not
    split 8 ways, and failed naming a fix `evaluate` cannot take (`data.batching.rows_per_batch`). It now
    pads the batches to 8 rows and measures what one device does with 4."""
    import yaml

    workdir = tmp_path / "run"
    shutil.copytree(trained_run.workdir, workdir, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    saved = yaml.safe_load((workdir / "config.yaml").read_text())
    saved["data"]["batching"]["rows_per_batch"] = 4
    (workdir / "config.yaml").write_text(yaml.safe_dump(saved))
    losses_only = ["--workdir", str(workdir), "--step", "0", "--split", "test", "--max-new-tokens", "0"]
    eight = programs.start(
        "cli_run.py", "evaluate", *losses_only, "--out", str(tmp_path / "eight"), devices=8
    )
    one = evaluate(
        workdir, "test", step=0, generation_overrides={"max_new_tokens": 0}, out_dir=tmp_path / "one"
    )
    programs.finish(eight, 300)
    read = json.loads((tmp_path / "eight" / "metrics.json").read_text())["loss"]
    got = {"loss": read["loss"], **read["terms"], **read["variants"]}
    want = {"loss": one["loss"]["loss"], **one["loss"]["terms"], **one["loss"]["variants"]}
    assert got == pytest.approx(want, rel=1e-5)


def test_a_hint_names_five_alike_tokens_as_repetition():
    """Repetition counts generations of more than 4 tokens (by hand: [4] * 5 is 5 tokens, all alike, over
    80%), and one count over half the generations is enough: no generation here stopped at max_new_tokens
    (10). Mutation that survived before: `len(ids) > 4` -> `> 5`."""
    from nextquill_jax.eval.evaluate import generation_hint

    hint = generation_hint([[4] * 5] * 3, max_new_tokens=10)
    assert hint is not None and "0/3 generations stopped" in hint and "3/3 repeat one token" in hint
    assert generation_hint([[4] * 4] * 3, max_new_tokens=10) is None  # 4 tokens: too short to count


@pytest.mark.parametrize(
    ("setting", "fix"),
    [
        ("--batch-size", "Fix: pass a multiple of 4, such as 4, or leave --batch-size out."),
        (
            "compare.eval_batch_size",
            "Fix: set compare.eval_batch_size to a multiple of 4, such as 4, or null.",
        ),
    ],
)
def test_an_unsplit_batch_message_suggests_the_next_multiple_and_how_to_unset_the_setting(setting, fix):
    """A batch of 3 over 4 shards: the suggestion is ceil(3 / 4) * 4 = 4 (not 0, the floor), and a flag is
    left out where a config key is set to null. Mutations that survived before: the ceiling -> floor
    division, the flag / key branches of the unset advice swapped."""
    from nextquill_jax.eval.evaluate import unsplit_batch_message

    assert unsplit_batch_message(3, 4, {"data": 2, "fsdp": 2}, setting) == (
        f"{setting} 3 is not a multiple of the 4 batch shards of the mesh {{'data': 2, 'fsdp': 2}}, over "
        f"which each batch of prompts is split. {fix}"
    )


def test_the_replacing_line_names_step_0_and_a_metrics_file_that_is_not_an_object(tmp_path):
    """Step 0 (an untrained checkpoint) is a step, not a missing one: "step 0", not the model's name; an
    earlier metrics.json that parses but is not an object (a JSON list) is named without what it held, not
    an AttributeError. Mutations that survived before: `is not None` -> truthiness in `_results_of`,
    AttributeError dropped from the exceptions `replacing_line` catches."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"step": 0, "model": "run", "examples": 3}))
    new = {"step": 0, "model": "run", "examples": 1, "generation": {"max_new_tokens": 6}}
    assert replacing_line(out, new, None) == (
        f"replacing {out / 'metrics.json'} (step 0, 3 examples) with step 0, 1 example"
    )
    (out / "metrics.json").write_text("[1, 2]")
    assert replacing_line(out, new, None) == f"replacing {out / 'metrics.json'} with step 0, 1 example"


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        ({"max_examples": 0}, r"^max_examples must be >= 1, got 0$"),
        ({"loaded": object(), "step": 3}, r"^evaluate: pass `loaded`, or `step` / `model_path` to load a"),
        ({"loaded": object(), "model_path": "m"}, r"^evaluate: pass `loaded`, or `step` / `model_path` to"),
    ],
)
def test_arguments_that_cannot_apply_are_refused_before_a_model_is_loaded(tmp_path, arguments, said):
    """Not a workdir and not a LoadedModel: loading or reading a model first would raise another error.
    Mutations that survived before: `max_examples < 1` -> `< 0`, the `loaded` check's `or` -> `and`."""
    with pytest.raises(ValueError, match=said):
        evaluate(tmp_path / "no_run", "test", **arguments)


def test_examples_without_a_category_are_scored_as_none_beside_the_others():
    """Rows with and without a category: the per-category scores hold "(none)" beside "Books" (the rows
    without one are not dropped, and the categories are not dropped for all). Exact predictions score
    ROUGE-1 1 in both groups. Mutation that survived before: `all(c is None ...)` -> `any(...)` in _scored."""
    rows = [
        {"index": 0, "user_id": "u", "target": "a warm day", "prompt_with_history": "p0"},
        {
            "index": 1,
            "user_id": "v",
            "category": "Books",
            "target": "a cold night",
            "prompt_with_history": "p1",
        },
    ]
    predictions = ["a warm day", "a cold night"]
    scores, lines = evaluate_module._scored(rows, predictions, [[5, 2], [6, 6, 6]], "with", 3)
    assert sorted(scores["per_category"]) == ["(none)", "Books"]
    for group in scores["per_category"].values():
        assert abs(group["rouge1"] - 1.0) <= 1e-9
    written = [json.loads(line) for line in lines]
    assert [w["category"] for w in written] == [None, "Books"]
    assert [w["stopped_by"] for w in written] == ["eos", "max_new_tokens"]  # 2 < 3 tokens, then 3 == 3


def test_a_hint_counts_only_generations_of_exactly_max_new_tokens_as_stopped_there():
    """By hand: three generations of 5 distinct tokens under max_new_tokens 6 ended at their end token, one
    short of the limit: none stopped at it, so no hint; three of 6 tokens did."""
    from nextquill_jax.eval.evaluate import generation_hint

    assert generation_hint([[1, 2, 3, 4, 5]] * 3, max_new_tokens=6) is None
    hint = generation_hint([[1, 2, 3, 4, 5, 6]] * 3, max_new_tokens=6)
    assert hint is not None and "3/3 generations stopped at max_new_tokens (6)" in hint
    assert "0/3 repeat one token" in hint


def test_the_replacing_line_names_the_metrics_beside_predictions_and_the_predictions_a_loss_only_run_deletes(
    tmp_path,
):
    """Both files there: the line names metrics.json with what it held, says the predictions go when nothing
    is generated, and ends with "; " and the advice; predictions alone: the line says they are deleted."""
    out = tmp_path / "out"
    out.mkdir()
    metrics, predictions = out / "metrics.json", out / "predictions.jsonl"
    metrics.write_text(json.dumps({"step": 6, "model": "run", "examples": 4}))
    predictions.write_text("{}\n")
    losses_only = {"step": 7, "model": "run", "examples": 2, "generation": {"max_new_tokens": 0}}
    assert replacing_line(out, losses_only) == (
        f"replacing {metrics} (step 6, 4 examples) with step 7, 2 examples and deleting {predictions} "
        f"(max_new_tokens 0 writes no predictions); pass --out DIR to keep both"
    )
    generating = {**losses_only, "generation": {"max_new_tokens": 5}}
    assert replacing_line(out, generating) == (
        f"replacing {metrics} (step 6, 4 examples) with step 7, 2 examples; pass --out DIR to keep both"
    )
    metrics.unlink()
    assert replacing_line(out, losses_only, None) == (
        f"deleting {predictions}: this evaluation (step 7, 2 examples) has max_new_tokens 0 and writes none"
    )


def test_another_tokenizer_is_a_path_gone_or_another_packaged_name_but_not_the_same_one(tmp_path):
    """The same string or the same directory by another path is not another tokenizer; an absolute path that
    names nothing here, or a packaged name beside a directory, is; a relative path unknown here (and no
    packaged name) cannot be told apart."""
    from nextquill_jax.models.tokenizers import tokenizer_names

    other = evaluate_module._other_tokenizer
    (tmp_path / "tok").mkdir()
    (tmp_path / "x").mkdir()
    assert other(str(tmp_path / "tok"), str(tmp_path / "tok")) is False
    assert other(str(tmp_path / "x" / ".." / "tok"), str(tmp_path / "tok")) is False
    assert other(str(tmp_path / "gone"), str(tmp_path / "tok")) is True
    assert other(tokenizer_names()[0], str(tmp_path / "tok")) is True
    assert other("prepared_elsewhere/tok", str(tmp_path / "tok")) is False


def _float64_target_probs(model, examples, stream: str) -> list[np.ndarray]:
    """p(y) of each example's target tokens under `model` with prompt `stream`, each example alone in a
    right-padded row, in a float64 softmax (as `test_loss_terms_equal_float64_cross_entropy...` states it)."""
    width = max(len(ex[stream]) + len(ex["target"]) for ex in examples)
    ids = np.zeros((len(examples), width), np.int32)
    for row, ex in enumerate(examples):
        seq = np.concatenate([ex[stream], ex["target"]])
        ids[row, : len(seq)] = seq
    logits = np.asarray(model(ids), np.float64)
    probs = []
    for row, ex in enumerate(examples):
        start = len(ex[stream]) - 1  # the position that predicts the first target token
        z = logits[row, start : start + len(ex["target"])]
        p = np.exp(z - z.max(-1, keepdims=True))
        probs.append((p / p.sum(-1, keepdims=True))[np.arange(len(ex["target"])), ex["target"]])
    return probs


def test_metrics_json_effects_hold_the_preference_share_and_mean_dce_of_the_target_tokens(run, evaluated):
    """`loss.effects` (split_losses: the DCE statistics, the preference-token share among them):
    pref_fraction = |{DCE > δ}| / tokens and dce_mean = mean DCE, DCE = p_h(y) − p_∅(y), against a float64
    statement on the exported model (a token within 1e-4 of δ may fall either side)."""
    workdir, model, _ = run
    _, _, saved = evaluated
    split = PreparedSplit(workdir / "prepared", "test")
    examples = [split[i] for i in range(len(split))]
    with_p, without_p = (_float64_target_probs(model, examples, s) for s in ("prompt_with", "prompt_without"))
    dce = np.concatenate([w - o for w, o in zip(with_p, without_p, strict=True)])
    delta, effects = saved["loss"]["threshold"], saved["loss"]["effects"]
    assert saved["loss"]["tokens"] == dce.size
    low, high = np.mean(dce > delta + 1e-4), np.mean(dce > delta - 1e-4)
    assert low - 1e-12 <= effects["pref_fraction"] <= high + 1e-12
    assert effects["dce_mean"] == pytest.approx(float(dce.mean()), abs=1e-5)


def _losses_only(workdir: Path, out_dir: Path, **options) -> dict:
    """`evaluate` of the run's test split without decoding (`max_new_tokens` 0), quietly, with `options`."""
    return evaluate(
        workdir,
        "test",
        generation=dataclasses.replace(GEN, max_new_tokens=0),
        out_dir=out_dir,
        echo=lambda _: None,
        **options,
    )


def test_max_examples_one_short_of_the_split_measures_the_losses_of_those_examples_only(run, tmp_path):
    """`max_examples` = N − 1 of a split of N: the loss terms count the first N − 1 examples' target tokens,
    not the whole split's."""
    workdir, _, _ = run
    split = PreparedSplit(workdir / "prepared", "test")
    count = len(split) - 1
    metrics = _losses_only(workdir, tmp_path, max_examples=count)
    assert metrics["examples"] == count
    assert metrics["loss"]["tokens"] == sum(len(split[i]["target"]) for i in range(count))


def test_the_replacing_line_of_a_loss_only_run_over_metrics_alone_deletes_nothing(tmp_path):
    """No predictions.jsonl to delete: the line says only what it replaces."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"step": 3, "model": "run", "examples": 2}))
    losses_only = {"step": 4, "model": "run", "examples": 1, "generation": {"max_new_tokens": 0}}
    assert replacing_line(out, losses_only, None) == (
        f"replacing {out / 'metrics.json'} (step 3, 2 examples) with step 4, 1 example"
    )


def test_each_prediction_line_carries_its_rows_id_reference_and_the_evaluated_prompt():
    """Without-history prompts: each line has the row's `id`, its without-history prompt and its target as
    the reference; an exact prediction scores ROUGE-1 1 and one sharing no word 0 (by hand)."""
    rows = [
        {
            "index": 4,
            "id": "ex-a",
            "user_id": "u",
            "target": "a warm day",
            "prompt_with_history": "with a",
            "prompt_without_history": "without a",
        },
        {
            "index": 7,
            "id": "ex-b",
            "user_id": "v",
            "target": "a cold night",
            "prompt_with_history": "with b",
            "prompt_without_history": "without b",
        },
    ]
    _, lines = evaluate_module._scored(rows, ["a warm day", "blue green"], [[5, 2], [6, 2]], "without", 3)
    written = [json.loads(line) for line in lines]
    assert [w["index"] for w in written] == [4, 7]
    assert [w["id"] for w in written] == ["ex-a", "ex-b"]
    assert [w["prompt"] for w in written] == ["without a", "without b"]
    assert [w["reference"] for w in written] == ["a warm day", "a cold night"]
    assert [w["prediction"] for w in written] == ["a warm day", "blue green"]
    assert [w["rouge1"] for w in written] == pytest.approx([1.0, 0.0], abs=1e-9)


@pytest.mark.parametrize(
    ("rows", "shards", "processes"), [(2, 4, 2), (3, 8, 2), (4, 8, 1), (5, 6, 4), (4, 4, 4)]
)
def test_rows_are_raised_to_the_fewest_whose_global_batch_splits_over_the_shards(
    monkeypatch, rows, shards, processes
):
    """Each process contributes `rows_per_batch` rows: the count becomes the smallest m >= rows with
    m * processes a multiple of the batch shards (stated by search here), and a count that already splits is
    kept as it is."""
    cfg = load_config("configs/tiny_synthetic.yaml", [f"data.batching.rows_per_batch={rows}"])
    monkeypatch.setattr(evaluate_module, "batch_shard_count", lambda mesh: shards)
    monkeypatch.setattr(evaluate_module.jax, "process_count", lambda: processes)
    want = next(m for m in range(rows, rows + shards + 1) if (m * processes) % shards == 0)
    got = evaluate_module.rows_splitting_over(cfg, mesh=None)
    assert got.data.batching.rows_per_batch == want
    if want == rows:
        assert got is cfg


def test_metrics_json_records_the_end_token_of_the_data_not_the_tokenizers_padding(run, evaluated, tmp_path):
    """A decoding tokenizer whose pad token is another token than the end token: `eos_token_id` is still the
    id the prepared targets end in (the data's), and the generations stop at it."""
    workdir, _, _ = run
    _, _, saved = evaluated
    padded = tmp_path / "padded_tok"
    tok = load_fast_tokenizer(saved["tokenizer"])
    other = next(i for i in range(len(tok)) if i != TINY_EOS_ID)
    tok.pad_token = tok.convert_ids_to_tokens(other)
    tok.save_pretrained(padded)
    assert load_fast_tokenizer(padded).pad_token_id == other != TINY_EOS_ID  # the premise
    metrics = _losses_only(workdir, tmp_path / "out", max_examples=1, tokenizer=str(padded))
    assert metrics["eos_token_id"] == TINY_EOS_ID
    assert metrics["stop_token_ids"][0] == TINY_EOS_ID


def test_metrics_json_prompt_names_the_rendered_field_the_predictions_were_prompted_with(run, evaluated):
    """`prompt` in metrics.json is the `<split>.jsonl` field of the prompt text: each prediction's `prompt`
    is that field of its rendered row."""
    workdir, _, _ = run
    _, predictions, saved = evaluated
    rendered = [json.loads(line) for line in (workdir / "prepared" / "test.jsonl").read_text().splitlines()]
    assert saved["prompt"] in rendered[0]
    assert [p["prompt"] for p in predictions] == [r[saved["prompt"]] for r in rendered]


def test_a_nextquill_run_weighting_its_alignment_term_has_its_own_loss_among_the_variants(run, tmp_path):
    """A nextquill run with `weight_alignment`: its loss (L_n + α L_p, L_p weighted) is `variants.nextquill`,
    which split_losses derives from the terms with the run's weights, so the terms' L_p is weighted as the
    run's is."""
    from nextquill_jax.train.workdir import restore_model

    workdir, _, _ = run
    loaded = restore_model(workdir)
    section = dataclasses.replace(loaded.config.loss, variant="nextquill", alpha=0.5, weight_alignment=True)
    loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, loss=section))
    metrics = _losses_only(workdir, tmp_path, loaded=loaded)
    loss = metrics["loss"]
    assert loss["variant"] == "nextquill" and loss["alpha"] == 0.5
    want = loss["terms"]["loss_n"] + 0.5 * loss["terms"]["loss_p"]
    assert loss["loss"] == pytest.approx(want, rel=1e-5)
    assert loss["variants"]["nextquill"] == pytest.approx(want, rel=1e-5)


def test_metrics_json_names_the_split_and_the_data_it_was_read_from(run, evaluated):
    workdir, _, _ = run
    _, predictions, saved = evaluated
    assert saved["split"] == "test"
    assert Path(saved["data"]) == workdir / "prepared"
    assert saved["examples"] == len(predictions)


def test_the_replacing_line_names_an_unparsable_metrics_file_without_what_it_held(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{cut short")
    new = {"step": 2, "model": "run", "examples": 3, "generation": {"max_new_tokens": 6}}
    assert replacing_line(out, new, None) == f"replacing {out / 'metrics.json'} with step 2, 3 examples"
