"""LoRA adapters over the decoder's projection kernels, as a pytree apart from the model's parameters.

A target kernel W [L, *in, *out] (e.g. `layers/attn/q_proj` [L, D, H, Hd]) gets A [L, *in, r] and
B [L, r, *out]; the layer computes x·W + (alpha / r)·(dropout(x)·A)·B. B starts at zero, so an adapted model
starts equal to its base; A is drawn like PEFT's (Kaiming-uniform, bound 1/sqrt(fan_in)). Adapters carry the
logical axes of their kernel (the rank axis unsharded), so they shard by the same rules.

The adapters travel beside the model, not inside it: `CausalLM.hidden_states(..., adapters=Adapters(...))`
scans them with the layers, so training differentiates them alone and the frozen base gets no weight gradient.
A loaded LoRA run's model carries its adapters (`CausalLM.attach_adapters`, as `LoraWeight` state) and applies
them apart the same way in every forward (evaluation, effect reports, decoding). `merge` folds them into the
kernels (W + (alpha / r)·A·B, in float32) for `export --merged`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

# Projection kernels that can take an adapter, and how many of their axes (after `layers`) are inputs.
INPUT_AXES: dict[tuple[str, str], int] = {
    ("attn", "q_proj"): 1,
    ("attn", "k_proj"): 1,
    ("attn", "v_proj"): 1,
    ("attn", "o_proj"): 2,
    ("mlp", "gate"): 1,
    ("mlp", "up"): 1,
    ("mlp", "down"): 1,
}
# The dtype of merged kernels W + scale·A·B (`merge`), as `ModelConfig.param_dtype` spells it.
MERGED_DTYPE = "float32"
# A stable index per kernel, so each target draws its own dropout mask.
_TARGET_INDEX = {name: i for i, name in enumerate(INPUT_AXES)}


class LoraWeight(nnx.Variable):
    """An adapter matrix (A or B) a model carries (`CausalLM.attach_adapters`): state that `nnx.split` and
    `nnx.merge` carry with the model, but not an `nnx.Param`: `nnx.state(model, nnx.Param)` is the base's."""


@struct.dataclass
class Adapters:
    """The adapters of a model call. `weights`: {"layers": {"attn": {"q_proj": {"a": A, "b": B}}, ...}};
    `scale` = alpha / rank; `dropout` the rate on the adapter's input; `key` its PRNG key (None: no dropout,
    as in evaluation). A pytree whose scale and dropout are static."""

    weights: dict
    scale: float = struct.field(pytree_node=False)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    key: jax.Array | None = None


@struct.dataclass
class LayerAdapters:
    """One layer's slice of `Adapters` (leading `layers` axis removed), as the scan body sees it."""

    weights: dict
    scale: float = struct.field(pytree_node=False)
    dropout: float = struct.field(pytree_node=False)
    key: jax.Array | None

    def apply(self, module: str, name: str, x: jax.Array) -> jax.Array | None:
        """(alpha / r)·(dropout(x)·A)·B for kernel `module/name`, or None when it has no adapter.

        x [B, T, *in] in the compute dtype -> [B, T, *out] in x's dtype."""
        pair = self.weights.get(module, {}).get(name)
        if pair is None:
            return None
        if self.key is not None and self.dropout > 0:
            key = jax.random.fold_in(self.key, _TARGET_INDEX[(module, name)])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
        n_in = INPUT_AXES[(module, name)]
        low = jnp.tensordot(x, pair["a"].astype(x.dtype), axes=n_in)  # [B, T, r]
        return (self.scale * jnp.tensordot(low, pair["b"].astype(x.dtype), axes=1)).astype(x.dtype)


def add_adapter(y: jax.Array, lora: LayerAdapters | None, module: str, name: str, x: jax.Array) -> jax.Array:
    """y [B, T, *out] (the output of kernel `module/name` on input x [B, T, *in]) plus its LoRA term, when
    `lora` has one for that kernel; in y.dtype."""
    extra = None if lora is None else lora.apply(module, name, x)
    return y if extra is None else y + extra


def layer_slices(adapters: Adapters | None, num_layers: int) -> tuple[dict | None, jax.Array | None]:
    """(per-layer weights with a leading [L] axis, per-layer dropout keys [L, 2]) to scan alongside the
    layers; (None, None) without adapters."""
    if adapters is None:
        return None, None
    keys = None if adapters.key is None else jax.random.split(adapters.key, num_layers)
    return adapters.weights["layers"], keys


def path_name(path: Sequence[str]) -> str:
    """ "layers/attn/q_proj" for ("layers", "attn", "q_proj")."""
    return "/".join(path)


def target_paths(params: Mapping[str, Any], targets: Sequence[str]) -> list[tuple[str, str, str]]:
    """The kernels (("layers", module, name)) whose path matches one of the regexes `targets`.

    Raises:
        ValueError: a pattern that is not a valid regex (with `re`'s reason), a regex matching no parameter,
            or one matching a parameter that cannot take an adapter (naming the paths that can).
    """
    layers = params.get("layers", {})
    kernels = [("layers", m, n) for (m, n) in INPUT_AXES if n in layers.get(m, {})]
    every = [path_name(p) for p in _all_paths(params)]
    allowed = [path_name(p) for p in kernels]
    chosen = []
    for pattern in targets:
        try:
            regex = re.compile(pattern)
        except re.error as e:  # not a ValueError: without this it escapes the config checks as a traceback
            raise ValueError(
                f"model.lora.targets: {pattern!r} is not a valid regular expression ({e}). Fix: correct the "
                f"pattern, e.g. 'attn/(q|v)_proj'"
            ) from None
        hits = [p for p in every if regex.search(p)]
        if not hits:
            raise ValueError(
                f"model.lora.targets: {pattern!r} matches no parameter. Fix: match one of {allowed}"
            )
        wrong = [p for p in hits if p not in allowed]
        if wrong:
            raise ValueError(
                f"model.lora.targets: {pattern!r} matches {wrong}, which take no adapter. Fix: match only "
                f"projection kernels: {allowed}"
            )
        chosen += [k for k in kernels if path_name(k) in hits and k not in chosen]
    return [k for k in kernels if k in chosen]


def _all_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out += _all_paths(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


def adapter_shapes(
    params: Mapping[str, Any], paths: Sequence[tuple[str, str, str]], rank: int, dtype: Any
) -> dict:
    """`jax.ShapeDtypeStruct`s of the adapters of `paths`: a [L, *in, rank], b [L, rank, *out]."""
    out: dict = {"layers": {}}
    for _, module, name in paths:
        shape = params["layers"][module][name].shape
        n_in = INPUT_AXES[(module, name)]
        layers, ins, outs = shape[0], shape[1 : 1 + n_in], shape[1 + n_in :]
        out["layers"].setdefault(module, {})[name] = {
            "a": jax.ShapeDtypeStruct((layers, *ins, rank), dtype),
            "b": jax.ShapeDtypeStruct((layers, rank, *outs), dtype),
        }
    return out


def adapter_logical_axes(logical: Mapping[str, Any], paths: Sequence[tuple[str, str, str]]) -> dict:
    """Logical axes of the adapters from those of their kernels (`logical`: path dict of PartitionSpecs or
    tuples); the rank axis is None (replicated)."""
    out: dict = {"layers": {}}
    for _, module, name in paths:
        axes = tuple(logical["layers"][module][name])
        n_in = INPUT_AXES[(module, name)]
        out["layers"].setdefault(module, {})[name] = {
            "a": jax.sharding.PartitionSpec(*axes[: 1 + n_in], None),
            "b": jax.sharding.PartitionSpec(axes[0], None, *axes[1 + n_in :]),
        }
    return out


def init_adapters(key: jax.Array, shapes: Mapping[str, Any]) -> dict:
    """Fresh adapters for `shapes` (`adapter_shapes`): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PEFT's
    Kaiming-uniform with a = sqrt(5), B = 0."""
    out: dict = {"layers": {}}
    for module, kernels in shapes["layers"].items():
        for name, pair in kernels.items():
            a, b = pair["a"], pair["b"]
            fan_in = math.prod(a.shape[1:-1])
            bound = 1.0 / math.sqrt(fan_in)
            sub = jax.random.fold_in(key, _TARGET_INDEX[(module, name)])
            value = jax.random.uniform(sub, a.shape, jnp.float32, -bound, bound).astype(a.dtype)
            out["layers"].setdefault(module, {})[name] = {"a": value, "b": jnp.zeros(b.shape, b.dtype)}
    return out


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """A·B per layer: a [L, *in, r], b [L, r, *out] -> [L, *in, *out] (float32)."""
    return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a.astype(jnp.float32), b.astype(jnp.float32))


def merge(params: Mapping[str, Any], weights: Mapping[str, Any], scale: float) -> dict:
    """`params` with every adapted kernel W (an array, or a quantized kernel: dequantized) replaced by
    W + scale·A·B as a float32 array of W's shape; other parameters unchanged, in their own dtypes.

    Float32 whatever W's dtype (MERGED_DTYPE): a trained update is often below W's bfloat16 resolution (a few
    steps at lr 1e-4 changed a tiny model's logits by 0.0031, and rounding the merged kernels to bfloat16 lost
    0.0012 of that), so the merged model matches the adapted forward (`Adapters`) to float32 rounding only
    if the sum is kept in float32."""
    layers = {m: dict(v) if isinstance(v, Mapping) else v for m, v in params["layers"].items()}
    for module, kernels in weights["layers"].items():
        for name, pair in kernels.items():
            w = params["layers"][module][name]  # an array, or a quantized kernel (`quantize`)
            layers[module][name] = w[...].astype(MERGED_DTYPE) + scale * delta(pair["a"], pair["b"])
    return {**params, "layers": layers}
