"""Preference recall: how many of a user's signature words (the synthetic benchmark's ground truth) a
generated text contains, per example and on average."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

# A letter of any script: with ASCII letters only, "crispé" held the word "crisp". Digits, "_" and
# punctuation end a word.
_LETTER = r"[^\W\d_]"


def signature_recall(text: str, signature_words: Sequence[str]) -> float:
    """Share of `signature_words` that occur in `text` as whole words (neither preceded nor followed by a
    letter of any script: "crisp's" holds "crisp", "crispé" and "crispy" do not; a word may hold other
    characters, as "well-made" or "5-star" do), case-sensitively (the synthetic signature words are
    lower-case; a capitalised title word such as "Gentle" is not the signature word "gentle"). A word listed
    twice in `signature_words` counts twice.

    Raises:
        ValueError: `signature_words` is empty, or holds an empty or blank word.
    """
    if not signature_words:
        raise ValueError("signature_words is empty: recall is undefined")
    if blank := [w for w in signature_words if not w.strip()]:
        raise ValueError(f"signature_words holds a blank word {blank[0]!r}, which every text would hold")
    found = [
        re.search(rf"(?<!{_LETTER}){re.escape(w)}(?!{_LETTER})", text) is not None for w in signature_words
    ]
    return sum(found) / len(signature_words)


def preference_recall(predictions_path: str | Path, rendered_split_path: str | Path) -> dict[str, float]:
    """Mean signature-word recall of the generations in `predictions_path` (evaluate's predictions.jsonl)
    and, for comparison, of their references; each prediction is joined by `index` to the row of the
    prepared `<split>.jsonl` holding `meta.signature_words`.

    Returns `{"prediction": mean, "reference": mean, "examples": n, "per_example": {index: recall}}`.

    Raises:
        ValueError: a prediction whose index is not in the split, or a row without `meta.signature_words`
            (naming the file and the index).
    """
    with open(rendered_split_path, encoding="utf-8") as f:
        rows = {r["index"]: r for r in map(json.loads, filter(str.strip, f))}
    with open(predictions_path, encoding="utf-8") as f:
        predictions = [json.loads(line) for line in f if line.strip()]
    if not predictions:
        raise ValueError(f"{predictions_path} holds no predictions")
    got, ceiling = [], []
    for p in predictions:
        row = rows.get(p["index"])
        words = None if row is None else (row.get("meta") or {}).get("signature_words")
        if not words:
            raise ValueError(
                f"{predictions_path}: index {p['index']} has no meta.signature_words in {rendered_split_path}"
            )
        got.append(signature_recall(p["prediction"], words))
        ceiling.append(signature_recall(p["reference"], words))
    return {
        "prediction": sum(got) / len(got),
        "reference": sum(ceiling) / len(ceiling),
        "examples": len(got),
        "per_example": {p["index"]: value for p, value in zip(predictions, got, strict=True)},
    }
