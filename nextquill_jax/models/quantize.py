"""Frozen base weights stored in 8 or 4 bits (QLoRA's base), dequantized where a layer reads them.

`Int8Weight`: per-output-channel absmax int8 (w ≈ q · absmax / 127 over the kernel's input axes).
`NF4Weight`: 4-bit NormalFloat (QLoRA, Dettmers et al. 2023): each layer's kernel, in row-major order, cut
into blocks of `NF4_BLOCK` values, each block scaled by its absmax and rounded to the nearest of the 16 NF4
levels, two codes packed per byte; the absmax stays float32 (no double quantization). Where the kernel's last
axis is a multiple of the block (every projection of the supported real models), the blocks are kept on the
kernel's other axes, so a mesh shards the codes as it shards the kernel; otherwise the kernel is flattened
(its last block zero-padded). The blocks, and so the values, are the same either way.

Both are pytrees whose leaves keep the leading `layers` axis, so a quantized kernel can stand in a parameter
dict where the array stood: the scan over layers slices them, and `kernel[...]` (what every layer reads)
returns the dequantized weight. Only the decoder's projection kernels are quantized (`lora.INPUT_AXES`);
embeddings, norms and biases stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .lora import INPUT_AXES

# The NF4 code book (QLoRA's normal-float levels on [-1, 1]).
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip
NF4_BLOCK = 64


@struct.dataclass
class Int8Weight:
    """q int8 [L, *in, *out]; scale float32 [L, 1 (per input axis), *out]; `dtype`: of the dequantized
    weight."""

    q: jax.Array
    scale: jax.Array
    dtype: Any = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantised array's shape."""
        return self.q.shape

    def __getitem__(self, index: Any) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(self.dtype)[index]


@struct.dataclass
class NF4Weight:
    """packed uint8 [L, *kernel_shape[:-1], kernel_shape[-1] / NF4_BLOCK, NF4_BLOCK / 2] where the last axis
    is a multiple of NF4_BLOCK, else [L, blocks, NF4_BLOCK / 2] (`rows_of_blocks`), high nibble first;
    absmax float32: packed's shape without its last axis; `kernel_shape`: one layer's kernel shape; `dtype`:
    of the dequantized weight."""

    packed: jax.Array
    absmax: jax.Array
    kernel_shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantised array's shape."""
        return (*self._lead, *self.kernel_shape)

    @property
    def _lead(self) -> tuple[int, ...]:
        """(L,) for the stacked kernel, () for one layer's slice."""
        kept = len(self.kernel_shape) + 1 if rows_of_blocks(self.kernel_shape) else 2
        return self.packed.shape[: self.packed.ndim - kept]

    def __getitem__(self, index: Any) -> jax.Array:
        lead = self._lead
        codes = jnp.stack([self.packed >> 4, self.packed & 0xF], axis=-1)  # [..., blocks, NF4_BLOCK / 2, 2]
        codes = codes.reshape(*self.packed.shape[:-1], NF4_BLOCK)
        values = jnp.asarray(NF4_LEVELS)[codes] * self.absmax[..., None]  # [..., blocks, NF4_BLOCK]
        if not rows_of_blocks(self.kernel_shape):
            values = values.reshape(*lead, -1)[..., : math.prod(self.kernel_shape)]
        return values.reshape(*lead, *self.kernel_shape).astype(self.dtype)[index]


def rows_of_blocks(kernel_shape: tuple[int, ...]) -> bool:
    """Whether NF4 blocks of a kernel of `kernel_shape` stay on its other axes (its last axis is a multiple
    of NF4_BLOCK) rather than in one flattened row."""
    return kernel_shape[-1] % NF4_BLOCK == 0


def quantize_int8(w: jax.Array, n_in: int) -> Int8Weight:
    """w [L, *in (n_in axes), *out] -> per-output-channel absmax int8, one layer at a time."""

    def one(layer: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = layer.astype(jnp.float32)
        absmax = jnp.max(jnp.abs(x), axis=tuple(range(n_in)), keepdims=True)
        # A non-finite weight makes its channel's scale, and so the channel, non-finite (training stops on
        # the loss, as it does on a float base): `absmax > 0` read NaN as an all-zero channel, silently.
        scale = jnp.where(absmax == 0, 1.0, absmax / 127.0)
        return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale

    q, scale = jax.lax.map(one, w)
    return Int8Weight(q=q, scale=scale, dtype=w.dtype)


def quantize_nf4(w: jax.Array) -> NF4Weight:
    """w [L, ...] -> NF4 codes in blocks of NF4_BLOCK values per layer (`NF4Weight`'s layouts), one layer at
    a time."""
    kernel_shape = tuple(w.shape[1:])
    pad = -math.prod(kernel_shape) % NF4_BLOCK
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)

    def one(layer: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = layer.astype(jnp.float32)
        if rows_of_blocks(kernel_shape):
            blocks = x.reshape(*kernel_shape[:-1], -1, NF4_BLOCK)  # [*kernel_shape[:-1], blocks, NF4_BLOCK]
        else:
            blocks = jnp.pad(x.reshape(-1), (0, pad)).reshape(-1, NF4_BLOCK)  # [blocks, NF4_BLOCK]
        absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [..., blocks]
        normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
        codes = jnp.searchsorted(midpoints, normed).astype(jnp.uint8)  # the nearest level's index
        pairs = codes.reshape(*codes.shape[:-1], NF4_BLOCK // 2, 2)
        return (pairs[..., 0] << 4) | pairs[..., 1], absmax

    packed, absmax = jax.lax.map(one, w)
    return NF4Weight(packed=packed, absmax=absmax, kernel_shape=kernel_shape, dtype=w.dtype)


def quantize_base(params: Mapping[str, Any], kind: str) -> dict:
    """`params` with every decoder projection kernel quantized (`kind`: "int8" or "nf4"); jit-compatible.

    Raises:
        ValueError: an unknown `kind`.
    """
    if kind not in ("int8", "nf4"):
        raise ValueError(f"unknown quantization {kind!r}; choose int8 or nf4")
    layers = {m: dict(v) if isinstance(v, Mapping) else v for m, v in params["layers"].items()}
    for (module, name), n_in in INPUT_AXES.items():
        w = layers.get(module, {}).get(name)
        if w is not None:
            layers[module][name] = quantize_int8(w, n_in) if kind == "int8" else quantize_nf4(w)
    return {**params, "layers": layers}


def dequantize(params: Any) -> Any:
    """`params` with every quantized kernel replaced by its dequantized array."""
    quantized = lambda x: isinstance(x, Int8Weight | NF4Weight)
    return jax.tree.map(lambda x: x[...] if quantized(x) else x, params, is_leaf=quantized)


def stored_bytes(params: Any) -> int:
    """Bytes the arrays of `params` occupy (quantized kernels by their codes and scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
