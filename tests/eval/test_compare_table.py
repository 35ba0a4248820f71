"""`compare_table`: the table of a comparison from its runs' files, written by hand here (no training)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nextquill_jax.data.checksums import file_digest
from nextquill_jax.eval.bootstrap import paired_bootstrap
from nextquill_jax.eval.compare_table import (
    NO_WIDTH_VERDICT,
    difference_verdict,
    example_keys,
    few_examples_line,
    interval_text,
    left_out_counts,
    not_measured_line,
    write_results,
)
from nextquill_jax.eval.effect_report import write_report
from nextquill_jax.loss import LossConfig
from tests.eval.test_nonfinite_results import effects, run_files


def _results(tmp_path, records, baseline):
    out = tmp_path / "out"
    out.mkdir()
    compare = SimpleNamespace(out=str(out), split="test", baseline=baseline, resamples=1000)
    return write_results(SimpleNamespace(source="compare.yaml", compare=compare), records), out


def test_runs_whose_data_was_prepared_differently_are_paired_by_example_id(tmp_path):
    """A variant whose `data` overrides prepared its split otherwise holds the examples in another order, and
    not all of them: each of its shared examples scores the baseline's value + 0.1 (ROUGE-1) and + 0.5 (NLL),
    so pairing by id gives exactly those differences; pairing by row index would pair u4 with u0 and so on."""
    base_ids = ["u0", "u1", "u2", "u3", "u4"]
    base_rouge, base_nll = [0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]
    rouge, nll = dict(zip(base_ids, base_rouge, strict=True)), dict(zip(base_ids, base_nll, strict=True))
    rouge["u9"], nll["u9"] = 0.9, 9.0  # only the variant's data holds u9; only the baseline's holds u3
    other_ids = ["u4", "u0", "u1", "u2", "u9"]
    records = [
        run_files(tmp_path, "base", base_rouge, base_nll, bleu=1.0, ids=base_ids),
        run_files(
            tmp_path,
            "short",
            [rouge[k] + (k != "u9") * 0.1 for k in other_ids],
            [nll[k] + (k != "u9") * 0.5 for k in other_ids],
            bleu=1.0,
            ids=other_ids,
        ),
    ]
    result, out = _results(tmp_path, records, "base")
    for metric, step in (("rouge1", 0.1), ("nll_with", 0.5)):
        got = result["differences"]["short"][metric]
        assert (got["mean"], got["low"], got["high"]) == pytest.approx((step, step, step), abs=1e-6)
        assert (got["examples"], got["nonfinite"], got["unpaired"]) == (4, 0, 2)
    text = (out / "results.md").read_text()
    # Every pair differs by the same amount: an interval of no width, which gives no verdict.
    assert (
        "short vs base on ROUGE-1: no verdict: the examples' differences agree exactly "
        "(+0.1000 [+0.1000, +0.1000], 4 examples, 4 paired of 6:"
    ) in text
    assert "each difference pairs only the examples both evaluated, the same id with the same content" in text
    assert "share an id" not in text  # every shared id holds the same example in both
    # Each run's own mean still covers every example it evaluated.
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["short"]["rouge1"] == pytest.approx((0.6 + 0.2 + 0.3 + 0.4 + 0.9) / 5, abs=1e-12)


def test_runs_of_the_same_data_say_nothing_of_unpaired_examples(tmp_path):
    records = [run_files(tmp_path, n, [0.1, 0.2, 0.4], [1.0, 2.0, 3.0], bleu=1.0) for n in ("a", "b")]
    result, out = _results(tmp_path, records, "a")
    assert result["differences"]["b"]["rouge1"]["unpaired"] == 0
    assert "paired of" not in (out / "results.md").read_text()


def test_runs_of_the_same_data_pair_every_example(tmp_path):
    """Rows with their user and target text, as `data prepare` writes them: the same data pairs as by id."""
    targets = ["first review", "second review", "third review"]
    records = [
        run_files(tmp_path, n, [0.1 + d, 0.2 + d, 0.4 + d], [1.0, 2.0, 3.0], bleu=1.0, targets=targets)
        for n, d in (("a", 0.0), ("b", 0.1))
    ]
    result, out = _results(tmp_path, records, "a")
    got = result["differences"]["b"]["rouge1"]
    assert (got["examples"], got["unpaired"], got["other_content"]) == (3, 0, 0)
    assert got["mean"] == pytest.approx(0.1, abs=1e-6)
    assert result["not_paired"] == {}
    text = (out / "results.md").read_text()
    assert "paired of" not in text and "share an id" not in text


def test_examples_that_share_an_id_but_not_their_content_are_not_paired(tmp_path):
    """A variant whose data overrides prepared other examples (another synthetic seed) may hold another
    example under the same id: the two are not the same example, so pairing them would report a difference
    over unrelated examples. Only u2 and u3 are the same examples in both runs (each +0.1 in the variant);
    u0 and u1 hold other targets there, scoring far from the baseline's."""
    ids = ["u0", "u1", "u2", "u3"]
    base_targets = ["Lonely Shadow", "Broken Garden", "Silent Bridge", "Electric River"]
    other_targets = ["Broken Garden", "Lonely Shadow", "Silent Bridge", "Electric River"]
    base = run_files(
        tmp_path, "base", [0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4], bleu=1.0, ids=ids, targets=base_targets
    )
    other = run_files(
        tmp_path, "other", [0.9, 0.9, 0.4, 0.5], [9, 9, 3.5, 4.5], bleu=1.0, ids=ids, targets=other_targets
    )
    result, out = _results(tmp_path, [base, other], "base")
    for metric, step in (("rouge1", 0.1), ("nll_with", 0.5)):
        got = result["differences"]["other"][metric]
        assert (got["mean"], got["low"], got["high"]) == pytest.approx((step, step, step), abs=1e-6)
        assert (got["examples"], got["unpaired"], got["other_content"]) == (2, 4, 2)
    text = (out / "results.md").read_text()
    assert (
        f"other vs base on ROUGE-1: {NO_WIDTH_VERDICT} (+0.1000 [+0.1000, +0.1000], 2 examples, 2 paired of "
        "6: 4 share an id but not their content (user, target text))"
    ) in text
    assert "Some examples share an id with one of the baseline's but not its content" in text


def test_a_variant_whose_examples_all_differ_from_the_baseline_s_says_so(tmp_path):
    """The same ids, none of them the same example (all other targets): no difference is drawn, and
    results.md says why, instead of a paired difference over unrelated examples."""
    ids = ["u0", "u1", "u2"]
    base = run_files(tmp_path, "base", [0.1, 0.2, 0.3], [1, 2, 3], bleu=1.0, ids=ids, targets=["a", "b", "c"])
    other = run_files(
        tmp_path, "other", [0.2, 0.3, 0.4], [2, 3, 4], bleu=1.0, ids=ids, targets=["x", "y", "z"]
    )
    result, out = _results(tmp_path, [base, other], "base")
    assert result["differences"]["other"] == {}
    assert result["not_paired"]["other"]["rouge1"] == {"unpaired": 6, "other_content": 3}
    text = (out / "results.md").read_text()
    assert " vs base on ROUGE-1: " not in text
    assert (
        "- other vs base on ROUGE-1, ROUGE-L, METEOR, NLL (with hist.), NLL (without): not compared, no "
        "example is in both runs' data (6 examples: 6 share an id but not their content (user, target text))"
    ) in text
    assert "Some examples share an id with one of the baseline's but not its content" in text
    # The rows still give each run's own means.
    assert {r["variant"]: r["rouge1"] for r in result["rows"]} == pytest.approx({"base": 0.2, "other": 0.3})


def test_results_md_says_bleu_and_the_auroc_have_no_interval(tmp_path):
    """The README promises a difference with an interval for each metric; BLEU (a corpus statistic) and the
    DCE AUROC have none, and results.md says so under the differences, naming only the columns it shows."""
    records = [
        run_files(tmp_path, n, [0.1 + d, 0.3 + d], [1.0, 2.0], bleu=1.0) for n, d in (("a", 0), ("b", 0.1))
    ]
    result, out = _results(tmp_path, records, "a")
    assert not {"bleu", "dce_auroc"} & set(result["differences"]["b"])
    text = (out / "results.md").read_text()
    assert (
        "No difference or interval for BLEU (a corpus statistic): a paired bootstrap resamples per-example "
        "values; the table gives its mean only."
    ) in text
    assert "DCE AUROC (one" not in text  # no ground-truth roles here: the column is not shown

    def not_generated(name):  # no BLEU either: no such line
        record = run_files(tmp_path / "none", name, [0.5], [1.0], bleu=1.0)
        Path(record["eval_dir"], "predictions.jsonl").unlink()
        return {k: v for k, v in record.items() if k != "bleu"}

    _, out = _results(tmp_path / "none", [not_generated("a"), not_generated("b")], "a")
    assert "No difference or interval" not in (out / "results.md").read_text()


def test_with_roles_both_columns_without_interval_are_named_and_an_undefined_auroc_counted(tmp_path):
    """Every report here has roles, so both BLEU and the DCE AUROC are shown: the line under the differences
    names both and says "their means". Variant v's seed-1 report scores preference tokens only (no AUROC
    defined), its seed 0 both kinds: the undefined-AUROC line counts 1 seed of v's 2."""
    runs = [("base", 0, ["preference", "noise"]), ("v", 0, ["preference", "noise"])]
    runs.append(("v", 1, ["preference", "preference"]))
    records = []
    for name, seed, roles in runs:
        record = run_files(tmp_path / f"seed{seed}", name, [0.1, 0.3], [1.0, 2.0], bleu=1.0)
        examples = [dataclasses.replace(effects(i, 1.0 + i), roles=roles) for i in range(2)]
        write_report(examples, LossConfig(), Path(record["effects_summary"]).parent, split="test")
        records.append({**record, "seed": seed, "effects_blake2b": file_digest(record["effects_summary"])})
    _, out = _results(tmp_path, records, "base")
    text = (out / "results.md").read_text()
    assert (
        "No difference or interval for BLEU (a corpus statistic) or DCE AUROC (one AUROC over the tokens of "
        "all examples): a paired bootstrap resamples per-example values; the table gives their means only."
    ) in text, text
    assert text.split("| v |")[1].splitlines()[0].endswith("| n/a |")  # the mean of 1.0 and an undefined one
    assert "for which no AUROC is defined: v (1 seed of 2)." in text, text


def test_examples_sharing_an_id_are_refused(tmp_path):
    split = tmp_path / "test.jsonl"
    split.write_text('{"index": 0, "id": "x", "source": "a:1"}\n{"index": 1, "id": "x", "source": "a:2"}\n')
    with pytest.raises(ValueError, match=r"test.jsonl: examples share the id 'x'.* Fix: give every record"):
        example_keys(split)
    split.write_text('{"index": 0, "id": "", "source": "a:1"}\n{"index": 1, "id": "", "source": "a:2"}\n')
    keys = example_keys(split)
    assert [keys[0].id, keys[1].id] == ["a:1", "a:2"]  # no ids: the file:line each target came from


def test_a_one_variant_comparison_says_there_is_nothing_to_compare(tmp_path):
    result, out = _results(tmp_path, [run_files(tmp_path, "a", [0.1, 0.2], [1.0, 2.0], bleu=1.0)], "a")
    assert result["differences"] == {}
    text = (out / "results.md").read_text()
    assert text.endswith("\nOnly one variant (a): no other to compare with it.\n")
    assert "Difference to" not in text


def test_the_std_across_seeds_is_the_sample_std(tmp_path):
    """Two seeds whose ROUGE-1 means are 0.1 and 0.3: the sample std is sqrt(2 * 0.1**2 / 1) = 0.1414 (the
    population std would be 0.1)."""
    records = []
    for seed, value in ((0, 0.1), (1, 0.3)):
        record = run_files(tmp_path / f"seed{seed}", "a", [value, value], [1.0, 2.0], bleu=1.0)
        records.append({**record, "seed": seed})
    result, out = _results(tmp_path, records, "a")
    assert result["rows"][0]["rouge1"] == pytest.approx(0.2, abs=1e-12)
    assert result["rows"][0]["rouge1_std"] == pytest.approx(2**0.5 * 0.1, abs=1e-12)
    assert "| a | 0.2000 ± 0.1414 |" in (out / "results.md").read_text()


def test_three_seeds_give_the_mean_of_their_means_and_its_sample_std(tmp_path):
    """Seed means 0.1, 0.2 and 0.6: the row's ROUGE-1 is their mean 0.3 (their median, 0.2, would pass with
    two seeds, where the two agree), its std the float64 NumPy sample std (ddof=1)."""
    seed_means = [0.1, 0.2, 0.6]
    records = []
    for seed, value in enumerate(seed_means):
        record = run_files(tmp_path / f"seed{seed}", "a", [value, value], [1.0, 2.0], bleu=1.0)
        records.append({**record, "seed": seed})
    result, out = _results(tmp_path, records, "a")
    std = float(np.std(np.array(seed_means, np.float64), ddof=1))
    assert result["rows"][0]["rouge1"] == pytest.approx(np.mean(seed_means), abs=1e-12)
    assert result["rows"][0]["rouge1_std"] == pytest.approx(std, abs=1e-12)
    assert f"| a | 0.3000 ± {std:.4f} |" in (out / "results.md").read_text()


def test_pairs_are_taken_in_the_baseline_s_order(tmp_path):
    """The bootstrap resamples pair positions, so the interval depends on the pairs' order: it is the one
    `paired_bootstrap` gives in the baseline's split order, whatever order the variant's data holds the
    examples in (the same variant prepared twice must give one interval)."""
    diffs = [0.05, 0.3, -0.1, 0.2, 0.0, 0.17, -0.04, 0.11, 0.26, -0.08, 0.02, 0.14]
    ids = [f"e{i}" for i in range(len(diffs))]
    base = {k: 0.1 + 0.05 * i for i, k in enumerate(ids)}
    variant = {k: base[k] + d for k, d in zip(ids, diffs, strict=True)}
    shuffled = [ids[i] for i in (3, 0, 11, 7, 4, 1, 9, 2, 10, 5, 8, 6)]
    records = [
        run_files(tmp_path, "base", list(base.values()), [1.0] * 12, bleu=1.0, ids=ids),
        run_files(tmp_path, "v", [variant[k] for k in shuffled], [1.0] * 12, bleu=1.0, ids=shuffled),
    ]
    result, _ = _results(tmp_path, records, "base")
    want = paired_bootstrap([variant[k] for k in ids], list(base.values()), resamples=1000)
    other = paired_bootstrap([variant[k] for k in shuffled], [base[k] for k in shuffled], resamples=1000)
    assert (want.low, want.high) != pytest.approx((other.low, other.high), abs=1e-9)  # the order shows
    got = result["differences"]["v"]["rouge1"]
    assert (got["mean"], got["low"], got["high"]) == pytest.approx((want.mean, want.low, want.high), abs=1e-9)


def test_a_variant_with_no_finite_pair_has_no_difference_for_that_metric(tmp_path):
    """Every NLL of the variant's run is null (a diverged run): no pair is left to resample, so the NLL has
    no difference (the table's n/a says why), while its ROUGE-1, finite, is compared as usual."""
    records = [
        run_files(tmp_path, "base", [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], bleu=1.0),
        run_files(tmp_path, "diverged", [0.2, 0.2, 0.4], [math.nan] * 3, bleu=1.0),
    ]
    result, out = _results(tmp_path, records, "base")
    assert "nll_with" not in result["differences"]["diverged"]
    assert result["differences"]["diverged"]["rouge1"]["examples"] == 3
    assert math.isnan(result["rows"][1]["nll_with"])
    assert "diverged vs base on NLL (with hist.)" not in (out / "results.md").read_text()


def test_one_paired_example_is_counted_in_the_singular_and_its_interval_of_no_width_gives_no_verdict(
    tmp_path,
):
    """Each example of the variant scores its baseline's + 0.1: one pair gives the difference exactly, and
    every bootstrap resample draws that one pair, so the interval [+0.1, +0.1] excludes 0 while saying
    nothing of the uncertainty ("better" before, as if significant)."""
    records = [run_files(tmp_path, n, [0.1 + d], [1.0 + d], bleu=1.0) for n, d in (("a", 0.0), ("b", 0.1))]
    result, out = _results(tmp_path, records, "a")
    rouge = result["differences"]["b"]["rouge1"]
    assert rouge["examples"] == 1 and rouge["low"] == pytest.approx(rouge["high"], abs=1e-12)
    assert rouge["low"] > 0
    assert rouge["significant"] is False
    text = (out / "results.md").read_text()
    assert f"b vs a on ROUGE-1: {NO_WIDTH_VERDICT} (+0.1000 [+0.1000, +0.1000], 1 example)" in text
    assert "b vs a on ROUGE-1: better" not in text
    assert "Only 1 paired example: at fewer than" in text


def test_examples_that_differ_by_different_amounts_keep_their_verdict(tmp_path):
    """The no-width rule leaves an interval with width alone: three pairs differing by +0.1, +0.2, +0.3
    give a bootstrap interval inside (0, 0.3], "better"."""
    base = [0.1, 0.2, 0.3]
    records = [
        run_files(tmp_path, "a", base, [1.0, 2.0, 3.0], bleu=1.0),
        run_files(
            tmp_path, "b", [v + d for v, d in zip(base, (0.1, 0.2, 0.3), strict=True)], [1, 2, 3], bleu=1
        ),
    ]
    result, out = _results(tmp_path, records, "a")
    rouge = result["differences"]["b"]["rouge1"]
    assert 0.1 - 1e-9 <= rouge["low"] < rouge["high"] <= 0.3 + 1e-9 and rouge["significant"] is True
    assert "b vs a on ROUGE-1: better (+0.2000 [" in (out / "results.md").read_text()


def test_a_run_that_generated_nothing_has_no_text_metrics_in_the_table(tmp_path):
    """A run evaluated with max_new_tokens 0 records no BLEU and has no predictions.jsonl: its text metrics
    are absent ("-" beside a run that generated; the column left out, with a line saying so, when no run did),
    never 0, and no difference is drawn for them; the NLL difference is the one the effect reports give."""

    def not_generated(name, nll):
        record = run_files(tmp_path, name, [0.5, 0.5, 0.5], nll, bleu=1.0)
        Path(record["eval_dir"], "predictions.jsonl").unlink()
        return {k: v for k, v in record.items() if k != "bleu"}

    generated = run_files(tmp_path, "gen", [0.1, 0.2, 0.4], [1.0, 2.0, 3.0], bleu=7.0)
    mixed, out = _results(tmp_path, [generated, not_generated("a", [1.5, 2.5, 3.5])], "gen")
    rows = {r["variant"]: r for r in mixed["rows"]}
    assert rows["gen"]["bleu"] == 7.0 and "rouge1" in rows["gen"]
    assert not {"rouge1", "rougeL", "meteor", "bleu"} & set(rows["a"])
    assert set(mixed["differences"]["a"]) == {"nll_with", "nll_without"}
    assert mixed["differences"]["a"]["nll_with"]["mean"] == pytest.approx(0.5, abs=1e-6)
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| variant | ROUGE-1 | ROUGE-L | METEOR | NLL (with hist.) | NLL (without) | BLEU |"
    assert table[3].startswith("| a | - | - | - | 2.5000 | ") and table[3].endswith(" | - |")
    assert table[6] == (
        '"-": not measured by that variant\'s runs: a: ROUGE-1, ROUGE-L, METEOR, BLEU (generated no text: '
        "max_new_tokens 0)."
    )
    assert not any(" on ROUGE" in line or " on METEOR" in line for line in table)
    # The hand-written split has neither signature words nor roles; a run generated, so that is not why.
    assert (
        "Left out, measured by no run: pref. recall (rows without meta.signature_words); pref. NLL, "
        "DCE AUROC (no ground-truth preference tokens: meta.target_spans)."
    ) in table

    (tmp_path / "none").mkdir()
    none, out = _results(
        tmp_path / "none", [not_generated("b", [1.0, 2.0, 3.0]), not_generated("c", [2.0, 3.0, 4.0])], "b"
    )
    assert not any({"rouge1", "bleu"} & set(row) for row in none["rows"])
    text = (out / "results.md").read_text()
    assert text.splitlines()[0] == "| variant | NLL (with hist.) | NLL (without) |"
    assert (  # not generating is the reason for the text metrics alone
        "Left out, measured by no run: ROUGE-1, ROUGE-L, METEOR, pref. recall, BLEU (no run generated text: "
        "max_new_tokens 0); pref. NLL, DCE AUROC (no ground-truth preference tokens: meta.target_spans)."
    ) in text
    assert f"c vs b on NLL (with hist.): {NO_WIDTH_VERDICT} (+1.0000 [+1.0000, +1.0000], 3 examples)" in text
    assert '"-"' not in text  # every shown column measured by every row


def test_a_column_some_seeds_of_a_variant_lack_is_absent_from_its_row_not_their_mean(tmp_path):
    """Variant a's seed 0 generated and its effect report has ground-truth roles; its seed 1 generated
    nothing and its report has no roles. A mean over the seeds that measured a column would read as the
    variant's: its text metrics, BLEU and DCE AUROC are absent ("-"), while its NLL, which both seeds
    measured, is the mean of the two seeds' means, (2.0 + 3.0) / 2."""
    base = run_files(tmp_path / "seed0", "base", [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], bleu=2.0)
    measured = run_files(tmp_path / "seed0", "a", [0.4, 0.5, 0.6], [1.0, 2.0, 3.0], bleu=5.0)
    with_roles = [dataclasses.replace(effects(i, 1.0 + i), roles=["preference", "noise"]) for i in range(3)]
    write_report(with_roles, LossConfig(), Path(measured["effects_summary"]).parent, split="test")
    measured["effects_blake2b"] = file_digest(measured["effects_summary"])  # as the run would record it
    silent = run_files(tmp_path / "seed1", "a", [0.9, 0.9, 0.9], [2.0, 3.0, 4.0], bleu=9.0)
    Path(silent["eval_dir"], "predictions.jsonl").unlink()  # max_new_tokens 0: no predictions, no BLEU
    silent = {**{k: v for k, v in silent.items() if k != "bleu"}, "seed": 1}
    result, out = _results(tmp_path, [base, measured, silent], "base")
    row = result["rows"][1]
    assert row["seeds"] == [0, 1]
    assert all(row.get(m) is None for m in ("rouge1", "rougeL", "meteor", "bleu", "dce_auroc")), row
    assert row["nll_with"] == pytest.approx(2.5, abs=1e-6)
    assert set(result["differences"]["a"]) == {"nll_with", "nll_without"}
    line = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| a |"))
    assert line.startswith("| a | - | - | - | 2.5000 ± 0.7071 | "), line  # sample std of 2.0 and 3.0


def test_the_dash_line_names_each_variant_with_its_own_reasons():
    """Variants are separated by "; " and one variant's reasons by ", ", so that every reason stays with its
    variant; a row that generated does not blame its missing columns on generation."""
    shown = [
        ("rouge1", "ROUGE-1"),
        ("preference_nll_with", "pref. NLL"),
        ("bleu", "BLEU"),
        ("dce_auroc", "DCE AUROC"),
    ]
    rows = [
        {"variant": "gen", "rouge1": 0.1, "preference_nll_with": 2.0, "bleu": 1.0, "dce_auroc": 0.8},
        {"variant": "a"},
        {"variant": "b", "rouge1": 0.2, "bleu": 2.0},
    ]
    no_roles = "(no ground-truth preference tokens: meta.target_spans)"
    assert not_measured_line(rows, shown) == (
        '"-": not measured by that variant\'s runs: a: ROUGE-1, BLEU (generated no text: max_new_tokens 0), '
        f"pref. NLL, DCE AUROC {no_roles}; b: pref. NLL, DCE AUROC {no_roles}."
    )
    assert not_measured_line(rows[:1], shown) is None
    # A row that generated (it has BLEU) but lacks preference recall: its rows have no signature words.
    recall = [{"variant": "gen", "preference_recall": 0.5, "bleu": 1.0}, {"variant": "c", "bleu": 2.0}]
    assert not_measured_line(recall, [("preference_recall", "pref. recall"), ("bleu", "BLEU")]) == (
        '"-": not measured by that variant\'s runs: c: pref. recall (rows without meta.signature_words).'
    )


def test_predictions_another_evaluation_replaced_are_refused_not_read(tmp_path):
    """The run's eval directory is `nextquill-jax evaluate`'s default --out: an evaluation there after the
    comparison recorded the run (one without generation, which deletes predictions.jsonl; or one with other
    decoding, which rewrites it) must not be read with the record's BLEU. Its metrics.json names the BLEU of
    the evaluation its predictions.jsonl belongs to."""
    base = run_files(tmp_path, "base", [0.1, 0.2, 0.4], [1.0, 2.0, 3.0], bleu=7.0)
    other = run_files(tmp_path, "other", [0.2, 0.3, 0.5], [1.0, 2.0, 3.0], bleu=8.0)
    eval_dir = Path(other["eval_dir"])
    fix = f"Fix: delete {tmp_path / 'other' / 'compare_done.json'} and run compare again"

    (eval_dir / "metrics.json").write_text(json.dumps({"overall": {"bleu": 9.5}}))  # decoded otherwise
    replaced = [{"index": i, "rouge1": 0.9, "rougeL": 0.9, "meteor": 0.9} for i in range(3)]
    (eval_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in replaced))
    with pytest.raises(ValueError, match=r"there: BLEU 9\.5, predictions.jsonl present\): another") as e:
        _results(tmp_path, [base, other], "base")
    assert str(e.value).startswith(f"{eval_dir} no longer holds the evaluation ") and fix in str(e.value)

    (eval_dir / "metrics.json").write_text(json.dumps({"loss": {}}))  # max_new_tokens 0: no text metrics
    (eval_dir / "predictions.jsonl").unlink()
    (tmp_path / "again").mkdir()
    with pytest.raises(ValueError, match=r"\(BLEU 8\.0; there: no BLEU, predictions.jsonl absent\)"):
        _results(tmp_path / "again", [base, other], "base")

    # predictions.jsonl deleted alone, metrics.json still the record's: refused too, not a bare open error.
    (eval_dir / "metrics.json").write_text(json.dumps({"overall": {"bleu": 8.0}}))
    (tmp_path / "alone").mkdir()
    with pytest.raises(ValueError, match=r"\(BLEU 8\.0; there: BLEU 8\.0, predictions.jsonl absent\)"):
        _results(tmp_path / "alone", [base, other], "base")


def test_an_effect_report_written_over_the_recorded_one_is_refused_not_read(tmp_path):
    """`nextquill-jax effects --out <run>/effects` replaces the report the run recorded (another split,
    examples or step): the table read its NLLs and AUROC as the run's, and the verdicts changed."""
    from nextquill_jax.eval.effect_report import write_report

    base = run_files(tmp_path, "base", [0.1, 0.2, 0.4], [1.0, 2.0, 3.0], bleu=7.0)
    other = run_files(tmp_path, "other", [0.2, 0.3, 0.5], [1.0, 2.0, 3.0], bleu=8.0)
    summary, done = Path(other["effects_summary"]), tmp_path / "other" / "compare_done.json"
    fix = f"Fix: delete {done} and run compare again, which reports the run again without training it."
    write_report([effects(i, 9.0) for i in range(2)], LossConfig(), summary.parent, split="val")
    with pytest.raises(ValueError) as e:
        _results(tmp_path, [base, other], "base")
    assert str(e.value) == (
        f"{summary} is no longer the effect report {done} records (another content: another report was "
        f"written there since, such as `nextquill-jax effects --out` the run's effects directory). {fix}"
    )
    summary.unlink()
    (tmp_path / "gone").mkdir()
    with pytest.raises(ValueError) as e:
        _results(tmp_path / "gone", [base, other], "base")
    assert str(e.value) == f"{summary}, the effect report {done} records, does not exist. {fix}"
    # A record from before the digest was recorded: its report is read as it is.
    write_report(
        [effects(i, v) for i, v in enumerate([1.0, 2.0, 3.0])], LossConfig(), summary.parent, split="test"
    )
    older = {k: v for k, v in other.items() if k != "effects_blake2b"}
    (tmp_path / "older").mkdir()
    results, _ = _results(tmp_path / "older", [base, older], "base")
    assert [row["variant"] for row in results["rows"]] == ["base", "other"]


@pytest.mark.parametrize(
    ("d", "text"),
    [
        ({"mean": 3.31e-7, "low": 1.58e-7, "high": 5.05e-7}, "+3.31e-07 [+1.58e-07, +5.05e-07]"),
        ({"mean": -0.0123, "low": -0.02, "high": -4e-6}, "-1.23e-02 [-2.00e-02, -4.00e-06]"),
        ({"mean": 0.1, "low": 0.05, "high": 0.15}, "+0.1000 [+0.0500, +0.1500]"),
        # Just under 5e-5, 4 decimals round to 0.0000; at 5e-5 they give 0.0001, the fixed form again.
        ({"mean": 4.9e-5, "low": 2e-5, "high": 7e-5}, "+4.90e-05 [+2.00e-05, +7.00e-05]"),
        ({"mean": 5e-5, "low": 5e-5, "high": 1e-4}, "+0.0001 [+0.0001, +0.0001]"),
        ({"mean": 0.0, "low": 0.0, "high": 0.0}, "+0.0000 [+0.0000, +0.0000]"),
    ],
)
def test_an_interval_that_would_print_as_zero_is_written_in_scientific_notation(d, text):
    """A difference of bfloat16 rounding (a mean of 3e-7 whose interval excludes 0) printed as
    "worse (+0.0000 [+0.0000, +0.0000])", an interval that reads as one at 0 beside its verdict; values
    that are exactly 0 keep the fixed form."""
    assert interval_text(d) == text


def test_every_metric_reads_in_its_own_direction():
    """By hand: the text metrics and preference recall are scores (higher is better), the NLLs losses (lower
    is better); a difference of -0.5 [-0.7, -0.3] is worse for the first and better for the second, and the
    opposite one the reverse. Only the NLL with history's direction was exercised by the other tests."""
    from nextquill_jax.eval.compare_table import conclusions

    scores = {"ROUGE-1", "ROUGE-L", "METEOR", "pref. recall"}
    losses = {"pref. NLL", "NLL (with hist.)", "NLL (without)"}
    for sign, scores_are, losses_are in ((-1, "worse", "better"), (1, "better", "worse")):
        d = {"mean": 0.5 * sign, "low": min(0.3 * sign, 0.7 * sign), "high": max(0.3 * sign, 0.7 * sign)}
        d |= {"examples": 40, "nonfinite": 0, "unpaired": 0}
        metrics = ["rouge1", "rougeL", "meteor", "preference_recall"]
        metrics += ["preference_nll_with", "nll_with", "nll_without"]
        lines = conclusions({"baseline": "b", "differences": {"v": dict.fromkeys(metrics, d)}})
        words = {line.split(" on ")[1].split(": ")[0]: line.split(": ")[1].split(" (")[0] for line in lines}
        assert words == {**dict.fromkeys(scores, scores_are), **dict.fromkeys(losses, losses_are)}


def test_the_left_out_counts_pair_the_not_finite_with_the_finite():
    """By hand: 3 examples in the interval, 1 paired but not finite, 2 in one run's data only: 3 + 1 = 4
    pairs of the 4 + 2 = 6 examples either run holds (the pairs not finite are still paired)."""
    counts = {"examples": 3, "nonfinite": 1, "unpaired": 2, "other_content": 0}
    assert left_out_counts(counts) == (
        ", 1 left out: not finite, 4 paired of 6: the rest in one run's data only"
    )
    shared_id = {**counts, "unpaired": 3, "other_content": 1}  # 2 of the 3: one id, two examples
    assert left_out_counts(shared_id) == (
        ", 1 left out: not finite, 4 paired of 7: 2 share an id but not their content (user, target text), "
        "1 in one run's data only"
    )


def test_verdicts_and_the_few_examples_warning_at_their_bounds():
    """As the docstrings state them: an interval at 0 of no width (every pair equal) is no significant
    difference, one away from 0 of no width has no verdict, one excluding 0 with width is better or worse in
    the metric's direction; the warning is for fewer than 30 paired examples, the least count named."""
    assert difference_verdict({"mean": 0.0, "low": 0.0, "high": 0.0}, True) == "no significant difference"
    assert difference_verdict({"mean": 0.1, "low": 0.1, "high": 0.1}, True) == NO_WIDTH_VERDICT
    assert difference_verdict({"mean": 0.1, "low": 0.05, "high": 0.2}, True) == "better"
    assert difference_verdict({"mean": 0.1, "low": 0.05, "high": 0.2}, False) == "worse"
    assert difference_verdict({"mean": 0.1, "low": -0.05, "high": 0.2}, True) == "no significant difference"
    assert few_examples_line([30, 40]) is None and few_examples_line([]) is None
    assert few_examples_line([40, 29]).startswith("Only 29 paired examples: at fewer than 30 ")
