"""Per-token LM-head statistics computed tile by tile, never holding a [tokens, V] logits array.

For S stacked hidden-state streams h [S, ..., R, D] and an LM head W, the logits z = h Wᵀ are produced one
tile (a chunk of response slots × a block of the vocabulary) at a time. The forward pass keeps an online
logsumexp and the label's logit per token; the backward pass (a `jax.custom_vjp`) recomputes each tile's
logits from h and W, so the memory of both passes is bounded by the tile size, not by tokens × V.

The optional effect stream holds the statistics of the difference of the logits of streams 0 and 1,
`z_0 − z_1` (NextQuill's alignment logits), formed tile by tile from the two streams' logits: it costs no
matrix product of its own, and its gradient flows into streams 0 and 1 (dz_0 += dz_e, dz_1 −= dz_e).

Operands: the logits of the S streams are products of `operand_dtype` operands accumulated in float32
(`float32` by default; `bfloat16` rounds h and W to bfloat16 first, as `CausalLM.logits` does under a
bfloat16 compute dtype, and is exact when both already are bfloat16: a product of two bfloat16 values is
exact in float32). Every pass that forms a stream's logits (forward, JS sweep, backward recompute) uses the
same operands, so the recomputed softmax is normalised by the logsumexp it came from. The effect stream is
the float32 difference of two such float32 logit tiles; the gradient passes (dh = dz W, dW = dzᵀ h) take a
float32 dz and float32 operands whatever `operand_dtype` is.

The optional Jensen–Shannon statistic between streams 0 and 1,
`JS = KL(p_0 ‖ m) + KL(p_1 ‖ m)` with `m = (p_0 + p_1) / 2` over the full vocabulary, needs each stream's
logsumexp first, so it takes a second sweep over the vocabulary.

Layout of the tiles: the leading dimensions of h (after the stream axis) are flattened into M rows that
every tile keeps whole, so a batch-sharded input stays data-parallel under `jax.jit`; the response axis R
is cut into the fewest chunks of at most ⌈token_chunk / M⌉ slots (at least one slot per row), all of one
size C = ⌈R / chunks⌉, padded with ignored slots (fewer than one per chunk); the vocabulary is cut into the
fewest blocks of at most `vocab_chunk` columns, all of one size rounded up to a multiple of 128 (the
matrix units' tile). Sizes balanced this way keep the products' padding small: at R = 384, M = 4 and the
default tiles, chunks of 256 slots would pad R to 512 (a third more work in every pass). When the block
size does not divide V, the last block is shifted back to end at V and its columns already covered by the
block before it are masked, so W is never padded or copied.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nextquill_jax.data.batch import IGNORE_INDEX

HeadLayout = Literal["vd", "dv"]
HEAD_LAYOUTS: tuple[str, ...] = ("vd", "dv")
OPERAND_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 8192
_ALIGN = 128  # vocabulary blocks are rounded up to a multiple of this (matrix-unit tile)


class HeadStats(NamedTuple):
    """Per-token statistics of the logits of each stream (float32); S' = S, or S + 1 with the effect stream.

    lse: [S', ..., R] logsumexp of the logits over the vocabulary.
    label_logit: [S', ..., R] the logit of the token's label (0 where the label is ignored, NaN where it is
        outside [0, V)).
    js: [..., R] Jensen–Shannon weight between streams 0 and 1, or None when not requested.
    """

    lse: jax.Array
    label_logit: jax.Array
    js: jax.Array | None


class _Plan(NamedTuple):
    """Static tiling of one call: rows M, slots R in n_chunks chunks of `chunk`, V in n_blocks of `block`."""

    layout: str
    operands: str
    with_js: bool
    with_effect: bool
    counterfactual_grad: bool
    head_grad: bool
    rows: int
    slots: int
    chunk: int
    n_chunks: int
    vocab: int
    block: int
    n_blocks: int


# (lse, label_logit, js or None) as HeadStats holds them; per chunk, the third is the KL pair [2, M, C].
_TokenStats = tuple[jax.Array, jax.Array, jax.Array | None]
# What the backward pass recomputes from: h, y in chunks, W, the forward's lse and KL (None without JS).
_Residuals = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]


def head_vocab(lm_head: jax.Array, head_layout: HeadLayout, width: int) -> int:
    """Vocabulary size V of an LM head [V, D] ("vd") or [D, V] ("dv") that must act on hidden size `width`.

    Raises:
        ValueError: for an unknown layout, a head that is not 2-D, or one whose D is not `width`.
    """
    if head_layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {head_layout!r}")
    if lm_head.ndim != 2:
        raise ValueError(f"lm_head must be 2-D ([V, D] or [D, V]), got shape {lm_head.shape}")
    vocab, head_width = lm_head.shape if head_layout == "vd" else lm_head.shape[::-1]
    if head_width != width:
        other = "dv" if head_layout == "vd" else "vd"
        raise ValueError(
            f"hidden size {width} does not match lm_head {lm_head.shape} with layout {head_layout!r}; "
            f"fix: pass head_layout={other!r} if the head is stored the other way"
        )
    return vocab


def head_token_stats(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    *,
    head_layout: HeadLayout = "vd",
    with_js: bool = False,
    with_effect: bool = False,
    counterfactual_grad: bool = True,
    frozen_head: bool = False,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    operand_dtype: str = "float32",
) -> HeadStats:
    """Logsumexp and label logit of `hidden @ Wᵀ` per token and stream, with a memory-bounded custom VJP.

    Args:
        hidden: [S, ..., R, D] S streams of final hidden states (any float dtype; computed in float32).
        lm_head: [V, D] when `head_layout == "vd"` (tied embedding), [D, V] when "dv" (untied kernel).
        labels: [..., R] int target ids in [0, V), or IGNORE_INDEX (-100) for slots outside the loss.
        head_layout: "vd" or "dv", see `lm_head`.
        with_js: also return the Jensen–Shannon weight between streams 0 and 1 (needs S >= 2).
        with_effect: append a stream S with the statistics of the logits difference z_0 − z_1 (needs S >= 2).
        counterfactual_grad: the effect stream's gradient reaches stream 1 (the z_1 of z_0 − z_1); False
            treats z_1 as a constant there (its own statistics keep their gradient).
        frozen_head: the LM head is not trained (e.g. under LoRA): its gradient is zero and its
            weight-gradient products (dzᵀ h per tile) are not computed.
        token_chunk: tokens per tile across all rows (at least one response slot per row).
        vocab_chunk: vocabulary columns per tile.
        operand_dtype: "float32" or "bfloat16": the operands of the streams' logits products (module
            docstring); the effect stream and the gradient stay float32.

    Returns:
        HeadStats with lse, label_logit [S, ..., R] ([S + 1, ..., R] with the effect stream) and js
        [..., R] (or None), float32. Differentiable with respect to `hidden` and `lm_head` in reverse mode
        only (`jax.grad`, `vjp`; a `jax.custom_vjp`: `jax.jvp` / `jacfwd` raise TypeError); the gradient
        has their dtypes.

    Raises:
        ValueError: for mismatched shapes, an unknown layout or operand dtype, non-positive chunk sizes, or
            `with_js` with S < 2, or `with_effect` with S < 2.
    """
    if hidden.ndim < 3:
        raise ValueError(
            f"hidden must be [S, ..., R, D] with at least 3 dimensions, got shape {hidden.shape}"
        )
    vocab = head_vocab(lm_head, head_layout, hidden.shape[-1])
    width = hidden.shape[-1]
    if labels.shape != hidden.shape[1:-1]:
        raise ValueError(f"labels shape {labels.shape} must equal hidden.shape[1:-1] = {hidden.shape[1:-1]}")
    for name, wanted in (("with_js", with_js), ("with_effect", with_effect)):
        if wanted and hidden.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 streams, got {hidden.shape[0]}")
    for name, size in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
        # NumPy integers count (an element of a sizes array); bools do not (True is no size).
        if not isinstance(size, int | np.integer) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    token_chunk, vocab_chunk = int(token_chunk), int(vocab_chunk)
    if operand_dtype not in OPERAND_DTYPES:
        raise ValueError(f"operand_dtype must be one of {OPERAND_DTYPES}, got {operand_dtype!r}")

    slots = hidden.shape[-2]
    streams = hidden.shape[0] + with_effect
    lead = hidden.shape[1:-2]
    rows = math.prod(lead)
    max_chunk = max(1, min(slots, -(-token_chunk // max(rows, 1))))
    chunk = -(-slots // -(-slots // max_chunk)) if slots else max_chunk
    n_blocks = -(-vocab // min(vocab_chunk, vocab))
    block = min(vocab_chunk, vocab, -(-vocab // n_blocks // _ALIGN) * _ALIGN)
    plan = _Plan(
        layout=head_layout,
        operands=operand_dtype,
        with_js=with_js,
        with_effect=with_effect,
        counterfactual_grad=counterfactual_grad,
        head_grad=not frozen_head,
        rows=rows,
        slots=slots,
        chunk=chunk,
        n_chunks=max(1, -(-slots // chunk)),
        vocab=vocab,
        block=block,
        n_blocks=-(-vocab // block),
    )
    h = hidden.astype(jnp.float32).reshape(hidden.shape[0], rows, slots, width)  # [S, M, R, D]
    y = labels.astype(jnp.int32).reshape(rows, slots)  # [M, R]
    lse, label_logit, js = _stats(h, lm_head, y, plan)
    bad_label = (y != IGNORE_INDEX) & ((y < 0) | (y >= vocab))  # NaN, so it cannot pass unnoticed under jit
    label_logit = jnp.where(bad_label, jnp.nan, label_logit)
    return HeadStats(
        lse=lse.reshape(streams, *lead, slots),
        label_logit=label_logit.reshape(streams, *lead, slots),
        js=None if js is None else js.reshape(*lead, slots),
    )


def _to_chunks(x: jax.Array, plan: _Plan, fill: float | int, axis: int = -1) -> jax.Array:
    """Cut the slot axis (`axis`, negative) into chunks: [..., R, *tail] -> [n_chunks, ..., C, *tail]."""
    axis = x.ndim + axis
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, plan.n_chunks * plan.chunk - plan.slots)
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(*x.shape[:axis], plan.n_chunks, plan.chunk, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _from_chunks(x: jax.Array, plan: _Plan, axis: int = -1) -> jax.Array:
    """Inverse of `_to_chunks`: [n_chunks, ..., C, *tail] -> [..., R, *tail], dropping the padding."""
    axis = x.ndim - 1 + axis  # the slot axis once the chunk axis is merged back
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], plan.n_chunks * plan.chunk, *x.shape[axis + 2 :])
    return lax.slice_in_dim(x, 0, plan.slots, axis=axis)


def _vocab_block(w: jax.Array, i: jax.Array, plan: _Plan) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Block i of the head as float32 [Vb, D], its global column ids [Vb] and which columns are new [Vb]."""
    start = jnp.minimum(i * plan.block, plan.vocab - plan.block)
    if plan.layout == "vd":
        wb = lax.dynamic_slice_in_dim(w, start, plan.block, axis=0)
    else:
        wb = lax.dynamic_slice_in_dim(w, start, plan.block, axis=1).T
    cols = start + jnp.arange(plan.block)
    return wb.astype(jnp.float32), cols, cols >= i * plan.block


def _logits(h: jax.Array, wb: jax.Array, plan: _Plan) -> jax.Array:
    """Streams' logits tile h [S, M, C, D] · wb [Vb, D]ᵀ -> [S, M, C, Vb] float32 from `plan.operands`."""
    dtype = jnp.dtype(plan.operands)
    return jnp.einsum("smcd,vd->smcv", h.astype(dtype), wb.astype(dtype), preferred_element_type=jnp.float32)


def _add_block(dw: jax.Array, dwb: jax.Array, i: jax.Array, plan: _Plan) -> jax.Array:
    """dw[block i] += dwb ([Vb, D] float32), in the head's layout and dtype."""
    start = jnp.minimum(i * plan.block, plan.vocab - plan.block)
    axis = 0 if plan.layout == "vd" else 1
    dwb = dwb if plan.layout == "vd" else dwb.T
    current = lax.dynamic_slice_in_dim(dw, start, plan.block, axis=axis)
    return lax.dynamic_update_slice_in_dim(dw, current + dwb.astype(dw.dtype), start, axis=axis)


def _lse_update(
    carry: Sequence[jax.Array], z: jax.Array, fresh: jax.Array, is_label: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold a logits tile z [n, M, C, Vb] into the running (max, sum of exp, label logit), each [n, M, C]."""
    running_max, running_sum, label_logit = carry
    z_fresh = jnp.where(fresh, z, -jnp.inf)
    new_max = jnp.maximum(running_max, z_fresh.max(-1))
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(z_fresh - new_max[..., None]).sum(-1)
    return new_max, running_sum, label_logit + jnp.where(is_label, z, 0.0).sum(-1)


def _chunk_forward(hc: jax.Array, yc: jax.Array, w: jax.Array, plan: _Plan) -> _TokenStats:
    """One token chunk: hc [S, M, C, D], yc [M, C] -> lse, label_logit [S', M, C], kl [2, M, C] or None."""
    n_hidden, rows, chunk = hc.shape[:3]
    streams = n_hidden + plan.with_effect

    def lse_step(carry, i):
        wb, cols, fresh = _vocab_block(w, i, plan)
        z = _logits(hc, wb, plan)  # [S, M, C, Vb]
        is_label = fresh & (cols == yc[..., None])  # [M, C, Vb]
        stats = _lse_update([c[:n_hidden] for c in carry], z, fresh, is_label)
        if plan.with_effect:  # the effect tile z_0 - z_1 is never stacked with the others
            effect = _lse_update([c[n_hidden:] for c in carry], z[:1] - z[1:2], fresh, is_label)
            stats = [jnp.concatenate(pair) for pair in zip(stats, effect, strict=True)]
        return tuple(stats), None

    zeros = jnp.zeros((streams, rows, chunk), jnp.float32)
    init = (jnp.full_like(zeros, -jnp.inf), zeros, zeros)
    (running_max, running_sum, label_logit), _ = lax.scan(lse_step, init, jnp.arange(plan.n_blocks))
    lse = running_max + jnp.log(running_sum)
    if not plan.with_js:
        return lse, label_logit, None

    def kl_step(kl, i):
        wb, _, fresh = _vocab_block(w, i, plan)
        logp = _logits(hc[:2], wb, plan) - lse[:2, ..., None]  # [2, M, C, Vb]
        log_mid = jnp.logaddexp(logp[0], logp[1]) - jnp.log(2.0)
        terms = jnp.where(fresh, jnp.exp(logp) * (logp - log_mid), 0.0)
        return kl + terms.sum(-1), None

    kl, _ = lax.scan(kl_step, jnp.zeros((2, rows, chunk), jnp.float32), jnp.arange(plan.n_blocks))
    return lse, label_logit, kl


def _forward(h: jax.Array, w: jax.Array, y: jax.Array, plan: _Plan) -> tuple[_TokenStats, _Residuals]:
    """h [S, M, R, D] f32, y [M, R] -> (lse, label_logit [S', M, R], js [M, R] | None) and the residuals."""
    h_chunks = _to_chunks(h, plan, 0.0, axis=-2)  # [nC, S, M, C, D]
    y_chunks = _to_chunks(y, plan, IGNORE_INDEX)  # [nC, M, C]
    lse, label_logit, kl = lax.map(lambda xs: _chunk_forward(*xs, w, plan), (h_chunks, y_chunks))
    js = None if kl is None else _from_chunks(kl[:, 0] + kl[:, 1], plan)
    out = (_from_chunks(lse, plan), _from_chunks(label_logit, plan), js)
    return out, (h_chunks, y_chunks, w, lse, kl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _stats(h: jax.Array, w: jax.Array, y: jax.Array, plan: _Plan) -> _TokenStats:
    """h [S, M, R, D], head w ([V, D] or [D, V], as `plan` says), labels y [M, R] -> the token statistics of
    `_forward`, with the recomputing backward pass `_stats_bwd` (no [..., V] logits kept for it)."""
    return _forward(h, w, y, plan)[0]


def _stats_fwd(h: jax.Array, w: jax.Array, y: jax.Array, plan: _Plan) -> tuple[_TokenStats, _Residuals]:
    """`_stats`' forward pass for its custom VJP: the statistics and `_forward`'s residuals."""
    return _forward(h, w, y, plan)


def _stats_bwd(
    plan: _Plan, residuals: _Residuals, cotangents: _TokenStats
) -> tuple[jax.Array, jax.Array, None]:
    """Recompute tile logits; dz = g_lse·softmax + g_label·onehot (+ the JS term), the effect stream's dz
    folded into streams 0 and 1; dh = dz W, dW = dzᵀ h (zero, not computed, for a frozen head)."""
    h_chunks, y_chunks, w, lse, kl = residuals
    g_lse, g_label, g_js = cotangents
    g_lse = _to_chunks(g_lse, plan, 0.0)  # [nC, S', M, C]
    g_label = _to_chunks(g_label, plan, 0.0)
    g_js = None if g_js is None else _to_chunks(g_js, plan, 0.0)  # [nC, M, C]

    def vocab_step(carry, i):
        dw, dh = carry
        wb, cols, fresh = _vocab_block(w, i, plan)

        def token_step(dwb, xs):
            hc, yc, lse_c, kl_c, gl, gy, gj = xs
            z = _logits(hc, wb, plan)  # [S, M, C, Vb]
            n_hidden = z.shape[0]
            is_label = fresh & (cols == yc[..., None])  # [M, C, Vb]

            def d_logits(z, lse, gl, gy):  # d(g_lse·lse + g_label·label_logit) / dz and softmax(z)
                p = jnp.where(fresh, jnp.exp(z - lse[..., None]), 0.0)
                return gl[..., None] * p + jnp.where(is_label, gy[..., None], 0.0), p

            dz, p = d_logits(z, lse_c[:n_hidden], gl[:n_hidden], gy[:n_hidden])
            if plan.with_js:
                # d JS / d z_s = p_s ⊙ (log p_s − log m − KL(p_s ‖ m)) for the two JS streams s.
                logp = z[:2] - lse_c[:2, ..., None]
                log_mid = jnp.logaddexp(logp[0], logp[1]) - jnp.log(2.0)
                djs = gj[..., None] * p[:2] * (logp - log_mid - kl_c[..., None])
                dz = dz.at[:2].add(djs)
            if plan.with_effect:  # z_e = z_0 - z_1: its gradient goes to z_0 and, negated, to z_1
                dz_e, _ = d_logits(z[0] - z[1], lse_c[n_hidden], gl[n_hidden], gy[n_hidden])
                dz_1 = dz[1:2] - dz_e if plan.counterfactual_grad else dz[1:2]
                dz = jnp.concatenate([dz[:1] + dz_e, dz_1, dz[2:]])
            dh_c = jnp.einsum("smcv,vd->smcd", dz, wb)
            if not plan.head_grad:
                return dwb, dh_c
            return dwb + jnp.einsum("smcv,smcd->vd", dz, hc), dh_c

        xs = (h_chunks, y_chunks, lse, kl, g_lse, g_label, g_js)
        dwb, dh_blocks = lax.scan(token_step, jnp.zeros(wb.shape, jnp.float32), xs)
        return (_add_block(dw, dwb, i, plan), dh + dh_blocks), None

    init = (jnp.zeros_like(w), jnp.zeros_like(h_chunks))
    (dw, dh), _ = lax.scan(vocab_step, init, jnp.arange(plan.n_blocks))
    return _from_chunks(dh, plan, axis=-2), dw, None


_stats.defvjp(_stats_fwd, _stats_bwd)
