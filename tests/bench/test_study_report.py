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
