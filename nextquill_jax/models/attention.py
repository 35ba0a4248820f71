"""Grouped-query causal attention with segment ids: the mask rule and three implementations.

Shapes: q [B, T, H, Hd], k / v [B, S, K, Hd] with H a multiple of K (grouped-query attention),
segment ids [B, T] int32 (0 = padding; a packed row numbers its examples 1, 2, ...).
The mask rule: query slot i sees key slot j iff j <= i and both carry the same segment id. Padding tokens
(segment 0) see only earlier padding, so no softmax row is ever empty; their outputs are meaningless
and unused.

- `xla`: blockwise attention (`blockwise_attention.py`): online softmax over key blocks, memory O(T), block
  pairs that cannot hold a visible pair skipped; plain XLA ops, every backend. Padding queries get output 0.
- `xla_dense`: einsum + explicit mask over the full [B, K, G, T, T] score tensor, float32 softmax; every
  backend. The reference statement of the rule; also the decode steps' attention over a KV cache
  (`CausalLM.extend`). A prompt's prefill (`CausalLM.prefill`) uses the configured implementation.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, bf16/fp16; segment ids become a
  boolean mask (without them only the causal mask is applied, which is cuDNN's fastest path). With
  `max_segments` set (`ModelConfig.cudnn_max_segments`; a training run's default) they become per-segment
  lengths and offsets for cuDNN's packed mode instead (`cudnn_packed.py`: private JAX API, no [T, T] mask),
  which runs per shard as splash does.
- `splash`: Pallas splash attention, TPU only, with segment ids natively. Under `jax.set_mesh(mesh)` with
  several devices it runs per shard in `jax.shard_map` (batch over the rules' "batch" axes, heads over
  "heads").
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from ..parallel import DEFAULT_RULES, logical_to_mesh_spec
from .blockwise_attention import DEFAULT_BLOCK, blockwise_attention
from .cudnn_packed import cudnn_packed_attention

# The JAX backends each accelerator-only implementation runs on, and the hardware that means.
_BACKENDS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}
_HARDWARE = {"cudnn": "an NVIDIA GPU (cuDNN)", "splash": "a TPU (Pallas)"}
_SPLASH_BLOCK = 512


def check_attention_backend(impl: str, backend: str | None = None, key: str = "attention_impl") -> None:
    """Raise ValueError if attention implementation `impl` cannot run on `backend` (default: JAX's); the
    message names the setting as `key` (`model.attention_impl` in a training config) and the fix."""
    backend = backend or jax.default_backend()
    allowed = _BACKENDS.get(impl)
    if allowed is not None and backend not in allowed:
        raise ValueError(
            f"{key}={impl!r} needs {_HARDWARE[impl]}, but JAX runs on {backend!r}. Fix: set {key}='xla' "
            f"(works everywhere)."
        )


def attention_mask(
    q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_slots: jax.Array, kv_slots: jax.Array
) -> jax.Array:
    """Boolean mask [B, T, S]: kv_slots[j] <= q_slots[i] and equal segment ids.

    q_segment_ids [B, T], kv_segment_ids [B, S], q_slots [T], kv_slots [S] (int32 sequence indices).
    """
    causal = kv_slots[None, :] <= q_slots[:, None]  # [T, S]
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
    return causal[None] & same_segment


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q kᵀ / sqrt(Hd), masked) v with grouped heads.

    q [B, T, H, Hd], k/v [B, S, K, Hd], mask [B, T, S]. Scores and softmax in float32; probabilities cast to
    q.dtype before the value product (as transformers does).
    Returns [B, T, H, Hd] in q.dtype.
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, hd)  # [B, T, K, G, Hd]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / np.sqrt(hd)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)  # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    max_segments: int | None = None,
) -> jax.Array:
    """cuDNN flash attention (GPU). q [B, T, H, Hd], k/v [B, T, K, Hd], segment_ids [B, T] or None.

    segment_ids None: causal only. Given, with `max_segments` None: a dense [B, 1, T, T] segment mask; with
    `max_segments` an int: cuDNN's packed mode (`cudnn_packed.cudnn_packed_attention`, whose contract on the
    segment ids applies; padding outputs are 0 there).

    Raises:
        ValueError: q is not bfloat16/float16 (cuDNN flash attention has no float32 kernel); from
            `cudnn_packed.segment_offsets` in the packed mode.
        ImportError: packed mode, and the installed jax lacks the private API it calls.
    """
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention_impl='cudnn' needs compute_dtype bfloat16 or float16, got {q.dtype}. "
            "Fix: set compute_dtype='bfloat16' or attention_impl='xla'."
        )
    if segment_ids is not None and max_segments is not None:
        # Per device: the private API's own partitioning gives the offsets no sharding rule of their own, so
        # each shard's call sees only its rows' offsets here, the one-device call that was checked on a GPU.
        packed = functools.partial(cudnn_packed_attention, max_segments=max_segments)
        return _per_shard(packed, q, k, v, segment_ids)
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, interpret: bool = False
) -> jax.Array:
    """Pallas splash attention (TPU; `interpret=True` runs the same kernel on any backend, slowly, for tests).

    q [B, T, H, Hd], k/v [B, T, K, Hd], segment_ids [B, T]. T is padded internally to a multiple of the
    kernel's block size with segment id -1, which no real token shares.
    Returns [B, T, H, Hd].
    """
    return _per_shard(functools.partial(_splash_local, interpret=interpret), q, k, v, segment_ids)


def _per_shard(
    local: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
) -> jax.Array:
    """`local(q, k, v, segment_ids)` run on each device's own rows and heads (`jax.shard_map`) under the
    ambient mesh (`jax.set_mesh`) of several devices: rows over the rules' "batch" axes, heads over "heads",
    either left whole where its shard count does not divide it; `local` itself on one device.

    q [B, T, H, Hd], k / v [B, T, K, Hd], segment_ids [B, T]; returns `local`'s [B, T, H, Hd]. Where the
    head shards do not divide the K key/value heads (more shards than K, or K not a multiple of them), k / v
    are repeated to the H query heads first.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, segment_ids)
    heads_axes = logical_to_mesh_spec(("heads",), _rules_for(mesh))[0]
    head_parts = _axis_size(mesh, heads_axes)
    if q.shape[2] % head_parts:
        heads_axes = None
    elif k.shape[2] % head_parts:
        # Fewer key/value heads than head shards: give every query head its own copy.
        k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
        v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
    batch_axes = logical_to_mesh_spec(("batch",), _rules_for(mesh))[0]
    if q.shape[0] % _axis_size(mesh, batch_axes):
        batch_axes = None
    qkv_spec = PartitionSpec(batch_axes, None, heads_axes, None)
    seg_spec = PartitionSpec(batch_axes, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec),
        out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, segment_ids)


def _rules_for(mesh) -> list:
    """DEFAULT_RULES restricted to the mesh's axis names (a mesh may lack some of them)."""
    names = set(mesh.axis_names)
    rules = []
    for logical, target in DEFAULT_RULES:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(a for a in axes if a in names)
        rules.append((logical, kept or None))
    return rules


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in names]))


def _splash_local(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, interpret: bool
) -> jax.Array:
    """Splash attention on one device's arrays (same shapes as `splash_attention`)."""
    # Imported here: the Pallas TPU stack is only needed when splash is used.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    _, t, h, hd = q.shape
    block = min(_SPLASH_BLOCK, -(-t // 128) * 128)
    padded = -(-t // block) * block
    pad = padded - t
    # Kernel layout: [B, heads, T, Hd]; the kernel expects q already scaled.
    qh = jnp.pad(jnp.swapaxes(q, 1, 2) / np.sqrt(hd).astype(q.dtype), ((0, 0), (0, 0), (0, pad), (0, 0)))
    kh = jnp.pad(jnp.swapaxes(k, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))
    vh = jnp.pad(jnp.swapaxes(v, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((padded, padded)) for _ in range(h)])
    sizes = splash_kernel.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash_kernel.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    one_row = lambda qr, kr, vr, sr: kernel(qr, kr, vr, segment_ids=splash_kernel.SegmentIds(q=sr, kv=sr))
    out = jax.vmap(one_row)(qh, kh, vh, seg)  # [B, H, padded, Hd]
    return jnp.swapaxes(out[:, :, :t], 1, 2)


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    impl: str,
    *,
    segments_given: bool = True,
    cudnn_max_segments: int | None = None,
) -> jax.Array:
    """Causal self-attention within segments with the chosen implementation: q [B, T, H, Hd], k/v
    [B, T, K, Hd], segment_ids [B, T] int32 (a token attends to earlier tokens of its own segment) ->
    [B, T, H, Hd] in q.dtype.

    `segments_given=False` says every token is in segment 1 (lets cuDNN use its plain causal kernel).
    `cudnn_max_segments`: for `cudnn`, use its packed mode with at most this many segments per row
    (`cudnn_attention`); the other implementations take segment ids natively and ignore it.

    Raises:
        ValueError: `impl` unknown or not runnable on this backend; H not a multiple of K (`xla`); q not
            bfloat16 / float16 or too many segments for `cudnn_max_segments` (`cudnn`).
        ImportError: `cudnn`'s packed mode, where the installed jax lacks the private API it calls.
    """
    check_attention_backend(impl)
    if impl == "xla":
        # Short sequences get one block of T rounded up to 8 rather than padding to the default block.
        return blockwise_attention(q, k, v, segment_ids, min(DEFAULT_BLOCK, -(-q.shape[1] // 8) * 8))
    if impl == "xla_dense":
        slots = jnp.arange(q.shape[1], dtype=jnp.int32)
        return xla_attention(q, k, v, attention_mask(segment_ids, segment_ids, slots, slots))
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids if segments_given else None, cudnn_max_segments)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids)
    raise ValueError(f"unknown attention_impl {impl!r}; known: xla, xla_dense, cudnn, splash")
