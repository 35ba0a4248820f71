"""cuDNN's packed attention path without a GPU: the segment lengths / offsets against a NumPy statement, the
contract on segment ids (ValueError outside jit, NaN rows under it), and the wrapper around the private API
with that API replaced by a CPU emulation of its documented semantics (tests/models/cudnn_emulation.py)."""

from __future__ import annotations

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo as fused

from nextquill_jax.models import CausalLM, attention
from nextquill_jax.models.attention import self_attention
from nextquill_jax.models.cudnn_packed import (
    cudnn_packed_attention,
    kv_offsets_follow_key_heads,
    segment_offsets,
)
from tests.models.cudnn_emulation import emulated_fix_seqlen_offsets, emulated_packed_attention
from tests.models.test_attention import random_qkv

# Rows of 12 slots: three segments and end padding; a full row of max (3) segments; one segment; a left-padded
# prompt (CausalLM.prefill); all padding.
ROWS = np.array(
    [
        [1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0],
        [1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ],
    np.int32,
)


def numpy_offsets(seg: np.ndarray, max_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """The API's statement: seqlens [B, M] and offsets [B, M + 1], -1 where a row has no such segment."""
    seqlens = np.full((seg.shape[0], max_segments), -1)
    offsets = np.full((seg.shape[0], max_segments + 1), -1)
    for row in range(seg.shape[0]):
        for k in range(1, max_segments + 1):
            slots = np.flatnonzero(seg[row] == k)
            if slots.size:
                seqlens[row, k - 1], offsets[row, k - 1] = slots.size, slots[0]
    return seqlens, offsets


@pytest.mark.parametrize("max_segments, rows", [(3, slice(None)), (4, slice(None)), (1, slice(2, 5))])
def test_segment_offsets_match_the_numpy_statement(max_segments, rows):
    seg = ROWS[rows]
    expected = numpy_offsets(seg, max_segments)
    for got in (
        segment_offsets(seg, max_segments),
        jax.jit(segment_offsets, static_argnums=1)(seg, max_segments),
    ):
        assert got.seqlens.dtype == got.offsets.dtype == jnp.int32
        np.testing.assert_array_equal(got.seqlens, expected[0])
        np.testing.assert_array_equal(got.offsets, expected[1])
        assert np.asarray(got.fits).all()


@pytest.mark.parametrize(
    "row, message",
    [
        ([1, 2, 3, 0], "segment ids 0..3, outside 0..2"),  # more segments than max_segments
        ([1, 1, 2, 1], r"runs \[1, 2, 1\]"),  # an id in two runs
        ([1, 0, 1, 0], r"runs \[1, 1\]"),  # an id's run split by padding (no other id out of order)
        ([2, 2, 1, 0], r"runs \[2, 1\]"),  # ids out of row order
        ([1, -1, 0, 0], "outside 0..2"),
    ],
)
def test_rows_breaking_the_contract_raise_outside_jit_and_are_marked_under_it(row, message):
    seg = np.array([[1, 1, 2, 0], row], np.int32)
    with pytest.raises(ValueError, match=f"row 1 .*{message}"):
        segment_offsets(seg, 2)
    fits = jax.jit(lambda s: segment_offsets(s, 2).fits)(seg)
    np.testing.assert_array_equal(fits, [True, False])


def test_rows_that_skip_an_id_keep_the_contract_and_their_order_is_checked_across_the_gap():
    """Ids need not start at 1 nor be consecutive: a row of ids 2 and 3 only, or of 1 and 3, fits and gets
    the NumPy statement's lengths and offsets; ids 3 then 1 (2 absent between them) break the order."""
    seg = np.array([[2, 2, 2, 3, 3, 0], [0, 1, 1, 3, 3, 3]], np.int32)
    got = segment_offsets(seg, 3)
    expected = numpy_offsets(seg, 3)
    np.testing.assert_array_equal(got.seqlens, expected[0])
    np.testing.assert_array_equal(got.offsets, expected[1])
    assert np.asarray(got.fits).all()
    with pytest.raises(ValueError, match=r"row 0 has segment runs \[3, 1\]"):
        segment_offsets(np.array([[3, 3, 1, 1, 0, 0]], np.int32), 3)


def test_the_contract_error_names_the_first_broken_row_and_its_fix():
    """Rows 1-3 each break the contract their own way: the error names row 1; each alone gets its fix."""
    rows = np.array([[1, 1, 2, 0], [1, 2, 3, 0], [1, -1, 0, 0], [2, 2, 1, 0]], np.int32)
    fixes = {  # each message's end, after the reason: the setting and the fix
        1: "outside 0..2 (cudnn_max_segments=2). Fix: raise cudnn_max_segments to at least 3.",
        2: "outside 0..2 (cudnn_max_segments=2). Fix: mark padding 0 and number a row's examples 1, 2, ....",
        3: "(cudnn_max_segments=2). Fix: number a row's examples 1, 2, ... in row order, each in one "
        "contiguous run.",
    }
    with pytest.raises(ValueError, match=r"^segment_ids row 1 has segment ids 0\.\.3"):
        segment_offsets(rows, 2)
    for row, fix in fixes.items():
        with pytest.raises(ValueError, match=re.escape(fix) + "$"):
            segment_offsets(rows[[0, row]], 2)


@pytest.mark.parametrize("max_segments", [0, True, 2.0])
def test_max_segments_must_be_a_positive_int(max_segments):
    with pytest.raises(ValueError, match="max_segments must be an int >= 1"):
        segment_offsets(ROWS, max_segments)
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        segment_offsets(ROWS[0], 3)


@pytest.fixture
def emulated(monkeypatch):
    """Install the CPU emulation of the private API and its offset arithmetic; call with whether its kv
    offsets count the key's heads (jax PR #39521) or the query's (jax <= 0.11.0)."""
    kv_offsets_follow_key_heads.cache_clear()

    def install(kv_offsets_use_kv_heads: bool) -> None:
        monkeypatch.setattr(
            fused, "dot_product_attention", emulated_packed_attention(kv_offsets_use_kv_heads)
        )
        monkeypatch.setattr(
            fused, "_fix_seqlen_offsets", emulated_fix_seqlen_offsets(kv_offsets_use_kv_heads)
        )
        kv_offsets_follow_key_heads.cache_clear()

    yield install
    kv_offsets_follow_key_heads.cache_clear()


def packed_and_dense(seg: np.ndarray, max_segments: int, repeat_kv: bool = True):
    """(packed, dense) attention functions of (q, k, v) over the segment ids `seg`."""
    seg = jnp.asarray(seg)
    return (
        jax.jit(lambda q, k, v: cudnn_packed_attention(q, k, v, seg, max_segments, repeat_kv=repeat_kv)),
        jax.jit(lambda q, k, v: self_attention(q, k, v, seg, "xla_dense")),
    )


@pytest.mark.parametrize("kv_offsets_use_kv_heads, repeat_kv", [(True, True), (False, True), (True, False)])
def test_packed_attention_and_gradients_match_dense_attention(emulated, kv_offsets_use_kv_heads, repeat_kv):
    """Grouped heads (4 query, 2 kv): exact at real tokens with k / v repeated to the query heads, whether
    jax's kv offsets count the key's heads or the query's (jax <= 0.11.0), and with grouped k / v passed as
    they are where they count the key's; padding outputs are 0 and padding gradients 0, although the
    emulated cuDNN leaves NaN there."""
    emulated(kv_offsets_use_kv_heads)
    q, k, v = random_qkv(5, 12, 4, 2, 8)
    real = ROWS > 0
    cotangent = (
        jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32) * real[..., None, None]
    )
    packed, dense = packed_and_dense(ROWS, 3, repeat_kv)
    out = np.asarray(packed(q, k, v))
    np.testing.assert_allclose(out[real], np.asarray(dense(q, k, v))[real], atol=1e-6, rtol=0)
    assert (out[~real] == 0).all()
    grads = [
        jax.grad(lambda q, k, v, f=f: (f(q, k, v) * cotangent).sum(), (0, 1, 2))(q, k, v)
        for f in (packed, dense)
    ]
    for got, want in zip(*grads, strict=True):
        assert np.isfinite(got).all() and (np.asarray(got)[~real] == 0).all()
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_the_emulated_grouped_query_bug_is_what_the_repeat_avoids(emulated):
    """Called directly with grouped k / v (not repeated), the buggy API is wrong: the repeat is needed."""
    emulated(kv_offsets_use_kv_heads=False)
    q, k, v = random_qkv(5, 12, 4, 2, 8)
    packed = segment_offsets(jnp.asarray(ROWS), 3)
    direct = fused.dot_product_attention(
        q, k, v, q_seqlen=packed.seqlens, kv_seqlen=packed.seqlens, q_offsets=packed.offsets,
        kv_offsets=packed.offsets, scale=float(1 / np.sqrt(8)), mask_type=fused.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )  # fmt: skip
    _, dense = packed_and_dense(ROWS, 3)
    real = ROWS > 0
    assert not np.allclose(np.asarray(direct)[real], np.asarray(dense(q, k, v))[real], atol=1e-3)


@pytest.mark.parametrize("repeat_kv, heads_passed", [(True, 4), (False, 2)])
def test_repeat_kv_decides_the_heads_the_api_is_given(emulated, monkeypatch, repeat_kv, heads_passed):
    emulated(True)
    emulate = fused.dot_product_attention
    seen = []

    @functools.wraps(emulate)  # its signature: the wrapper checks the API's parameters
    def spy(q, k, v, **kw):
        seen.append(k.shape[2])
        return emulate(q, k, v, **kw)

    monkeypatch.setattr(fused, "dot_product_attention", spy)
    q, k, v = random_qkv(5, 12, 4, 2, 8)
    cudnn_packed_attention(q, k, v, jnp.asarray(ROWS), 3, repeat_kv=repeat_kv)
    assert seen == [heads_passed]


def test_grouped_kv_on_a_jax_with_the_kv_offset_bug_is_refused(emulated):
    """Unrepeated k / v would be read from the wrong tokens there (the test above shows how wrong)."""
    emulated(False)
    q, k, v = random_qkv(5, 12, 4, 2, 8)
    with pytest.raises(
        ValueError, match=r"repeat_kv=False with 2 kv heads for 4 query heads.*PR #39521.*Fix"
    ):
        cudnn_packed_attention(q, k, v, jnp.asarray(ROWS), 3, repeat_kv=False)
    cudnn_packed_attention(q[:, :, :2], k, v, jnp.asarray(ROWS), 3, repeat_kv=False)  # no grouping: allowed


@pytest.mark.parametrize("kv_offsets_use_kv_heads", [True, False])
def test_the_kv_offset_probe_reads_jax_offset_arithmetic(emulated, kv_offsets_use_kv_heads):
    emulated(kv_offsets_use_kv_heads)
    assert kv_offsets_follow_key_heads() is kv_offsets_use_kv_heads


def test_the_kv_offset_probe_agrees_with_the_installed_jax_at_another_shape():
    """The installed jax's own `_fix_seqlen_offsets` on 6 query heads, 2 kv heads of 3 and three segments in
    two rows: its kv offsets are the key's element offsets (2 · 3 per token) exactly where the probe says so,
    and the query's (6 · 3 per token) otherwise."""
    kv_offsets_follow_key_heads.cache_clear()
    seqlens = jnp.array([[2, 3, 1], [4, -1, -1]], jnp.int32)
    offsets = jnp.array([[0, 2, 5, -1], [1, -1, -1, -1]], jnp.int32)
    query, key = jnp.zeros((2, 7, 6, 3)), jnp.zeros((2, 7, 2, 3))
    _, _, _, kv_offsets = fused._fix_seqlen_offsets(seqlens, seqlens, offsets, offsets, query, key)
    tokens = np.array(
        [0, 2, 5, 7 + 1, 14, 14, 14, 14]
    )  # segments' first slots in the [B * T] buffer; fill B·T
    per_token = 2 * 3 if kv_offsets_follow_key_heads() else 6 * 3
    np.testing.assert_array_equal(np.asarray(kv_offsets).ravel(), tokens * per_token)


@pytest.mark.parametrize(
    "replacement",
    [
        None,
        lambda q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key, layout: None,
        lambda *args: (_ for _ in ()).throw(RuntimeError("changed")),
        lambda q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key: (
            q_seqlen,
            kv_seqlen,
            0 * q_offsets,
            0 * kv_offsets,
        ),
    ],
    ids=["missing", "other parameters", "raises", "zero offsets"],
)
def test_the_kv_offset_probe_keeps_the_repeat_when_jax_changes(monkeypatch, replacement):
    kv_offsets_follow_key_heads.cache_clear()
    if replacement is None:
        monkeypatch.delattr(fused, "_fix_seqlen_offsets")
    else:
        monkeypatch.setattr(fused, "_fix_seqlen_offsets", replacement)
    assert kv_offsets_follow_key_heads() is False
    kv_offsets_follow_key_heads.cache_clear()


def test_rows_breaking_the_contract_are_nan_under_jit_and_the_others_exact(emulated):
    emulated(True)
    q, k, v = random_qkv(5, 12, 4, 2, 8)
    packed, dense = packed_and_dense(ROWS, 2)  # rows 0 and 1 hold 3 segments
    out, want = np.asarray(packed(q, k, v)), np.asarray(dense(q, k, v))
    assert np.isnan(out[:2]).all()
    real = ROWS[2:] > 0
    np.testing.assert_allclose(out[2:][real], want[2:][real], atol=1e-6, rtol=0)


def test_one_segment_rows_keep_the_packed_mode(emulated):
    """max_segments=1 passes a spare empty segment (the emulation asserts M > 1), so a left-padded prompt's
    segment keeps its offset."""
    emulated(True)
    q, k, v = random_qkv(3, 12, 4, 2, 8)
    packed, dense = packed_and_dense(ROWS[2:], 1)
    real = ROWS[2:] > 0
    np.testing.assert_allclose(np.asarray(packed(q, k, v))[real], np.asarray(dense(q, k, v))[real], atol=1e-6)


def test_a_jax_without_the_private_api_is_an_import_error_naming_the_version(monkeypatch):
    monkeypatch.setattr(fused, "dot_product_attention", lambda query, key, value, mask=None: query)
    q, k, v = random_qkv(1, 4, 2, 1, 8)
    written_for = (
        r"lacks \['q_seqlen'.*Fix: set model\.cudnn_max_segments: null.*jax 0\.10\.2, which this path was"
    )
    with pytest.raises(ImportError, match=written_for):
        cudnn_packed_attention(q, k, v, jnp.ones((1, 4), jnp.int32), 2)


@pytest.mark.parametrize("lacking", ["scale", "mask_type", "qkv_layout", "MaskType"])
def test_a_jax_whose_private_api_lacks_any_one_thing_passed_is_an_import_error(monkeypatch, lacking):
    """Every parameter the call passes, and the MaskType it names, is checked for, each on its own."""
    if lacking == "MaskType":
        monkeypatch.delattr(fused, "MaskType")
    else:
        parameters = ["query", "key", "value", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale",
                      "mask_type", "qkv_layout"]  # fmt: skip
        api = lambda *args, **kwargs: None
        api.__signature__ = inspect.Signature(
            [
                inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                for p in parameters
                if p != lacking
            ]
        )
        monkeypatch.setattr(fused, "dot_product_attention", api)
    q, k, v = random_qkv(1, 4, 2, 1, 8)
    with pytest.raises(ImportError, match=rf"lacks \['{lacking}'\]"):
        cudnn_packed_attention(q, k, v, jnp.ones((1, 4), jnp.int32), 2)


def test_model_with_cudnn_max_segments_runs_the_packed_path(emulated, monkeypatch, tiny_model_config):
    """ModelConfig.cudnn_max_segments reaches the attention: a bf16 CausalLM on packed and left-padded rows
    gives the blockwise path's logits at every real token (backend check lifted; the emulation stands in)."""
    emulated(False)
    monkeypatch.setattr(attention, "check_attention_backend", lambda impl: None)
    packed_calls = []
    packed = fused.dot_product_attention
    counted = lambda *a, **kw: packed_calls.append(1) or packed(*a, **kw)
    # With the signature the API check inspects.
    monkeypatch.setattr(fused, "dot_product_attention", functools.wraps(packed)(counted))
    cfg = tiny_model_config(compute_dtype="bfloat16")  # 4 heads, 2 kv heads of 8
    _, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
    seg = jnp.asarray(ROWS[:4])
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, seg.shape), jnp.int32)
    logits = {}
    for impl, max_segments in (("xla", None), ("cudnn", 3)):
        model_cfg = cfg.replace(attention_impl=impl, cudnn_max_segments=max_segments)
        graphdef = nnx.graphdef(CausalLM(model_cfg, rngs=nnx.Rngs(0)))
        logits[impl] = np.asarray(jax.jit(lambda s, g=graphdef: nnx.merge(g, s)(ids, None, seg))(state))
    assert packed_calls, "the cudnn model never reached the packed attention"
    real = ROWS[:4] > 0
    # Three bfloat16 steps at the logits' largest magnitude (~0.4; measured 1.6e-3); a segment mask or k/v
    # head mix-up moves them by 0.2 or more.
    np.testing.assert_allclose(logits["cudnn"][real], logits["xla"][real], atol=6e-3, rtol=0)
