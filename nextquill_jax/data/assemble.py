"""Build the arrays of one batch (the contract in `batch.py`) from rows of tokenised examples.

Each row holds zero or more examples. Example k of a row (k = 1, 2, ...) is laid out as

    with stream:     prompt_with    + target   segment id k, positions 0 .. P_w + L - 1
    without stream:  prompt_without + target   segment id k, positions 0 .. P_o + L - 1
    response slots:  L consecutive slots; slot for target token j has
                     label = target[j],
                     response_index_with    = (start of the example in the with stream)    + P_w - 1 + j,
                     response_index_without = (start of the example in the without stream) + P_o - 1 + j.

The hidden state at `P - 1 + j` has seen the prompt and target[:j], so both indices predict target[j] from
the same preceding target tokens. Padding is id 0, position 0, segment 0; unused slots have label
IGNORE_INDEX, index 0 and reference_dce 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nextquill_jax.data.batch import IGNORE_INDEX


@dataclass(frozen=True)
class RowShape:
    """Array sizes of one row: with-stream tokens T_w, without-stream tokens T_o, response slots R."""

    with_len: int
    without_len: int
    response_slots: int

    def as_tuple(self) -> tuple[int, int, int]:
        """(T_w, T_o, R): the with-history and without-history row lengths and the response slots."""
        return (self.with_len, self.without_len, self.response_slots)


def assemble_batch(
    rows: Sequence[Sequence[Mapping[str, np.ndarray]]], shape: RowShape, *, with_reference_dce: bool
) -> dict[str, np.ndarray]:
    """Lay out `rows` (each a list of examples with `prompt_with`, `prompt_without`, `target` and, when
    `with_reference_dce`, `reference_dce` arrays) into one batch.

    Returns:
        The batch dict of `batch.py`: `with_*` [B, T_w], `without_*` [B, T_o], `response_index_*`, `labels`
        (and `reference_dce`) [B, R], all int32 (reference_dce float32), B = len(rows).

    Raises:
        ValueError: naming the row and example, if a prompt is empty (its first target token would have no
            predicting position) or a row's examples overflow `shape`.
    """
    B, (T_w, T_o, R) = len(rows), shape.as_tuple()
    out = {
        "with_ids": np.zeros((B, T_w), np.int32),
        "with_positions": np.zeros((B, T_w), np.int32),
        "with_segment_ids": np.zeros((B, T_w), np.int32),
        "without_ids": np.zeros((B, T_o), np.int32),
        "without_positions": np.zeros((B, T_o), np.int32),
        "without_segment_ids": np.zeros((B, T_o), np.int32),
        "response_index_with": np.zeros((B, R), np.int32),
        "response_index_without": np.zeros((B, R), np.int32),
        "labels": np.full((B, R), IGNORE_INDEX, np.int32),
    }
    if with_reference_dce:
        out["reference_dce"] = np.zeros((B, R), np.float32)
    for b, row in enumerate(rows):
        off_w = off_o = off_r = 0
        for k, ex in enumerate(row, start=1):
            target = ex["target"]
            L = len(target)
            if off_r + L > R:
                raise ValueError(f"row {b}: examples need {off_r + L} response slots, row holds {R}")
            ends = []
            for stream, prompt_key, off, T in (
                ("with", "prompt_with", off_w, T_w),
                ("without", "prompt_without", off_o, T_o),
            ):
                prompt = ex[prompt_key]
                P = len(prompt)
                if P == 0:
                    raise ValueError(
                        f"row {b} example {k}: empty {prompt_key}; every prompt needs >= 1 token"
                    )
                end = off + P + L
                if end > T:
                    raise ValueError(f"row {b}: examples need {end} {stream}-stream tokens, row holds {T}")
                out[f"{stream}_ids"][b, off : off + P] = prompt
                out[f"{stream}_ids"][b, off + P : end] = target
                out[f"{stream}_positions"][b, off:end] = np.arange(P + L)
                out[f"{stream}_segment_ids"][b, off:end] = k
                out[f"response_index_{stream}"][b, off_r : off_r + L] = off + P - 1 + np.arange(L)
                ends.append(end)
            out["labels"][b, off_r : off_r + L] = target
            if with_reference_dce:
                out["reference_dce"][b, off_r : off_r + L] = ex["reference_dce"]
            off_w, off_o = ends
            off_r += L
    return out
