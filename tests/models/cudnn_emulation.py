"""A CPU stand-in for cuDNN's packed attention as JAX's private API documents it, for checks without a GPU.

`emulated_packed_attention(kv_offsets_use_kv_heads)` replaces
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` in its packed mode: segment m of row b is the
`q_seqlen[b, m]` tokens from slot `q_offsets[b, m]` (keys likewise), -1 entries are unused, each segment is
attended causally on its own. It asserts the argument contract (int32 [B, M] lengths, [B, M + 1] offsets,
M > 1, mask type PADDING_CAUSAL, BTNH layout) and plays cuDNN's worst case where cuDNN promises nothing: every
output and every q / k / v gradient outside all segments is NaN. With `kv_offsets_use_kv_heads=False` it
also reproduces jax <= 0.11.0's grouped-query bug (kv offsets scaled by the query's heads, not the key's).

`emulated_fix_seqlen_offsets(kv_offsets_use_kv_heads)` stands in for the private `_fix_seqlen_offsets`, the
offset arithmetic `cudnn_packed.kv_offsets_follow_key_heads` asks: jax 0.10.2's own where the flag is False
(kv offsets scaled by the query's heads), the fixed arithmetic of jax PR #39521 (the key's heads) where True.

`install()` sets up a CPU run of benchmarks/cudnn_mask.py: both stand-ins in place of the private API, and
`attention.cudnn_attention` answering its dense-mask and causal-only calls with the `xla_dense` implementation
(the packed calls go through the real `cudnn_packed_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def emulated_packed_attention(kv_offsets_use_kv_heads: bool):
    """The stand-in for the private `dot_product_attention` (see the module docstring)."""

    def dot_product_attention(
        query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None,
        kv_offsets=None, *, scale, mask_type, qkv_layout,
    ):  # fmt: skip
        from jax._src.cudnn.fused_attention_stablehlo import MaskType

        b, _, n, _ = query.shape
        m = q_seqlen.shape[1]
        assert bias is None and mask is None and mask_type == MaskType.PADDING_CAUSAL and qkv_layout == "BTNH"
        assert m > 1 and q_offsets.shape == kv_offsets.shape == (b, m + 1), (q_offsets.shape, m)
        assert all(x.dtype == jnp.int32 for x in (q_seqlen, kv_seqlen, q_offsets, kv_offsets))
        # Where the kv offsets land in the flattened [B * S] key buffer (JAX adds b * S per row).
        kv_rows = kv_offsets + jnp.arange(b, dtype=jnp.int32)[:, None] * key.shape[1]
        if not kv_offsets_use_kv_heads:
            kv_rows = kv_rows * (n // key.shape[2])
        kv_starts = jnp.where(kv_offsets >= 0, kv_rows, -1)
        return _attend(query, key, value, q_seqlen, kv_seqlen, q_offsets[:, :m], kv_starts[:, :m], scale)

    return dot_product_attention


def emulated_fix_seqlen_offsets(kv_offsets_use_kv_heads: bool):
    """The stand-in for the private `_fix_seqlen_offsets` (see the module docstring), built on jax
    0.10.2's."""
    from jax._src.cudnn.fused_attention_stablehlo import _fix_seqlen_offsets

    def fix_seqlen_offsets(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
        fixed = _fix_seqlen_offsets(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key)
        if not kv_offsets_use_kv_heads:
            return fixed
        # The key in the query's place: its rows, tokens and heads give the kv offsets their own stride.
        by_key = _fix_seqlen_offsets(kv_seqlen, kv_seqlen, kv_offsets, kv_offsets, key, key)
        return (*fixed[:3], by_key[3])

    return fix_seqlen_offsets


@jax.custom_vjp
def _attend(q, k, v, q_len, kv_len, q_start, kv_start, scale):
    out, _ = _attend_fwd(q, k, v, q_len, kv_len, q_start, kv_start, scale)
    return out


def _attend_fwd(q, k, v, q_len, kv_len, q_start, kv_start, scale):
    out, vjp = jax.vjp(lambda q, k, v: _masked(q, k, v, q_len, kv_len, q_start, kv_start, scale), q, k, v)
    q_cover, kv_cover = _coverage(q, k, q_len, kv_len, q_start, kv_start)
    return _poison(out, q_cover), (vjp, q_cover, kv_cover)


def _attend_bwd(res, g):
    vjp, q_cover, kv_cover = res
    dq, dk, dv = vjp(jnp.where(q_cover[:, :, None, None], g, 0))
    return (_poison(dq, q_cover), _poison(dk, kv_cover), _poison(dv, kv_cover), None, None, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _poison(x, covered):
    return jnp.where(covered[:, :, None, None], x, jnp.nan)


def _coverage(q, k, q_len, kv_len, q_start, kv_start):
    """([B, T] query slots, [B, S] key slots) inside some segment."""
    b, t = q.shape[:2]
    s = k.shape[1]
    slots = jnp.arange(t)[None, :, None]
    used = q_len > 0
    q_cover = (used[:, None] & (slots >= q_start[:, None]) & (slots < (q_start + q_len)[:, None])).any(-1)
    flat = jnp.arange(b * s)[:, None, None]  # [B * S, 1, 1] over (row, segment)
    kv_in = (kv_len > 0) & (flat >= kv_start) & (flat < kv_start + kv_len)
    return q_cover, kv_in.any((1, 2)).reshape(b, s)


def _masked(q, k, v, q_len, kv_len, q_start, kv_start, scale):
    """Attention of each query slot to its segment's keys in the flattened key buffer; 0 where uncovered."""
    b, t, n, hd = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    slots = jnp.arange(t)[None, :, None]  # [1, T, 1]
    inside = (q_len > 0)[:, None] & (slots >= q_start[:, None]) & (slots < (q_start + q_len)[:, None])
    seg = jnp.argmax(inside, axis=-1)  # [B, T], the segment of each covered query
    rel = jnp.arange(t)[None] - jnp.take_along_axis(q_start, seg, axis=1)  # [B, T]
    start = jnp.take_along_axis(kv_start, seg, axis=1)  # [B, T]
    last = start + jnp.minimum(rel, jnp.take_along_axis(kv_len, seg, axis=1) - 1)  # [B, T], causal bound
    flat = jnp.arange(b * s)[None, None]  # [1, 1, B * S]
    visible = (flat >= start[..., None]) & (flat <= last[..., None])
    visible &= inside.any(-1)[..., None]  # [B, T, B * S]
    kf = k.reshape(b * s, kv_heads, hd).astype(jnp.float32)
    vf = v.reshape(b * s, kv_heads, hd).astype(jnp.float32)
    qg = q.reshape(b, t, kv_heads, n // kv_heads, hd).astype(jnp.float32)
    scores = jnp.einsum("btkgd,jkd->btkgj", qg, kf) * scale
    # A finite fill keeps rows without keys (uncovered queries) NaN-free, in value and in gradient.
    scores = jnp.where(visible[:, :, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jnp.where(visible[:, :, None, None], jax.nn.softmax(scores, axis=-1), 0)
    out = jnp.einsum("btkgj,jkd->btkgd", probs, vf).reshape(b, t, n, hd)
    return out.astype(q.dtype)


def install(kv_offsets_use_kv_heads: bool = True, patch=setattr) -> None:
    """Patch the stand-ins in for a CPU run of benchmarks/cudnn_mask.py (see the module docstring);
    `patch(obj, name, value)` sets each (a test passes `monkeypatch.setattr`, which undoes them)."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from nextquill_jax.models import attention, cudnn_packed

    patch(fused, "dot_product_attention", emulated_packed_attention(kv_offsets_use_kv_heads))
    patch(fused, "_fix_seqlen_offsets", emulated_fix_seqlen_offsets(kv_offsets_use_kv_heads))
    cudnn_packed.kv_offsets_follow_key_heads.cache_clear()

    def cudnn_attention(q, k, v, segment_ids, max_segments=None):
        if segment_ids is not None and max_segments is not None:
            return cudnn_packed.cudnn_packed_attention(q, k, v, segment_ids, max_segments)
        seg = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
        return attention.self_attention(q, k, v, seg, "xla_dense")

    patch(attention, "cudnn_attention", cudnn_attention)
