"""Sharded loading on 8 simulated CPU devices, mesh (data=1, fsdp=2, tensor=4): parameters land with the
shardings the logical-axis rules give, each device holds only its slice, and the sharded forward equals the
single-device one. Splash attention (Pallas, interpret mode) under shard_map equals the XLA attention, and the
blockwise attention on sharded inputs equals the dense attention in value and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from tests.multidevice import run_with_devices


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    # Sizes divisible by the mesh: heads 8, kv heads 4, mlp 128, vocab 320 by tensor=4; hidden 64 by fsdp=2.
    config = Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("sharded") / "hf"
    model.save_pretrained(path)
    return path


def test_load_pretrained_on_a_mesh(checkpoint_dir):
    out = run_with_devices(
        f"""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import PartitionSpec as P
        from flax import nnx
        from nextquill_jax.models import load_pretrained

        auto = (jax.sharding.AxisType.Auto,) * 3
        mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=auto)
        single = load_pretrained({str(checkpoint_dir)!r})
        sharded = load_pretrained({str(checkpoint_dir)!r}, mesh=mesh)
        params = {{path: v.get_value() for path, v in nnx.state(sharded, nnx.Param).flat_state()}}
        expected = {{
            ("embed",): (P("tensor", "fsdp"), (80, 32)),
            ("lm_head",): (P("fsdp", "tensor"), (32, 80)),
            ("layers", "attn", "q_proj"): (P(None, "fsdp", "tensor", None), (2, 32, 2, 8)),
            ("layers", "attn", "k_proj"): (P(None, "fsdp", "tensor", None), (2, 32, 1, 8)),
            ("layers", "attn", "o_proj"): (P(None, "tensor", None, "fsdp"), (2, 2, 8, 32)),
            ("layers", "attn", "q_bias"): (P(None, "tensor", None), (2, 2, 8)),
            ("layers", "mlp", "down"): (P(None, "tensor", "fsdp"), (2, 32, 32)),
            ("layers", "input_norm", "scale"): (P(None, None), (2, 64)),
        }}
        for path, (spec, shard_shape) in expected.items():
            arr = params[path]
            assert arr.sharding.mesh.shape == mesh.shape, path
            assert arr.sharding.spec == spec, (path, arr.sharding.spec)
            assert {{s.data.shape for s in arr.addressable_shards}} == {{shard_shape}}, path
        single_params = dict(nnx.state(single, nnx.Param).flat_state())
        for path, arr in params.items():
            assert np.array_equal(np.asarray(arr), np.asarray(single_params[path].get_value())), path

        ids = np.random.default_rng(0).integers(0, 320, (4, 16)).astype(np.int32)
        segments = np.ones((4, 16), np.int32); segments[1, :5] = 0
        positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
        def run(model):
            graphdef, state = nnx.split(model)
            forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
            return np.asarray(forward(state, ids, positions, segments))
        ref = run(single)
        with jax.set_mesh(mesh):
            got = run(sharded)
        print("maxdiff", float(np.abs(got - ref).max()))
        assert np.abs(got - ref).max() <= 1e-5
        """
    )
    assert "maxdiff" in out


def test_splash_attention_under_shard_map_matches_xla():
    run_with_devices(
        """
        import functools, jax, jax.numpy as jnp, numpy as np
        from nextquill_jax.models.attention import attention_mask, splash_attention, xla_attention

        auto = (jax.sharding.AxisType.Auto,) * 3
        mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=auto)
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((2, 64, 8, 16)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((2, 64, 2, 16)), jnp.float32)  # 2 kv heads < 4 head shards
        v = jnp.asarray(rng.standard_normal((2, 64, 2, 16)), jnp.float32)
        seg = jnp.asarray(np.repeat([[1, 2], [1, 1]], 32, axis=1).astype(np.int32))
        slots = jnp.arange(64)
        ref = xla_attention(q, k, v, attention_mask(seg, seg, slots, slots))
        with jax.set_mesh(mesh):
            got = jax.jit(functools.partial(splash_attention, interpret=True))(q, k, v, seg)
        assert float(jnp.abs(got - ref).max()) <= 1e-5, float(jnp.abs(got - ref).max())
        """
    )


def test_blockwise_attention_on_sharded_inputs_matches_dense():
    run_with_devices(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from nextquill_jax.models.attention import attention_mask, xla_attention
        from nextquill_jax.models.blockwise_attention import blockwise_attention

        auto = (jax.sharding.AxisType.Auto,) * 3
        mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=auto)
        rng = np.random.default_rng(0)
        seg = jnp.asarray(np.repeat([[1, 2, 2, 0], [1, 1, 3, 3]], 24, axis=1).astype(np.int32))  # [2, 96]
        real = (seg > 0)[:, :, None, None]
        slots = jnp.arange(96)
        for kv_heads in (4, 2):  # 2 kv heads < 4 head shards
            q = jnp.asarray(rng.standard_normal((2, 96, 8, 16)), jnp.float32)
            k = jnp.asarray(rng.standard_normal((2, 96, kv_heads, 16)), jnp.float32)
            v = jnp.asarray(rng.standard_normal((2, 96, kv_heads, 16)), jnp.float32)
            w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
            dense = lambda q, k, v: xla_attention(q, k, v, attention_mask(seg, seg, slots, slots))
            blockwise = lambda q, k, v: blockwise_attention(q, k, v, seg, 32)
            loss = lambda attend: lambda q, k, v: jnp.sum(jnp.where(real, attend(q, k, v), 0.0) * w)
            ref_value, ref_grads = jax.value_and_grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
            heads = NamedSharding(mesh, P("fsdp", None, "tensor", None))
            kv = heads if kv_heads == 4 else NamedSharding(mesh, P("fsdp", None, None, None))
            args = [jax.device_put(a, s) for a, s in ((q, heads), (k, kv), (v, kv))]
            with jax.set_mesh(mesh):
                value, grads = jax.jit(jax.value_and_grad(loss(blockwise), argnums=(0, 1, 2)))(*args)
            assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value)), (value, ref_value)
            for got, expected in zip(grads, ref_grads):
                err = float(jnp.abs(got - expected).max() / jnp.abs(expected).max())
                assert err <= 1e-5, (kv_heads, err)
        """
    )
