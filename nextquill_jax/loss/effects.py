"""Causal preference effects (NEXTQUILL.md, "Causal preference effects" and "Preference-bearing tokens").

Pure functions over aligned arrays: `[..., R, V]` logits and `[..., R]` labels belong to the same R target
tokens, labels are already shifted and `IGNORE_INDEX` (-100) marks slots outside the loss. Everything is
computed in float32 whatever the input dtype.

- model-side effect MCE(t) = z_h(t) − z_∅(t), a logit vector;
- data-side effect DCE(t) = p_h(y_t) − p_∅(y_t), a probability difference in [-1, 1] that carries no gradient;
- preference weights: `target` (λ where DCE > δ, else ε) or `js` (KL(p_h ‖ m) + KL(p_∅ ‖ m), m the mixture);
- summary statistics of DCE for logging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nextquill_jax.data.batch import IGNORE_INDEX
from nextquill_jax.loss.fused_head import (
    DEFAULT_TOKEN_CHUNK,
    DEFAULT_VOCAB_CHUNK,
    HeadLayout,
    head_token_stats,
    head_vocab,
)

# Quantiles of DCE reported per call (aux keys dce_p10, dce_p50, dce_p90).
DCE_QUANTILES: dict[str, float] = {"dce_p10": 0.1, "dce_p50": 0.5, "dce_p90": 0.9}


def concrete_values(x: jax.Array) -> np.ndarray | None:
    """x's values on the host, or None when they are not known here: under jit (a tracer) or spread over
    hosts. For checks that cost nothing inside a compiled step."""
    try:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None  # other hosts hold parts of it
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None  # under jit: the values are unknown until run time


def check_labels(labels: jax.Array, vocab: int | None) -> None:
    """For concrete labels [..., R] int (not under jit), raise ValueError at the first id outside [0, vocab)
    and not IGNORE_INDEX; nothing for traced labels (they give NaN, see `token_logprobs`) or `vocab` None."""
    values = None if vocab is None else concrete_values(labels)
    if values is None:
        return
    bad = (values != IGNORE_INDEX) & ((values < 0) | (values >= vocab))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"labels{list(where)} = {values[where]} is outside [0, {vocab}) and not {IGNORE_INDEX}"
        )


def target_mask(labels: jax.Array) -> jax.Array:
    """[..., R] bool: True where the slot holds a target token (label != IGNORE_INDEX)."""
    return labels != IGNORE_INDEX


def _float32_at_targets(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """logits [..., R, V] as float32, zero at the slots `mask` [..., R] leaves out. A non-finite logit there
    (an additive -inf mask, a NaN) is left out of a value by a later `where` on the result, but not out of
    its gradient, which would be NaN."""
    return jnp.where(mask[..., None], logits.astype(jnp.float32), 0.0)


def token_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log p(y_t) = z[y_t] − logsumexp(z) per token.

    Args:
        logits: [..., R, V] any float dtype.
        labels: [..., R] int ids in [0, V) or IGNORE_INDEX.

    Returns:
        [..., R] float32, 0 at ignored slots whatever their logits (-inf or NaN too, in value and gradient),
        NaN where a label is outside [0, V) (so a bad label under jit cannot pass unnoticed).
    """
    mask = target_mask(labels)
    logits = _float32_at_targets(logits, mask)
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    safe = jnp.where(mask & in_range, labels, 0)
    label_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    logprob = jnp.where(mask, label_logit - jax.nn.logsumexp(logits, axis=-1), 0.0)
    return jnp.where(mask & ~in_range, jnp.nan, logprob)


def model_effect(logits_with: jax.Array, logits_without: jax.Array) -> jax.Array:
    """MCE = z_h − z_∅: [..., R, V] float32 logit difference (differentiable through both streams). Needs
    finite logits: a column that is -inf in both streams gives NaN (-inf + inf), and so does L_p.

    Raises:
        ValueError: the two streams' shapes differ (they would broadcast into another shape silently).
    """
    _check_same_shape(logits_with=logits_with, logits_without=logits_without)
    return logits_with.astype(jnp.float32) - logits_without.astype(jnp.float32)


def data_effect(logprob_with: jax.Array, logprob_without: jax.Array, mask: jax.Array) -> jax.Array:
    """DCE = p_h(y) − p_∅(y) from token log-probs [..., R]; 0 where `mask` is False.

    The result is wrapped in `jax.lax.stop_gradient`: its gradient with respect to the log-probs is zero, with
    no error or warning. DCE is a data-side quantity (NEXTQUILL.md, "Causal preference effects"): it picks the
    preference-bearing tokens whose weights carry no gradient, so no loss may move the model through it. For a
    differentiable probability difference, take `jnp.exp(lp_with) - jnp.exp(lp_without)` of `token_logprobs`
    yourself.

    Raises:
        ValueError: the two log-probs' and the mask's shapes are not all one.
    """
    _check_same_shape(logprob_with=logprob_with, logprob_without=logprob_without, mask=mask)
    dce = jnp.exp(logprob_with.astype(jnp.float32)) - jnp.exp(logprob_without.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.where(mask, dce, 0.0))


def _check_same_shape(**arrays: jax.Array) -> None:
    """ValueError naming each array's shape unless all are one."""
    shapes = {name: jnp.shape(x) for name, x in arrays.items()}
    if len(set(shapes.values())) > 1:
        named = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shapes differ: {named}; they must be equal")


def dce_from_logits(logits_with: jax.Array, logits_without: jax.Array, labels: jax.Array) -> jax.Array:
    """DCE of the label tokens from two [..., R, V] logit streams → [..., R] float32, 0 at ignored slots, NaN
    where a (traced) label is outside [0, V).

    No gradient: the result is `jax.lax.stop_gradient`ed (`data_effect`), so `jax.grad` through it is zero
    with no error; DCE is data-side, the source of weights that carry no gradient (NEXTQUILL.md). A
    differentiable soft weight must be built from `token_logprobs` of the two streams instead.

    Raises:
        ValueError: streams whose shapes differ or are not labels' shape + (V,), or (for concrete labels) a
            label neither IGNORE_INDEX nor in [0, V).
    """
    if logits_with.shape != logits_without.shape or logits_with.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits_with {logits_with.shape} and logits_without {logits_without.shape} must both be labels "
            f"shape {labels.shape} + (V,)"
        )
    check_labels(labels, logits_with.shape[-1])
    mask = target_mask(labels)
    return data_effect(token_logprobs(logits_with, labels), token_logprobs(logits_without, labels), mask)


def dce_from_hidden(
    hidden_with: jax.Array,
    hidden_without: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    *,
    head_layout: HeadLayout = "vd",
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> jax.Array:
    """DCE from final hidden states of a (frozen) model, chunked over tokens and vocabulary.

    Args:
        hidden_with, hidden_without: [..., R, D] aligned hidden states of the two prompts.
        lm_head: [V, D] ("vd", tied embedding) or [D, V] ("dv", untied kernel).
        labels: [..., R] target ids or IGNORE_INDEX.

    Returns:
        [..., R] float32 DCE, 0 at ignored slots, NaN where a (traced) label is outside [0, V); no gradient:
        its inputs and result are `jax.lax.stop_gradient`ed, so `jax.grad` through it is zero with no error
        (DCE is data-side, the source of weights that carry no gradient; NEXTQUILL.md). Suitable for storing
        as `reference_dce`. (Its inputs' gradients are stopped, so unlike `head_token_stats` it also passes
        through `jax.jvp`, with zero tangents.)

    Raises:
        ValueError: if the two hidden streams differ in shape, or (for concrete labels) a label is neither
            IGNORE_INDEX nor in [0, V) of `lm_head` (see `head_token_stats` for the rest).
    """
    if hidden_with.shape != hidden_without.shape:
        raise ValueError(
            f"hidden_with {hidden_with.shape} and hidden_without {hidden_without.shape} must match"
        )
    check_labels(labels, head_vocab(lm_head, head_layout, hidden_with.shape[-1]))
    hidden = jax.lax.stop_gradient(
        jnp.stack([hidden_with.astype(jnp.float32), hidden_without.astype(jnp.float32)])
    )
    stats = head_token_stats(
        hidden,
        jax.lax.stop_gradient(lm_head),
        labels,
        head_layout=head_layout,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
    )
    logprob = stats.label_logit - stats.lse  # [2, ..., R]
    return data_effect(logprob[0], logprob[1], target_mask(labels))


def target_weights(
    dce: jax.Array, mask: jax.Array, *, threshold: float, high: float, low: float
) -> jax.Array:
    """ω_t = high if DCE(t) > threshold else low; [..., R] float32, 0 where `mask` is False, no gradient.

    A NaN DCE at a target slot (a label outside a stream's or reference's vocabulary under jit) gives a NaN
    weight, so the loss is NaN instead of silently weighting that token `low`."""
    weights = jnp.where(dce > threshold, high, low).astype(jnp.float32)
    weights = jnp.where(jnp.isnan(dce), jnp.nan, weights)
    return jax.lax.stop_gradient(jnp.where(mask, weights, 0.0))


def js_weights(
    logits_with: jax.Array, logits_without: jax.Array, mask: jax.Array, *, detach: bool = True
) -> jax.Array:
    """ω_t = KL(p_h ‖ m) + KL(p_∅ ‖ m), m = (p_h + p_∅)/2, over the full vocabulary.

    Args:
        logits_with, logits_without: [..., R, V].
        mask: [..., R] bool target mask.
        detach: stop the gradient (default); False lets it flow into both streams as the public code does.

    Returns:
        [..., R] float32 in [0, 2 log 2] (float32 noise below 0 is cut), 0 where `mask` is False whatever the
        logits there (in value and gradient). A token of probability 0 (a -inf logit,
        e.g. a masked vocabulary column, or an underflow) adds 0 log 0 = 0, with a finite gradient.
    """
    logp = jnp.stack(
        [
            jax.nn.log_softmax(_float32_at_targets(logits_with, mask), axis=-1),
            jax.nn.log_softmax(_float32_at_targets(logits_without, mask), axis=-1),
        ]
    )  # [2, ..., R, V]
    # log 0 = -inf becomes the lowest finite float: p = 0 there still, but p (log p − log m) is 0 · finite
    # instead of 0 · (-inf + inf) = NaN, and logaddexp's gradient stays finite. Finite values pass unchanged
    # (NaN too), and so does every value and gradient of finite logits.
    logp = jnp.where(jnp.isneginf(logp), jnp.finfo(jnp.float32).min, logp)
    log_mid = jnp.logaddexp(logp[0], logp[1]) - jnp.log(2.0)  # [..., R, V]
    js = (jnp.exp(logp) * (logp - log_mid)).sum(axis=(0, -1))
    # >= 0 exactly; float32 cancellation between near-equal streams leaves ±1e-7 noise.
    js = jnp.where(mask, jnp.maximum(js, 0.0), 0.0)
    return jax.lax.stop_gradient(js) if detach else js


def effect_stats(dce: jax.Array, mask: jax.Array, *, threshold: float) -> dict[str, jax.Array]:
    """Summary statistics of DCE over the target tokens, as float32 scalars.

    Combinable sums (add them across micro-batches and shards): `effect_count` (target tokens with a DCE),
    `pref_count` (tokens with DCE > threshold, the preference-bearing ones), `dce_sum`, `dce_sq_sum`.
    Per-call quantiles `dce_p10`, `dce_p50`, `dce_p90` (0 when there is no target token): quantiles of one
    call, which no sum of parts reproduces; see `losses.combine_aux` for how they are merged for logging.

    Args:
        dce: [..., R] data-side effects. mask: [..., R] bool target mask.
    """
    dce = jax.lax.stop_gradient(dce.astype(jnp.float32))
    count = mask.sum(dtype=jnp.float32)
    stats = {
        "effect_count": count,
        "pref_count": (mask & (dce > threshold)).sum(dtype=jnp.float32),
        "dce_sum": jnp.where(mask, dce, 0.0).sum(),
        "dce_sq_sum": jnp.where(mask, dce * dce, 0.0).sum(),
    }
    # Linear interpolation between order statistics, as numpy.quantile's default; ignored slots sort last.
    ordered = jnp.sort(jnp.where(mask, dce, jnp.inf).reshape(-1))
    if ordered.size == 0:  # no slot at all (an empty batch): no order statistic to read
        return {**stats, **{key: jnp.zeros((), jnp.float32) for key in DCE_QUANTILES}}
    last = jnp.maximum(count - 1, 0)
    for key, q in DCE_QUANTILES.items():
        position = q * last
        below = jnp.floor(position)
        frac = position - below
        lo = ordered[below.astype(jnp.int32)]
        hi = ordered[jnp.minimum(below + 1, last).astype(jnp.int32)]
        stats[key] = jnp.where(count > 0, lo + frac * (hi - lo), 0.0)
    return stats
