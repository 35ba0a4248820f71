"""Counterfactual health while training: is the without-history stream still a language model, and does the
dynamic DCE still single out a minority of target tokens?

Under L_p (mce, nextquill) the public code's without-history forward keeps its gradient, and L_p rewards
lowering z_∅ on the label; the stream can drift towards uniform (its CE towards ln V), and then
DCE = p_h(y) − p_∅(y) exceeds δ almost everywhere, which turns NextQuill's weighting into a constant.
`HealthMonitor` reads the logged rows and warns once per symptom, naming the step and the remedies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

REMEDIES = (
    "loss.counterfactual_grad: false, loss.anchor: 0.1, or loss.dce: fixed (LoRA: reference_model: base)"
)


@dataclass
class HealthMonitor:
    """Warns when the without-history target CE (`ce_without`) exceeds `ce_ratio` times its first logged
    value (`baseline`; on resume, the run's first row), or the preference-bearing fraction (`pref_fraction`,
    the share of target tokens whose DCE exceeds `threshold`, the run's `loss.threshold`) exceeds `pref_bound`
    (None: not checked). Each symptom is reported once per process (a resumed run reports it again)."""

    ce_ratio: float
    pref_bound: float | None
    baseline: float | None = None
    threshold: float | None = None  # named in the warning with its config key (None: the key alone)
    reported: set[str] = field(default_factory=set)

    def check(self, step: int, row: Mapping[str, float]) -> list[str]:
        """The warnings that `row` (the metrics of optimizer step `step`) raises for the first time; a value
        that is not finite (a skipped step's) is read as absent."""
        warnings = []
        # A step skipped under `train.nonfinite: skip` logs NaN: as the baseline it would silence the warning
        # for the whole run (a resume reads the first finite value back, `MetricsLog.first_value`).
        ce, pref = (_finite(row.get(key)) for key in ("ce_without", "pref_fraction"))
        if ce is not None and self.baseline is None:
            self.baseline = ce
        elif ce is not None and "ce" not in self.reported and ce > self.ce_ratio * self.baseline:
            self.reported.add("ce")
            warnings.append(
                f"counterfactual health, step {step}: the without-history target CE is {ce:.3f} nats, "
                f"{ce / self.baseline:.2f}x its first logged {self.baseline:.3f} (logging.health_ce_ratio "
                f"{self.ce_ratio}): that stream is collapsing, and the dynamic DCE with it. "
                f"Remedies: {REMEDIES}."
            )
        if (
            pref is not None
            and self.pref_bound is not None
            and "pref" not in self.reported
            and pref > self.pref_bound
        ):
            self.reported.add("pref")
            # The config keys, not the paper's δ: the user sets loss.threshold, not "delta".
            threshold = "loss.threshold" + ("" if self.threshold is None else f" {self.threshold}")
            warnings.append(
                f"counterfactual health, step {step}: {pref:.0%} of target tokens are preference-bearing "
                f"(DCE > {threshold}; bound logging.health_pref_fraction {self.pref_bound}): the weighting "
                f"is close to uniform. Remedies: {REMEDIES}."
            )
        return warnings


def _finite(value: float | None) -> float | None:
    """`value`, or None where it is absent or not finite."""
    return value if value is not None and math.isfinite(value) else None
