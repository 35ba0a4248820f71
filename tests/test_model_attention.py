"""Attention mask rule and implementations against a float64 NumPy statement of masked grouped-query
attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextquill_jax.models import CausalLM, ModelConfig
from nextquill_jax.models.attention import (
    attention_mask,
    check_attention_backend,
    cudnn_attention,
    splash_attention,
    xla_attention,
)


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


def test_splash_kernel_in_interpret_mode_matches_reference():
    # T = 100 is not a multiple of the kernel block: exercises the internal padding.
    segments = np.array([[1] * 40 + [2] * 50 + [0] * 10], np.int32)
    q, k, v = random_qkv(1, 100, 4, 2, 16, seed=1)
    out = np.asarray(splash_attention(q, k, v, jnp.asarray(segments), interpret=True))
    np.testing.assert_allclose(out, reference_attention(q, k, v, segments), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_accelerator_attention_on_cpu_is_a_clear_error(impl):
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' needs a"):
        check_attention_backend(impl, "cpu")
    cfg = ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        attention_impl=impl,
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="Fix: set attention_impl='xla'"):  # raised while tracing the forward
        jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 4), jnp.int32)), state)


def test_cudnn_needs_half_precision():
    q, k, v = random_qkv(1, 4, 2, 1, 8)
    with pytest.raises(ValueError, match="compute_dtype bfloat16"):
        cudnn_attention(q, k, v, None)
