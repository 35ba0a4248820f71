"""`compare` (eval/compare.py, compare_file.py, compare_record.py, compare_table.py): two trained variants and
an untrained one of a tiny config on the synthetic benchmark through train, evaluate and effects; the table's
differences against the per-example values the runs wrote; the untrained variant's model against the trained
ones' start; resuming; bad files."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import typing
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from nextquill_jax import cli
from nextquill_jax.config_schema import ConfigError, build
from nextquill_jax.data.config import SPLITS
from nextquill_jax.eval import evaluate
from nextquill_jax.eval.bootstrap import paired_bootstrap
from nextquill_jax.eval.compare import run_comparison
from nextquill_jax.eval.compare_file import CompareConfig, load_comparison
from nextquill_jax.eval.compare_record import DONE_FILE, check_trained_in, finished_changes
from nextquill_jax.eval.compare_table import FEW_EXAMPLES
from nextquill_jax.train import checkpoint, loop

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py


@pytest.fixture(scope="module")
def compared(tmp_path_factory, save_tiny_tokenizer, tiny_config):
    root = tmp_path_factory.mktemp("compare")
    base = tiny_config(None, root / "unused")
    base["model"]["overrides"]["vocab_size"] = 704  # the tiny tokenizer has 700 ids
    # The compact template with one past review: the tiny tokenizer (trained on other text) spends about
    # one token per 3 characters here, so with `review` a row needed 1024 tokens (its longest example 708);
    # with `review_short` the longest is 436 and every example still fits whole in a row of 448. Four rows a
    # step (one example each): two steps still read 8 of the 24 training examples. Both cut the work each
    # step, evaluation and effect report compute; no claim below depends on the prompt's wording or length.
    base["data"].update(
        format="synthetic",
        synthetic_users=6,
        template="review_short",
        tokenizer=str(save_tiny_tokenizer(root / "tok")),
        max_history=1,
        max_prompt_tokens=900,
        max_target_tokens=120,
    )
    base["data"]["batching"].update(
        seq_len_with=448, seq_len_without=None, response_slots=None, rows_per_batch=4
    )
    base["train"].update(max_steps=2, data_dir=None)
    base["checkpoint"]["async_save"] = False
    file = {
        "compare": {
            "out": str(root / "out"),
            "baseline": "context_sft",
            "max_examples": 6,
            "effect_examples": 4,
            "max_new_tokens": 6,
            "resamples": 1000,
        },
        "variants": {
            "context_sft": {"overrides": ["loss.variant=context_sft"]},
            "nextquill": {"overrides": ["loss.variant=nextquill", "loss.counterfactual_grad=false"]},
            # The base's model is a preset (qwen2.5-0.5b) made tiny by overrides: evaluated as that tiny
            # random model, not anything the preset's name names.
            "untrained": {"train": False},
        },
        "base": base,
    }
    path = root / "compare.yaml"
    path.write_text(yaml.safe_dump(file))
    messages, checked, check_step = [], [], checkpoint.check_step
    evaluated, evaluate_run = {}, evaluate.evaluate

    def recording_evaluate(workdir, *args, loaded, **kwargs):
        evaluated[workdir.name] = jax.device_get(nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
        return evaluate_run(workdir, *args, loaded=loaded, **kwargs)

    # Every verification of a step directory, and the parameters each run is evaluated with, recorded.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            checkpoint, "check_step", lambda step_dir: checked.append(step_dir) or check_step(step_dir)
        )
        patch.setattr(evaluate, "evaluate", recording_evaluate)
        result = run_comparison(load_comparison(path), echo=messages.append)
    return root, path, result, messages, checked, evaluated


def test_the_table_and_its_intervals_come_from_the_runs_files(compared):
    root, _, result, _, _, _ = compared
    assert [r["variant"] for r in result["rows"]] == ["context_sft", "nextquill", "untrained"]
    per_run = {}
    for name in ("context_sft", "nextquill"):
        lines = (
            (root / "out" / "seed0" / name / "eval" / "test" / "predictions.jsonl").read_text().splitlines()
        )
        per_run[name] = {r["index"]: r["rouge1"] for r in map(json.loads, lines)}
        row = next(r for r in result["rows"] if r["variant"] == name)
        assert row["rouge1"] == pytest.approx(np.mean(list(per_run[name].values())), rel=1e-12)
        assert 0.0 <= row["dce_auroc"] <= 1.0 and row["preference_recall"] is not None
    common = sorted(per_run["nextquill"])
    want = paired_bootstrap(
        [per_run["nextquill"][i] for i in common], [per_run["context_sft"][i] for i in common], resamples=1000
    )
    got = result["differences"]["nextquill"]["rouge1"]
    assert (got["mean"], got["low"], got["high"]) == pytest.approx(
        (want.mean, want.low, want.high), abs=1e-12
    )
    assert set(result["differences"]["nextquill"]) >= {"rouge1", "preference_recall", "preference_nll_with"}
    text = (root / "out" / "results.md").read_text()
    assert "| nextquill |" in text and "nextquill vs context_sft on ROUGE-1: " in text
    if not want.significant:
        verdict = "no significant difference"
    elif not want.has_width:  # every pair differs by the same amount: no verdict
        verdict = "no verdict: the examples' differences agree exactly"
    else:
        verdict = "better" if want.mean > 0 else "worse"
    assert f"nextquill vs context_sft on ROUGE-1: {verdict}" in text
    # This tiny comparison evaluates a handful of examples: results.md says not to trust its intervals.
    fewest = min(d["examples"] for d in result["differences"]["nextquill"].values())
    assert fewest < FEW_EXAMPLES
    assert f"Only {fewest} paired examples: at fewer than {FEW_EXAMPLES} the bootstrap intervals" in text


def test_each_runs_checkpoint_is_verified_once_for_its_evaluation_and_effect_report(compared):
    root, _, _, _, checked, _ = compared
    final = [root / "out" / "seed0" / name / "checkpoints" / "2" for name in ("context_sft", "nextquill")]
    assert sorted(checked) == final


def test_penalty_cost_reads_each_runs_model_and_data_as_its_effect_report_did(compared, monkeypatch):
    """benchmarks/penalty_cost.py's loading (`seed_costs`: the trained runs' final checkpoints, the untrained
    variant's initial model, each run's prepared data): every run's unpenalised per-example NLL on the first
    4 test examples is the one its effect report wrote (`per_example[i].nll_with`, the fused head's path),
    and the example keys agree across the runs. The untrained model's NLL differs from the trained runs' by
    far more than the tolerance, so a run read from the wrong model fails it."""
    from nextquill_jax.bench.command import benchmarks_dir
    from tests.bench.test_bench import benchmark_script

    root, path, _, _, _, _ = compared
    monkeypatch.syspath_prepend(str(benchmarks_dir()))
    cost = benchmark_script("penalty_cost")
    comparison = load_comparison(path)
    costs = cost.seed_costs(comparison, 0, list(comparison.variants), 4, 1.2)
    cost.same_examples(costs)
    nll = {}
    for name, run_costs in costs.items():
        summary = json.loads((root / "out" / "seed0" / name / "effects" / "summary.json").read_text())
        written = [e["nll_with"] for e in summary["per_example"][:4]]
        nll[name] = [-c["plain"].astype(np.float64).mean() for c in run_costs]
        np.testing.assert_allclose(nll[name], written, rtol=2e-5)
    assert np.abs(np.subtract(nll["untrained"], nll["context_sft"])).min() > 1e-3


def test_a_second_run_resumes_without_running_again(compared):
    _, path, first, _, _, _ = compared
    messages = []
    again = run_comparison(load_comparison(path), echo=messages.append)
    assert sum("done already" in m for m in messages) == 3
    assert again["rows"] == first["rows"]


def test_the_readme_python_snippet_evaluates_and_compares(compared, tmp_path):
    """The README's "Evaluating and comparing from Python" block as written, on a copy of this module's
    nextquill run (evaluate writes into the run) and on its compare file (every run finished: nothing runs
    again): each call returns what it wrote."""
    from tests.conftest import readme_python_block

    root, path, first, _, _, _ = compared
    code = readme_python_block("### Evaluating and comparing from Python")
    assert code.count('"runs/from_python"') == 1 and code.count('"configs/study/smollm2_synthetic.yaml"') == 1
    run = shutil.copytree(root / "out" / "seed0" / "nextquill", tmp_path / "run")
    code = code.replace('"runs/from_python"', repr(str(run)))
    code = code.replace('"configs/study/smollm2_synthetic.yaml"', repr(str(path)))
    said = []
    namespace = {"print": lambda *args: said.append(args)}
    exec(code, namespace)
    metrics, results = namespace["metrics"], namespace["results"]
    written = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert metrics == written and metrics["generation"]["max_new_tokens"] == 16
    assert (metrics["overall"]["rouge1"], metrics["loss"]) in said
    assert results == json.loads((root / "out" / "results.json").read_text())
    assert results["rows"] == first["rows"] and said[-1] == (results["conclusions"],)


def test_a_table_stopped_between_its_two_files_leaves_no_earlier_table_beside_new_numbers(
    compared, monkeypatch
):
    """results.json and results.md were each replaced whole, one after the other: a run stopped between them
    left the new numbers beside the earlier table. The table now goes first and comes back last."""
    from nextquill_jax.eval import compare_table

    root, path, first, _, _, _ = compared
    out = root / "out"

    def stopped(result):
        raise KeyboardInterrupt  # as a kill between the two files

    monkeypatch.setattr(compare_table, "markdown", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(load_comparison(path), echo=lambda line: None)
    assert (out / "results.json").is_file() and not (out / "results.md").exists()
    monkeypatch.undo()
    assert run_comparison(load_comparison(path), echo=lambda line: None)["rows"] == first["rows"]
    assert (out / "results.md").is_file()


def _files(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _trained_in(path, tmp_path, out: str, source: Path, data_dir: Path | None, *overrides: str):
    """The compare file at `path` with `nextquill` alone, in compare.out `tmp_path`/`out`, evaluating the run
    in compare.out `source` (`trained_in`), its base's data `data_dir` and `overrides` added."""

    def change(raw):
        _only(raw, "nextquill")
        raw["compare"]["out"] = str(tmp_path / out)
        raw["variants"]["nextquill"]["trained_in"] = str(source)
        raw["variants"]["nextquill"]["overrides"] += list(overrides)
        raw["base"]["train"]["data_dir"] = None if data_dir is None else str(data_dir)

    return _edited(path, tmp_path, change)


def test_a_trained_in_variant_evaluates_the_other_comparisons_run_without_training_or_changing_it(
    compared, tmp_path
):
    """A second comparison evaluating the first's `nextquill` run (`trained_in` its compare.out, its prepared
    data as base.train.data_dir): nothing trains here, nothing under the first comparison changes, the
    predictions and losses equal those of `evaluate` reading that run's checkpoint itself, and the effect
    report and table row equal the first comparison's (the same checkpoint, data and settings). Run again, it
    is done already."""
    root, path, first, _, _, _ = compared
    source = root / "out" / "seed0" / "nextquill"
    before = _files(source)
    edited = _trained_in(path, tmp_path, "out2", root / "out", root / "out" / "prepared")
    messages = []
    result = run_comparison(load_comparison(edited), echo=messages.append)
    run = tmp_path / "out2" / "seed0" / "nextquill"
    assert (
        f"nextquill (seed 0): evaluating the run in {source} (`trained_in`), which trained there" in messages
    )
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert _files(source) == before
    # The reference: the run's final checkpoint as `nextquill-jax evaluate --workdir` reads it.
    direct = evaluate.evaluate(
        source,
        "test",
        out_dir=tmp_path / "direct",
        max_examples=6,
        generation_overrides={"max_new_tokens": 6},
    )
    assert direct["step"] == 2
    evaluated = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert (evaluated["step"], evaluated["loss"]) == (direct["step"], direct["loss"])
    assert (run / "eval" / "test" / "predictions.jsonl").read_text() == (
        tmp_path / "direct" / "predictions.jsonl"
    ).read_text()
    effects = [json.loads((d / "effects" / "summary.json").read_text()) for d in (run, source)]
    assert [{k: v for k, v in e.items() if k != "files"} for e in effects] == [
        {k: v for k, v in effects[1].items() if k != "files"}
    ] * 2
    assert result["rows"] == [r for r in first["rows"] if r["variant"] == "nextquill"]
    record = json.loads((run / DONE_FILE).read_text())
    assert record["settings"]["trained_in"] == str(root / "out")
    assert record["skipped_updates"] == json.loads((source / DONE_FILE).read_text())["skipped_updates"]
    messages = []
    run_comparison(load_comparison(edited), echo=messages.append)
    assert messages == [f"nextquill (seed 0): done already ({run / DONE_FILE})"]


def test_a_trained_in_run_that_cannot_stand_for_the_variant_is_refused_before_anything_is_written(
    compared, tmp_path
):
    """Each refusal names the variant, the seed, the run and the fix, and nothing is written in compare.out:
    no such run; a run trained under other settings (each key, the run's value first); the data's path
    differing (with the `base.train.data_dir` to set); a run that was itself evaluated from elsewhere; and at
    load, `trained_in` with `train: false` or naming the file's own compare.out."""
    root, path, _, _, _, _ = compared
    prepared = root / "out" / "prepared"
    source = root / "out" / "seed0" / "nextquill"
    head = "variant 'nextquill' (seed 0) evaluates the run in"

    def refused(file) -> str:
        with pytest.raises(ConfigError) as e:
            run_comparison(load_comparison(file), echo=lambda m: None)
        assert not (tmp_path / "out2").exists()
        return str(e.value)

    message = refused(_trained_in(path, tmp_path, "out2", tmp_path / "nowhere", prepared))
    assert (  # named as missing (it read "which has not finished", a run that does not exist at all)
        f"{head} {tmp_path / 'nowhere' / 'seed0' / 'nextquill'} (`trained_in`), which does not exist. Fix: "
        "set `trained_in` to the compare.out of the comparison that trained the variant" in message
    )
    (tmp_path / "started" / "seed0" / "nextquill").mkdir(parents=True)  # begun, never finished
    message = refused(_trained_in(path, tmp_path, "out2", tmp_path / "started", prepared))
    assert f"{tmp_path / 'started' / 'seed0' / 'nextquill'} (`trained_in`), which has not finished" in message
    message = refused(_trained_in(path, tmp_path, "out2", root / "out", prepared, "loss.low=0.6"))
    assert f"{head} {source} (`trained_in`), which trained under other settings" in message
    assert "loss.low: 0.1 -> 0.6" in message and "Fix: give the variant the settings that run" in message
    message = refused(_trained_in(path, tmp_path, "out2", root / "out", None))
    assert f'train.data_dir: "{prepared}" -> "{tmp_path / "out2" / "prepared"}"' in message
    assert f"set `base.train.data_dir: {prepared}` in this file" in message

    evaluated = tmp_path / "evaluated" / "seed0" / "nextquill"
    evaluated.mkdir(parents=True)
    record = json.loads((source / DONE_FILE).read_text())
    record["settings"]["trained_in"] = str(root / "elsewhere")
    (evaluated / DONE_FILE).write_text(json.dumps(record))
    message = refused(_trained_in(path, tmp_path, "out2", tmp_path / "evaluated", prepared))
    assert f"it was evaluated from the comparison in {root / 'elsewhere'}" in message
    assert f"Fix: set `trained_in: {root / 'elsewhere'}`, where it trained." in message

    # A run that prepared its own data (its `data` overrides) recorded `train.data_dir: null`: the fix is
    # the variant's own override, which base.train.data_dir cannot give it, and following it passes.
    own_data = tmp_path / "own_data" / "seed0" / "nextquill"
    own_data.mkdir(parents=True)
    record = json.loads((source / DONE_FILE).read_text())
    record["settings"]["config"]["train"]["data_dir"] = None
    record["settings"]["config"]["data"]["max_target_tokens"] = 119
    (own_data / DONE_FILE).write_text(json.dumps(record))
    other_data = "data.max_target_tokens=119"
    message = refused(_trained_in(path, tmp_path, "out2", tmp_path / "own_data", prepared, other_data))
    assert f'train.data_dir: null -> "{prepared}"' in message
    assert "add `train.data_dir=null` to `variants.nextquill.overrides`" in message
    followed = load_comparison(
        _trained_in(
            path, tmp_path, "out2", tmp_path / "own_data", prepared, other_data, "train.data_dir=null"
        )
    )
    check_trained_in(followed, "nextquill", 0, followed.run_config("nextquill", 0))

    def untrained(raw):
        raw["variants"]["untrained"]["trained_in"] = str(root / "out")

    def own(raw):
        raw["variants"]["nextquill"]["trained_in"] = raw["compare"]["out"]

    def own_spelt_otherwise(raw):  # <out's parent>/x/../<out's name>: the same directory
        out = Path(raw["compare"]["out"])
        raw["variants"]["nextquill"]["trained_in"] = str(out.parent / "x" / ".." / out.name)

    with pytest.raises(
        ConfigError, match=r"`variants.untrained.trained_in` names a comparison .* `train: false`"
    ):
        load_comparison(_edited(path, tmp_path, untrained))
    for change in (own, own_spelt_otherwise):
        with pytest.raises(
            ConfigError, match=r"`variants.nextquill.trained_in` is this file's own compare.out"
        ):
            load_comparison(_edited(path, tmp_path, change))


def test_a_run_trained_here_under_other_settings_is_evaluated_again_once_the_variant_is_trained_in(
    compared, tmp_path
):
    """A run that trained in this compare.out, on data now elsewhere, is refused while the variant trains
    here (its checkpoint cannot stand for the new settings), but not once the variant names another
    comparison's run (`trained_in`), whose own training settings `check_trained_in` checks: its differing
    settings then only mean evaluating again."""
    root, path, _, _, _, _ = compared
    prepared = root / "out" / "prepared"
    local = tmp_path / "out3" / "seed0" / "nextquill"
    local.mkdir(parents=True)
    record = json.loads((root / "out" / "seed0" / "nextquill" / DONE_FILE).read_text())
    record["settings"]["config"]["train"]["data_dir"] = str(tmp_path / "old_data")
    (local / DONE_FILE).write_text(json.dumps(record))

    def here(raw):
        _only(raw, "nextquill")
        raw["compare"]["out"] = str(tmp_path / "out3")
        raw["base"]["train"]["data_dir"] = str(prepared)

    trains_here = load_comparison(_edited(path, tmp_path, here))
    with pytest.raises(ConfigError, match=r"finished training in .* with other settings"):
        finished_changes(trains_here, "nextquill", 0, trains_here.run_config("nextquill", 0))
    elsewhere = load_comparison(_trained_in(path, tmp_path, "out3", root / "out", prepared))
    cfg = elsewhere.run_config("nextquill", 0)
    check_trained_in(elsewhere, "nextquill", 0, cfg)
    changes = finished_changes(elsewhere, "nextquill", 0, cfg)
    assert ("train.data_dir", str(tmp_path / "old_data"), str(prepared)) in changes
    assert ("variants.nextquill.trained_in", None, str(root / "out")) in changes


def test_an_untrained_variant_evaluates_the_parameters_the_trained_variants_start_from(compared):
    """`train: false` on a `model.preset` base: the preset with its overrides, initialised from `train.seed`
    exactly as `train` initialises the trained variants (their step 0), and recorded as step 0."""
    from nextquill_jax.train.setup import set_up_run

    _, path, _, _, _, evaluated = compared
    comparison = load_comparison(path)
    run = set_up_run(comparison.run_config("nextquill", 0), comparison.workdir("nextquill", 0), echo=print)
    start = jax.device_get(run.initial_params())
    assert jax.tree.structure(evaluated["untrained"]) == jax.tree.structure(start)
    for got, want in zip(jax.tree.leaves(evaluated["untrained"]), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(got, want)
    # The trained runs were evaluated with other (trained) parameters: the comparison above is not vacuous.
    trained = zip(jax.tree.leaves(evaluated["nextquill"]), jax.tree.leaves(start), strict=True)
    assert any(not np.array_equal(got, want) for got, want in trained)
    metrics = json.loads((comparison.workdir("untrained", 0) / "eval" / "test" / "metrics.json").read_text())
    assert metrics["step"] == 0 and metrics["model"].startswith("preset qwen2.5-0.5b untrained")


def test_step_0_evaluates_the_untrained_model_in_an_untrained_variants_and_a_trained_runs_directory(
    compared, tmp_path, capsys
):
    """A `train: false` variant's directory has no checkpoint: `evaluate` says so and names `--step 0`, which
    evaluates the model compare evaluated there; a trained run's `--step 0` is that same start, not its
    checkpoint (whose loss differs)."""
    _, path, _, _, _, _ = compared
    comparison = load_comparison(path)
    untrained, trained = comparison.workdir("untrained", 0), comparison.workdir("nextquill", 0)
    flags = ["--max-examples", "6", "--max-new-tokens", "6"]
    assert cli.main(["evaluate", "--workdir", str(untrained), "--out", str(tmp_path / "x"), *flags]) == 1
    error = capsys.readouterr().err
    assert "holds a run's config.yaml but no checkpoints" in error and "its step 0: pass `--step 0`" in error

    def results(out: Path) -> tuple[list[str], float]:
        predictions = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").open()]
        return predictions, json.loads((out / "metrics.json").read_text())["loss"]["loss"]

    recorded, recorded_loss = results(untrained / "eval" / "test")
    trained_loss = results(trained / "eval" / "test")[1]
    assert trained_loss != pytest.approx(recorded_loss, rel=1e-6)
    for workdir, out in ((untrained, tmp_path / "untrained"), (trained, tmp_path / "trained")):
        assert (
            cli.main(["evaluate", "--workdir", str(workdir), "--step", "0", "--out", str(out), *flags]) == 0
        )
        predictions, loss = results(out)
        assert predictions == recorded and loss == pytest.approx(recorded_loss, rel=1e-6)
        assert json.loads((out / "metrics.json").read_text())["step"] == 0
    effects = ["effects", "--workdir", str(untrained), "--step", "0", "--split", "test"]
    assert cli.main([*effects, "--num-examples", "4", "--out", str(tmp_path / "effects")]) == 0
    got = json.loads((tmp_path / "effects" / "summary.json").read_text())
    want = json.loads((untrained / "effects" / "summary.json").read_text())
    assert got["per_example"] == want["per_example"] and got["dce"] == want["dce"]


def test_bad_compare_files_are_errors(compared, tmp_path):
    _, path, _, _, _, _ = compared
    raw = yaml.safe_load(path.read_text())
    for change, message in (
        (lambda r: r["compare"].update(baseline="sft"), "`compare.baseline` 'sft' is not a variant"),
        (lambda r: r["variants"]["nextquill"].update(overrides=["loss.varaint=mce"]), "variant 'nextquill'"),
        (lambda r: r.pop("base"), "exactly the sections compare, variants, base"),
        (lambda r: r["compare"].update(resamples=10), "resamples must be >= 1000"),
    ):
        broken = yaml.safe_load(yaml.safe_dump(raw))
        change(broken)
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(broken))
        with pytest.raises(ConfigError, match=message):
            load_comparison(tmp_path / "bad.yaml")


@pytest.mark.parametrize(("name", "kind", "command"), [("tiny_synthetic", "training config", "train"),
                                                      ("demo", "demo file", "demo")])  # fmt: skip
def test_a_training_or_demo_config_given_to_compare_says_which_command_reads_it(name, kind, command):
    # `compare --config configs/tiny_synthetic.yaml` listed the sections found, with no fix
    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    with pytest.raises(ConfigError) as e:
        load_comparison(path)
    assert str(e.value).endswith(
        f". Fix: this is a {kind}; run `nextquill-jax {command} --config {path}`, or pass a compare file "
        "(configs/study/smollm2_synthetic.yaml is one; its keys: configs/REFERENCE.md)."
    )


def test_an_untrained_variant_resolves_cudnn_max_segments_auto_from_the_evaluated_split(
    tmp_path, write_random_data, tiny_config, monkeypatch
):
    """A `train: false` variant with `model.cudnn_max_segments: auto` (no training set-up to resolve it) is
    saved with the most examples a row of the evaluated split holds, counted from the batches evaluation
    yields, and its model loads with that bound (on a GPU: the backend check lifted, as there; on CPU it
    would be read with xla, `reading_config`)."""
    import dataclasses

    from flax import nnx

    from nextquill_jax.config import load_config
    from nextquill_jax.data.pipeline import BatchPipeline
    from nextquill_jax.data.prepared_split import PreparedSplit
    from nextquill_jax.eval.compare import untrained_config
    from nextquill_jax.models import CausalLM, attention, save_pretrained
    from nextquill_jax.train.workdir import initial_model

    monkeypatch.setattr(attention, "check_attention_backend", lambda impl, **_: None)

    data = write_random_data(tmp_path / "data", train=8, val=8)
    raw = tiny_config(data, tmp_path / "unused")
    hf_dir = tmp_path / "base"
    save_pretrained(CausalLM(load_config(None, base=raw).model.model_config(), rngs=nnx.Rngs(0)), hf_dir)
    raw["model"] = {
        "path": str(hf_dir),
        "attention_impl": "cudnn",
        "compute_dtype": "bfloat16",
        "cudnn_max_segments": "auto",
    }
    cfg = load_config(None, base=raw)
    batching = dataclasses.replace(cfg.data.batching, shuffle=False, num_epochs=1, drop_remainder=False)
    most = max(int(b["with_segment_ids"].max()) for b in BatchPipeline(PreparedSplit(data, "val"), batching))
    assert most > 1  # the evaluated rows are packed

    workdir, lines = tmp_path / "work", []
    saved = untrained_config(cfg, workdir, "val", lines.append)
    assert saved.model.cudnn_max_segments == most
    assert lines[-1].startswith(
        f"model.cudnn_max_segments: auto chose {most}: the most examples a planned val"
    )
    assert load_config(workdir / "config.yaml").model.cudnn_max_segments == most
    assert initial_model(workdir).model.cfg.cudnn_max_segments == most


def test_an_untrained_lora_variant_evaluates_the_base_training_starts_from(
    tmp_path, write_random_data, tiny_config
):
    """Under `model.lora` the step-0 model is the frozen base training holds, carrying the fresh adapters
    (B = 0, so unchanged): its parameters are the same arrays, in the base's dtype."""
    from nextquill_jax.config import load_config
    from nextquill_jax.eval.compare import untrained_config
    from nextquill_jax.train.setup import set_up_run
    from nextquill_jax.train.workdir import initial_model

    raw = tiny_config(write_random_data(tmp_path / "data", train=8, val=8), tmp_path / "unused")
    raw["model"]["lora"] = {"rank": 2, "alpha": 4.0, "targets": ["attn/(q|v)_proj"], "base_dtype": "float32"}
    workdir = tmp_path / "work"
    cfg = untrained_config(load_config(None, base=raw), workdir, "val", print)
    start = jax.device_get(nnx.to_pure_dict(nnx.state(initial_model(workdir).model, nnx.Param)))
    base = jax.device_get(set_up_run(cfg, workdir, echo=print).base_params)
    assert jax.tree.structure(start) == jax.tree.structure(base)
    for got, want in zip(jax.tree.leaves(start), jax.tree.leaves(base), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_the_compare_split_is_one_of_the_prepared_splits_checked_at_load(tmp_path):
    """Checked before the variants and the base config: a misspelt split fails at once, not after training."""
    assert typing.get_args(typing.get_type_hints(CompareConfig)["split"]) == SPLITS
    for split in SPLITS:
        assert (
            build(CompareConfig, {"out": "o", "baseline": "a", "split": split}, "compare", "f").split == split
        )
    file = tmp_path / "c.yaml"
    compare = {"out": str(tmp_path / "out"), "baseline": "a", "split": "tset"}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": {"a": {}}, "base": {}}))
    with pytest.raises(ConfigError) as e:
        load_comparison(file)
    message = str(e.value)
    expected = (
        f"{file}, line {_line(file, 'split:')}: `compare.split` is 'tset', not one of {list(SPLITS)}. Did "
        "you mean 'test'? Fix: set"
    )
    assert message.startswith(expected), message


def test_repeated_seeds_counts_below_one_and_path_like_variant_names_are_refused_at_load(
    tmp_path, tiny_config
):
    """Refused when the file is loaded, before any variant trains: each message names the key and the fix."""
    base = tiny_config(tmp_path / "unused", tmp_path / "unused_run")
    file = tmp_path / "c.yaml"

    def refused(compare=None, variants=None, seeds=None):
        section = {"out": str(tmp_path / "out"), "baseline": "a", **(compare or {})}
        file.write_text(yaml.safe_dump({"compare": section, "variants": variants or {"a": {}}, "base": base}))
        with pytest.raises(ConfigError) as e:
            load_comparison(file, seeds)
        return str(e.value)

    message = refused({"seeds": [0, 1, 0]})
    at = f"{file}, line {_line(file, '  seeds:')}"  # the file's seeds; --seeds' have no line
    assert message.startswith(f"{at}: `compare.seeds` lists seed [0] more than once ([0, 1, 0])"), message
    assert refused(seeds=[3, 3]).startswith(f"{file}: `compare.seeds` lists seed [3] more than once ([3, 3])")
    message = refused({"seeds": [0, -1]})  # was refused as `data.batching.seed`, on a variant's line
    expected = "`compare.seeds` must be integers >= 0, got [-1] ([0, -1]). Fix: list seeds >= 0 (in the file"
    assert message.startswith(f"{at}: {expected}, or after --seeds)"), message
    empty = {"compare": {"out": str(tmp_path / "out"), "baseline": "a"}, "variants": {}, "base": base}
    file.write_text(yaml.safe_dump(empty))
    with pytest.raises(ConfigError) as e:
        load_comparison(file)
    at = f"{file}, line {_line(file, 'variants:')}"
    assert str(e.value).startswith(f"{at}: `variants` is empty: a comparison needs its baseline"), e.value
    assert "Fix: name each under `variants`" in str(e.value)
    for override in ("train.seed=7", "data.batching={seed: 7}", f"train.workdir={tmp_path / 'elsewhere'}"):
        # Each seed's run would be the same run, or the run would train where compare does not look.
        message = refused(variants={"a": {}, "b": {"overrides": [override]}})
        key = override.partition("=")[0] if "{" not in override else "data.batching.seed"
        assert f": variant 'b': `{key}` is compare's to set" in message, message
        assert message.endswith("Fix: remove the override; set compare.seeds or compare.out instead"), message
    for key in ("max_examples", "eval_batch_size", "effect_examples"):
        for value in (0, -2):
            message = refused({key: value})
            at = f"{file}, line {_line(file, f'  {key}:')}"
            assert message.startswith(f"{at}: `compare.{key}` must be >= 1, got {value}. Fix: set"), message
    assert refused({"max_new_tokens": -1}) == (  # 0 is allowed: no generation
        f"{file}, line {_line(file, '  max_new_tokens:')}: `compare.max_new_tokens` must be >= 0, got -1. "
        "Fix: set a count >= 0 (0: no generation, the losses only), or null for the base config's "
        "eval.generation.max_new_tokens."
    )
    for name in ("../../escaped", "a/b", "..", ".", "with space"):
        message = refused({"baseline": name}, {name: {}})
        at = f"{file}, line {_line(file, 'variants:')}"  # the section the fix names
        assert message.startswith(f"{at}: variant name {name!r} cannot name its runs' directories"), message
        assert "letters, digits, '_', '.' and '-', and is not '.' or '..'. Fix: rename" in message
    for name in ("v1.5_lr-3e-4", "..a"):  # allowed: a plain directory name under <out>/seed<S>
        compare = {"out": "o", "baseline": name}
        file.write_text(yaml.safe_dump({"compare": compare, "variants": {name: {}}, "base": base}))
        assert load_comparison(file, [0, 1]).workdir(name, 1) == Path.cwd() / "o" / "seed1" / name


def _line(file: Path, text: str) -> int:
    """The 1-based line of `file` that first holds `text`."""
    return next(n for n, line in enumerate(file.read_text().splitlines(), 1) if text in line)


def test_compare_file_errors_name_the_line_and_blame_base_or_the_variant(tmp_path, tiny_config):
    """As a training config's errors do, a compare file's name the line of the key; an error in `base` is
    blamed on `base` (its key as the file writes it), not on the first variant with compare's own per-run
    settings (seed, workdir) listed as the user's overrides; one in a variant's overrides on that variant, at
    the line of the override at fault."""
    file = tmp_path / "c.yaml"

    def refused(change) -> str:
        raw = {
            "compare": {"out": str(tmp_path / "out"), "baseline": "a", "max_new_tokens": 0},
            "variants": {"a": {"train": False}, "b": {"overrides": ["loss.variant=context_sft"]}},
            "base": tiny_config(tmp_path / "data", tmp_path / "run"),
        }
        change(raw)
        file.write_text(yaml.safe_dump(raw, sort_keys=False))
        with pytest.raises(ConfigError) as e:
            load_comparison(file)
        message = str(e.value)
        assert "train.seed=" not in message and "workdir=" not in message, message  # compare's own settings
        return message

    message = refused(lambda raw: raw["compare"].update(max_new_token=0))
    assert message == (
        f"{file}, line {_line(file, 'max_new_token:')}: unknown key `compare.max_new_token`. Did you mean "
        "`compare.max_new_tokens`?"
    )
    message = refused(lambda raw: raw["base"]["train"].update(max_step=2))
    assert message == (
        f"{file}, line {_line(file, 'max_step:')}: unknown key `base.train.max_step`. Did you mean "
        "`base.train.max_steps`?"
    )
    message = refused(lambda raw: raw["base"]["optim"].update(learning_rate="abc"))
    assert message.startswith(
        f"{file}, line {_line(file, 'learning_rate:')}: `base.optim.learning_rate` expects a float"
    ), message
    assert "variant" not in message
    message = refused(lambda raw: raw["base"]["optim"].update(learning_rate=-1.0))  # a section's own check
    assert message.startswith(f"{file}, line {_line(file, 'learning_rate:')}: invalid `base.optim`: "), (
        message
    )

    overrides = ["loss.variant=context_sft", "loss.varient=nextquill"]
    message = refused(lambda raw: raw["variants"]["b"].update(overrides=overrides))
    at = f"{file}, line {_line(file, '- loss.varient=nextquill')}"
    assert message.startswith(f"{at}: variant 'b': unknown key `loss.varient` (in "), message
    overrides = ["loss.variant=context_sft", "optim.learning_rate=-1"]
    message = refused(lambda raw: raw["variants"]["b"].update(overrides=overrides))
    assert message.startswith(
        f"{file}, line {_line(file, '- optim.learning_rate=-1')}: variant 'b': invalid `optim`: learning_rate"
    ), message
    assert message.endswith("(overrides: loss.variant=context_sft optim.learning_rate=-1)"), message


def _finished_with(comparison, settings: dict, **record) -> None:
    """Record variant `a` (seed 0) of `comparison` as finished with `settings` (its compare_done.json), with
    the other fields `record` gives."""
    from nextquill_jax.eval.compare_record import write_done

    comparison.workdir("a", 0).mkdir(parents=True, exist_ok=True)
    write_done(comparison.workdir("a", 0) / DONE_FILE, {"variant": "a", "settings": settings, **record})


def test_a_finished_run_whose_prepared_data_moved_is_refused_with_the_reason(tmp_path, tiny_config):
    """A copied comparison (`cp -r cmp1 cmpX`, then `out: cmpX`): compare_done.json holds the prepared data's
    path, so the run is refused, and the message says why and how to reuse the runs; following it (the data
    path in the file) reuses them."""
    import dataclasses

    from nextquill_jax.eval.compare_record import finished_changes, run_settings

    base = tiny_config(tmp_path / "unused", tmp_path / "unused_run")
    base["train"]["data_dir"] = None
    file = tmp_path / "c.yaml"
    compare = {"out": str(tmp_path / "cmpX"), "baseline": "a"}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": {"a": {}}, "base": base}))
    comparison = load_comparison(file)
    cfg = comparison.run_config("a", 0)
    ran = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, data_dir=str(tmp_path / "cmp1" / "prepared"))
    )
    _finished_with(comparison, run_settings(comparison, "a", ran))
    with pytest.raises(ConfigError) as e:
        finished_changes(comparison, "a", 0, cfg)
    message = str(e.value)
    assert (
        f'train.data_dir: "{tmp_path / "cmp1" / "prepared"}" -> "{tmp_path / "cmpX" / "prepared"}" (a moved'
        in message
    )
    assert "records the prepared data's path, not its content" in message
    trained_on = tmp_path / "cmp1" / "prepared"
    assert (
        "to reuse the runs, run the file with the compare.out they ran in, or set `base.train.data_dir: "
        f"{trained_on}` in it, the data they trained on). Fix: use a new" in message
    )
    # Following that fix: the copied run is the same run, evaluated again only where evaluation changed.
    base["train"]["data_dir"] = str(trained_on)
    file.write_text(yaml.safe_dump({"compare": compare, "variants": {"a": {}}, "base": base}))
    followed = load_comparison(file)
    assert finished_changes(followed, "a", 0, followed.run_config("a", 0)) == []


def test_a_finished_run_whose_record_files_moved_is_refused_with_the_way_to_reuse_it(tmp_path, tiny_config):
    """compare_done.json holds the record files' paths, not their content (unlike `train`, which resumes with
    files that moved): the refusal says so and how to reuse the runs, and a symbolic link at the old path,
    as it says, makes the run the same again."""
    import dataclasses

    from nextquill_jax.eval.compare_record import finished_changes, run_settings

    old, new = tmp_path / "old" / "records.jsonl", tmp_path / "new" / "records.jsonl"
    new.parent.mkdir()
    new.write_text("{}\n")
    base = tiny_config(tmp_path / "unused", tmp_path / "unused_run")
    base["data"].update(format="generic", sources=[str(new)])
    file = tmp_path / "c.yaml"
    file.write_text(
        yaml.safe_dump(
            {"compare": {"out": str(tmp_path / "cmp"), "baseline": "a"}, "variants": {"a": {}}, "base": base}
        )
    )
    comparison = load_comparison(file)
    cfg = comparison.run_config("a", 0)
    ran = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[str(old)]))
    _finished_with(comparison, run_settings(comparison, "a", ran))
    with pytest.raises(ConfigError) as e:
        finished_changes(comparison, "a", 0, cfg)
    assert (
        "(moved record files, template or tokenizer? compare_done.json records their paths, not their "
        "content: to reuse the runs, put the files back, or a symbolic link to their new place at each old "
        "path). Fix: use a new" in str(e.value)
    )
    old.parent.mkdir()
    old.symlink_to(new)
    assert finished_changes(comparison, "a", 0, cfg) == []


def test_a_record_with_relative_paths_from_the_directory_it_ran_in_is_not_a_change(
    tmp_path, tiny_config, monkeypatch
):
    """A run's config joins the compare file's relative paths to the current directory, as `train` does, so
    that compare_done.json records what the run's config.yaml does; a record of an earlier version, which
    kept them relative (`compare.out`, the data and workdir below it), read from the same directory is the
    same run."""
    from nextquill_jax.eval.compare_record import finished_changes, run_settings

    monkeypatch.chdir(tmp_path)
    base = tiny_config("unused", "unused_run")
    base["train"]["data_dir"] = None
    file = tmp_path / "c.yaml"
    file.write_text(
        yaml.safe_dump({"compare": {"out": "cmp", "baseline": "a"}, "variants": {"a": {}}, "base": base})
    )
    comparison = load_comparison(file)
    cfg = comparison.run_config("a", 0)
    assert (cfg.train.data_dir, cfg.train.workdir) == (
        str(tmp_path / "cmp" / "prepared"),
        str(tmp_path / "cmp" / "seed0" / "a"),
    )
    earlier = run_settings(comparison, "a", cfg)
    earlier["config"]["train"].update(data_dir="cmp/prepared", workdir="cmp/seed0/a")
    _finished_with(comparison, earlier)
    assert finished_changes(comparison, "a", 0, cfg) == []


def test_compare_out_and_trained_in_are_absolute_and_a_relative_eval_dir_is_read_from_its_run(
    tmp_path, tiny_config, monkeypatch
):
    """`compare.out` was used as written: `~/cmp` trained in the home directory (the run's config expands
    `~`) but locked, logged and looked for the run in a folder named `~` here, failing after the training;
    and a run's compare_done.json recorded its eval_dir relative, so the table, run from another directory,
    read another directory's predictions (a wrong recall, silently) or none."""
    from nextquill_jax.eval.compare import run_variant
    from nextquill_jax.eval.compare_record import run_settings

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    base = tiny_config(tmp_path / "unused", tmp_path / "unused_run")
    file = tmp_path / "c.yaml"
    variants = {"a": {}, "b": {"trained_in": "~/other"}}
    file.write_text(yaml.safe_dump({"compare": {"out": "~/cmp", "baseline": "a"}, "variants": variants,
                                    "base": base}))  # fmt: skip
    comparison = load_comparison(file)
    assert comparison.compare.out == str(home / "cmp")
    assert comparison.variants["b"].trained_in == str(home / "other")

    file.write_text(yaml.safe_dump({"compare": {"out": "cmp", "baseline": "a"}, "variants": {"a": {}},
                                    "base": base}))  # fmt: skip
    comparison = load_comparison(file)
    assert comparison.compare.out == str(tmp_path / "cmp")
    settings = run_settings(comparison, "a", comparison.run_config("a", 0))
    _finished_with(comparison, settings, seed=0, eval_dir="cmp/seed0/a/eval/test")  # an earlier record
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    record = run_variant(comparison, "a", 0, echo=lambda line: None)
    assert record["eval_dir"] == str(tmp_path / "cmp" / "seed0" / "a" / "eval" / "test")


def test_a_finished_run_trained_under_another_nonfinite_policy_is_refused_once_it_skipped_an_update(
    tmp_path, tiny_config
):
    """A resume may change `train.nonfinite` and `train.max_skips` (a diverged run resumes skipping: the fix
    compare gives is to set it in the file's `base`). A finished run's numbers depend on them only once it
    skipped an update, so one that skipped none is reused under the new policy, one that skipped some is
    not, and one whose record predates the count is not either."""
    import dataclasses

    from nextquill_jax.eval.compare_record import finished_changes, run_settings
    from nextquill_jax.train.resume import may_change

    base = tiny_config(tmp_path / "unused", tmp_path / "unused_run")
    file = tmp_path / "c.yaml"
    compare = {"out": str(tmp_path / "o"), "baseline": "a"}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": {"a": {}}, "base": base}))
    comparison = load_comparison(file)
    cfg = comparison.run_config("a", 0)
    ran = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, nonfinite="skip", max_skips=3))
    for record in ({"skipped_updates": 2}, {}):
        _finished_with(comparison, run_settings(comparison, "a", ran), **record)
        with pytest.raises(ConfigError) as e:
            finished_changes(comparison, "a", 0, cfg)
        assert 'train.nonfinite: "skip" -> "stop"' in str(e.value), record
        assert "train.max_skips: 3 -> 20" in str(e.value), record
    _finished_with(comparison, run_settings(comparison, "a", ran), skipped_updates=0)
    assert finished_changes(comparison, "a", 0, cfg) == []
    assert may_change("train.nonfinite") and may_change("train.max_skips")


def test_each_trained_runs_record_holds_its_skipped_updates_from_its_metrics(compared):
    root, _, _, _, _, _ = compared
    runs = root / "out" / "seed0"
    for name in ("context_sft", "nextquill"):
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        skipped = [row["skipped"] for row in rows if "skipped" in row]
        assert len(skipped) == 2 and skipped[-1] == 0, (name, skipped)  # both steps' rows; nothing skipped
        assert json.loads((runs / name / DONE_FILE).read_text())["skipped_updates"] == 0, name
    assert json.loads((runs / "untrained" / DONE_FILE).read_text())["skipped_updates"] is None


def test_variants_share_the_prepared_data_unless_their_data_overrides_change_it(tmp_path, tiny_config):
    base = tiny_config(tmp_path / "unused", tmp_path / "unused_run")
    base["train"]["data_dir"] = None
    variants = {
        "a": {},
        "batching": {"overrides": ["data.batching.rows_per_batch=4"]},  # not part of the prepared data
        "history": {"overrides": ["data.max_history=1"]},
    }
    file = tmp_path / "c.yaml"
    compare = {"out": str(tmp_path / "out"), "baseline": "a"}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": variants, "base": base}))
    comparison = load_comparison(file)
    data_dirs = {name: comparison.run_config(name, 3).train.data_dir for name in variants}
    shared = str(tmp_path / "out" / "prepared")
    assert data_dirs == {"a": shared, "batching": shared, "history": None}  # None: <workdir>/prepared


def test_a_run_whose_training_stops_on_a_signal_stops_the_comparison_unevaluated(
    tmp_path, tiny_config, monkeypatch, capsys
):
    base = tiny_config(tmp_path / "data", tmp_path / "unused_run")
    file = tmp_path / "c.yaml"
    compare = {"out": str(tmp_path / "out"), "baseline": "a"}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": {"a": {}, "b": {}}, "base": base}))
    started, handlers = [], lambda: (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    outside = handlers()

    def stopped(cfg, workdir, *, echo):  # as a SIGTERM or Ctrl-C after step 2
        assert handlers() == outside  # training finds the handlers `train` would: its own handling unchanged
        started.append(workdir)
        return loop.TrainResult("preempted", 2, workdir, 2, None)

    monkeypatch.setattr(loop, "train", stopped)
    assert cli.main(["compare", "--config", str(file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("compare stopped: training in ") and "stopped at step 2 before its end" in out
    assert "run the same command again to resume" in out
    assert started == [tmp_path / "out" / "seed0" / "a"]  # variant b never started
    assert not list((tmp_path / "out").rglob(DONE_FILE)) and not (tmp_path / "out" / "results.md").exists()
    assert handlers() == outside


class _SignalReachedTheTestError(Exception):
    pass


def _compare_file_on_random_data(tmp_path, write_random_data, tiny_config, variants: dict) -> Path:
    """A compare file in `tmp_path` (c.yaml) of `variants` (baseline `a`, split val) over the tiny config
    on random prepared data (8 train and 8 val examples)."""
    base = tiny_config(write_random_data(tmp_path / "data", train=8, val=8), tmp_path / "unused")
    file = tmp_path / "c.yaml"
    compare = {"out": str(tmp_path / "out"), "baseline": "a", "split": "val"}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": variants, "base": base}))
    return file


def _stand_ins_around_evaluation(monkeypatch, calls: list) -> None:
    """Stand-ins for what a run reads and writes around its evaluation, each appending its call to `calls`:
    the untrained model (`("initial", run)`), the trained one (`("restore", run)`), the tokenizer (None) and
    the effect report (`("effects", run, data_dir)`), which writes an empty summary.json in its out_dir (a
    run's record holds the summary's digest)."""
    from types import SimpleNamespace

    from nextquill_jax.data import prepare
    from nextquill_jax.eval import effect_report
    from nextquill_jax.train import workdir as workdir_module

    def model(stage: str, source: str):
        return lambda workdir: (
            calls.append((stage, workdir.name)) or SimpleNamespace(model=None, source=source)
        )

    def report(model, tokenizer, data_dir, split, out_dir, *args, **kwargs) -> dict:
        calls.append(("effects", out_dir.parent.name, Path(data_dir)))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text("{}")
        return {"files": {"summary": str(out_dir / "summary.json")}}

    monkeypatch.setattr(workdir_module, "initial_model", model("initial", "step 0"))
    monkeypatch.setattr(workdir_module, "restore_model", model("restore", "step 2"))
    monkeypatch.setattr(prepare, "load_fast_tokenizer", lambda name: None)
    monkeypatch.setattr(effect_report, "build_effect_report", report)


def test_a_signal_outside_training_stops_the_comparison_cleanly_and_running_it_again_resumes(
    tmp_path, write_random_data, tiny_config, monkeypatch, capsys
):
    """SIGTERM during a run's evaluation, then Ctrl-C (SIGINT) while the table is written: each stops
    `compare` with status 0 (as `train` stopped by them) and one line naming the signal, the run and stage,
    the runs finished and that the same command resumes; the handlers there were before are put back, the
    stopped stage is not recorded as done, and each run again redoes only what was not finished. Evaluation,
    the effect report, the model and the table are stand-ins (nothing here depends on their numbers)."""
    import os

    from nextquill_jax.eval import compare_table

    variants = {"a": {"train": False}, "b": {"train": False}}
    file = _compare_file_on_random_data(tmp_path, write_random_data, tiny_config, variants)
    out, data = tmp_path / "out", tmp_path / "data"
    stages, signals = [], {}  # (stage, run, ...) in order; stage -> the signal sent when it starts

    def stage(name, workdir=None):
        stages.append((name, workdir and workdir.name))
        if name in signals:
            os.kill(os.getpid(), signals.pop(name))

    def evaluated(workdir, *args, **kwargs):
        stage("evaluate", workdir) if workdir.name == "b" else stages.append(("evaluate", workdir.name))
        return {"overall": {"bleu": 1.0}}

    def tabulated(comparison, records):
        stage("table")
        (out / "results.md").write_text("the table\n")
        return {}

    monkeypatch.setattr(evaluate, "evaluate", evaluated)
    monkeypatch.setattr(compare_table, "write_results", tabulated)
    _stand_ins_around_evaluation(monkeypatch, stages)

    def reached(signum, frame):  # where compare lets a signal through (without the fix: everywhere)
        raise _SignalReachedTheTestError(signal.Signals(signum).name)

    previous = {s: signal.signal(s, reached) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        signals["evaluate"] = signal.SIGTERM
        assert cli.main(["compare", "--config", str(file)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[-1] == (
            "compare stopped: SIGTERM during b (seed 0)'s evaluation (outside training; nothing unfinished "
            "is recorded as done); runs finished: a (seed 0); run the same command again to resume "
            "(finished runs are not run again)"
        )
        assert stages == [
            ("initial", "a"),
            ("evaluate", "a"),
            ("effects", "a", data),
            ("initial", "b"),
            ("evaluate", "b"),
        ]
        assert (out / "seed0" / "a" / DONE_FILE).is_file() and not (out / "seed0" / "b" / DONE_FILE).exists()
        assert all(signal.getsignal(s) is reached for s in previous)

        stages.clear()
        signals["table"] = signal.SIGINT
        assert cli.main(["compare", "--config", str(file)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"a (seed 0): done already ({out / 'seed0' / 'a' / DONE_FILE})"
        assert lines[-1].startswith(
            "compare stopped: SIGINT during the table (results.json, results.md) (outside training; "
        ) and lines[-1].endswith("runs finished: a (seed 0), b (seed 0); run the same command again to "
            "resume (finished runs are not run again)")  # fmt: skip
        assert stages == [("initial", "b"), ("evaluate", "b"), ("effects", "b", data), ("table", None)]
        assert all(signal.getsignal(s) is reached for s in previous)

        stages.clear()
        assert cli.main(["compare", "--config", str(file)]) == 0
        assert capsys.readouterr().out.endswith("the table\n\n")
        assert stages == [("table", None)]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_an_error_of_one_run_names_that_run_and_the_runs_finished_before_it(
    tmp_path, write_random_data, tiny_config, monkeypatch, capsys
):
    """A run's error may name only what the runs share (a vocabulary error names the prepared data): the
    `error:` line and the exception's note name the run it came from. Evaluation, the effect report and the
    model are stand-ins."""
    variants = {"a": {"train": False}, "b": {"train": False}}
    file = _compare_file_on_random_data(tmp_path, write_random_data, tiny_config, variants)

    def evaluated(workdir, *args, **kwargs):
        if workdir.name == "b":
            raise ConfigError("prepared split val holds token id 9, but the model's vocab_size is 8")
        return {"overall": {"bleu": 1.0}}

    monkeypatch.setattr(evaluate, "evaluate", evaluated)
    _stand_ins_around_evaluation(monkeypatch, [])
    assert cli.main(["compare", "--config", str(file)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: prepared split val holds token id 9, but the model's vocab_size is 8 (run b (seed 0) of the "
        "comparison; runs finished: a (seed 0))"
    )
    with pytest.raises(ConfigError) as raised:
        run_comparison(load_comparison(file), echo=lambda line: None)
    assert raised.value.__notes__ == ["(run b (seed 0) of the comparison; runs finished: a (seed 0))"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_raised_inside_a_gc_callback_still_stops_the_comparison(
    signum, tmp_path, write_random_data, tiny_config, monkeypatch, capsys
):
    """The signal arrives while a garbage-collector callback runs (JAX runs one at every collection), where
    the handler's exception cannot propagate: before the fix Python printed "Exception ignored" and compare
    ran on to its end with the handlers already put back. Now it stops at the stage it was in, as a signal
    anywhere else does. Evaluation, the effect report, the model and the table are stand-ins."""
    import gc
    import os
    import sys
    import time

    from nextquill_jax.eval import compare_table

    file = _compare_file_on_random_data(tmp_path, write_random_data, tiny_config, {"a": {"train": False}})

    def signalled_in_a_callback(phase, info):
        gc.callbacks.remove(signalled_in_a_callback)
        os.kill(os.getpid(), signum)  # its handler runs at the callback's next line
        time.sleep(0.01)

    def evaluated(workdir, *args, **kwargs):
        gc.callbacks.append(signalled_in_a_callback)
        gc.collect()
        for _ in range(100):  # the rest of the evaluation (1 s at most): where the signal comes again
            time.sleep(0.01)
        return {"overall": {"bleu": 1.0}}

    tabulated = []

    def tabulate(comparison, records):
        tabulated.append(records)
        (tmp_path / "out" / "results.md").write_text("the table\n")
        return {}

    monkeypatch.setattr(evaluate, "evaluate", evaluated)
    monkeypatch.setattr(compare_table, "write_results", tabulate)
    _stand_ins_around_evaluation(monkeypatch, [])
    before = sys.unraisablehook, signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert cli.main(["compare", "--config", str(file)]) == 0
    name = signal.Signals(signum).name
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith(f"compare stopped: {name} during a (seed 0)'s evaluation (outside training; ")
    )
    assert tabulated == [] and not (tmp_path / "out" / "seed0" / "a" / DONE_FILE).exists()
    assert (sys.unraisablehook, signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_misspelt_best_metric_of_any_variant_is_refused_before_the_first_run_starts(
    tmp_path, tiny_config, monkeypatch
):
    base = tiny_config(tmp_path / "data", tmp_path / "unused_run")
    file = tmp_path / "c.yaml"
    variants = {"a": {}, "b": {"overrides": ["checkpoint.best_metric=eval/lss"]}, "c": {"train": False}}
    compare = {"out": str(tmp_path / "out"), "baseline": "a"}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": variants, "base": base}))
    started = []
    monkeypatch.setattr(loop, "train", lambda cfg, workdir, *, echo: started.append(workdir))
    with pytest.raises(ConfigError) as e:
        run_comparison(load_comparison(file), echo=lambda _: None)
    message = str(e.value)
    expected = f"{file}: variant 'b': checkpoint.best_metric `eval/lss` is not a metric"
    assert message.startswith(expected), message
    assert "Did you mean `eval/loss`" in message and message.count("variant '") == 1
    assert started == [] and not (tmp_path / "out").exists()


def test_a_model_path_of_any_variant_that_names_nothing_is_refused_before_the_first_run_starts(
    tmp_path, tiny_config, monkeypatch
):
    """A variant whose `model.path` (or fixed-DCE `loss.reference_model`) names nothing failed only when its
    run started, after every variant before it had trained; each is now named before any run starts, once
    per variant whatever the seeds. A reference that is a run of the comparison itself, trained before the
    variant reads it, is no such path."""
    base = tiny_config(tmp_path / "data", tmp_path / "unused_run")
    file = tmp_path / "c.yaml"
    missing, reference = tmp_path / "no_model", tmp_path / "no_reference"
    fixed = ["loss.variant=dce", "loss.dce=fixed"]
    variants = {
        "a": {},
        "b": {"overrides": [f"model.path={missing}", "model.preset=null"]},
        "c": {"overrides": [*fixed, f"loss.reference_model={reference}"]},
        "d": {"overrides": [*fixed, f"loss.reference_model={tmp_path / 'out' / 'seed0' / 'a'}"]},
    }
    compare = {"out": str(tmp_path / "out"), "baseline": "a", "seeds": [0, 1]}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": variants, "base": base}))
    started = []
    monkeypatch.setattr(loop, "train", lambda cfg, workdir, *, echo: started.append(workdir))
    with pytest.raises(ConfigError) as e:
        run_comparison(load_comparison(file), echo=lambda _: None)
    lines = str(e.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{file}: variant 'b': model.path {str(missing)!r} does not exist"), lines
    assert lines[1].startswith(
        f"{file}: variant 'c': loss.reference_model {str(reference)!r} does not exist"
    ), lines
    assert lines[1].endswith(
        "; or a training workdir (config.yaml and checkpoints/), or `base` with model.lora."
    )
    assert started == [] and not (tmp_path / "out").exists()


def test_an_eval_batch_size_the_mesh_does_not_split_is_refused_before_the_first_run_starts(
    tmp_path, tiny_config, monkeypatch
):
    """As on a mesh of 4 batch shards: evaluate refused compare.eval_batch_size 3 only after the first
    variant had trained, naming a --batch-size flag compare does not have."""
    from nextquill_jax import parallel

    base = tiny_config(tmp_path / "data", tmp_path / "unused_run")
    file = tmp_path / "c.yaml"
    compare = {"out": str(tmp_path / "out"), "baseline": "a", "eval_batch_size": 3}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": {"a": {}, "b": {}}, "base": base}))
    started = []
    monkeypatch.setattr(loop, "train", lambda cfg, workdir, *, echo: started.append(workdir))
    monkeypatch.setattr(parallel, "batch_shard_count", lambda mesh: 4)
    with pytest.raises(ConfigError) as e:
        run_comparison(load_comparison(file), echo=lambda _: None)
    lines = str(e.value).splitlines()
    assert [line.split(": compare.eval_batch_size 3 is not a multiple")[0] for line in lines] == [
        f"{file}: variant 'a'",
        f"{file}: variant 'b'",
    ]
    assert lines[0].endswith(
        "over which each batch of prompts is split. Fix: set compare.eval_batch_size to a multiple of 4, "
        "such as 4, or null."
    ), lines[0]
    assert started == []


def test_an_interrupted_run_under_other_settings_is_refused_before_the_first_run_starts(
    tmp_path, tiny_config, monkeypatch
):
    """Variant b's training was interrupted (checkpoints, no compare_done.json) under `loss.variant=mce`;
    the file now says sft: refused up front, not when b starts after a has trained, with compare's fix. The
    same settings pass."""
    import dataclasses

    from nextquill_jax.config import save_config
    from nextquill_jax.eval.compare_record import check_interrupted_run

    base = tiny_config(tmp_path / "data", tmp_path / "unused_run")
    file = tmp_path / "c.yaml"
    variants = {"a": {}, "b": {"overrides": ["loss.variant=sft"]}}
    compare = {"out": str(tmp_path / "out"), "baseline": "a"}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": variants, "base": base}))
    comparison = load_comparison(file)
    cfg, workdir = comparison.run_config("b", 0), comparison.workdir("b", 0)
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    save_config(cfg, workdir / "config.yaml")
    assert check_interrupted_run(comparison, "b", 0, cfg) is None
    # Record files named elsewhere are left to `train`, which resumes where they are the same files moved.
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[str(tmp_path / "r.jsonl")]))
    save_config(moved, workdir / "config.yaml")
    assert check_interrupted_run(comparison, "b", 0, cfg) is None
    save_config(
        dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, variant="mce")), workdir / "config.yaml"
    )
    started = []
    monkeypatch.setattr(loop, "train", lambda cfg, workdir, *, echo: started.append(workdir))
    with pytest.raises(ConfigError) as e:
        run_comparison(comparison, echo=lambda _: None)
    message = str(e.value)
    assert message.startswith(f"{file}: variant 'b' (seed 0) has an unfinished training in {workdir}"), (
        message
    )
    assert 'loss.variant: "mce" -> "sft"' in message and "--workdir" not in message
    assert f"Fix: use a new compare.out for the changed file, or delete {workdir} to train" in message
    assert started == []


def _comparison(tmp_path, tiny_config, variants: dict, **settings):
    """A compare file in `tmp_path` (c.yaml) of `variants` (baseline `a`) over the tiny config, with the
    `compare` section's other `settings`, loaded."""
    base = tiny_config(tmp_path / "data", tmp_path / "unused_run")
    file = tmp_path / "c.yaml"
    compare = {"out": str(tmp_path / "out"), "baseline": "a", **settings}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": variants, "base": base}))
    return load_comparison(file)


def test_settings_changes_tells_training_from_evaluation_keys(tmp_path, tiny_config):
    """`eval.split` (the split training validates on; no key a resume may change) is a training change, only
    `eval.generation.*` of the `eval` section an evaluation one; LoRA dropout above 0 in the current config
    alone (the recorded run had none) makes `train.micro_batches` a training change too."""
    from nextquill_jax.eval.compare_record import run_settings, settings_changes
    from nextquill_jax.train.resume import normalised

    comparison = _comparison(tmp_path, tiny_config, {"a": {}})
    recorded = run_settings(comparison, "a", comparison.run_config("a", 0))
    current = copy.deepcopy(recorded)
    current["config"]["eval"]["split"] = "test"
    current["config"]["eval"]["generation"]["max_new_tokens"] = 7
    was = recorded["config"]["eval"]["generation"]["max_new_tokens"]
    training, evaluation = settings_changes(recorded, current, "a")
    assert training == [("eval.split", "val", "test")]
    assert evaluation == [("eval.generation.max_new_tokens", was, 7)]

    recorded["config"]["model"]["lora"] = {"rank": 4, "alpha": 8.0, "dropout": 0.0}
    recorded["config"] = normalised(recorded["config"])
    current = copy.deepcopy(recorded)
    current["config"]["model"]["lora"]["dropout"] = 0.1
    current["config"]["train"]["micro_batches"] = 2
    training, evaluation = settings_changes(recorded, current, "a")
    assert training == [("model.lora.dropout", 0.0, 0.1), ("train.micro_batches", 1, 2)]
    assert evaluation == []


def test_a_finished_run_whose_template_moved_is_refused_with_the_way_to_reuse_it(tmp_path, tiny_config):
    """The moved-files hint covers the template (and tokenizer), not only the record files."""
    import dataclasses

    from nextquill_jax.data.templates import TEMPLATE_DIR
    from nextquill_jax.eval.compare_record import run_settings

    old, new = tmp_path / "old" / "t.yaml", tmp_path / "new" / "t.yaml"
    for template in (old, new):
        template.parent.mkdir()
        template.write_text((TEMPLATE_DIR / "plain.yaml").read_text())
    comparison = _comparison(tmp_path, tiny_config, {"a": {}})
    cfg = comparison.run_config("a", 0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template=str(new)))
    ran = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template=str(old)))
    _finished_with(comparison, run_settings(comparison, "a", ran))
    with pytest.raises(ConfigError) as e:
        finished_changes(comparison, "a", 0, cfg)
    assert f'data.template: "{old}" -> "{new}" (moved record files, template or tokenizer?' in str(e.value)


def test_a_finished_run_that_did_not_train_here_is_evaluated_again_under_other_training_settings(
    tmp_path, tiny_config
):
    """Other training settings refuse only a run that trained in this compare.out: an untrained variant's run
    (`train: false`) and a run recorded as evaluated from another comparison's (`trained_in`), whose variant
    now trains here, have no training here to keep: their changes are returned (to evaluate again)."""
    import dataclasses

    from nextquill_jax.eval.compare_record import run_settings

    comparison = _comparison(tmp_path, tiny_config, {"a": {"train": False}})
    cfg = comparison.run_config("a", 0)
    ran = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, low=0.5))
    _finished_with(comparison, run_settings(comparison, "a", ran))
    assert finished_changes(comparison, "a", 0, cfg) == [("loss.low", 0.5, cfg.loss.low)]

    comparison = _comparison(tmp_path, tiny_config, {"a": {}})
    settings = run_settings(comparison, "a", ran)
    settings["trained_in"] = str(tmp_path / "elsewhere")
    _finished_with(comparison, settings)
    assert finished_changes(comparison, "a", 0, cfg) == [
        ("loss.low", 0.5, cfg.loss.low),
        ("variants.a.trained_in", str(tmp_path / "elsewhere"), None),
    ]


def test_a_trained_in_run_is_refused_if_its_record_predates_settings_or_it_trained_nothing(
    tmp_path, tiny_config
):
    """`check_trained_in` of a source run: a compare_done.json without settings is named as predating them
    (not as unfinished), a run that did not train (`train: false` there) is refused, and a run that skipped no
    update stands for the variant under another non-finite policy (one that skipped updates does not)."""
    import dataclasses

    from nextquill_jax.eval.compare_record import run_settings

    comparison = _comparison(tmp_path, tiny_config, {"a": {"trained_in": str(tmp_path / "src")}})
    cfg = comparison.run_config("a", 0)
    done = tmp_path / "src" / "seed0" / "a" / DONE_FILE
    done.parent.mkdir(parents=True)
    own = {**run_settings(comparison, "a", cfg), "trained_in": None}  # as the source recorded it

    def refusal(**record) -> str:
        done.write_text(json.dumps({"variant": "a", **record}))
        with pytest.raises(ConfigError) as e:
            check_trained_in(comparison, "a", 0, cfg)
        return str(e.value)

    assert "(`trained_in`), whose record predates recorded settings. Fix:" in refusal()
    assert "(`trained_in`), which trained nothing (`train: false` there)" in refusal(
        settings={**own, "train": False}
    )
    skip = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, nonfinite="skip"))
    skipped = {**run_settings(comparison, "a", skip), "trained_in": None}
    assert 'train.nonfinite: "skip" -> "stop"' in refusal(settings=skipped, skipped_updates=2)
    done.write_text(json.dumps({"variant": "a", "settings": skipped, "skipped_updates": 0}))
    check_trained_in(comparison, "a", 0, cfg)


def test_an_interrupted_run_is_checked_only_where_it_trains_here_and_saved_a_step(tmp_path, tiny_config):
    """`check_interrupted_run` leaves alone a variant that does not train here (`train: false`, or
    `trained_in`) and a checkpoints directory without a step, though each holds a config.yaml under other
    settings; once a step is there, the trained variant is refused."""
    import dataclasses

    from nextquill_jax.config import save_config
    from nextquill_jax.eval.compare_record import check_interrupted_run

    variants = {"a": {}, "u": {"train": False}, "t": {"trained_in": str(tmp_path / "src")}}
    comparison = _comparison(tmp_path, tiny_config, variants)
    for name, step_dir in (("a", "tmp_3"), ("u", "2"), ("t", "2")):
        cfg, workdir = comparison.run_config(name, 0), comparison.workdir(name, 0)
        (workdir / "checkpoints" / step_dir).mkdir(parents=True)
        other = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, variant="mce"))
        save_config(other, workdir / "config.yaml")
        assert check_interrupted_run(comparison, name, 0, cfg) is None, name
    (comparison.workdir("a", 0) / "checkpoints" / "3").mkdir()
    with pytest.raises(ConfigError, match=r"variant 'a' \(seed 0\) has an unfinished training in "):
        check_interrupted_run(comparison, "a", 0, comparison.run_config("a", 0))


# The tests below change the finished runs of `compared` (they evaluate some again), so they come after every
# test that reads them as the first comparison left them.


def _edited(path, tmp_path, change):
    """The compare file at `path` with `change(raw dict)` applied, written to `tmp_path`/edited.yaml."""
    raw = yaml.safe_load(path.read_text())
    change(raw)
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(raw))
    return edited


def _only(raw, name):
    """Keep variant `name` alone, as the baseline: only its run is looked at."""
    raw["variants"] = {name: raw["variants"][name]}
    raw["compare"]["baseline"] = name


def test_settings_that_change_no_number_reuse_the_finished_runs(compared, tmp_path):
    from nextquill_jax.eval.compare_record import finished_changes

    _, path, _, _, _, _ = compared

    def change(raw):
        raw["base"]["logging"]["every_steps"] = 5
        raw["base"]["checkpoint"]["keep"] = 1
        raw["compare"].update(resamples=3000, baseline="nextquill")

    comparison = load_comparison(_edited(path, tmp_path, change))
    for name in comparison.variants:
        assert finished_changes(comparison, name, 0, comparison.run_config(name, 0)) == []


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_micro_batches_and_the_joint_forward_change_a_runs_numbers_only_under_lora_dropout(
    compared, tmp_path, dropout
):
    """`train.micro_batches` and `train.joint_forward` change no value, so a finished run is reused under
    other values of them, except where LoRA dropout is above 0: there they draw other masks, and a run
    trained under other values is reported as trained differently (it was reused silently)."""
    from nextquill_jax.eval.compare_record import run_settings, settings_changes
    from nextquill_jax.train.resume import normalised

    _, path, _, _, _, _ = compared
    comparison = load_comparison(path)
    name = next(iter(comparison.variants))
    recorded = run_settings(comparison, name, comparison.run_config(name, 0))
    recorded["config"]["model"]["lora"] = {"rank": 4, "alpha": 8.0, "dropout": dropout}
    recorded["config"] = normalised(recorded["config"])  # every LoRA key, as a run records them
    current = copy.deepcopy(recorded)
    current["config"]["train"].update(micro_batches=2, joint_forward=True)
    training, evaluation = settings_changes(recorded, current, name)
    expected = [("train.joint_forward", False, True), ("train.micro_batches", 1, 2)] if dropout else []
    assert sorted(training) == expected and evaluation == []


def test_a_run_trained_under_other_settings_is_refused_before_anything_runs(compared, tmp_path):
    """The user's report: `nextquill` becomes `loss.variant=mce` and max_examples changes. Nothing runs (not
    even the evaluation settings' re-evaluation of the other variants): the error names the run, every
    differing key with the finished run's value first, and the fix."""
    root, path, _, _, _, _ = compared

    def change(raw):
        raw["variants"]["nextquill"]["overrides"] = ["loss.variant=mce"]
        raw["compare"]["max_examples"] = 5

    records = {p: p.read_text() for p in (root / "out").glob("seed0/*/compare_done.json")}
    assert len(records) == 3
    messages = []
    with pytest.raises(ConfigError) as e:
        run_comparison(load_comparison(_edited(path, tmp_path, change)), echo=messages.append)
    message, workdir = str(e.value), root / "out" / "seed0" / "nextquill"
    assert message.startswith(f"{tmp_path / 'edited.yaml'}: variant 'nextquill' (seed 0) finished training")
    assert 'loss.variant: "nextquill" -> "mce"' in message
    assert "loss.counterfactual_grad: false -> true" in message
    assert "compare.max_examples: 6 -> 5" in message
    assert f"Fix: use a new compare.out for the changed file, or delete {workdir} to run" in message
    assert message.count("variant '") == 1  # the others trained with the same settings
    assert messages == [] and {p: p.read_text() for p in records} == records


def test_a_run_whose_evaluation_settings_changed_is_evaluated_again_without_training(compared, tmp_path):
    """The user's other report: only `max_new_tokens` changes (and here the decoding of one variant): its
    checkpoint is evaluated again with the new settings, not reused and not trained again."""
    root, path, _, _, _, _ = compared
    workdir = root / "out" / "seed0" / "nextquill"

    def change(raw):
        _only(raw, "nextquill")
        raw["variants"]["nextquill"]["overrides"].append("eval.generation.repetition_penalty=1.0")
        raw["compare"]["max_new_tokens"] = 5

    edited = _edited(path, tmp_path, change)
    trained = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    log = (workdir / "metrics.jsonl").read_text()
    messages = []
    result = run_comparison(load_comparison(edited), echo=messages.append)
    assert messages[0] == (
        "nextquill (seed 0): evaluating its checkpoint again: settings changed since it finished: "
        "eval.generation.repetition_penalty: 1.2 -> 1.0; compare.max_new_tokens: 6 -> 5"
    )
    assert not any("already finished" in m for m in messages)  # `train` did not run
    # evaluate's line on the results it replaces, without its advice: compare has no --out to keep both
    assert any(m.startswith(f"replacing {workdir / 'eval' / 'test' / 'metrics.json'} (") for m in messages)
    assert not any("--out" in m for m in messages), messages
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == trained
    assert (workdir / "metrics.jsonl").read_text() == log
    metrics = json.loads((workdir / "eval" / "test" / "metrics.json").read_text())
    assert metrics["step"] == 2
    assert (metrics["generation"]["max_new_tokens"], metrics["generation"]["repetition_penalty"]) == (5, 1.0)
    record = json.loads((workdir / "compare_done.json").read_text())
    assert record["settings"]["evaluation"]["max_new_tokens"] == 5
    assert [r["variant"] for r in result["rows"]] == ["nextquill"]
    messages = []
    run_comparison(load_comparison(edited), echo=messages.append)
    assert messages == [f"nextquill (seed 0): done already ({workdir / 'compare_done.json'})"]


def test_a_record_without_its_settings_is_run_again_and_then_records_them(compared, tmp_path):
    """compare_done.json written before it recorded settings: the trained run goes through `train` (which
    checks its checkpoint's config and finds it finished), the untrained one is evaluated again."""
    root, path, _, _, _, _ = compared

    def change(raw):
        raw["variants"].pop("context_sft")
        raw["compare"]["baseline"] = "nextquill"

    for name in ("nextquill", "untrained"):
        done = root / "out" / "seed0" / name / "compare_done.json"
        record = json.loads(done.read_text())
        record.pop("settings")
        done.write_text(json.dumps(record))
    messages = []
    run_comparison(load_comparison(_edited(path, tmp_path, change)), echo=messages.append)
    old = "does not record the settings it ran with (an older version wrote it)"
    assert any(m.startswith(f"nextquill (seed 0): {root / 'out'}") and old in m for m in messages)
    untrained = f"untrained (seed 0): {root / 'out' / 'seed0' / 'untrained' / 'compare_done.json'} {old}"
    assert f"{untrained}: evaluating it again" in messages
    assert any("already finished at step 2 of 2: nothing to train" in m for m in messages)
    for name in ("nextquill", "untrained"):
        done = root / "out" / "seed0" / name / "compare_done.json"
        assert json.loads(done.read_text())["settings"]["evaluation"]["max_new_tokens"] == 6


def test_max_new_tokens_0_evaluates_finished_runs_again_and_tables_only_the_losses(compared, tmp_path):
    """The finished runs (evaluated with max_new_tokens 6, or 5 after the test above) with the file's
    `compare.max_new_tokens` set to 0: each checkpoint is evaluated again without generating, not trained
    again; the NLL columns equal those of the comparison that generated (same checkpoints and examples), and
    neither results.json nor results.md keeps the earlier runs' text metrics. Set back to 6, the runs generate
    again: every column is the first comparison's (the same greedy decoding of the same checkpoints)."""
    root, path, first, _, _, _ = compared
    names = ("context_sft", "nextquill")

    def change(raw):
        raw["variants"].pop("untrained")
        raw["compare"]["max_new_tokens"] = 0

    workdirs = {name: root / "out" / "seed0" / name for name in names}
    trained = {name: sorted(p.name for p in (w / "checkpoints").iterdir()) for name, w in workdirs.items()}
    logs = {name: (w / "metrics.jsonl").read_text() for name, w in workdirs.items()}
    losses = {
        name: json.loads((w / "eval" / "test" / "metrics.json").read_text())["loss"]
        for name, w in workdirs.items()
    }
    messages = []
    result = run_comparison(load_comparison(_edited(path, tmp_path, change)), echo=messages.append)
    assert any(
        m.startswith(
            "context_sft (seed 0): evaluating its checkpoint again: settings changed since it finished:"
        )
        and m.endswith("compare.max_new_tokens: 6 -> 0")
        for m in messages
    ), messages
    assert not any("already finished" in m or m.startswith("generated ") for m in messages), messages
    assert "test: generation skipped (max_new_tokens 0): losses only, no text metrics" in " ".join(messages)
    for name, workdir in workdirs.items():
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == trained[name]
        assert (workdir / "metrics.jsonl").read_text() == logs[name]
        assert not (workdir / "eval" / "test" / "predictions.jsonl").exists()
        metrics = json.loads((workdir / "eval" / "test" / "metrics.json").read_text())
        assert metrics["loss"] == losses[name] and "overall" not in metrics
        assert "bleu" not in json.loads((workdir / DONE_FILE).read_text())

    text_metrics = {"rouge1", "rougeL", "meteor", "preference_recall", "bleu"}
    before = {r["variant"]: r for r in first["rows"]}
    for row in result["rows"]:
        assert text_metrics & set(before[row["variant"]]) == text_metrics  # measured when it generated
        assert not text_metrics & set(row), row
        for metric in ("nll_with", "nll_without", "preference_nll_with", "dce_auroc"):
            assert row[metric] == pytest.approx(before[row["variant"]][metric], rel=1e-6), metric
    assert set(result["differences"]["nextquill"]) == {"preference_nll_with", "nll_with", "nll_without"}
    written = json.loads((root / "out" / "results.json").read_text())
    assert not any(text_metrics & set(row) for row in written["rows"])
    table = (root / "out" / "results.md").read_text()
    assert table.splitlines()[0] == "| variant | pref. NLL | NLL (with hist.) | NLL (without) | DCE AUROC |"
    for header in ("ROUGE", "METEOR", "pref. recall", "BLEU"):
        assert f"on {header}" not in table
    assert (
        "Left out, measured by no run: ROUGE-1, ROUGE-L, METEOR, pref. recall, BLEU (no run generated text: "
        "max_new_tokens 0)."
    ) in table
    assert "nextquill vs context_sft on NLL (with hist.): " in table

    messages.clear()
    back = run_comparison(
        load_comparison(_edited(path, tmp_path, lambda raw: raw["variants"].pop("untrained"))),
        echo=messages.append,
    )
    assert any(m.endswith("compare.max_new_tokens: 0 -> 6") for m in messages), messages
    for name, workdir in workdirs.items():
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == trained[name]
        assert (workdir / "eval" / "test" / "predictions.jsonl").is_file()
        assert "bleu" in json.loads((workdir / DONE_FILE).read_text())
    for row in back["rows"]:
        for metric in (*text_metrics, "nll_with", "nll_without", "preference_nll_with", "dce_auroc"):
            assert row[metric] == pytest.approx(before[row["variant"]][metric], rel=1e-6), metric
    table = (root / "out" / "results.md").read_text()
    assert table.splitlines()[0] == (
        "| variant | ROUGE-1 | ROUGE-L | METEOR | pref. recall | pref. NLL | NLL (with hist.) | "
        "NLL (without) | BLEU | DCE AUROC |"
    )
    assert "Left out" not in table


def test_a_run_trained_then_moved_before_its_evaluation_evaluates_on_the_data_where_it_now_is(
    compared, tmp_path
):
    """Training finished, then the comparison moved before the run was evaluated (no compare_done.json yet):
    `train` checks the data at the new place against the checkpoint's digests and trains nothing, and the
    evaluation reads the data there, not where the config saved with the checkpoint says (after the move
    it was "meta.json not found: run data prepare"). The losses are those of the run where it trained."""
    root, path, _, _, _, _ = compared
    moved = tmp_path / "moved"
    shutil.copytree(root / "out", moved, ignore=shutil.ignore_patterns("*.lock"))
    (moved / "seed0" / "context_sft" / DONE_FILE).unlink()
    metrics = lambda out: json.loads(
        (out / "seed0" / "context_sft" / "eval" / "test" / "metrics.json").read_text()
    )
    before = metrics(root / "out")

    def change(raw):
        _only(raw, "context_sft")
        raw["compare"]["out"] = str(moved)

    prepared = root / "out" / "prepared"  # where the checkpoint's saved config names the data
    hidden = prepared.rename(tmp_path / "hidden")
    messages = []
    try:
        run_comparison(load_comparison(_edited(path, tmp_path, change)), echo=messages.append)
    finally:
        hidden.rename(prepared)
    assert any("already finished at step 2 of 2: nothing to train" in m for m in messages)
    assert metrics(moved)["loss"] == before["loss"]
    assert (moved / "seed0" / "context_sft" / DONE_FILE).exists()


def test_a_signal_ignored_when_the_comparison_starts_stays_ignored_and_everything_is_put_back():
    """A background job (`nohup`, `cmd &` in a script) gets SIGINT ignored: as `train` does, the comparison
    leaves it ignored, else a Ctrl-C meant for the foreground would stop it. SIGTERM, not ignored, is the
    comparison's while it runs; its handler and `sys.unraisablehook` are the earlier ones again after."""
    import sys

    from nextquill_jax.eval.compare import _StopOnSignal

    sigterm_before, hook_before = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    sigint_before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            assert sys.unraisablehook == stop._lost
            with stop.suspended():  # training's own handlers then see what `train` would
                assert signal.getsignal(signal.SIGTERM) is sigterm_before
                assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is sigterm_before
        assert sys.unraisablehook is hook_before
    finally:
        signal.signal(signal.SIGINT, sigint_before)


def test_a_finished_run_is_trained_again_only_where_it_has_no_training_here_to_keep(
    tmp_path, tiny_config, monkeypatch
):
    """`run_variant` on a finished run whose settings changed: one recorded untrained (`train: false`) whose
    variant now trains is trained, then its checkpoint evaluated; one that trained here, whose evaluation
    settings alone changed, is evaluated from its checkpoint without training. Training, model loading,
    evaluation and the effect report are stand-ins that record what was called. A run evaluated again whose
    evaluation fails is left unrecorded."""
    from nextquill_jax.eval.compare import run_variant
    from nextquill_jax.eval.compare_record import run_settings
    from nextquill_jax.train import metrics_log
    from nextquill_jax.train import workdir as workdir_module

    calls, data = [], tmp_path / "data"
    monkeypatch.setattr(
        loop, "train_to_the_end", lambda cfg, workdir, echo: calls.append(("train", workdir.name))
    )
    monkeypatch.setattr(workdir_module, "data_dir_of", lambda cfg, workdir: data)
    monkeypatch.setattr(evaluate, "evaluate", lambda workdir, *a, **k: {})
    _stand_ins_around_evaluation(monkeypatch, calls)
    skipped = {"skipped": 2}  # its training log's last count of skipped updates
    monkeypatch.setattr(metrics_log, "last_value", lambda workdir, key: skipped[key])

    untrained = _comparison(tmp_path, tiny_config, {"a": {"train": False}})
    _finished_with(untrained, run_settings(untrained, "a", untrained.run_config("a", 0)))
    comparison = _comparison(tmp_path, tiny_config, {"a": {}})
    workdir = comparison.workdir("a", 0)
    record = run_variant(comparison, "a", 0, echo=lambda _: None)
    assert calls == [("train", "a"), ("restore", "a"), ("effects", "a", data)]
    assert record["skipped_updates"] == 2 and record["settings"]["train"] is True

    calls.clear()
    settings = run_settings(comparison, "a", comparison.run_config("a", 0))
    settings["evaluation"]["max_examples"] = 3  # recorded as evaluated on 3 examples; the file now says all
    _finished_with(comparison, settings)
    run_variant(comparison, "a", 0, echo=lambda _: None)
    assert calls == [("restore", "a"), ("effects", "a", data)]

    # Evaluated again and stopped by an error: the record of the old settings must not stand for the run.
    _finished_with(comparison, settings)

    def failing(workdir, *args, **kwargs) -> dict:
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(evaluate, "evaluate", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_variant(comparison, "a", 0, echo=lambda _: None)
    assert not (workdir / DONE_FILE).exists()


def test_an_eval_batch_size_the_mesh_does_not_split_is_accepted_where_nothing_is_decoded(
    tmp_path, tiny_config, monkeypatch
):
    """With compare.max_new_tokens 0 evaluation decodes nothing, so no batch of prompts is split over the
    mesh's batch shards and any eval_batch_size does; decoding 6 tokens, 3 over 4 shards is refused."""
    from nextquill_jax import parallel
    from nextquill_jax.eval.compare import _check_eval_batch_size

    monkeypatch.setattr(parallel, "batch_shard_count", lambda mesh: 4)
    for max_new_tokens in (0, 6):
        comparison = _comparison(
            tmp_path, tiny_config, {"a": {}}, eval_batch_size=3, max_new_tokens=max_new_tokens
        )
        if max_new_tokens == 0:
            assert _check_eval_batch_size(comparison) is None
        else:
            with pytest.raises(ConfigError, match=r"compare\.eval_batch_size 3 is not a multiple of"):
                _check_eval_batch_size(comparison)


def test_on_locked_is_called_once_with_the_compare_out_lock_held(
    tmp_path, write_random_data, tiny_config, monkeypatch
):
    """The CLI opens its third-party log in compare.out from `on_locked`: once the comparison holds the lock
    (compare.lock is there), and once only. Evaluation, the effect report, the model and the table are
    stand-ins."""
    from nextquill_jax.eval import compare_table

    file = _compare_file_on_random_data(tmp_path, write_random_data, tiny_config, {"a": {"train": False}})
    monkeypatch.setattr(evaluate, "evaluate", lambda workdir, *a, **k: {})
    monkeypatch.setattr(compare_table, "write_results", lambda comparison, records: {})
    _stand_ins_around_evaluation(monkeypatch, [])
    locked = []
    run_comparison(
        load_comparison(file),
        echo=lambda _: None,
        on_locked=lambda: locked.append((tmp_path / "out" / "compare.lock").exists()),
    )
    assert locked == [True]


def test_a_misspelt_best_metric_is_refused_once_whatever_the_number_of_seeds(
    tmp_path, tiny_config, monkeypatch
):
    """The check reads the variant's config, the same for every seed: a variant run with seeds 0 and 1 is
    named in one line, not one a seed."""
    variants = {"a": {}, "b": {"overrides": ["checkpoint.best_metric=eval/lss"]}}
    comparison = _comparison(tmp_path, tiny_config, variants, seeds=[0, 1])
    monkeypatch.setattr(loop, "train", lambda cfg, workdir, *, echo: pytest.fail("a run started"))
    with pytest.raises(ConfigError) as e:
        run_comparison(comparison, echo=lambda _: None)
    lines = str(e.value).splitlines()
    file = tmp_path / "c.yaml"
    assert len(lines) == 1 and lines[0].startswith(f"{file}: variant 'b': checkpoint.best_metric `eval/lss`")


def test_a_trained_in_variants_best_metric_is_not_checked_where_it_does_not_train(
    tmp_path, tiny_config, monkeypatch
):
    """`checkpoint.best_metric` only matters to a run that trains: a variant evaluating another comparison's
    run (`trained_in`) is not refused for it, while the same setting on a variant that trains here is. The
    `trained_in` run's own checks are stubbed (they read a trained run, `test_a_trained_in_run_that_cannot_
    stand_for_the_variant_...` covers them): each run counts as finished, with nothing to do."""
    from nextquill_jax.eval import compare

    misspelt = ["checkpoint.best_metric=eval/lss"]
    variants = {
        "a": {},
        "b": {"overrides": misspelt, "trained_in": str(tmp_path / "elsewhere")},
        "c": {"overrides": misspelt},
    }
    comparison = _comparison(tmp_path, tiny_config, variants)
    monkeypatch.setattr(compare, "check_trained_in", lambda *args: None)
    monkeypatch.setattr(compare, "finished_changes", lambda *args: [])
    with pytest.raises(ConfigError) as e:
        compare._check_runs(comparison, [("a", 0), ("b", 0), ("c", 0)])
    lines = str(e.value).splitlines()
    file = tmp_path / "c.yaml"
    assert len(lines) == 1 and lines[0].startswith(f"{file}: variant 'c': checkpoint.best_metric `eval/lss`")


def test_under_the_multi_process_runtime_sigterm_is_left_to_its_service(monkeypatch):
    """JAX's preemption service owns SIGTERM once the multi-process runtime has started: the comparison takes
    only SIGINT, and a SIGTERM `_Signalled` that reaches the unraisable hook goes to the earlier hook
    instead of being delivered again."""
    import sys
    from types import SimpleNamespace

    from nextquill_jax.eval import compare

    monkeypatch.setattr(compare, "_distributed", lambda: True)
    sigterm_before, reached = signal.getsignal(signal.SIGTERM), []
    monkeypatch.setattr(sys, "unraisablehook", reached.append)
    delivered = []  # a signal delivered again would arrive wherever the suite then is
    monkeypatch.setattr(compare.lost_signals, "deliver_again", delivered.append)
    with compare._StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) is sigterm_before
        assert signal.getsignal(signal.SIGINT) == stop._handle
        unraisable = SimpleNamespace(exc_value=compare._Signalled(signal.SIGTERM))
        stop._lost(unraisable)
        assert reached == [unraisable] and delivered == []
    assert signal.getsignal(signal.SIGTERM) is sigterm_before


def test_a_trained_in_run_with_its_own_data_is_evaluated_on_the_data_it_trained_on(
    tmp_path, tiny_config, monkeypatch
):
    """A variant whose data overrides differ from the base prepares its data in its own workdir, so a
    `trained_in` run of it has its data in the other comparison's `<run>/prepared`: evaluation and the effect
    report read that, not this comparison's workdir of the run, where nothing was prepared. Model loading,
    evaluation and the effect report are stand-ins that record what they were given."""
    from nextquill_jax.eval.compare import run_variant
    from nextquill_jax.train import metrics_log

    calls = []
    monkeypatch.setattr(
        evaluate, "evaluate", lambda *a, data_dir, **k: calls.append(("evaluate", data_dir)) or {}
    )
    _stand_ins_around_evaluation(monkeypatch, calls)
    monkeypatch.setattr(metrics_log, "last_value", lambda workdir, key: 0)
    other = tmp_path / "other"
    variant = {"trained_in": str(other), "overrides": ["data.max_target_tokens=100"]}
    base = tiny_config(None, tmp_path / "unused_run")
    base["train"]["data_dir"] = None  # the comparison prepares the data
    file = tmp_path / "c.yaml"
    compare = {"out": str(tmp_path / "out"), "baseline": "a", "split": "val"}
    file.write_text(yaml.safe_dump({"compare": compare, "variants": {"a": variant}, "base": base}))
    comparison = load_comparison(file)
    assert comparison.run_config("a", 0).train.data_dir is None  # its own data, not the shared one
    record = run_variant(comparison, "a", 0, echo=lambda _: None)
    prepared = other / "seed0" / "a" / "prepared"
    assert calls == [("restore", "a"), ("evaluate", prepared), ("effects", "a", prepared)]
    assert record["rendered_split"] == str(other / "seed0" / "a" / "prepared" / "val.jsonl")
