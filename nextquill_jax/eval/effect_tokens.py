"""Per-token causal effects of a prepared split's examples under a model: p_h(y), p_∅(y), DCE and ω.

The model runs its two forward passes on a batch laid out by the training pipeline's `assemble_batch` (one
example per row, so the response index is training's), and every target token gets p_h(y), p_∅(y),
DCE = p_h(y) − p_∅(y) (`effects.data_effect`) and the weight ω (`weighting.token_weights`: the loss config's
δ, λ, ε, or its `weighting`). `effect_report` summarises and draws them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nextquill_jax.data.assemble import RowShape
from nextquill_jax.data.prepared_split import rendered_rows
from nextquill_jax.eval.effect_scoring import EOS, target_offsets, token_pieces, token_roles
from nextquill_jax.loss import LossConfig

LENGTH_MULTIPLE = 64  # padded stream lengths are multiples of this, so one compiled shape serves all rows


@dataclass(frozen=True)
class ExampleEffects:
    """The effects of one example's L target tokens (the last one is EOS).

    `row` is the example's line of `<split>.jsonl` (user_id, both prompts, target, category, meta, ...);
    `pieces[k]` is the text token k adds to the target (the EOS token's own text for the last one);
    `roles` are the ground-truth roles (`effect_scoring.ALL_ROLES`) when the row has `meta.target_spans`.
    """

    index: int
    row: dict[str, Any]
    token_ids: np.ndarray  # [L] int32
    pieces: list[str]  # [L]
    p_with: np.ndarray  # [L] float32, p_h(y)
    p_without: np.ndarray  # [L] float32, p_∅(y)
    logp_with: np.ndarray  # [L] float32, log p_h(y) (finite where p_h(y) underflows)
    logp_without: np.ndarray  # [L] float32, log p_∅(y)
    dce: np.ndarray  # [L] float32
    weight: np.ndarray  # [L] float32
    roles: list[str] | None  # [L]


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, math.ceil(x / multiple) * multiple)


def one_example_rows(arrays: Sequence[dict[str, np.ndarray]]) -> RowShape:
    """The `data.assemble.RowShape` that lays out each of `arrays` (prepared examples: `prompt_with`,
    `prompt_without`, `target`) whole in a row of its own, every length rounded up to a multiple of
    `LENGTH_MULTIPLE` so that one compiled shape serves batches of similar examples."""
    return RowShape(
        _round_up(max(len(a["prompt_with"]) + len(a["target"]) for a in arrays), LENGTH_MULTIPLE),
        _round_up(max(len(a["prompt_without"]) + len(a["target"]) for a in arrays), LENGTH_MULTIPLE),
        _round_up(max(len(a["target"]) for a in arrays), LENGTH_MULTIPLE),
    )


@functools.lru_cache(maxsize=8)
def _effects_fn(graphdef: Any, loss_cfg: LossConfig):
    """A jitted `(state, batch) -> (probs [2, B, R], log-probs [2, B, R], dce [B, R], weight [B, R])` for the
    model `graphdef`.

    Cached, so reports on models of one architecture (e.g. every variant of a demo) compile once per shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nextquill_jax.loss import effects
    from nextquill_jax.loss.fused_head import head_token_stats
    from nextquill_jax.loss.weighting import token_weights
    from nextquill_jax.train.step import response_hidden

    def token_effects(state: Any, batch: dict) -> tuple[jax.Array, ...]:
        model = nnx.merge(graphdef, state)
        hidden = jnp.stack([response_hidden(model, batch, "with"), response_hidden(model, batch, "without")])
        lm_head, layout = model.lm_head_weight()
        stats = head_token_stats(hidden, lm_head, batch["labels"], head_layout=layout)
        logprob = stats.label_logit - stats.lse  # [2, B, R]
        mask = effects.target_mask(batch["labels"])
        dce = effects.data_effect(logprob[0], logprob[1], mask)
        weight = token_weights(dce, mask, loss_cfg)
        return jnp.where(mask, jnp.exp(logprob), 0.0), jnp.where(mask, logprob, 0.0), dce, weight

    return jax.jit(token_effects)


def compute_example_effects(
    model: Any,
    tokenizer: Any,
    prepared_dir: str | Path,
    split: str,
    indices: Sequence[int],
    loss_cfg: LossConfig,
    *,
    batch_rows: int = 4,
) -> list[ExampleEffects]:
    """Per-token effects of examples `indices` of a prepared split (module docstring).

    Args:
        model: a `CausalLM` (anything with `hidden_states` and `lm_head_weight`).
        tokenizer: the fast tokenizer the data was prepared with (for token texts and role offsets).
        prepared_dir: a `nextquill-jax data prepare` output; split: one of its splits.
        indices: example indices within the split.
        loss_cfg: supplies the weights' δ (threshold), λ (high) and ε (low), or their `weighting`.
        batch_rows: examples per forward pass (all passes share one padded shape).

    Raises:
        ValueError: an index outside the split or named twice, no index, a tokenizer that does not reproduce
            the prepared target tokens, or malformed `meta.target_spans` (naming the example).
        FileNotFoundError: the split is not prepared, or its preparation did not finish (`check_finished`).
    """
    from flax import nnx

    from nextquill_jax.data.assemble import assemble_batch
    from nextquill_jax.data.prepared_split import PreparedSplit, check_finished

    check_finished(prepared_dir)
    data = PreparedSplit(prepared_dir, split)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("no examples chosen")
    bad = [i for i in indices if not 0 <= i < len(data)]
    if bad:
        raise ValueError(
            f"example indices {bad} outside split {split!r} of {prepared_dir} (0..{len(data) - 1}). Fix: "
            f"choose examples in 0..{len(data) - 1} (`effects --examples`, or fewer with --num-examples)"
        )
    if len(set(indices)) < len(indices):  # its tokens would count twice in every figure of the report
        raise ValueError(f"example indices {indices} name an example more than once")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    eos_id = int(data.meta.get("eos_token_id", tokenizer.eos_token_id))
    rows = rendered_rows(prepared_dir, split, indices)
    arrays = [data[i] for i in indices]
    shape = one_example_rows(arrays)
    graphdef, state = nnx.split(model)
    run = _effects_fn(graphdef, loss_cfg)
    probs, logps, dce, weight = [], [], [], []
    for start in range(0, len(arrays), batch_rows):
        chunk = [[a] for a in arrays[start : start + batch_rows]]
        chunk += [[] for _ in range(batch_rows - len(chunk))]  # empty rows: one compiled batch size
        p, lp, d, w = run(state, assemble_batch(chunk, shape, with_reference_dce=False))
        probs.append(np.asarray(p))
        logps.append(np.asarray(lp))
        dce.append(np.asarray(d))
        weight.append(np.asarray(w))
    probs_all, logp_all = np.concatenate(probs, axis=1), np.concatenate(logps, axis=1)  # [2, N_padded, R]
    dce_all, weight_all = np.concatenate(dce), np.concatenate(weight)  # [N_padded, R]

    out = []
    eos_text = tokenizer.convert_ids_to_tokens(eos_id)
    for n, (index, row, arr) in enumerate(zip(indices, rows, arrays, strict=True)):
        ids = arr["target"]
        L = len(ids)
        where = f"{split}.jsonl example {index}"
        try:
            offsets = target_offsets(tokenizer, row["target"], ids, eos_id)
            spans = (row.get("meta") or {}).get("target_spans")
            roles = None if spans is None else [*token_roles(offsets, spans), EOS]
        except ValueError as e:
            raise ValueError(f"{Path(prepared_dir) / where}: {e}") from None
        out.append(
            ExampleEffects(
                index=index,
                row=row,
                token_ids=np.asarray(ids, np.int32),
                pieces=[*token_pieces(row["target"], offsets), eos_text],
                p_with=probs_all[0, n, :L],
                p_without=probs_all[1, n, :L],
                logp_with=logp_all[0, n, :L],
                logp_without=logp_all[1, n, :L],
                dce=dce_all[n, :L],
                weight=weight_all[n, :L],
                roles=roles,
            )
        )
    return out
