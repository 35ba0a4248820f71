"""Building blocks of the decoder: RMSNorm, rotary position embedding (incl. Llama 3 scaling), SwiGLU MLP.

Parameters are stored in `param_dtype`; every computation casts them to the dtype of its input activations
(the compute dtype), except the statistics of RMSNorm and the RoPE angles, which are float32.
Logical axis names on parameters: `embed` (model width D), `mlp` (F), `heads`, `kv_heads`, `head_dim`,
`vocab`, `norm` (a norm scale), plus `layers` added by the layer stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from .config import ModelConfig
from .lora import LayerAdapters, add_adapter

INIT_STD = 0.02  # transformers' initializer_range default for these families


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], dtype: jnp.dtype) -> nnx.Param:
    """A parameter drawn from N(0, INIT_STD²), annotated with logical `axes`."""
    value = INIT_STD * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes))


def constant_param(value: float, shape: Sequence[int], axes: Sequence[str], dtype: jnp.dtype) -> nnx.Param:
    """A parameter of `shape` filled with `value` (a norm's scale of ones), annotated with logical `axes`."""
    return nnx.Param(jnp.full(tuple(shape), value, dtype), out_sharding=tuple(axes))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x², last axis) + eps) * scale; x [..., N], scale [N].

    Statistics in float32, result in x.dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale over the last axis (size `dim`)."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype) -> None:
        self.scale = constant_param(1.0, (dim,), ("norm",), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] normalised and scaled (`rms_norm`), in x.dtype."""
        return rms_norm(x, self.scale[...], self.eps)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] (float32) of RoPE, with the config's scaling applied.

    Same formulas as transformers' `ROPE_INIT_FUNCTIONS` for "default", "linear" and "llama3".
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [B, T, N, head_dim] by angles positions [B, T] × inv_freq [head_dim/2].

    The "rotate half" layout of transformers' Llama (first half of head_dim pairs with the second half);
    angles and the rotation in float32, result in x.dtype.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Hd/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, Hd/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)). Kernels gate/up [D, F], down [F, D]. The two
    projections x @ gate, x @ up are the checkpoint name `mlp_gate_up` (a remat policy may keep them)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
        d, f, dtype = cfg.hidden_size, cfg.intermediate_size, cfg.param_jnp_dtype
        self.gate = normal_param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.up = normal_param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.down = normal_param(rngs, (f, d), ("mlp", "embed"), dtype)

    def __call__(self, x: jax.Array, lora: LayerAdapters | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D] in x.dtype (the kernels cast to it); `lora`: this layer's adapters, whose
        updates join the gate, up and down projections (`add_adapter`), or None."""
        dt = x.dtype
        gate = add_adapter(x @ self.gate[...].astype(dt), lora, "mlp", "gate", x)  # [B, T, F]
        up = add_adapter(x @ self.up[...].astype(dt), lora, "mlp", "up", x)
        gate, up = checkpoint_name((gate, up), "mlp_gate_up")
        hidden = jax.nn.silu(gate) * up
        return add_adapter(hidden @ self.down[...].astype(dt), lora, "mlp", "down", hidden)
