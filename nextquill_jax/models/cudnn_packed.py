"""cuDNN flash attention over packed rows given as per-segment lengths and offsets instead of a dense mask.

`jax.nn.dot_product_attention(implementation="cudnn")` takes packed segments only as a boolean mask
[B, 1, T, T], which it turns into an additive bias that cuDNN reads (and, before jax 0.11.1, differentiates)
in full. cuDNN also has a packed ("ragged", THD) mode: each segment is its own sequence, named by where it
starts in the row and how long it is, so no [T, T] tensor exists and no pair across segments is computed. JAX
exposes that mode only through the private `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`
(`q_seqlen`, `kv_seqlen`, `q_offsets`, `kv_offsets`), which this module calls; it was written against jax
0.10.2 and checked on an H200 under jax 0.11.2 (`benchmarks/cudnn_mask.py`) with k / v repeated to the query
heads (the form every run uses). A training run uses it with `attention_impl: cudnn` unless
`model.cudnn_max_segments` is null; a `ModelConfig` only where its `cudnn_max_segments` is set. Grouped k / v
passed as they are (`repeat_kv=False`) is offered to the benchmark only, and only on a jax whose offset
arithmetic counts the key's heads (`kv_offsets_follow_key_heads`), until a GPU has checked it.

The segment contract (the data pipeline's packed rows and `CausalLM.prefill`'s left-padded prompts keep it):
segment ids [B, T] int32 are 0 (padding, anywhere in the row) or 1..max_segments; each id's tokens form one
contiguous run, and the runs come in increasing id order along the row. A row that breaks it raises
ValueError outside jit; under jit (where the ids are not known while tracing) its attention output is NaN, so
the loss and the step are non-finite and the trainer stops or skips the step (`train.nonfinite`), never
training on silently mixed examples.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

WRITTEN_FOR_JAX = "0.10.2"
_PRIVATE_API = "jax._src.cudnn.fused_attention_stablehlo.dot_product_attention"
_NEEDED_PARAMETERS = ("q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale", "mask_type", "qkv_layout")


class SegmentOffsets(NamedTuple):
    """Packed segments of B rows in the form the private cuDNN API takes (M = max_segments).

    seqlens: [B, M] int32, tokens of segment m + 1 in row b; -1 where the row has no such segment.
    offsets: [B, M + 1] int32, slot where segment m + 1 starts in row b; -1 where the row has no such segment,
        and in the last column (the API's shape; JAX appends the end of the batch itself).
    fits: [B] bool, the row keeps the segment contract (ids in 0..M, contiguous runs in increasing id order).
    """

    seqlens: jax.Array
    offsets: jax.Array
    fits: jax.Array


def segment_offsets(segment_ids: jax.Array, max_segments: int) -> SegmentOffsets:
    """The per-segment lengths and start slots of packed rows, for cuDNN's packed attention.

    segment_ids [B, T] int (0 = padding, 1..max_segments = the examples of a row, see the module docstring);
    max_segments: a static int >= 1, the most segments any row may hold (it fixes the arrays' shapes).
    Tokens with id 0 are outside every segment. Memory: a [B, T, max_segments] comparison, once per call.

    Raises:
        ValueError: max_segments < 1 or segment_ids not of rank 2; or, when segment_ids is concrete (not
            traced), a row that breaks the contract (naming the row and why). Under jit such a row is only
            marked (`fits` False).
    """
    if not isinstance(max_segments, int) or isinstance(max_segments, bool) or max_segments < 1:
        raise ValueError(f"max_segments must be an int >= 1, got {max_segments!r}")
    if jnp.ndim(segment_ids) != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {jnp.shape(segment_ids)}")
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    t = seg.shape[1]
    slots = jnp.arange(t, dtype=jnp.int32)[None, :, None]  # [1, T, 1]
    member = seg[:, :, None] == jnp.arange(1, max_segments + 1, dtype=jnp.int32)  # [B, T, M]
    lengths = member.sum(axis=1, dtype=jnp.int32)  # [B, M]
    first = jnp.min(jnp.where(member, slots, t), axis=1)  # [B, M]; T where absent
    last = jnp.max(jnp.where(member, slots, -1), axis=1)  # [B, M]; -1 where absent
    present = lengths > 0
    contiguous = ~present | (last - first + 1 == lengths)
    # Increasing order: a present segment starts after every earlier id's last token.
    ended_before = jax.lax.cummax(last, axis=1)  # [B, M]
    previous_end = jnp.concatenate([jnp.full_like(ended_before[:, :1], -1), ended_before[:, :-1]], axis=1)
    ordered = ~present | (first > previous_end)
    in_range = (seg >= 0).all(axis=1) & (seg <= max_segments).all(axis=1)
    fits = in_range & (contiguous & ordered).all(axis=1)
    if not isinstance(fits, jax.core.Tracer):
        _raise_on_broken_rows(np.asarray(seg), max_segments, np.asarray(fits))
    seqlens = jnp.where(present, lengths, -1)
    offsets = jnp.concatenate([jnp.where(present, first, -1), jnp.full_like(first[:, :1], -1)], axis=1)
    return SegmentOffsets(seqlens=seqlens, offsets=offsets, fits=fits)


def _raise_on_broken_rows(seg: np.ndarray, max_segments: int, fits: np.ndarray) -> None:
    """ValueError naming the first row of concrete segment ids that breaks the contract, if any."""
    broken = np.flatnonzero(~fits)
    if not broken.size:
        return
    row = int(broken[0])
    ids = seg[row]
    if ids.min() < 0:
        reason = f"has segment ids {ids.min()}..{ids.max()}, outside 0..{max_segments}"
        fix = "Fix: mark padding 0 and number a row's examples 1, 2, ..."
    elif ids.max() > max_segments:
        reason = f"has segment ids {ids.min()}..{ids.max()}, outside 0..{max_segments}"
        fix = f"Fix: raise cudnn_max_segments to at least {ids.max()}"
    else:
        runs = ids[np.concatenate([[True], ids[1:] != ids[:-1]])]
        reason = f"has segment runs {runs[runs > 0].tolist()}: each id must be one run, in increasing order"
        fix = "Fix: number a row's examples 1, 2, ... in row order, each in one contiguous run"
    raise ValueError(f"segment_ids row {row} {reason} (cudnn_max_segments={max_segments}). {fix}.")


def cudnn_packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    max_segments: int,
    *,
    repeat_kv: bool = True,
) -> jax.Array:
    """Causal attention within packed segments through cuDNN's packed mode (GPU, Hopper or newer).

    q [B, T, H, Hd], k / v [B, T, K, Hd] (H a multiple of K), bfloat16 or float16; segment_ids [B, T] under
    the module's contract with at most `max_segments` segments per row. `repeat_kv`: repeat grouped k / v to
    the H query heads before the call (right under any jax); False passes them as they are, which needs
    `kv_offsets_follow_key_heads()` and has not run on a GPU yet (benchmarks/cudnn_mask.py checks it).
    Returns [B, T, H, Hd] in q.dtype: each segment's tokens attend causally to their own segment; padding
    tokens (id 0) get output 0 and send no gradient (cuDNN leaves both undefined outside its segments); rows
    that break the contract are NaN.

    Raises:
        ImportError: the installed jax lacks the private API this calls (or changed its parameters).
        ValueError: from `segment_offsets`; `repeat_kv` False on a jax whose kv offsets count the query's
            heads (it would read keys from the wrong tokens).
    """
    fused = _fused_attention_module()
    if not repeat_kv and k.shape[2] != q.shape[2] and not kv_offsets_follow_key_heads():
        raise ValueError(
            f"repeat_kv=False with {k.shape[2]} kv heads for {q.shape[2]} query heads: jax "
            f"{jax.__version__} scales the packed mode's kv offsets by the query's heads (fixed by jax PR "
            "#39521), so keys would be read from the wrong tokens. Fix: keep repeat_kv=True, or install a "
            "jax with that fix."
        )
    packed = segment_offsets(segment_ids, max_segments)
    seqlens, offsets = packed.seqlens, packed.offsets
    if max_segments == 1:
        # The API selects its packed mode only for more than one segment per row (offsets.shape[1] - 1 > 1);
        # one spare empty segment keeps a single-example row in it rather than in the plain padding mode,
        # which assumes the segment starts at slot 0 (a left-padded prompt's does not).
        seqlens, offsets = (jnp.pad(x, ((0, 0), (0, 1)), constant_values=-1) for x in (seqlens, offsets))
    real = (segment_ids > 0)[:, :, None, None]
    # Zeroed inputs make the gradient at padding slots zero whatever cuDNN writes there (select's
    # transpose drops the other branch, NaN or not).
    q, k, v = (jnp.where(real, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
    if repeat_kv and k.shape[2] != q.shape[2]:
        # Up to jax 0.11.0 the API scales kv_offsets by the query's heads, not the key's (fixed by jax PR
        # #39521), so with fewer kv heads it would read keys from the wrong tokens without an error. k / v
        # repeated to the query heads are right under either scaling.
        k, v = (jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
    out = fused.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=seqlens,
        kv_seqlen=seqlens,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=float(1.0 / np.sqrt(q.shape[-1])),
        mask_type=fused.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )
    out = jnp.where(real, out, jnp.zeros((), out.dtype))
    return jnp.where(packed.fits[:, None, None, None], out, jnp.full((), jnp.nan, out.dtype))


@functools.cache
def kv_offsets_follow_key_heads() -> bool:
    """Whether the installed jax turns the packed mode's kv offsets into element offsets with the key's own
    heads (jax PR #39521, after 0.11.0), so that grouped k / v could be passed without repeating them to the
    query heads. Asked of jax's private `_fix_seqlen_offsets` itself, on a two-segment row of 4 query heads
    and 2 kv heads: True only where its kv offsets come out at half its query offsets; False where they come
    out equal (the bug), where the function is missing or takes other arguments, or answers anything else.
    Cached: the answer belongs to the installed jax.
    """
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused

        with jax.ensure_compile_time_eval():
            seqlens = jnp.array([[2, 2]], jnp.int32)  # [B = 1, M = 2]
            offsets = jnp.array([[0, 2, -1]], jnp.int32)  # [B, M + 1]
            query = jnp.zeros((1, 4, 4, 1), jnp.float32)  # [B, T, N = 4, H]
            key = jnp.zeros((1, 4, 2, 1), jnp.float32)  # [B, S, N_kv = 2, H]
            _, _, q_offsets, kv_offsets = fused._fix_seqlen_offsets(
                seqlens, seqlens, offsets, offsets, query, key
            )
            q_second, kv_second = int(np.asarray(q_offsets)[0, 1]), int(np.asarray(kv_offsets)[0, 1])
    except Exception:  # any change to the private function: keep the repeat, right under either scaling
        return False
    return q_second > 0 and 2 * kv_second == q_second


def _fused_attention_module():
    """The private JAX module with cuDNN's packed attention, checked for the parameters used here.

    Raises:
        ImportError: it is missing, or its `dot_product_attention` lacks a parameter this module passes.
    """
    fix = (
        f"Fix: set model.cudnn_max_segments: null (cuDNN with the dense segment mask), or install jax "
        f"{WRITTEN_FOR_JAX}, which this path was written against."
    )
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError as e:
        raise ImportError(f"{_PRIVATE_API} is not importable in jax {jax.__version__} ({e}). {fix}") from e
    api = getattr(fused, "dot_product_attention", None)
    parameters = inspect.signature(api).parameters if callable(api) else {}
    missing = [p for p in _NEEDED_PARAMETERS if p not in parameters]
    if missing or not hasattr(fused, "MaskType"):
        raise ImportError(
            f"{_PRIVATE_API} in jax {jax.__version__} lacks {missing or ['MaskType']}; this path passes "
            f"{list(_NEEDED_PARAMETERS)}. {fix}"
        )
    return fused
