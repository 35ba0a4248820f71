"""Attention mask rule and implementations against a float64 NumPy statement of masked grouped-query
attention; the blockwise path's gradients against autodiff of the dense statement."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextquill_jax.models import CausalLM, attention
from nextquill_jax.models.attention import (
    attention_mask,
    check_attention_backend,
    cudnn_attention,
    self_attention,
    splash_attention,
    xla_attention,
)
from nextquill_jax.models.blockwise_attention import blockwise_attention


def reference_attention(q, k, v, segments) -> np.ndarray:
    """float64 loops: query i of row b attends keys j <= i with segments[b, j] == segments[b, i]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for row in range(b):
        for head in range(h):
            for i in range(t):
                keys = [j for j in range(i + 1) if segments[row, j] == segments[row, i]]
                scores = np.array([q[row, i, head] @ k[row, j, head // group] for j in keys]) / np.sqrt(d)
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                out[row, i, head] = probs @ v[row, keys, head // group]
    return out


def random_qkv(b, t, h, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d))
    )


SEGMENTS = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 0]], np.int32)


def test_mask_rule():
    slots = jnp.arange(12)
    mask = np.asarray(attention_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS), slots, slots))
    for b in range(2):
        for i in range(12):
            for j in range(12):
                assert mask[b, i, j] == (j <= i and SEGMENTS[b, j] == SEGMENTS[b, i]), (b, i, j)


def test_xla_attention_matches_reference_with_grouped_heads_and_segments():
    q, k, v = random_qkv(2, 12, 6, 2, 8)
    slots = jnp.arange(12)
    mask = attention_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS), slots, slots)
    out = np.asarray(xla_attention(q, k, v, mask))
    np.testing.assert_allclose(out, reference_attention(q, k, v, SEGMENTS), atol=2e-6, rtol=0)


# Rows: one example; three packed examples then padding; left padding; segments that revisit an earlier id
# (not produced by our packer, but allowed: block skipping must not assume increasing ids).
BLOCK_SEGMENTS = np.array(
    [
        [1] * 37,
        [1] * 15 + [2] * 9 + [3] * 8 + [0] * 5,
        [0] * 6 + [1] * 31,
        [1] * 10 + [2] * 10 + [1] * 10 + [3] * 7,
    ],
    np.int32,
)


@pytest.mark.parametrize(("block", "kv_heads"), [(8, 2), (16, 2), (64, 2), (16, 6)])
def test_blockwise_attention_matches_reference(block, kv_heads):
    # T = 37 is not a multiple of any block: exercises the padding of the last block. kv_heads 6 = 6 query
    # heads: plain multi-head attention (groups of one).
    q, k, v = random_qkv(4, 37, 6, kv_heads, 8, seed=2)
    attend = jax.jit(blockwise_attention, static_argnums=4)
    out = np.asarray(attend(q, k, v, jnp.asarray(BLOCK_SEGMENTS), block))
    real = BLOCK_SEGMENTS > 0
    expected = reference_attention(q, k, v, BLOCK_SEGMENTS)
    np.testing.assert_allclose(out[real], expected[real], atol=2e-6, rtol=0)
    assert np.all(out[~real] == 0.0)  # padding queries attend to nothing


@pytest.mark.parametrize(("block", "kv_heads"), [(8, 2), (16, 2), (16, 6)])
def test_blockwise_attention_gradients_match_dense(block, kv_heads):
    q, k, v = random_qkv(4, 37, 6, kv_heads, 8, seed=3)
    seg = jnp.asarray(BLOCK_SEGMENTS)
    real = (seg > 0)[:, :, None, None]
    weights = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    slots = jnp.arange(37)
    dense = lambda q, k, v: xla_attention(q, k, v, attention_mask(seg, seg, slots, slots))
    blockwise = lambda q, k, v: blockwise_attention(q, k, v, seg, block)

    def weighted_sum(attend):
        return lambda q, k, v: jnp.sum(jnp.where(real, attend(q, k, v), 0.0) * weights)

    value, grads = jax.value_and_grad(weighted_sum(dense), argnums=(0, 1, 2))(q, k, v)
    got_value, got_grads = jax.jit(jax.value_and_grad(weighted_sum(blockwise), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(float(got_value), float(value), rtol=1e-6)
    for name, got, expected in zip("qkv", got_grads, grads, strict=True):
        atol = 2e-6 * float(jnp.abs(expected).max())
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=atol, rtol=0, err_msg=name)


def test_blockwise_attention_in_bfloat16_stays_close_to_reference():
    q, k, v = random_qkv(4, 37, 6, 2, 8, seed=5)
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    out = blockwise_attention(*half, jnp.asarray(BLOCK_SEGMENTS), 16)
    assert out.dtype == jnp.bfloat16
    real = BLOCK_SEGMENTS > 0
    expected = reference_attention(*(a.astype(jnp.float32) for a in half), BLOCK_SEGMENTS)[real]
    err = np.linalg.norm(np.asarray(out, np.float32)[real] - expected) / np.linalg.norm(expected)
    assert err < 1e-2, err


def test_blockwise_attention_rejects_a_bad_block():
    q, k, v = random_qkv(1, 8, 2, 1, 8)
    for block in (0, 2.5):
        with pytest.raises(ValueError, match="block must be a positive int"):
            blockwise_attention(q, k, v, jnp.ones((1, 8), jnp.int32), block)
    q6, k4, v4 = random_qkv(1, 8, 6, 4, 8)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of key/value heads \(4\)"):
        blockwise_attention(q6, k4, v4, jnp.ones((1, 8), jnp.int32), 4)


def test_blockwise_attention_visits_the_block_pairs_whose_segments_meet():
    """Which block pairs run, against a plain statement: pair (i, j), j <= i, where in some row the real
    (> 0) segment ids of the two blocks have overlapping ranges. Visiting more gives the same numbers,
    slower; the packed row here (3 examples, then padding) leaves (2, 0), (3, 0..2) and (4, *) out."""
    from nextquill_jax.models.blockwise_attention import _segment_blocks

    segments = np.array([[1] * 15 + [2] * 9 + [3] * 8 + [0] * 5], np.int32)  # [B, T]
    block, n = 8, 5
    padded = np.pad(segments, ((0, 0), (0, n * block - segments.shape[1])))
    want = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(i + 1):
            for row in padded:
                a = [s for s in row[i * block : (i + 1) * block] if s > 0]
                b = [s for s in row[j * block : (j + 1) * block] if s > 0]
                want[i, j] |= bool(a and b and min(a) <= max(b) and min(b) <= max(a))
    assert want[2, 1] and not want[2, 0] and not want[3, :3].any() and not want[4].any()
    np.testing.assert_array_equal(np.asarray(_segment_blocks(jnp.asarray(segments), block)[1]), want)


def test_blockwise_attention_keeps_hundreds_of_segments_apart():
    """300 one-token examples in one row (short examples packed into a long row): each query attends to
    itself alone, so the output is its own value vector, whatever the segment ids' width."""
    q, k, v = random_qkv(1, 300, 2, 1, 8)
    segments = jnp.arange(1, 301, dtype=jnp.int32)[None]  # [B, T]
    out = np.asarray(blockwise_attention(q, k, v, segments, 16))
    np.testing.assert_allclose(out, np.repeat(np.asarray(v), 2, axis=2), atol=1e-6)


def test_blockwise_attention_refuses_keys_or_segments_of_another_length():
    """A decode-style call, 4 queries against 12 keys, ran and gave numbers off by 2.9 (the audit's case):
    every block pair is read off one [B, T] grid, so k, v and segment_ids must have q's B and T."""
    q, k, v = random_qkv(1, 12, 2, 1, 8)
    ones = jnp.ones((1, 12), jnp.int32)
    for args in (
        (q[:, :4], k, v, ones),  # fewer queries than keys
        (q[:, :4], k, v, ones[:, :4]),
        (q, k[:, :8], v[:, :8], ones),  # fewer keys than queries
        (q, k, v, ones[:, :8]),
        (q, k, v[:, :8], ones),
    ):
        with pytest.raises(ValueError, match=r"of the same B and T, got q \(1, (12|4), 2, 8\)"):
            blockwise_attention(*args, 4)


@pytest.mark.parametrize("t", [1, 5, 11])
def test_self_attention_xla_on_a_few_tokens_matches_reference(t):
    """`self_attention`'s `xla` picks one block of T rounded up to 8 for short rows: a row of fewer than 8
    tokens (a short prompt, a one-token forward) and one not a multiple of 8 match the float64 statement."""
    q, k, v = random_qkv(2, t, 6, 2, 8, seed=8)
    segments = SEGMENTS[:, -t:]
    out = np.asarray(self_attention(q, k, v, jnp.asarray(segments), "xla"))
    real = segments > 0
    np.testing.assert_allclose(out[real], reference_attention(q, k, v, segments)[real], atol=2e-6, rtol=0)


def test_splash_kernel_in_interpret_mode_matches_reference():
    # T = 100 is not a multiple of the kernel block: exercises the internal padding.
    segments = np.array([[1] * 40 + [2] * 50 + [0] * 10], np.int32)
    q, k, v = random_qkv(1, 100, 4, 2, 16, seed=1)
    out = np.asarray(splash_attention(q, k, v, jnp.asarray(segments), interpret=True))
    np.testing.assert_allclose(out, reference_attention(q, k, v, segments), atol=1e-5, rtol=0)


def test_self_attention_splash_passes_the_segment_ids(monkeypatch):
    """`self_attention(impl="splash")` hands the kernel the row's segment ids (kernel in interpret mode, the
    backend check lifted, as on a TPU): packed examples and padding match the float64 statement."""
    monkeypatch.setattr(attention, "check_attention_backend", lambda impl: None)
    monkeypatch.setattr(attention, "splash_attention", functools.partial(splash_attention, interpret=True))
    q, k, v = random_qkv(2, 12, 4, 2, 16, seed=9)
    out = np.asarray(self_attention(q, k, v, jnp.asarray(SEGMENTS), "splash"))
    np.testing.assert_allclose(out, reference_attention(q, k, v, SEGMENTS), atol=1e-5, rtol=0)


def test_model_logits_agree_between_blockwise_and_dense_attention(tiny_model_config):
    """The default `xla` (blockwise, 200 > one block of 128) and `xla_dense` give the same logits at every
    real token of packed and padded rows."""
    cfg = tiny_model_config()  # vocab 64, hidden 32, 2 layers, 4 heads and 2 kv heads of 8
    _, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 200)), jnp.int32)
    segments = np.zeros((2, 200), np.int32)
    segments[0, :90], segments[0, 90:170] = 1, 2
    segments[1, 30:] = 1
    positions = np.zeros((2, 200), np.int32)
    for row in range(2):
        for seg in (1, 2):
            where = np.flatnonzero(segments[row] == seg)
            positions[row, where] = np.arange(where.size)
    logits = {}
    for impl in ("xla", "xla_dense"):
        graphdef = nnx.graphdef(CausalLM(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0)))
        forward = jax.jit(lambda s, g=graphdef: nnx.merge(g, s)(ids, positions, segments))
        logits[impl] = np.asarray(forward(state))
    real = segments > 0
    np.testing.assert_allclose(logits["xla"][real], logits["xla_dense"][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_accelerator_attention_on_cpu_is_a_clear_error(impl, tiny_model_config):
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' needs a"):
        check_attention_backend(impl, "cpu")
    cfg = tiny_model_config(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, attention_impl=impl)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="Fix: set attention_impl='xla'"):  # raised while tracing the forward
        jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 4), jnp.int32)), state)


def test_accelerator_attention_is_allowed_on_its_own_backends_and_the_error_names_the_key():
    """The backend given is the one checked (a config checker asks about a TPU from a CPU host), each
    accelerator's JAX names pass (CUDA's platform is "gpu" or "cuda"), and the message names the setting as
    the caller's `key` in the reason and the fix."""
    for impl, backend in (
        ("cudnn", "gpu"),
        ("cudnn", "cuda"),
        ("splash", "tpu"),
        ("xla", "tpu"),
        ("xla_dense", "gpu"),
    ):
        check_attention_backend(impl, backend)
    message = (
        r"^model\.attention_impl='splash' needs a TPU \(Pallas\), but JAX runs on 'gpu'\. "
        r"Fix: set model\.attention_impl='xla' \(works everywhere\)\.$"
    )
    with pytest.raises(ValueError, match=message):
        check_attention_backend("splash", "gpu", key="model.attention_impl")


def test_xla_attention_in_bfloat16_returns_bfloat16_close_to_reference():
    """Probabilities are cast to q's dtype before the value product (as transformers does), so bfloat16 inputs
    give bfloat16 output (a float32 one broke the layer scan's carry in a bfloat16 decode step)."""
    q, k, v = (a.astype(jnp.bfloat16) for a in random_qkv(2, 12, 6, 2, 8, seed=6))
    slots = jnp.arange(12)
    out = xla_attention(q, k, v, attention_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS), slots, slots))
    assert out.dtype == jnp.bfloat16
    expected = reference_attention(*(a.astype(jnp.float32) for a in (q, k, v)), SEGMENTS)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cudnn_dense_mask_and_causal_calls_give_the_reference(dtype, monkeypatch):
    """`cudnn_attention`'s own part of its GPU-only calls, on CPU: jax's cuDNN call answered by jax's XLA
    implementation of the same function, so the mask passed (segment equality, or none with `max_segments`
    but no segment ids) is what is checked, in both half-precision dtypes, against the float64 statement."""
    plain = jax.nn.dot_product_attention
    monkeypatch.setattr(
        jax.nn,
        "dot_product_attention",
        lambda *a, implementation, **kw: plain(*a, implementation="xla", **kw),
    )
    q, k, v = (a.astype(dtype) for a in random_qkv(2, 12, 6, 2, 8, seed=7))
    wide = [a.astype(jnp.float32) for a in (q, k, v)]
    for segments, max_segments in ((SEGMENTS, None), (None, None), (None, 3)):
        out = cudnn_attention(q, k, v, None if segments is None else jnp.asarray(segments), max_segments)
        assert out.dtype == dtype
        expected = reference_attention(*wide, np.ones((2, 12), np.int32) if segments is None else segments)
        np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=2e-2, rtol=0)


def test_a_cudnn_model_given_no_segment_ids_asks_for_the_plain_causal_kernel(monkeypatch, tiny_model_config):
    """Without segment ids a `cudnn` model passes cuDNN no mask (its fastest, causal-only kernel); with them,
    the [B, 1, T, T] segment mask; `cudnn_max_segments` None. jax's cuDNN call is answered by its XLA
    implementation on CPU (backend check lifted)."""
    plain, masks = jax.nn.dot_product_attention, []

    def recording(*args, mask=None, implementation, **kwargs):
        masks.append(None if mask is None else mask.shape)
        return plain(*args, mask=mask, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    monkeypatch.setattr(attention, "check_attention_backend", lambda impl: None)
    cfg = tiny_model_config(num_layers=1, compute_dtype="bfloat16", attention_impl="cudnn")
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    model(ids)
    model(ids, None, jnp.asarray(SEGMENTS))
    assert masks == [None, (2, 1, 12, 12)]


def test_cudnn_needs_half_precision():
    q, k, v = random_qkv(1, 4, 2, 1, 8)
    with pytest.raises(ValueError, match="compute_dtype bfloat16"):
        cudnn_attention(q, k, v, None)
