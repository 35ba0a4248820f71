"""The batch contract between the data pipeline and the train step.

A batch is a dict of arrays, every one with a leading batch dimension B (rows). Two token streams carry the
same targets under two prompts: `with_*` (prompt with the user's history) and `without_*` (the `None`
placeholder). A row may hold several packed examples; `*_segment_ids` tell them apart (0 marks padding,
examples are numbered 1, 2, ... within a row) and `*_positions` restart at 0 for every example.

The response index pairs the streams: for response slot r of row b,

    hidden_with[b, response_index_with[b, r]]    predicts labels[b, r]
    hidden_without[b, response_index_without[b, r]] predicts labels[b, r]

and both positions see the same preceding target tokens. Slots beyond the row's target tokens have
`labels == IGNORE_INDEX` and index 0, so a gather is always in bounds and the loss ignores them.
"""

from __future__ import annotations

from typing import Final

IGNORE_INDEX: Final = -100

# key -> (dtype, shape) ; T_w, T_o: stream lengths, R: response slots per row.
BATCH_FIELDS: Final[dict[str, tuple[str, str]]] = {
    "with_ids": ("int32", "[B, T_w]"),
    "with_positions": ("int32", "[B, T_w]"),
    "with_segment_ids": ("int32", "[B, T_w]"),
    "without_ids": ("int32", "[B, T_o]"),
    "without_positions": ("int32", "[B, T_o]"),
    "without_segment_ids": ("int32", "[B, T_o]"),
    "response_index_with": ("int32", "[B, R]"),
    "response_index_without": ("int32", "[B, R]"),
    "labels": ("int32", "[B, R]"),
}

# Present only when the data carries precomputed fixed data-side effects (`loss.dce: fixed`).
OPTIONAL_FIELDS: Final[dict[str, tuple[str, str]]] = {
    "reference_dce": ("float32", "[B, R]"),
}
