"""benchmarks/study_report.py's tables from a run's metrics.jsonl: the counterfactual health and the
evaluations during training, written from hand-made logs whose expected cells are read off the input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.test_bench import benchmark_script


def write_run(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_evaluation_table_lists_every_evaluation_in_step_order_with_dashes_for_absent_streams(tmp_path):
    report = benchmark_script("study_report")
    train_row = {"step": 2, "loss": 2.5, "ce_with": 2.4, "ce_without": 3.9, "pref_fraction": 0.5}
    runs = {
        "context_sft": write_run(
            tmp_path / "a",
            [
                {"step": 96, "loss": 1.7, "ce_with": 1.7},
                {"step": 192, "eval/loss": 1.8, "eval/ce_with": 1.81234},
                {"step": 96, "eval/loss": 1.9, "eval/ce_with": 1.91234},
            ],
        ),
        "nextquill": write_run(
            tmp_path / "b",
            [
                train_row,
                {"step": 96, "eval/ce_with": 2.04, "eval/ce_without": 3.91756, "eval/pref_fraction": 0.6516},
            ],
        ),
        "never_evaluated": write_run(tmp_path / "c", [train_row]),
    }
    assert report.evaluation_table(runs)[2:] == [
        "| context_sft | 96 | 1.9123 | - | - |",
        "| context_sft | 192 | 1.8123 | - | - |",
        "| nextquill | 96 | 2.0400 | 3.9176 | 0.652 |",
    ]
    # The health table reads the training rows only: context_sft logs no without-history CE.
    assert report.health_table(runs)[2:] == [
        "| nextquill | 3.900 → 3.900 (3.900) | 0.500 → 0.500 |",
        "| never_evaluated | 3.900 → 3.900 (3.900) | 0.500 → 0.500 |",
    ]


def _result(differences: dict[str, dict[str, float]]) -> dict:
    """A `compare_runs` result holding only what `across_seeds` reads: each variant's mean differences."""
    return {"differences": {v: {m: {"mean": x} for m, x in d.items()} for v, d in differences.items()}}


def test_across_seeds_gives_the_t_interval_scipy_gives_and_the_hand_computed_study_figures():
    import numpy as np
    import scipy.stats

    report = benchmark_script("study_report")
    # STUDY.md's seeds section, computed by hand before this function existed: nextquill's per-seed
    # differences on preference-token NLL and their mean over seeds 0-2, +0.2629 [+0.2246, +0.3012].
    pref = [0.2490, 0.2602, 0.2795]
    recall = [0.031, -0.012, 0.020]  # higher is better: a positive mean is "better"
    results = [
        (s, _result({"nextquill": {"preference_nll_with": p, "rouge1": r}, "only_seed_0": {"nll_with": 1.0}}))
        for s, p, r in zip((0, 1, 2), pref, recall, strict=True)
    ]
    results[1][1]["differences"].pop("only_seed_0")
    rows = report.across_seeds(results)
    assert [(r["variant"], r["metric"]) for r in rows] == [
        ("nextquill", "rouge1"),
        ("nextquill", "preference_nll_with"),
    ]  # METRICS order; a variant some seed lacks has no row
    for row, values in zip(rows, (recall, pref), strict=True):
        interval = scipy.stats.ttest_1samp(np.array(values, dtype=np.float64), 0.0).confidence_interval(0.95)
        assert row["per_seed"] == values
        np.testing.assert_allclose(row["mean"], np.mean(values), rtol=1e-12)
        np.testing.assert_allclose([row["low"], row["high"]], [interval.low, interval.high], rtol=1e-10)
    assert f"{rows[1]['mean']:+.4f} [{rows[1]['low']:+.4f}, {rows[1]['high']:+.4f}]" == (
        "+0.2629 [+0.2246, +0.3012]"
    )
    assert report.row_verdict(rows[1]) == "worse"  # NLL: a positive difference is worse
    assert report.row_verdict(rows[0]) == "no significant difference"  # the interval holds 0
    assert report.row_verdict({**rows[0], "low": 0.001}) == "better"  # ROUGE: a positive difference is better
    tied = [(s, _result({"nextquill": {"preference_recall": 0.0104}})) for s in (0, 1)]
    (tied_row,) = report.across_seeds(tied)
    tied_t = scipy.stats.ttest_1samp([0.0104, 0.0104], 0.0)  # t = inf, p = 0: "significant" by the formula
    assert tied_t.pvalue == 0.0
    np.testing.assert_allclose([tied_row["low"], tied_row["high"]], tuple(tied_t.confidence_interval(0.95)))
    assert report.row_verdict({**tied_row, "examples_low": 0.0017, "examples_high": 0.0226}) == (
        "no verdict: the seeds agree exactly"
    )  # the study's generation table: one recalled word at each seed, not "better"
    one_seed = report.across_seeds(results[:1])
    assert one_seed[0]["low"] is None and report.row_verdict(one_seed[0]) == "no interval"
    table = report.across_table([0, 1, 2], "context_sft", rows)
    assert (
        table[3]
        == "| nextquill, pref. NLL | +0.2490 | +0.2602 | +0.2795 | +0.2629 [+0.2246, +0.3012] | - | worse |"
    )  # no interval over the examples without per-example values: "-"
    assert table[-1] == "t = 4.303 (2 degrees of freedom) over seeds [0, 1, 2]."


def test_runs_that_differ_in_more_than_the_seed_are_named_with_each_key(tmp_path, tiny_config):
    from nextquill_jax.config import config_to_dict, load_config

    report = benchmark_script("study_report")

    def record(variant: str, seed: int, **loss) -> dict:
        base = tiny_config(
            tmp_path / f"data{seed}", tmp_path / f"run{seed}", loss={"variant": "nextquill", **loss}
        )
        base["train"]["seed"] = seed
        base["data"]["batching"]["seed"] = seed
        base["logging"]["every_steps"] = 1 + seed  # changes no number: not a difference
        config = config_to_dict(load_config(None, base=base))
        settings = {"train": True, "config": config, "evaluation": {"split": "test", "max_new_tokens": 0}}
        return {"variant": variant, "seed": seed, "settings": settings}

    same = [record("a", 0), record("a", 1), record("b", 2, low=0.6), record("b", 3, low=0.6)]
    assert report.other_settings(same) == []
    other = [*same, record("a", 4, low=0.6)]
    assert report.other_settings(other) == ["a (seed 4) against seed 0: loss.low: 0.1 -> 0.6"]

    # The non-finite policy: a run that skipped no update trained as under any policy (the README's fix for
    # a diverged seed sets `train.nonfinite: skip` in the base, after seed 0 ran under `stop`).
    def under(policy: str, seed: int, skipped: int | None) -> dict:
        run = record("a", seed)
        run["settings"]["config"]["train"]["nonfinite"] = policy
        return run if skipped is None else {**run, "skipped_updates": skipped}

    assert report.other_settings([under("stop", 0, 0), under("skip", 1, 0)]) == []
    assert report.other_settings([under("stop", 0, 0), under("skip", 1, 3)]) == []
    refused = report.other_settings([under("stop", 0, None), under("skip", 1, 3)])  # older: no count
    assert refused == ['a (seed 1) against seed 0: train.nonfinite: "stop" -> "skip"']
    with pytest.raises(ValueError, match=r"a \(seed 5\): its compare_done.json predates recorded settings"):
        report.other_settings([same[0], {"variant": "a", "seed": 5}])


def test_a_variant_left_out_of_the_across_table_is_named_with_why():
    """`left_out`: a variant finished at one seed only (its absence), and one finished at both but with no
    paired difference at one (no example shared with the baseline): each named with its seeds; the baseline
    and the variants with a row are not."""
    report = benchmark_script("study_report")
    paired = {"mean": 0.1}
    results = [
        (0, {"differences": {"v": {"nll_with": paired}, "once": {"nll_with": paired}, "apart": {}}}),
        (1, {"differences": {"v": {"nll_with": paired}}}),
    ]
    finished = {0: ["base", "v", "once", "apart"], 1: ["base", "v", "apart"]}
    rows = [{"variant": "v"}]
    assert report.left_out(results, rows, finished, "base") == [
        "once: left out, finished in seed 0 only",
        "apart: left out, no paired difference to base at seeds 0, 1",
    ]
    finished[1].remove("apart")
    assert report.left_out(results, rows, finished, "base")[1] == (
        "apart: left out, no paired difference to base at seed 0 (finished in seed 0 only)"
    )


def test_the_interval_over_the_examples_is_the_bootstrap_of_seed_averaged_differences_and_both_must_exclude_0(
    tmp_path,
):
    """Two seeds, a baseline and two variants, per-example values written as runs' files. Variant `v`'s ROUGE
    differences alternate +0.5 / -0.3 at both seeds (seed means +0.1000, +0.1010): a t interval far from 0,
    while resampling the four examples reaches below 0. Its NLL is the baseline's + 0.1 at seed 0 and + 0.3
    at seed 1 on every example: the reverse (every seed-averaged difference is +0.2; the t interval over two
    seeds holds 0). Neither is a verdict. `steady`'s ROUGE is + 0.09, + 0.11, + 0.1, + 0.1 on its examples
    (+ 0.0001 more at seed 1): both exclude 0."""
    import numpy as np

    from nextquill_jax.eval.bootstrap import paired_bootstrap
    from nextquill_jax.eval.compare_table import compare_runs
    from tests.eval.test_nonfinite_results import run_files

    report = benchmark_script("study_report")
    rouge, nll = np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 2.0, 3.0, 4.0])
    alternating = np.array([0.5, -0.3, 0.5, -0.3])
    variants = {  # name: (ROUGE, NLL) per seed
        "base": lambda s: (rouge, nll),
        "v": lambda s: (rouge + alternating + 0.001 * s, nll + (0.1, 0.3)[s]),
        "steady": lambda s: (rouge + np.array([0.09, 0.11, 0.1, 0.1]) + 0.0001 * s, nll),
    }
    results, records = [], []
    for seed in (0, 1):
        seed_records = []
        for name, values in variants.items():
            r, n = values(seed)
            record = run_files(tmp_path / f"seed{seed}", name, list(r), list(n), bleu=1.0)
            seed_records.append({**record, "seed": seed})
        results.append((seed, compare_runs(seed_records, "base", 1000)))
        records += seed_records
    rows = {
        (r["variant"], r["metric"]): r
        for r in report.across_seeds(results, compare_runs(records, "base", 1000))
    }

    rouge_row = rows[("v", "rouge1")]
    assert rouge_row["per_seed"] == pytest.approx([0.1, 0.101], abs=1e-9)
    assert 0.0 < rouge_row["low"] < rouge_row["high"]  # the seeds agree
    averaged = (variants["v"](0)[0] + variants["v"](1)[0]) / 2  # [4] each example over the seeds
    expected = paired_bootstrap(averaged, rouge, resamples=1000)
    assert (rouge_row["examples_low"], rouge_row["examples_high"]) == pytest.approx(
        (expected.low, expected.high), abs=1e-12
    )
    assert rouge_row["examples"] == 4 and rouge_row["examples_low"] < 0.0 < rouge_row["examples_high"]
    assert report.row_verdict(rouge_row) == "no significant difference"

    nll_row = rows[("v", "nll_with")]
    assert nll_row["low"] < 0.0 < nll_row["high"]
    assert (nll_row["examples_low"], nll_row["examples_high"]) == pytest.approx((0.2, 0.2), abs=1e-6)
    assert report.row_verdict(nll_row) == "no significant difference"

    steady = rows[("steady", "rouge1")]
    assert steady["low"] > 0.0 and steady["examples_low"] > 0.0
    assert report.row_verdict(steady) == "better"

    table = report.across_table([0, 1], "base", [rouge_row], resamples=1000)
    assert table[2] == (
        f"| v, ROUGE-1 | +0.1000 | +0.1010 | +0.1005 [{rouge_row['low']:+.4f}, {rouge_row['high']:+.4f}] | "
        f"[{expected.low:+.4f}, {expected.high:+.4f}] | no significant difference |"
    )
    assert table[-3].startswith("Over the examples: each of the 4 paired examples' difference averaged over")
    assert "1,000 resamples" in table[-3]
    assert table[-2:] == [  # compare's results.md's warning, word for word
        "",
        "Only 4 paired examples: at fewer than 30 the bootstrap intervals are too narrow to trust; evaluate "
        "more examples before reading a verdict.",
    ]


def test_an_interval_of_no_width_over_the_examples_gives_no_verdict_and_few_examples_are_warned_of():
    """The auditor's case: three seeds whose NLL differences (+0.30, +0.31, +0.29) give a t interval that
    excludes 0, but one paired example, whose bootstrap interval is that example's difference at every
    resample: it has no width, so it says nothing, and the t interval alone must not decide ("worse" before).
    The table warns of the one example as compare's results.md does. An interval of a few ulps (the seeds'
    0.3 and 0.1 + 0.2; examples whose differences are 0.10005 computed along different paths) has no width
    either; 96 examples, as in the study, get no warning."""
    from nextquill_jax.eval.bootstrap import paired_bootstrap

    report = benchmark_script("study_report")
    one = paired_bootstrap([2.30], [2.0])
    assert one.low == one.high == one.mean and one.significant  # what the bootstrap gives one example
    per_seed = [
        (s, _result({"v": {"nll_with": m}})) for s, m in zip((0, 1, 2), (0.30, 0.31, 0.29), strict=True)
    ]
    pooled = {"differences": {"v": {"nll_with": {"low": one.low, "high": one.high, "examples": 1}}}}
    (row,) = report.across_seeds(per_seed, pooled, metrics=[("nll_with", "NLL", False)])
    assert 0.0 < row["low"] < row["high"]  # the t interval alone would say "worse"
    assert report.row_verdict(row) == "no verdict: the examples' differences agree exactly"
    table = report.across_table([0, 1, 2], "base", [row], resamples=2000)
    assert table[2] == (
        "| v, NLL | +0.3000 | +0.3100 | +0.2900 | +0.3000 [+0.2752, +0.3248] | [+0.3000, +0.3000] | "
        "no verdict: the examples' differences agree exactly |"
    )
    assert table[-1] == (
        "Only 1 paired example: at fewer than 30 the bootstrap intervals are too narrow to trust; evaluate "
        "more examples before reading a verdict."
    )

    rounded = {**row, "examples_low": 0.10004999999999997, "examples_high": 0.10005000000000003}
    assert report.row_verdict(rounded) == "no verdict: the examples' differences agree exactly"
    assert report.row_verdict({**rounded, "examples_low": 0.1, "examples_high": 0.1001}) == "worse"
    seeds = [
        (s, _result({"v": {"nll_with": m}})) for s, m in zip((0, 1, 2), (0.3, 0.1 + 0.2, 0.3), strict=True)
    ]
    (tied,) = report.across_seeds(seeds)
    assert tied["low"] < tied["high"]  # a few ulps apart: "worse" by exact equality
    assert report.row_verdict(tied) == "no verdict: the seeds agree exactly"
    study = report.across_table([0, 1, 2], "base", [{**row, "examples": 96}], resamples=2000)
    assert study[-1].startswith("Over the examples: each of the 96 paired examples'")


def test_the_across_table_counts_the_pairs_its_interval_over_the_examples_leaves_out(tmp_path):
    """Two seeds; the variant's data holds e0-e3 as the baseline's does, e4 with other content (another
    example under the id) and e9, which the baseline lacks, and its seed-1 NLL of e1 is null. The pooled
    difference pairs e0-e3 (4 of 7: the two e4s share an id but not their content, e9 is in the variant's
    data only) and leaves out e1's NLL, not finite once averaged over the seeds: the table counts them in the
    words of compare's results.md, where it said only "each of the 3 paired examples" before."""
    import math

    from nextquill_jax.eval.compare_table import compare_runs
    from tests.eval.test_nonfinite_results import run_files

    report = benchmark_script("study_report")
    base_ids, ids = ["e0", "e1", "e2", "e3", "e4"], ["e0", "e1", "e2", "e3", "e4", "e9"]
    targets = ["t0", "t1", "t2", "t3", "t4"]
    results, records = [], []
    for seed in (0, 1):
        root = tmp_path / f"seed{seed}"
        nll = [1.5, math.nan if seed else 2.5, 3.7, 4.2, 1.0, 1.0]
        seed_records = [
            run_files(root, "base", [0.1] * 5, [1.0, 2.0, 3.0, 4.0, 5.0], 1.0, base_ids, targets),
            run_files(root, "v", [0.2] * 6, nll, 1.0, ids, [*targets[:4], "other", "t9"]),
        ]
        seed_records = [{**r, "seed": seed} for r in seed_records]
        results.append((seed, compare_runs(seed_records, "base", 1000)))
        records += seed_records
    rows = {r["metric"]: r for r in report.across_seeds(results, compare_runs(records, "base", 1000))}
    counts = ("examples", "nonfinite", "unpaired", "other_content")
    assert tuple(rows["nll_with"][k] for k in counts) == (3, 1, 3, 1)
    assert tuple(rows["rouge1"][k] for k in counts) == (4, 0, 3, 1)
    table = report.across_table([0, 1], "base", list(rows.values()), resamples=1000)
    reason = (
        "4 paired of 7: 2 share an id but not their content (user, target text), 1 in one run's data only"
    )
    assert f"- v, NLL (with hist.), over the examples: 3 examples, 1 left out: not finite, {reason}" in table
    assert f"- v, ROUGE-1, over the examples: 4 examples, {reason}" in table
    # Seed 1's results.md gives the same counts in the same words (compare_table.left_out_counts).
    assert f", 3 examples, 1 left out: not finite, {reason})" in report.markdown(results[1][1])
    paired_all = [{**rows["rouge1"], "examples": 40, "nonfinite": 0, "unpaired": 0, "other_content": 0}]
    assert not any(line.startswith("- ") for line in report.across_table([0, 1], "base", paired_all))


def test_baseline_flag_pairs_against_another_variant_and_names_the_finished_ones_when_absent(
    tmp_path, tiny_config, write_config, capsys
):
    """A compare file whose baseline is `base`, with a variant `v` and a third, `w`: `--baseline v` prints
    each variant's difference to `v`, whose mean is the float64 mean of the per-example NLL differences to `v`
    (written as the runs' files), in the per-seed report and in `--across`'s table; without the flag the
    difference of `v` to `base` has the opposite sign. An unfinished or unknown baseline is refused with the
    variants that finished."""
    import numpy as np

    from nextquill_jax.eval.compare_record import write_done
    from tests.eval.test_nonfinite_results import run_files

    report = benchmark_script("study_report")
    out = tmp_path / "out"
    compare_file = write_config(
        {
            "compare": {"out": str(out), "baseline": "base", "seeds": [0], "resamples": 1000},
            "variants": {
                "base": {"overrides": ["loss.variant=context_sft"]},
                "v": {"overrides": ["loss.low=0.6"]},
                "w": {"overrides": ["loss.low=0.3"]},
                "unfinished": {"overrides": ["loss.low=0.5"]},
            },
            "base": tiny_config(tmp_path / "data", tmp_path / "unused"),
        },
        tmp_path / "compare.yaml",
    )
    nll = {
        "base": np.array([1.0, 2.0, 3.0, 4.0]),
        "v": np.array([1.5, 2.1, 3.7, 4.2]),
        "w": np.array([0.5, 2.4, 2.0, 4.9]),
    }
    for name, values in nll.items():
        record = run_files(out / "seed0", name, [0.1, 0.2, 0.3, 0.4], [float(x) for x in values], bleu=1.0)
        # The settings --across compares between seeds (one seed here, so any one setting will do).
        record["settings"]["evaluation"] = {"split": "test", "max_new_tokens": 0}
        write_done(out / "seed0" / name / "compare_done.json", record)

    def difference_line(printed: str, variant: str, baseline: str) -> str:
        prefix = f"- {variant} vs {baseline} on NLL (with hist.): "
        return next(line for line in printed.splitlines() if line.startswith(prefix))

    assert report.main([str(compare_file), "--baseline", "v"]) == 0
    printed = capsys.readouterr().out
    assert "Difference to v (mean [95% paired bootstrap interval]):" in printed
    for variant in ("base", "w"):
        mean = np.mean(nll[variant].astype(np.float64) - nll["v"].astype(np.float64))
        assert f"({mean:+.4f} [" in difference_line(printed, variant, "v")
    assert report.main([str(compare_file)]) == 0
    default = capsys.readouterr().out
    assert f"({np.mean(nll['v'] - nll['base']):+.4f} [" in difference_line(default, "v", "base")
    assert report.main([str(compare_file), "--across", "--baseline", "v"]) == 0
    across = capsys.readouterr().out
    assert across.startswith("| difference to v | seed 0 |")
    assert f"| w, NLL (with hist.) | {np.mean(nll['w'] - nll['v']):+.4f} |" in across

    with pytest.raises(SystemExit):
        report.main([str(compare_file), "--across", "--baseline", "bse"])
    assert "baseline 'bse' is not a variant of these files: base, v, w, unfinished" in capsys.readouterr().err
    for absent in ("unfinished", "nope"):
        with pytest.raises(SystemExit) as refused:
            report.main([str(compare_file), "--baseline", absent])
        assert refused.value.code == 2
        message = capsys.readouterr().err
        assert f"baseline {absent!r} has no finished run with seed 0" in message
        assert message.rstrip().endswith("finished: base, v, w")


def write_generating_run(run: Path, predictions: list[dict], signature_words: list[list[str]] | None) -> dict:
    """A finished run that generated, as compare leaves it: eval/test's metrics.json giving its BLEU and
    predictions.jsonl, and the rendered split (rows with `meta.signature_words` where given); returns its
    compare_done.json record."""
    eval_dir = run / "eval" / "test"
    eval_dir.mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps({"overall": {"bleu": 0.5}}))
    (eval_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    rows = [{"index": p["index"], "id": f"e{p['index']}"} for p in predictions]
    for row, words in zip(rows, signature_words or [], strict=False):
        row["meta"] = {"signature_words": words}
    (run / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "variant": run.name,
        "eval_dir": str(eval_dir),
        "rendered_split": str(run / "test.jsonl"),
        "bleu": 0.5,
    }


def test_generation_table_counts_the_limit_stops_words_and_recall_of_each_run_that_generated(tmp_path):
    """Counted by hand from the written predictions: stops at the limit, mean whitespace words, the share of
    signature words present as whole, case-sensitive words, and the references' own recall; a run that did
    not generate has no row, and data without signature words gives "-" and no ceiling line."""
    report = benchmark_script("study_report")
    words = [["warm", "tidy"], ["brisk", "odd"]]
    a = write_generating_run(
        tmp_path / "a",
        [
            {"index": 0, "prediction": "a warm, Tidy day", "reference": "warm and tidy", "stopped_by": "eos"},
            {
                "index": 1,
                "prediction": "brisk odd brisk",
                "reference": "nothing",
                "stopped_by": "max_new_tokens",
            },
        ],
        words,
    )
    silent = {"variant": "silent"}  # no BLEU: no generation
    table = report.generation_table([a, silent])
    # recall: example 0 has "warm" but not "tidy" ("Tidy" differs in case), example 1 both: (1/2 + 1) / 2;
    # words: 4 and 3; references: 1 and 0 -> ceiling 0.5
    assert table[2] == "| a | 2 | 1 | 3.5 | 0.7500 |"
    assert len(table) == 5 and table[-1] == "The references' own preference recall: 0.5000."
    unlabelled = write_generating_run(
        tmp_path / "u", [{"index": 0, "prediction": "x y", "reference": "z", "stopped_by": "eos"}], None
    )
    assert report.generation_table([unlabelled]) == [*table[:2], "| u | 1 | 0 | 2.0 | - |"]
    assert report.generation_table([silent]) == []
