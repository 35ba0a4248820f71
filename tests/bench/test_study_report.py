"""benchmarks/study_report.py's tables from a run's metrics.jsonl: the counterfactual health and the
evaluations during training, written from hand-made logs whose expected cells are read off the input."""

from __future__ import annotations

import json
from pathlib import Path

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
    one_seed = report.across_seeds(results[:1])
    assert one_seed[0]["low"] is None and report.row_verdict(one_seed[0]) == "no interval"
    table = report.across_table([0, 1, 2], "context_sft", rows)
    assert (
        table[3]
        == "| nextquill, pref. NLL | +0.2490 | +0.2602 | +0.2795 | +0.2629 [+0.2246, +0.3012] | worse |"
    )
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
