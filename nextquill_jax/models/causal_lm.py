"""CausalLM: embedding -> scanned decoder layers -> final RMSNorm -> LM head (tied or untied), in Flax NNX.

The decoder layers are one `DecoderLayer` module whose parameters carry a leading `layers` axis (built with
`nnx.vmap`); the forward pass runs `jax.lax.scan` over that stacked state, so compile time does not grow with
depth (unless `ModelConfig.scan_unroll` unrolls it: that many layers per loop iteration). The scan body is
wrapped in `jax.checkpoint` with the config's remat policy: a named one, or `save:NAME,...` over the values
the layer names with `checkpoint_name` (`config.REMAT_NAMES`).

Parameter layout (logical axes in brackets), L = layers, D = hidden, H / K = query / key-value heads:
  embed [V, D] (vocab, embed); lm_head [D, V] (embed, vocab), absent when tied;
  layers.attn.q_proj [L, D, H, Hd], k_proj / v_proj [L, D, K, Hd], o_proj [L, H, Hd, D]; optional biases
  q_bias [L, H, Hd], k_bias / v_bias [L, K, Hd], o_bias [L, D]; optional q_norm / k_norm scale [L, Hd];
  layers.mlp gate / up [L, D, F], down [L, F, D]; layers.input_norm / post_attn_norm scale [L, D];
  final_norm scale [D].
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from .attention import attention_mask, self_attention, xla_attention
from .config import ModelConfig, remat_saved_names
from .kv_cache import KVCache, empty_cache, write_slots
from .layers import MLP, RMSNorm, apply_rope, constant_param, normal_param, rope_inv_freq
from .lora import Adapters, LayerAdapters, LoraWeight, add_adapter, layer_slices

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy of `ModelConfig.remat_policy` `name` (any but "none"): a named policy, or
    for `save:NAME,...` `save_only_these_names` over those checkpoint names. None means save nothing.

    Raises:
        ValueError: `name` is not a remat policy (`config.remat_saved_names`).
    """
    saved = remat_saved_names(name)
    if saved is None:
        return REMAT_POLICIES[name]
    return jax.checkpoint_policies.save_only_these_names(*saved)


# attend(q [B,T,H,Hd], k [B,T,K,Hd], v, layer_cache) -> (out [B,T,H,Hd], new layer_cache)
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, object], tuple[jax.Array, object]]


class Attention(nnx.Module):
    """Projections of grouped-query attention; the attention itself is supplied by the caller (`attend`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
        d, h, kv, hd, dtype = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.param_jnp_dtype,
        )
        self.cfg = cfg
        self.q_proj = normal_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dtype)
        self.k_proj = normal_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = normal_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = normal_param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dtype)
        self.q_bias = constant_param(0.0, (h, hd), ("heads", "head_dim"), dtype) if cfg.qkv_bias else None
        self.k_bias = constant_param(0.0, (kv, hd), ("kv_heads", "head_dim"), dtype) if cfg.qkv_bias else None
        self.v_bias = constant_param(0.0, (kv, hd), ("kv_heads", "head_dim"), dtype) if cfg.qkv_bias else None
        self.o_bias = constant_param(0.0, (d,), ("embed",), dtype) if cfg.o_bias else None
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None

    def qkv(
        self, x: jax.Array, positions: jax.Array, lora: LayerAdapters | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D], positions [B, T] -> q [B, T, H, Hd], k, v [B, T, K, Hd] (q, k normed, rotated)."""
        dt = x.dtype

        def project(name: str, kernel: nnx.Param) -> jax.Array:  # [B, T, N, Hd]
            y = jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(dt))
            return add_adapter(y, lora, "attn", name, x)

        q, k, v = (
            project("q_proj", self.q_proj),
            project("k_proj", self.k_proj),
            project("v_proj", self.v_proj),
        )
        if self.q_bias is not None:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(self.cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        return checkpoint_name((q, k, v), "qkv")

    def out(self, attended: jax.Array, lora: LayerAdapters | None = None) -> jax.Array:
        """attended [B, T, H, Hd] -> [B, T, D]."""
        y = jnp.einsum("bthk,hkd->btd", attended, self.o_proj[...].astype(attended.dtype))
        y = add_adapter(y, lora, "attn", "o_proj", attended)
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(y.dtype)
        return checkpoint_name(y, "attn_out")


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
        dtype = cfg.param_jnp_dtype
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        attend: AttendFn,
        cache: object,
        lora: LayerAdapters | None = None,
    ) -> tuple[jax.Array, object]:
        """(x [B, T, D] after the layer, `attend`'s new layer cache).

        positions [B, T] int32 are RoPE's; `attend` computes the attention itself from q [B, T, H, Hd] and
        k, v [B, T, K, Hd] (`AttendFn`: the configured attention for a forward or a prefill, the dense one
        over the cache for `extend`), taking and returning this layer's (k, v) cache slices (None in a
        forward); `lora`: this layer's adapters, or None.
        """
        q, k, v = self.attn.qkv(self.input_norm(x), positions, lora)
        attended, cache = attend(q, k, v, cache)
        x = x + self.attn.out(checkpoint_name(attended, "attention"), lora)
        return x + self.mlp(self.post_attn_norm(x), lora), cache


class CausalLM(nnx.Module):
    """A Llama / Qwen2 / Qwen3 decoder-only LM. See the module docstring for the parameter layout.

    Forward: `model(input_ids, positions=None, segment_ids=None) -> logits [B, T, V] float32`.
    Decoding: `logits, cache = model.prefill(prompt_ids, model.init_cache(batch, max_len), ...)` for the
    prompt (through the configured attention), then `logits, cache = model.extend(ids, cache, ...)` for each
    new token.
    A LoRA run's loaded model carries its adapters (`attach_adapters`), which every forward then applies.
    `model.cfg` is its `ModelConfig` (`vocab_size`, `hidden_size`, the dtypes, ...).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
        dtype = cfg.param_jnp_dtype
        self.cfg = cfg
        self.lora_weights = None  # adapters this model carries (`attach_adapters`), and their alpha / r
        self.lora_scale = None
        with nnx.use_eager_sharding(False):
            self.embed = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
            self.layers = _stacked_layers(cfg, rngs)
            self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = (
                None
                if cfg.tie_word_embeddings
                else normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
            )

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """input_ids [B, T] int32 -> logits [B, T, V] float32; positions, segment_ids and ids outside
        [0, vocab_size) (NaN, no error): see hidden_states."""
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        adapters: Adapters | None = None,
    ) -> jax.Array:
        """Final normed hidden states [B, T, D] in the compute dtype.

        input_ids [B, T] int32; positions [B, T] int32 (RoPE positions, restarting at 0 per segment; default
        0..T-1); segment_ids [B, T] int32 (0 = padding, examples 1, 2, ... of a packed row; default all 1).
        A token attends to earlier tokens of its own segment only. `adapters`: LoRA adapters added to the
        projections they target (`lora.Adapters`; None: those the model carries, `attach_adapters`, if any).

        The ids are not checked (no error, under `jax.jit` or not): an id >= `self.cfg.vocab_size` (the
        model's `ModelConfig` is `.cfg`) or below -vocab_size has no embedding and gives NaN, which attention
        can spread to the other positions of its row; a negative id in [-vocab_size, 0) silently reads the
        embedding of id + vocab_size. `train` and `evaluate` (and `effects`, `compare`) refuse data holding
        an id outside [0, vocab_size) before compiling (README, "A real model"); a direct caller checks its
        own ids.

        Raises:
            ValueError: the config's attention_impl cannot run on this backend; input_ids not [B, T] with
                T >= 1, or positions / segment_ids of another shape.
        """
        positions, _, attend_self = self._own_sequence(input_ids, positions, segment_ids)

        def attend(q, k, v, cache):
            return attend_self(q, k, v), cache

        x, _ = self._run_layers(self._embed(input_ids), positions, attend, None, adapters)
        return self.final_norm(x)

    def attach_adapters(self, weights: dict, scale: float) -> None:
        """Carry the LoRA adapters `weights` (as `lora.Adapters.weights`) with scale alpha / r: from then on
        every forward (`__call__`, `hidden_states`, `prefill`, `extend`) given no `adapters` adds them to
        the projections they target as training's does, x·W + scale·(x·A)·B in the compute dtype (no
        dropout), and not merged into the kernels, where a small update would be rounded away in a bfloat16
        compute dtype. They are `lora.LoraWeight` state: `nnx.split(model)` / `nnx.merge` carry them and
        `nnx.state(model, nnx.Param)` is the base's parameters alone."""
        self.lora_weights = nnx.data(jax.tree.map(LoraWeight, weights))
        self.lora_scale = scale

    def attached_adapters(self) -> Adapters | None:
        """The adapters this model carries (`attach_adapters`), without dropout; None when it has none."""
        if self.lora_weights is None:
            return None
        is_weight = lambda x: isinstance(x, LoraWeight)
        return Adapters(jax.tree.map(lambda v: v[...], self.lora_weights, is_leaf=is_weight), self.lora_scale)

    def lm_head_weight(self) -> tuple[jax.Array, str]:
        """(W, layout) in the parameter dtype: "vd" = W is the tied embedding [V, D] (logits = h @ W.T),
        "dv" = W is the untied head kernel [D, V] (logits = h @ W)."""
        if self.lm_head is None:
            return self.embed[...], "vd"
        return self.lm_head[...], "dv"

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] float32 (products in the hidden dtype, float32 accumulation)."""
        w, layout = self.lm_head_weight()
        w = w.astype(hidden.dtype)
        spec = "...d,vd->...v" if layout == "vd" else "...d,dv->...v"
        return jnp.einsum(spec, hidden, w, preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | str | None = None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + generated).

        dtype defaults to the compute dtype; k/v: [L, batch, max_len, K, Hd]."""
        cfg = self.cfg
        dtype = jnp.dtype(dtype) if dtype is not None else cfg.compute_jnp_dtype
        return empty_cache(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)

    def extend(
        self,
        input_ids: jax.Array,
        cache: KVCache,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Run T new tokens against the cache, write their keys/values, return (logits, updated cache).

        input_ids [B, T] int32; positions and segment_ids [B, T] int32 (segment 0 is padding, which nothing
        attends to). Step: ids [B, 1], segment_ids 1 (default) and positions = the previous position + 1 (the
        default, the slot index, is right only without padding). A prompt may go through here too (as for
        `prefill`), but its attention is then dense over the whole cache: float32 scores [B, H, T, max_len]
        (`prefill` avoids them). Logits: [B, T, V] float32, or [B, 1, V] for the last token only with
        `last_only=True`. Attention is the dense masked einsum (`xla_attention`, any backend) whatever
        `attention_impl` says.

        Raises:
            ValueError: input_ids not [B, T] with T >= 1, or positions / segment_ids of another shape; the
                cache holds another row count than B; (outside jit) the T new tokens do not fit in the
                cache. Under jit the latter cannot be checked before running; the logits of an overflowing
                call are NaN instead.
        """
        _check_token_shapes(input_ids, positions, segment_ids)
        b, t = input_ids.shape
        cache.check_rows(b)
        start = cache.index
        if not isinstance(start, jax.core.Tracer) and int(start) + t > cache.max_len:
            raise ValueError(
                f"KV cache overflow: {int(start)} slots used + {t} new > max_len {cache.max_len}"
            )
        positions = _default_positions(positions, b, t, start)
        segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        cache_segments = write_slots(cache.segment_ids, segment_ids, start)  # [B, S]
        q_slots = start + jnp.arange(t, dtype=jnp.int32)
        mask = attention_mask(
            segment_ids, cache_segments, q_slots, jnp.arange(cache.max_len, dtype=jnp.int32)
        )

        def attend(q, k, v, layer_cache):
            k_cache, v_cache = layer_cache
            k_cache, v_cache = write_slots(k_cache, k, start), write_slots(v_cache, v, start)
            return xla_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask), (
                k_cache,
                v_cache,
            )

        x, (k_all, v_all) = self._run_layers(self._embed(input_ids), positions, attend, (cache.k, cache.v))
        logits = jnp.where(start + t > cache.max_len, jnp.nan, self._head(x, last_only))
        return logits, KVCache(k=k_all, v=v_all, segment_ids=cache_segments, index=start + t)

    def prefill(
        self,
        input_ids: jax.Array,
        cache: KVCache,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Run a prompt through the configured attention (`attention_impl`) and fill the cache with it.

        input_ids [B, T] int32, left-padded, with segment_ids [B, T] 0 on padding and 1 on tokens (default all
        1) and positions [B, T] restarting at 0 at each row's first token (default 0..T-1). The prompt attends
        only to itself, so attention is `self_attention` as in `hidden_states`: with `xla` (blockwise) or
        `cudnn` / `splash` no [B, H, T, max_len] score tensor is formed, unlike `extend` over the whole cache.
        Keys and values are rounded to the cache dtype before attending, so the prompt sees what the decode
        steps read back. The cache's slots 0..T-1 get the prompt, its other slots are marked unwritten
        (segment 0) and its index becomes T: earlier contents are discarded.
        Returns logits [B, T, V] float32 ([B, 1, V] with `last_only=True`) and the filled cache.

        Raises:
            ValueError: the cache holds another row count than B, T > cache.max_len, or the config's
                attention_impl cannot run on this backend; input_ids not [B, T] with T >= 1, or positions /
                segment_ids of another shape.
        """
        _check_token_shapes(input_ids, positions, segment_ids)
        cache.check_rows(input_ids.shape[0])
        t = input_ids.shape[1]
        if t > cache.max_len:
            raise ValueError(
                f"prompt of {t} tokens does not fit the KV cache's max_len {cache.max_len}. Fix: "
                f"init_cache(batch, max_len) with max_len >= {t} + the tokens to generate"
            )
        positions, segment_ids, attend_self = self._own_sequence(input_ids, positions, segment_ids)

        def attend(q, k, v, layer_cache):
            k_cache, v_cache = (write_slots(c, new, 0) for c, new in zip(layer_cache, (k, v), strict=True))
            k, v = (x.astype(k_cache.dtype).astype(q.dtype) for x in (k, v))  # [B, T, K, Hd]
            return attend_self(q, k, v), (k_cache, v_cache)

        x, (k_all, v_all) = self._run_layers(self._embed(input_ids), positions, attend, (cache.k, cache.v))
        segments = write_slots(jnp.zeros_like(cache.segment_ids), segment_ids, 0)  # [B, S]
        filled = KVCache(k=k_all, v=v_all, segment_ids=segments, index=jnp.asarray(t, jnp.int32))
        return self._head(x, last_only), filled

    def _own_sequence(
        self, input_ids: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]]:
        """For input_ids [B, T] attending to themselves (`hidden_states`, `prefill`): positions [B, T] int32
        (default 0..T-1), segment_ids [B, T] int32 (default all 1) and attend(q, k, v) -> [B, T, H, Hd]
        through the configured attention (cuDNN's plain causal kernel when no segment ids were given)."""
        _check_token_shapes(input_ids, positions, segment_ids)
        b, t = input_ids.shape
        given = segment_ids is not None
        segment_ids = segment_ids.astype(jnp.int32) if given else jnp.ones((b, t), jnp.int32)
        cfg = self.cfg
        attend = functools.partial(
            self_attention, segment_ids=segment_ids, impl=cfg.attention_impl, segments_given=given,
            cudnn_max_segments=cfg.cudnn_max_segments,
        )  # fmt: skip
        return _default_positions(positions, b, t, 0), segment_ids, attend

    def _head(self, x: jax.Array, last_only: bool) -> jax.Array:
        """Last layer's output x [B, T, D] -> logits [B, T, V] float32, or [B, 1, V] for the last slot."""
        return self.logits(self.final_norm(x[:, -1:] if last_only else x))

    def _embed(self, input_ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(self.embed[...], input_ids, axis=0).astype(self.cfg.compute_jnp_dtype)

    def _run_layers(
        self,
        x: jax.Array,
        positions: jax.Array,
        attend: AttendFn,
        caches: object,
        adapters: Adapters | None = None,
    ) -> tuple[jax.Array, object]:
        """Scan the stacked decoder layers over x [B, T, D]; `caches` (a pytree with leading L axis, or None)
        is scanned alongside and returned updated, and so are the adapters' per-layer weights and keys
        (`adapters`, else those the model carries)."""
        graphdef, state = nnx.split(self.layers)
        adapters = self.attached_adapters() if adapters is None else adapters
        weights, keys = layer_slices(adapters, self.cfg.num_layers)

        def body(h, xs):
            layer_state, layer_cache, layer_weights, layer_key = xs
            lora = None
            if adapters is not None:
                lora = LayerAdapters(layer_weights, adapters.scale, adapters.dropout, layer_key)
            return nnx.merge(graphdef, layer_state)(h, positions, attend, layer_cache, lora)

        policy_name = self.cfg.remat_policy
        if policy_name != "none":
            body = jax.checkpoint(body, policy=remat_policy(policy_name), prevent_cse=False)
        return jax.lax.scan(body, x, (state, caches, weights, keys), unroll=self.cfg.scan_unroll)


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One DecoderLayer whose parameters have a leading axis of size num_layers, annotated `layers`."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(
        in_axes=0, out_axes=0, axis_size=cfg.num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"}
    )
    def make(layer_rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, rngs=layer_rngs)

    return make(rngs)


def _check_token_shapes(
    input_ids: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None
) -> None:
    """ValueError unless input_ids is [B, T] with T >= 1 and positions / segment_ids (where given) are [B, T]
    too (a [T] positions array broadcast nowhere: it failed deep inside RoPE)."""
    if jnp.ndim(input_ids) != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1 tokens, got shape {jnp.shape(input_ids)}")
    for name, given in (("positions", positions), ("segment_ids", segment_ids)):
        if given is not None and jnp.shape(given) != input_ids.shape:
            raise ValueError(
                f"{name} must be [B, T] like input_ids {input_ids.shape}, got shape {jnp.shape(given)}"
            )


def _default_positions(positions: jax.Array | None, b: int, t: int, start) -> jax.Array:
    if positions is not None:
        return positions.astype(jnp.int32)
    return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
