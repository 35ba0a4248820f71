"""Scoring data-side effects against ground-truth token roles (pure NumPy, no model).

The synthetic benchmark (`data/synth.py`) stores each target's role spans as characters,
`meta.target_spans = [[start, end, role], ...]` with roles `preference`, `context` and `noise`. Here they
become one role per target token through the tokenizer's offset mapping: a token takes the role it overlaps
by the most characters (ties: preference, then context, then noise); a token overlapping no span is `glue`
(template words) and the appended EOS token is `eos`.

A token is *flagged* preference-bearing when DCE > δ (the threshold of the `target` weights). Scores over
the tokens with a ground-truth role (preference, context, noise; glue and EOS have none):

    precision = |flagged ∩ preference| / |flagged|        recall = |flagged ∩ preference| / |preference|
    AUROC     = P(DCE of a preference token > DCE of a context/noise token), ties counting one half

and per role (glue and eos included) the number of tokens, how many are flagged, and the mean DCE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ROLES: tuple[str, ...] = ("preference", "context", "noise")  # ground-truth roles, in tie-break order
GLUE, EOS = "glue", "eos"
ALL_ROLES: tuple[str, ...] = (*ROLES, GLUE, EOS)


def target_offsets(
    tokenizer: Any, text: str, target_ids: Sequence[int], eos_id: int
) -> list[tuple[int, int]]:
    """Character offsets `(start, end)` in `text` of every prepared target token but the final EOS.

    The target is tokenised as data preparation does (no special tokens); the prepared ids must be that
    encoding, possibly cut, followed by EOS.

    Args:
        tokenizer: a fast Hugging Face tokenizer (offset mappings need the Rust backend).
        text: the target text (the `target` field of `<split>.jsonl`).
        target_ids: [L] the prepared target tokens, ending with EOS.
        eos_id: the EOS id the data was prepared with.

    Returns:
        L - 1 offsets, end exclusive.

    Raises:
        ValueError: the ids do not end with EOS, or the tokenizer encodes `text` differently (naming the first
            differing position: the data was prepared with another tokenizer).
    """
    ids = [int(i) for i in target_ids]
    if not ids or ids[-1] != eos_id:
        raise ValueError(f"prepared target does not end with EOS id {eos_id}: last id {ids[-1:] or None}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    encoded, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    body = ids[:-1]
    if encoded[: len(body)] != body:
        at = next((k for k, (a, b) in enumerate(zip(encoded, body, strict=False)) if a != b), len(encoded))
        raise ValueError(
            f"the tokenizer encodes the target differently from the prepared tokens (first difference at "
            f"token {at} of {len(body)}: {encoded[at : at + 3]} vs {body[at : at + 3]}); use the tokenizer "
            f"the data was prepared with (its summary.json `tokenizer`)"
        )
    return offsets[: len(body)]


def token_pieces(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """The text each token adds, in order: `text[previous end : end]`, so the pieces join to the covered text.

    A token whose characters an earlier token already covers (part of a character split across byte-level
    tokens) adds ''. Characters after the last offset (when the target was cut) are not included.
    """
    pieces, covered = [], 0
    for _, end in offsets:
        pieces.append(text[covered:end] if end > covered else "")
        covered = max(covered, end)
    return pieces


def token_roles(offsets: Sequence[tuple[int, int]], spans: Sequence[Sequence[Any]]) -> list[str]:
    """Ground-truth role of each token from character role spans (module docstring).

    Args:
        offsets: [L] token character offsets (start, end), end exclusive.
        spans: `[start, end, role]` character spans, role in ROLES.

    Returns:
        [L] roles from `ROLES` or `GLUE`.

    Raises:
        ValueError: a span that is not `[start, end, role]` with 0 <= start < end and a known role.
    """
    bounds = []
    for k, span in enumerate(spans):
        if not (isinstance(span, list | tuple) and len(span) == 3):
            raise ValueError(f"meta.target_spans[{k}] = {span!r}: expected [start, end, role]")
        start, end, role = span
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
            raise ValueError(f"meta.target_spans[{k}] = {span!r}: need integers 0 <= start < end")
        if role not in ROLES:
            raise ValueError(f"meta.target_spans[{k}] = {span!r}: role must be one of {ROLES}")
        bounds.append((start, end, ROLES.index(role)))
    roles = []
    for t_start, t_end in offsets:
        overlap = [0] * len(ROLES)
        for start, end, r in bounds:
            overlap[r] += max(0, min(t_end, end) - max(t_start, start))
        best = max(range(len(ROLES)), key=lambda r: (overlap[r], -r))
        roles.append(ROLES[best] if overlap[best] > 0 else GLUE)
    return roles


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for the `positive` class: the Mann–Whitney rank formula with tied
    scores given their average rank (a tie counts one half).

    Args:
        scores: [N] real scores. positive: [N] bool labels.

    Returns:
        AUROC in [0, 1], or None when either class is empty.

    Raises:
        ValueError: shapes differ or scores are not finite.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    positive = np.asarray(positive, bool).reshape(-1)
    if scores.shape != positive.shape:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} differ in shape")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    # Tie groups of the sorted scores: every member gets the mean of the group's 1-based ranks.
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    ends = np.concatenate([starts[1:], [ordered.size]])
    ranks = np.empty(scores.size, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def score_roles(dce: np.ndarray, roles: Sequence[str], threshold: float) -> dict[str, Any]:
    """Precision, recall, F1 and AUROC of DCE against the ground-truth roles, and per-role counts.

    Args:
        dce: [N] data-side effects of N target tokens (any examples, concatenated).
        roles: [N] each from ALL_ROLES.
        threshold: δ; a token is flagged when DCE > δ.

    Returns:
        {"tokens_scored", "preference_tokens", "flagged", "true_positives", "precision", "recall", "f1",
        "auroc", "per_role": {role: {"tokens", "flagged", "flagged_fraction", "mean_dce"}}}; a ratio with a
        zero denominator is None.

    Raises:
        ValueError: lengths differ or a role is unknown.
    """
    dce = np.asarray(dce, np.float64).reshape(-1)
    roles_arr = np.asarray(list(roles), dtype=object)
    if dce.size != roles_arr.size:
        raise ValueError(f"{dce.size} DCE values but {roles_arr.size} roles")
    unknown = set(roles_arr.tolist()) - set(ALL_ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; expected {ALL_ROLES}")
    flagged = dce > threshold
    scored = np.isin(roles_arr, ROLES)
    positive = roles_arr == "preference"
    tp = int((flagged & positive).sum())
    n_flagged = int((flagged & scored).sum())
    n_pos = int(positive.sum())
    precision, recall = _ratio(tp, n_flagged), _ratio(tp, n_pos)
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    per_role = {}
    for role in ALL_ROLES:
        members = roles_arr == role
        count = int(members.sum())
        per_role[role] = {
            "tokens": count,
            "flagged": int((flagged & members).sum()),
            "flagged_fraction": _ratio(int((flagged & members).sum()), count),
            "mean_dce": float(dce[members].mean()) if count else None,
        }
    return {
        "tokens_scored": int(scored.sum()),
        "preference_tokens": n_pos,
        "flagged": n_flagged,
        "true_positives": tp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": auroc(dce[scored], positive[scored]),
        "per_role": per_role,
    }
