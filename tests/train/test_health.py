"""Counterfactual health (train/health.py): the monitor's rule, and its warning in real training runs: it
fires in a tiny mce run whose without-history CE climbs, and stays silent when the remedies hold it."""

from __future__ import annotations

import json

import pytest

from nextquill_jax.config import load_config
from nextquill_jax.train import loop
from nextquill_jax.train.health import HealthMonitor

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py


def test_each_symptom_is_reported_once_against_the_first_logged_value():
    monitor = HealthMonitor(ce_ratio=1.5, pref_bound=0.75)
    assert monitor.check(1, {"ce_without": 2.0, "pref_fraction": 0.5}) == []
    assert monitor.check(2, {"ce_without": 2.9, "pref_fraction": 0.7}) == []
    ce_warning = monitor.check(3, {"ce_without": 3.1, "pref_fraction": 0.7})
    assert (
        len(ce_warning) == 1 and "step 3" in ce_warning[0] and "1.55x its first logged 2.000" in ce_warning[0]
    )
    assert monitor.check(4, {"ce_without": 3.5, "pref_fraction": 0.7}) == []  # once
    pref_warning = monitor.check(5, {"ce_without": 3.5, "pref_fraction": 0.8})
    assert len(pref_warning) == 1 and "80% of target tokens" in pref_warning[0]
    assert "(DCE > loss.threshold; bound logging.health_pref_fraction 0.75)" in pref_warning[0]
    with_threshold = HealthMonitor(1.5, 0.75, threshold=0.05).check(1, {"pref_fraction": 0.8})
    assert "(DCE > loss.threshold 0.05; bound logging.health_pref_fraction 0.75)" in with_threshold[0]
    assert HealthMonitor(1.5, None, baseline=2.0).check(1, {"ce_without": 2.9, "pref_fraction": 0.99}) == []
    resumed = HealthMonitor(1.5, 0.75, baseline=2.0)  # the baseline read back from metrics.jsonl
    assert len(resumed.check(9, {"ce_without": 3.2})) == 1


def test_a_skipped_steps_nan_neither_becomes_the_baseline_nor_warns():
    """Under `train.nonfinite: skip` a skipped step logs NaN; as the first value it became the baseline, and
    every later comparison with NaN was false: the collapse warning could never fire in that run."""
    monitor = HealthMonitor(ce_ratio=1.5, pref_bound=0.75)
    assert monitor.check(1, {"ce_without": float("nan"), "pref_fraction": float("nan")}) == []
    assert monitor.baseline is None
    assert monitor.check(2, {"ce_without": 2.0, "pref_fraction": 0.5}) == []
    assert monitor.baseline == 2.0
    assert monitor.check(3, {"ce_without": float("inf")}) == []
    warned = monitor.check(4, {"ce_without": 20.0})
    assert len(warned) == 1 and "10.00x its first logged 2.000" in warned[0]


@pytest.mark.parametrize(
    ("name", "remedies", "warns"),
    [("public", {}, True), ("remedied", {"counterfactual_grad": False, "anchor": 0.1}, False)],
)
def test_the_warning_fires_when_the_without_stream_degrades(
    name, remedies, warns, tmp_path, write_random_data, tiny_config, capsys
):
    raw = tiny_config(
        write_random_data(tmp_path / "data"),
        tmp_path / name,
        loss={"variant": "mce", "alpha": 1.0, **remedies},
        logging={"every_steps": 4, "health_ce_ratio": 1.1},
        checkpoint={"every_steps": 0, "async_save": False},
    )
    raw["data"]["batching"]["num_epochs"] = 8
    messages = []
    loop.train(load_config(None, base=raw), tmp_path / name, echo=messages.append)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    ce = [r["ce_without"] for r in rows if "ce_without" in r]
    assert (max(ce) > 1.1 * ce[0]) == warns, ce  # the run degrades (or not) as the case says
    # The warnings reach `echo` (they were printed past it), and nothing else prints them.
    said = "\n".join(messages)
    assert ("counterfactual health" in said) == warns, said[-2000:]
    assert ("the without-history target CE" in said) == warns
    assert "counterfactual health" not in capsys.readouterr().out


def test_the_preference_warning_names_the_runs_loss_threshold(
    tmp_path, write_random_data, tiny_config, capsys
):
    """The warning names the config key and value a user sets (`loss.threshold`), not the paper's δ: with a
    threshold below every DCE (-0.5; a DCE is a probability difference) every target token is preference-
    bearing, so the warning fires at the first logged step."""
    raw = tiny_config(
        write_random_data(tmp_path / "data"),
        tmp_path / "run",
        loss={"variant": "nextquill", "threshold": -0.5},
        logging={"every_steps": 1},
        checkpoint={"every_steps": 0, "async_save": False},
    )
    raw["train"]["max_steps"] = 2
    loop.train(load_config(None, base=raw), tmp_path / "run", echo=print)
    printed = capsys.readouterr().out
    assert (
        "counterfactual health, step 1: 100% of target tokens are preference-bearing (DCE > loss.threshold "
        "-0.5; bound logging.health_pref_fraction 0.75)" in printed
    ), printed[-2000:]
    assert "delta" not in printed


def test_a_value_exactly_at_a_bound_does_not_warn():
    """The symptoms are values that EXCEED their bounds (the docstring, README): a without-history CE of
    exactly 1.5 x its first value, and a preference-bearing fraction exactly at the bound, are no warning;
    just above, each is."""
    assert HealthMonitor(1.5, 0.75, baseline=2.0).check(1, {"ce_without": 3.0, "pref_fraction": 0.75}) == []
    above = HealthMonitor(1.5, 0.75, baseline=2.0).check(1, {"ce_without": 3.001, "pref_fraction": 0.76})
    assert len(above) == 2


def test_a_resumed_run_measures_its_health_against_the_first_row_it_ever_logged(tmp_path, tiny_config):
    """The rows metrics.jsonl holds from before a resume (a skipped update's null first) give the baseline:
    a without-history CE that had already climbed past the ratio warns at the first row after the resume,
    which would otherwise become the baseline itself and hide the collapse."""
    from nextquill_jax.train.metrics_log import METRICS_FILE, MetricsLog

    cfg = load_config(None, base=tiny_config(tmp_path / "data", tmp_path / "run"))
    (tmp_path / "run").mkdir()
    rows = [{"step": 1, "ce_without": None}, {"step": 2, "ce_without": 1.0}, {"step": 3, "ce_without": 1.4}]
    (tmp_path / "run" / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = MetricsLog(tmp_path / "run", cfg.logging, start_step=3, total_steps=10)
    pending = loop.PendingMetrics(cfg, cfg.loss.loss_config(), [], log)
    ratio = cfg.logging.health_ce_ratio
    warning = pending.health.check(4, {"ce_without": 1.01 * ratio})
    assert len(warning) == 1 and "its first logged 1.000" in warning[0], warning
    log.close()
