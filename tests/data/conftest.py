"""Fixtures of the data tests: `formats`, the data section that reads each fixture format."""

from __future__ import annotations

import pytest

from tests.shared import FIXTURES as F


@pytest.fixture(scope="session")
def formats(small_dpl) -> dict[str, dict]:
    """Per fixture format (amazon2023, dpl, two lamp tasks, generic): the data section that prepares it
    (the template a format's records need, else the default `review`)."""
    return {
        "amazon2023": dict(
            format="amazon2023",
            sources=[f"{F}/amazon2023/Books.jsonl"],
            meta=[f"{F}/amazon2023/meta_Books.jsonl"],
            **small_dpl,
        ),
        "dpl": dict(format="dpl", sources=[f"{F}/dpl/Books/*.jsonl"], meta=[f"{F}/dpl/meta/Books.jsonl"]),
        "lamp_topic_writing": dict(
            format="lamp",
            template="lamp_topic_writing",
            sources=[f"{F}/lamp/topic_writing/dev_questions.json"],
            meta=[f"{F}/lamp/topic_writing/dev_outputs.json"],
        ),
        "lamp_abstract": dict(
            format="lamp",
            template="lamp_abstract",
            sources=[f"{F}/lamp/abstract/train_questions.jsonl"],
            meta=[f"{F}/lamp/abstract/train_outputs.json"],
        ),
        "generic": dict(format="generic", template="plain", sources=[f"{F}/generic/records.jsonl"]),
    }
