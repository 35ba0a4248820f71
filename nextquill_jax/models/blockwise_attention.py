"""Blockwise causal attention with segment ids: online softmax over key blocks, O(T) memory.

The dense `xla_attention` materialises float32 scores and probabilities [B, K, G, T, T] and keeps them for the
backward pass; at T = 2,048 that is most of a training step's memory and time on CPU. Here the sequence is cut
into blocks of `block` slots. The forward pass keeps a running max, normaliser and weighted sum per query
(online softmax) while it visits key blocks; only the output and the log-sum-exp per query are saved. The
backward pass recomputes each block's probabilities from the log-sum-exp.

A pair of blocks is visited only if it can hold a visible pair: the key block is not above the diagonal and
the ranges of real segment ids of the two blocks overlap in some row. In a packed row most off-diagonal pairs
belong to different examples and are skipped. The overlap test holds for any segment layout, so skipping never
changes the result.

The mask rule is `attention_mask`'s for every real token (segment id > 0). Padding queries (segment 0) attend
to nothing and get output 0 here (the dense path lets them see earlier padding); their outputs are unused.

Shapes: q [B, T, H, Hd], k / v [B, T, K, Hd] with H a multiple of K, segment ids [B, T] int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# (qb, kb, vb, segment ids, pairs to visit, blocked output, log-sum-exp): what `_forward` saves.
_Residuals = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]

DEFAULT_BLOCK = 128  # fastest of 64 / 128 / 256 / 512 on CPU at T = 2,048 (benchmarks/RESULTS.md)


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int = DEFAULT_BLOCK
) -> jax.Array:
    """Causal attention within segments, computed block by block. Returns [B, T, H, Hd] in q.dtype.

    q [B, T, H, Hd], k / v [B, T, K, Hd], segment_ids [B, T] (0 = padding). Scores, softmax statistics and
    accumulators are float32; probabilities are cast to v.dtype before the value product (as the dense path
    does). `block` is the number of slots per block; T is padded up to a multiple of it.

    Raises:
        ValueError: block is not a positive int, k, v or segment_ids do not have q's [B, T] (a decode step's
            fewer queries than keys is `xla_attention`'s), k and v differ, or H is not a multiple of K.
    """
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    # Each block pair is read off one shared [B, T] grid: other lengths would run and give wrong numbers.
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or segment_ids.shape != q.shape[:2]:
        raise ValueError(
            f"blockwise attention needs q [B, T, H, Hd] with k and v [B, T, K, Hd] and segment_ids [B, T] of "
            f"the same B and T, got q {q.shape}, k {k.shape}, v {v.shape}, segment_ids {segment_ids.shape}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    return _attention(q, k, v, segment_ids.astype(jnp.int32), block)


def _to_blocks(x: jax.Array, block: int, kv_heads: int) -> jax.Array:
    """[B, T, heads, Hd] -> [N, B, K, heads/K, block, Hd], T padded to N blocks."""
    b, t, heads, hd = x.shape
    n = -(-t // block)
    x = jnp.pad(x, ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
    x = x.reshape(b, n, block, kv_heads, heads // kv_heads, hd)
    return jnp.transpose(x, (1, 0, 3, 4, 2, 5))


def _kv_blocks(x: jax.Array, block: int) -> jax.Array:
    """Keys or values [B, T, K, Hd] -> [N, B, K, block, Hd]."""
    return _to_blocks(x, block, x.shape[2])[:, :, :, 0]


def _from_blocks(x: jax.Array, t: int) -> jax.Array:
    """[N, B, K, G, block, Hd] -> [B, T, K*G, Hd]."""
    n, b, kv_heads, group, block, hd = x.shape
    x = jnp.transpose(x, (1, 0, 4, 2, 3, 5)).reshape(b, n * block, kv_heads * group, hd)
    return x[:, :t]


def _segment_blocks(segment_ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Segment ids [N, B, block] (padding slots 0) and which block pairs to visit [N, N] bool.

    Pair (i, j) is visited if key block j is not above query block i and, in some row, the ranges of real
    segment ids of the two blocks overlap (a block without real tokens has an empty range). Computed once,
    outside the loops: with the batch sharded, the reduction over rows is one collective, not one per pair.
    """
    b, t = segment_ids.shape
    n = -(-t // block)
    seg = jnp.pad(segment_ids, ((0, 0), (0, n * block - t))).reshape(b, n, block).transpose(1, 0, 2)
    real = seg > 0
    lowest = jnp.where(real, seg, jnp.iinfo(jnp.int32).max).min(-1)  # [N, B]
    highest = jnp.where(real, seg, 0).max(-1)  # [N, B]
    overlap = (lowest[None, :] <= highest[:, None]) & (lowest[:, None] <= highest[None, :])  # [Nq, Nk, B]
    below_diagonal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
    return seg, below_diagonal & jnp.any(overlap, axis=-1)


def _masked_scores(
    qi: jax.Array, kj: jax.Array, si: jax.Array, sj: jax.Array, i: jax.Array, j: jax.Array, block: int
) -> jax.Array:
    """Scaled scores [B, K, G, block, block] float32 with invisible pairs at -inf.

    qi [B, K, G, block, Hd], kj [B, K, block, Hd], si / sj [B, block], i / j block indices."""
    scale = 1.0 / np.sqrt(qi.shape[-1])
    s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    slot = jnp.arange(block)
    causal = (j * block + slot)[None, :] <= (i * block + slot)[:, None]  # [block, block]
    visible = causal[None] & (si[:, :, None] == sj[:, None, :]) & (si[:, :, None] > 0)  # [B, block, block]
    return jnp.where(visible[:, None, None], s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int) -> jax.Array:
    """q [B, T, H, Hd], k / v [B, T, K, Hd], segment_ids [B, T] (0 = padding) -> [B, T, H, Hd], with the
    block-recomputing backward pass `_attention_bwd` (T is padded to whole blocks inside)."""
    return _forward(q, k, v, segment_ids, block)[0]


def _forward(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int
) -> tuple[jax.Array, _Residuals]:
    """Output [B, T, H, Hd] and what the backward pass needs: the blocked inputs, segment ids and pairs to
    visit (as `_to_blocks` / `_kv_blocks` / `_segment_blocks` give them), the blocked output and the
    log-sum-exp per query [N, B, K, G, block] (+inf where nothing is visible)."""
    t, kv_heads = q.shape[1], k.shape[2]
    qb = _to_blocks(q, block, kv_heads)  # [N, B, K, G, block, Hd]
    kb, vb = _kv_blocks(k, block), _kv_blocks(v, block)  # [N, B, K, block, Hd]
    seg, visit_pair = _segment_blocks(segment_ids, block)
    stats_shape = qb.shape[1:-1]  # [B, K, G, block]

    def query_block(i):
        qi, si = qb[i], seg[i]

        def visit(j, carry):
            def update(carry):
                row_max, row_sum, acc = carry
                s = _masked_scores(qi, kb[j], si, seg[j], i, j, block)
                new_max = jnp.maximum(row_max, s.max(-1))
                safe_max = jnp.where(jnp.isneginf(new_max), 0.0, new_max)  # rows with nothing visible yet
                p = jnp.exp(s - safe_max[..., None])
                rescale = jnp.exp(row_max - safe_max)
                pv = jnp.einsum(
                    "bkgqs,bksd->bkgqd", p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32
                )
                return new_max, row_sum * rescale + p.sum(-1), acc * rescale[..., None] + pv

            return jax.lax.cond(visit_pair[i, j], update, lambda c: c, carry)

        init = (
            jnp.full(stats_shape, -jnp.inf, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, qi.shape[-1]), jnp.float32),
        )
        row_max, row_sum, acc = jax.lax.fori_loop(0, i + 1, visit, init)
        seen = row_sum > 0
        safe_sum = jnp.where(seen, row_sum, 1.0)
        out = acc / safe_sum[..., None]
        lse = jnp.where(seen, row_max + jnp.log(safe_sum), jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(
        query_block, jnp.arange(qb.shape[0])
    )  # [N, B, K, G, block, Hd], [N, B, K, G, block]
    return _from_blocks(out, t), (qb, kb, vb, seg, visit_pair, out, lse)


def _attention_bwd(
    block: int, residuals: _Residuals, d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    """Gradients of q, k, v: for each key block, visit the query blocks that see it and recompute p."""
    qb, kb, vb, seg, visit_pair, out, lse = (
        residuals  # qb / out [N, B, K, G, block, Hd], kb / vb [N, B, K, block, Hd]
    )
    t = d_out.shape[1]
    scale = 1.0 / np.sqrt(qb.shape[-1])
    dob = _to_blocks(d_out, block, kb.shape[2])
    # Σ_d dO·O per query [N, B, K, G, block]: the softmax backward's row term.
    row_term = jnp.sum(dob.astype(jnp.float32) * out.astype(jnp.float32), -1)
    n = qb.shape[0]

    def key_block(dq, j):
        kj, vj, sj = kb[j], vb[j], seg[j]

        def visit(i, carry):
            def update(carry):
                dq, dk_j, dv_j = carry
                qi, doi = qb[i], dob[i]
                p = jnp.exp(_masked_scores(qi, kj, seg[i], sj, i, j, block) - lse[i][..., None])
                dv_j = dv_j + jnp.einsum(
                    "bkgqs,bkgqd->bksd", p.astype(d_out.dtype), doi, preferred_element_type=jnp.float32
                )
                dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - row_term[i][..., None]) * scale).astype(qb.dtype)  # d scores, scale folded in
                dk_j = dk_j + jnp.einsum("bkgqs,bkgqd->bksd", ds, qi, preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bkgqs,bksd->bkgqd", ds, kj, preferred_element_type=jnp.float32)
                return dq.at[i].add(dq_i), dk_j, dv_j

            return jax.lax.cond(visit_pair[i, j], update, lambda c: c, carry)

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(j, n, visit, (dq, zeros, zeros))
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(n))
    dq = _from_blocks(dq, t).astype(qb.dtype)
    dk = _from_blocks(dk[:, :, :, None], t).astype(kb.dtype)
    dv = _from_blocks(dv[:, :, :, None], t).astype(vb.dtype)
    return dq, dk, dv, None


_attention.defvjp(_forward, _attention_bwd)
