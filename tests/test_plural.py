"""`counted`: a count and its noun, the noun plural for every count but exactly 1 (English: "0 examples")."""

from __future__ import annotations

import pytest

from nextquill_jax.plural import counted


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, "0 examples"), (1, "1 example"), (2, "2 examples"), (11, "11 examples"), (-1, "-1 examples")],
)
def test_only_one_is_singular(n: int, expected: str) -> None:
    assert counted(n, "example") == expected
