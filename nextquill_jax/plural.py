"""Counts in messages: `counted(1, "example")` is "1 example", `counted(3, "example")` "3 examples".

Imports nothing of this package, so any layer may name it.
"""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """`n` and `noun`, the noun with an `s` unless `n` is 1 (every noun the messages count takes one)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
