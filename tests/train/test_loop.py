"""The loop's console output (train/loop.py)."""

from __future__ import annotations

from nextquill_jax.train.loop import eval_line


def test_the_eval_line_shows_the_loss_and_the_tracked_metric():
    metrics = {"eval/loss": 3.25, "eval/ce_with": 3.0, "eval/pref_fraction": 0.5, "eval/ce_without": 4.0}
    assert eval_line(7, metrics, "eval/ce_without") == (
        "step 7: eval/loss 3.2500, eval/ce_with 3.0000, eval/pref_fraction 0.5000, eval/ce_without 4.0000"
    )
    assert eval_line(7, {"eval/loss": 1.0}, "eval/loss") == "step 7: eval/loss 1.0000"
