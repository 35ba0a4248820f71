"""The quantile the package takes from NumPy (`np.percentile` / `np.quantile`, method "linear"), stated in
plain Python, for the tests of the statistics it writes (a prepared split's summary, an effect report)."""

from __future__ import annotations

from collections.abc import Sequence


def linear_quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of `values` (q in [0, 1]): linear between the sorted values at the ranks around
    (n - 1) q."""
    ordered, h = sorted(values), (len(values) - 1) * q
    k = int(h)
    return float(ordered[k] + (h - k) * (ordered[min(k + 1, len(values) - 1)] - ordered[k]))
