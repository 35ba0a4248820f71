"""Sharded model pieces on 8 simulated CPU devices, mesh (data=1, fsdp=2, tensor=4); prints one line
`RESULT {json}`.

    models_sharded.py load CHECKPOINT
        The checkpoint (a Hugging Face directory or a GGUF file) loaded with and without the mesh: per
        parameter ("/"-joined path) its mesh's (axis, size) pairs, sharding spec, set of shard shapes and
        whether it equals the unsharded parameter; "maxdiff": the largest difference between the sharded and
        unsharded forward's logits on packed and padded rows; "gguf_reads": how many times the sharded load
        dequantized each GGUF tensor whole (empty for a directory).
    models_sharded.py splash
        Splash attention (Pallas, interpret mode) under the mesh against the XLA attention: "maxdiff"; and
        on 3 rows of 6 query heads (dividing neither mesh axis) against the float64 statement of
        tests/models/test_attention.py: "undivided_maxdiff".
    models_sharded.py cudnn_packed
        cuDNN's packed attention (its private API replaced by tests/models/cudnn_emulation.py) under the mesh
        against the one-device call: "errors", the largest difference of the output and of the q, k, v
        gradients relative to the one-device value's largest, and "shapes", the q shape of each call the API
        received, first under the mesh, then on one device.
    models_sharded.py cudnn_generate
        Greedy `generate_ids` of a tiny bf16 model with cuDNN's packed prefill (API emulated) given `mesh=`
        outside any `jax.set_mesh`, against one device: "same_tokens", and "shapes", the q shape of each
        call the API received, first on the mesh, then on one device.
    models_sharded.py nf4
        Projection kernels quantized to nf4 on the mesh: per kernel its codes' spec, shard count and whether
        they dequantize as the unsharded kernel's do.
    models_sharded.py blockwise
        Blockwise attention on inputs sharded over fsdp (rows) and tensor (heads) against the unsharded dense
        attention, with 4 and 2 kv heads: per kv head count the weighted sum's value and reference value, and
        the relative error of the q, k, v gradients.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nextquill_jax.models import gguf, load_pretrained
from nextquill_jax.models.attention import attention_mask, self_attention, splash_attention, xla_attention
from nextquill_jax.models.blockwise_attention import blockwise_attention
from tests.models.test_attention import reference_attention


def make_mesh():
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=auto)


def load(checkpoint: str) -> dict:
    mesh = make_mesh()
    single = load_pretrained(checkpoint)
    gguf_reads = collections.Counter()
    dequantize = gguf._dequantize

    def counted(tensor, path, *, first_block_only=False):
        gguf_reads[tensor.name] += not first_block_only
        return dequantize(tensor, path, first_block_only=first_block_only)

    gguf._dequantize = counted
    sharded = load_pretrained(checkpoint, mesh=mesh)
    gguf._dequantize = dequantize
    params = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
    single_params = dict(nnx.to_flat_state(nnx.state(single, nnx.Param)))
    report = {
        "/".join(path): {
            "mesh": list(arr.sharding.mesh.shape.items()),
            "spec": str(arr.sharding.spec),
            "shard_shapes": sorted({s.data.shape for s in arr.addressable_shards}),
            "equals_single": bool(
                np.array_equal(np.asarray(arr), np.asarray(single_params[path].get_value()))
            ),
        }
        for path, arr in params.items()
    }

    ids = np.random.default_rng(0).integers(0, 320, (4, 16)).astype(np.int32)
    segments = np.ones((4, 16), np.int32)
    segments[1, :5] = 0
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)

    def run(model):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
        return np.asarray(forward(state, ids, positions, segments))

    ref = run(single)
    with jax.set_mesh(mesh):
        got = run(sharded)
    return {"params": report, "maxdiff": float(np.abs(got - ref).max()), "gguf_reads": gguf_reads}


def splash() -> dict:
    mesh = make_mesh()
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 64, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 64, 2, 16)), jnp.float32)  # 2 kv heads < 4 head shards
    v = jnp.asarray(rng.standard_normal((2, 64, 2, 16)), jnp.float32)
    seg = jnp.asarray(np.repeat([[1, 2], [1, 1]], 32, axis=1).astype(np.int32))
    slots = jnp.arange(64)
    ref = xla_attention(q, k, v, attention_mask(seg, seg, slots, slots))
    with jax.set_mesh(mesh):
        got = jax.jit(functools.partial(splash_attention, interpret=True))(q, k, v, seg)
    # 3 rows over fsdp 2 and 6 query heads over tensor 4: neither divides, so both are left whole.
    q3, k3, v3 = (jnp.asarray(rng.standard_normal((3, 64, h, 16)), jnp.float32) for h in (6, 2, 2))
    seg3 = np.repeat([[1, 2], [1, 1], [0, 1]], 32, axis=1).astype(np.int32)
    with jax.set_mesh(mesh):
        got3 = jax.jit(functools.partial(splash_attention, interpret=True))(q3, k3, v3, jnp.asarray(seg3))
    want3 = reference_attention(q3, k3, v3, seg3)
    return {
        "maxdiff": float(jnp.abs(got - ref).max()),
        "undivided_maxdiff": float(np.abs(np.asarray(got3, np.float64) - want3).max()),
    }


def cudnn_packed() -> dict:
    shapes = []
    _emulated_cudnn(shapes)
    mesh = make_mesh()  # rows over fsdp (2), heads over tensor (4)
    rng = np.random.default_rng(0)
    rows = [[1] * 8 + [2] * 16 + [0] * 8, [1] * 32, [0] * 4 + [1] * 28, [1] * 10 + [2] * 10 + [3] * 12]
    seg = jnp.asarray(np.array(rows, np.int32))  # [4, 32]
    real = (seg > 0)[:, :, None, None]
    q = jnp.asarray(rng.standard_normal((4, 32, 8, 16)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((4, 32, 2, 16)), jnp.bfloat16) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    attend = lambda q, k, v: self_attention(q, k, v, seg, "cudnn", cudnn_max_segments=3).astype(jnp.float32)
    loss = weighted_sum(attend, real, w)
    run = jax.jit(lambda q, k, v: (attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
    with jax.set_mesh(mesh):
        sharded = run(q, k, v)
    one = run(q, k, v)
    leaves = zip(jax.tree.leaves(sharded), jax.tree.leaves(one), strict=True)
    as_f32 = lambda x: np.asarray(x, np.float32)
    return {
        "errors": [float(np.abs(as_f32(a) - as_f32(b)).max() / np.abs(as_f32(b)).max()) for a, b in leaves],
        "shapes": shapes,
    }


def _emulated_cudnn(shapes: list) -> None:
    """cuDNN's private packed-attention API replaced by the CPU emulation, recording the q shape of each call
    in `shapes`; the backend check lifted."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from nextquill_jax.models import attention
    from tests.models.cudnn_emulation import emulated_packed_attention

    emulation = emulated_packed_attention(kv_offsets_use_kv_heads=True)

    @functools.wraps(emulation)  # the signature the packed path checks for
    def recording(query, *args, **kwargs):
        shapes.append(list(query.shape))
        return emulation(query, *args, **kwargs)

    fused.dot_product_attention = recording
    attention.check_attention_backend = lambda impl, **_: None  # the emulation stands in for the GPU


def cudnn_generate() -> dict:
    from nextquill_jax.models import CausalLM, ModelConfig
    from nextquill_jax.models.generate import GenerationConfig, generate_ids

    shapes = []
    _emulated_cudnn(shapes)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg = ModelConfig(
        family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, compute_dtype="bfloat16", attention_impl="cudnn", cudnn_max_segments=1,
    )  # fmt: skip
    graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
    lengths = [16, 5, 11, 1]
    rng = np.random.default_rng(2)
    ids, mask = np.zeros((4, 16), np.int32), np.zeros((4, 16), np.int32)
    for row, n in enumerate(lengths):  # left-padded prompts
        ids[row, 16 - n :], mask[row, 16 - n :] = rng.integers(1, 64, n), 1
    settings = GenerationConfig(max_new_tokens=6, do_sample=False)
    run = lambda model, **kw: generate_ids(model, ids, mask, settings, eos_token_ids=63, pad_token_id=0, **kw)
    on_mesh = run(nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P()))), mesh=mesh)
    one = run(nnx.merge(graphdef, state))
    return {"same_tokens": bool(np.array_equal(on_mesh, one)), "tokens": one.tolist(), "shapes": shapes}


def weighted_sum(attend, real, w):
    """The attention output at real tokens, weighted by `w` and summed: a scalar with dense gradients."""
    return lambda q, k, v: jnp.sum(jnp.where(real, attend(q, k, v), 0.0) * w)


def blockwise() -> dict:
    mesh = make_mesh()
    rng = np.random.default_rng(0)
    seg = jnp.asarray(np.repeat([[1, 2, 2, 0], [1, 1, 3, 3]], 24, axis=1).astype(np.int32))  # [2, 96]
    real = (seg > 0)[:, :, None, None]
    slots = jnp.arange(96)
    dense = lambda q, k, v: xla_attention(q, k, v, attention_mask(seg, seg, slots, slots))
    by_blocks = lambda q, k, v: blockwise_attention(q, k, v, seg, 32)
    out = {}
    for kv_heads in (4, 2):  # 2 kv heads < 4 head shards
        q = jnp.asarray(rng.standard_normal((2, 96, 8, 16)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((2, 96, kv_heads, 16)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((2, 96, kv_heads, 16)), jnp.float32)
        w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
        ref_value, ref_grads = jax.value_and_grad(weighted_sum(dense, real, w), argnums=(0, 1, 2))(q, k, v)
        heads = NamedSharding(mesh, P("fsdp", None, "tensor", None))
        kv = heads if kv_heads == 4 else NamedSharding(mesh, P("fsdp", None, None, None))
        args = [jax.device_put(a, s) for a, s in ((q, heads), (k, kv), (v, kv))]
        with jax.set_mesh(mesh):
            loss = weighted_sum(by_blocks, real, w)
            value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
        out[str(kv_heads)] = {
            "value": float(value),
            "ref_value": float(ref_value),
            "grad_errors": [
                float(jnp.abs(got - expected).max() / jnp.abs(expected).max())
                for got, expected in zip(grads, ref_grads, strict=True)
            ],
        }
    return out


def nf4() -> dict:
    """Projection kernels of real-model proportions (last axis a multiple of NF4's block) placed with their
    rules' shardings, quantized to nf4 as a LoRA run's frozen base is: per kernel, the codes' spec, how many
    distinct shards they are cut into, and whether they dequantize to what the unsharded kernel gives."""
    from nextquill_jax.config import LoraConfig
    from nextquill_jax.train.adapters import frozen_base

    mesh = make_mesh()
    layers, d, h, hd, f = 2, 128, 8, 64, 512
    kernels = {  # module, name -> shape, the rules' spec (tests/models/test_sharded.py EXPECTED_SHARDS)
        ("attn", "q_proj"): ((layers, d, h, hd), P(None, "fsdp", "tensor", None)),
        ("attn", "o_proj"): ((layers, h, hd, d), P(None, "tensor", None, "fsdp")),
        ("mlp", "gate"): ((layers, d, f), P(None, "fsdp", "tensor")),
        ("mlp", "down"): ((layers, f, d), P(None, "tensor", "fsdp")),
    }
    rng = np.random.default_rng(0)
    host = {key: jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for key, (shape, _) in kernels.items()}

    def nest(arrays: dict) -> dict:
        """{(module, name): array} -> {"layers": {module: {name: array}}}, a params dict's nesting."""
        layers_ = {}
        for (module, name), array in arrays.items():
            layers_.setdefault(module, {})[name] = array
        return {"layers": layers_}

    placed = {key: jax.device_put(w, NamedSharding(mesh, kernels[key][1])) for key, w in host.items()}
    with jax.set_mesh(mesh):
        sharded = frozen_base(nest(placed), LoraConfig(base_dtype="nf4"))["layers"]
    single = frozen_base(nest(host), LoraConfig(base_dtype="nf4"))["layers"]
    return {
        f"{m}/{n}": {
            "spec": str(sharded[m][n].packed.sharding.spec),
            "shards": len({str(s.index) for s in sharded[m][n].packed.addressable_shards}),
            "equals_single": bool(
                np.array_equal(np.asarray(sharded[m][n][...]), np.asarray(single[m][n][...]))
            ),
        }
        for m, n in kernels
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("load").add_argument("checkpoint")
    commands.add_parser("splash")
    commands.add_parser("blockwise")
    commands.add_parser("nf4")
    commands.add_parser("cudnn_packed")
    commands.add_parser("cudnn_generate")
    args = parser.parse_args()
    if args.command == "load":
        result = load(args.checkpoint)
    else:
        programs = {
            "splash": splash,
            "blockwise": blockwise,
            "nf4": nf4,
            "cudnn_packed": cudnn_packed,
            "cudnn_generate": cudnn_generate,
        }
        result = programs[args.command]()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
