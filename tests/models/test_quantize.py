"""Quantized frozen base weights (models/quantize.py) against float64 NumPy statements of int8 absmax and
NF4 blockwise quantization; their layer slices; a model run on a quantized parameter dict."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextquill_jax.models import CausalLM, ModelConfig, quantize

W = np.random.default_rng(0).normal(scale=0.02, size=(3, 32, 4, 8)).astype(np.float32)  # [L, D, H, Hd]


def test_int8_is_per_output_channel_absmax():
    q = quantize.quantize_int8(jnp.asarray(W), n_in=1)
    absmax = np.abs(W.astype(np.float64)).max(axis=1, keepdims=True)  # over the input axis D
    codes = np.clip(np.round(W / (absmax / 127)), -127, 127)
    np.testing.assert_array_equal(np.asarray(q.q), codes.astype(np.int8))
    np.testing.assert_allclose(np.asarray(q[...]), codes * absmax / 127, rtol=1e-6, atol=1e-9)
    assert np.abs(np.asarray(q[...]) - W).max() <= (absmax / 127 / 2).max() * 1.0001


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_non_finite_weight_stays_non_finite_in_its_channel_or_block(kind, bad):
    """A NaN made int8's scale 1, and the channel's small weights rounded to code 0: the NaN vanished and the
    channel became zeros, silently (a float base keeps it, and training stops on the loss)."""
    w = W.copy()
    w[1, 5, 2, 3] = bad
    q = quantize.quantize_int8(jnp.asarray(w), 1) if kind == "int8" else quantize.quantize_nf4(jnp.asarray(w))
    values = np.asarray(q[...])
    assert not np.isfinite(values[1, 5, 2, 3])
    np.testing.assert_array_equal(np.isfinite(values[0]), True)  # other layers keep their values
    if kind == "int8":
        assert not np.isfinite(values[1, :, 2, 3]).any()  # the whole output channel
        np.testing.assert_array_equal(np.isfinite(values[1, :, 2, 2]), True)


# The last axis a multiple of the block: blocks kept on the kernel's other axes (so a mesh shards them).
W_ROWS = np.random.default_rng(1).normal(scale=0.02, size=(3, 6, 2, 128)).astype(np.float32)  # [L, H, Hd, D]
# 105 values a layer, not a multiple of the block: flattened, the last of 2 blocks padded with 23 zeros.
W_PADDED = np.random.default_rng(2).normal(scale=0.02, size=(3, 5, 7, 3)).astype(np.float32)


@pytest.mark.parametrize(
    ("w", "packed_shape"),
    [(W, (3, W[0].size // 64, 32)), (W_ROWS, (3, 6, 2, 2, 32)), (W_PADDED, (3, 2, 32))],
    ids=["flat", "rows", "padded"],
)
def test_nf4_is_the_nearest_level_per_block_of_64(w, packed_shape):
    q = quantize.quantize_nf4(jnp.asarray(w))
    size = w[0].size
    padded = np.pad(w.astype(np.float64).reshape(3, size), ((0, 0), (0, -size % quantize.NF4_BLOCK)))
    blocks = padded.reshape(3, -1, quantize.NF4_BLOCK)  # row-major blocks, any layout
    absmax = np.abs(blocks).max(axis=-1, keepdims=True)
    codes = np.abs((blocks / absmax)[..., None] - quantize.NF4_LEVELS).argmin(axis=-1)
    want = (quantize.NF4_LEVELS[codes] * absmax).reshape(3, -1)[:, :size].reshape(w.shape)
    np.testing.assert_allclose(np.asarray(q[...]), want, rtol=1e-6, atol=1e-9)
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == packed_shape and q.shape == w.shape
    assert q.absmax.shape == packed_shape[:-1]


@pytest.mark.parametrize("kind", ["int8", "nf4", "nf4_rows"])
def test_a_layer_slice_dequantizes_to_that_layer(kind):
    w = jnp.asarray(W_ROWS if kind == "nf4_rows" else W)
    q = quantize.quantize_int8(w, 1) if kind == "int8" else quantize.quantize_nf4(w)
    whole = np.asarray(q[...])
    for layer in range(3):
        one = jax.tree.map(lambda x, i=layer: x[i], q)
        assert one.shape == w.shape[1:]
        np.testing.assert_array_equal(np.asarray(one[...]), whole[layer])


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_model_runs_on_quantized_kernels_as_on_their_dequantized_values(kind):
    cfg = ModelConfig(
        family="llama", vocab_size=80, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    quantized = quantize.quantize_base(params, kind)
    assert quantized["embed"] is params["embed"]  # only the decoder's projection kernels
    assert isinstance(quantized["layers"]["mlp"]["down"], quantize.Int8Weight | quantize.NF4Weight)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 80, (2, 7)))
    run = jax.jit(lambda p: nnx.merge(graphdef, p).hidden_states(ids))
    np.testing.assert_allclose(
        np.asarray(run(quantized)), np.asarray(run(quantize.dequantize(quantized))), rtol=1e-5, atol=1e-5
    )
    kernels = lambda p: quantize.stored_bytes([p["layers"]["attn"], p["layers"]["mlp"]])  # no biases here
    ratio = kernels(quantized) / kernels(params)
    # int8: 1 byte + a float32 scale per output channel; nf4: half a byte + a float32 absmax per 64 values.
    assert (0.25 < ratio < 0.27) if kind == "int8" else (0.5 / 4 < ratio < 0.5625 / 4 * 1.01)
