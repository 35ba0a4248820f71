"""The key/value cache for incremental decoding: a pytree of fixed-size arrays, passed in and returned.

Slots are written left to right, the same slots for every row; `index` counts the slots written. Rows of a
batch with prompts of different lengths are left-padded: padding slots carry segment id 0 and real tokens
segment id >= 1, and a query sees only earlier slots of its own segment, so padding is never attended to.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    """k, v: [L, B, S, K, Hd] (S = max_len); segment_ids: [B, S] int32 (0 = padding or not yet written);
    index: int32 scalar, the number of slots written."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        """S, the slots per row."""
        return self.k.shape[2]

    def check_rows(self, rows: int) -> None:
        """Raise ValueError unless the cache holds `rows` rows (B): a prefill of fewer rows went through
        silently and the next step failed on a shape mismatch far from the cause."""
        if self.k.shape[1] != rows:
            raise ValueError(
                f"the KV cache holds {self.k.shape[1]} rows but the input has {rows}. Fix: init_cache with "
                "the input's batch size"
            )


def empty_cache(
    num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: jnp.dtype
) -> KVCache:
    """An all-zero cache with nothing written (index 0): k, v [num_layers, batch, max_len, kv_heads,
    head_dim] in `dtype`, segment_ids [batch, max_len] int32."""
    shape = (num_layers, batch, max_len, kv_heads, head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        segment_ids=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def write_slots(cache_array: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, T, ...] into cache_array [B, S, ...] at slots start .. start+T-1."""
    starts = (0, start) + (0,) * (cache_array.ndim - 2)
    return jax.lax.dynamic_update_slice(cache_array, new.astype(cache_array.dtype), starts)
