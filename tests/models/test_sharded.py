"""Sharded loading on 8 simulated CPU devices, mesh (data=1, fsdp=2, tensor=4): parameters land with the
shardings the logical-axis rules give, each device holds only its slice, and the sharded forward equals the
single-device one. Splash attention (Pallas, interpret mode) under shard_map equals the XLA attention, and the
blockwise attention on sharded inputs equals the dense attention in value and gradients."""

from __future__ import annotations

import pytest
import torch
from jax.sharding import PartitionSpec as P
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, tiny_hf_config):
    # Sizes divisible by the mesh: heads 8, kv heads 4, mlp 128, vocab 320 by tensor=4; hidden 64 by fsdp=2.
    config = tiny_hf_config("qwen2", tied=False, vocab_size=320, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("sharded") / "hf"
    model.save_pretrained(path)
    return path


# Per parameter: its sharding under the logical-axis rules and the shape of each device's shard.
EXPECTED_SHARDS = {
    ("embed",): (P("tensor", "fsdp"), (80, 32)),
    ("lm_head",): (P("fsdp", "tensor"), (32, 80)),
    ("layers", "attn", "q_proj"): (P(None, "fsdp", "tensor", None), (2, 32, 2, 8)),
    ("layers", "attn", "k_proj"): (P(None, "fsdp", "tensor", None), (2, 32, 1, 8)),
    ("layers", "attn", "o_proj"): (P(None, "tensor", None, "fsdp"), (2, 2, 8, 32)),
    ("layers", "attn", "q_bias"): (P(None, "tensor", None), (2, 2, 8)),
    ("layers", "mlp", "down"): (P(None, "tensor", "fsdp"), (2, 32, 32)),
    ("layers", "input_norm", "scale"): (P(None, None), (2, 64)),
}
MESH_SHAPE = [["data", 1], ["fsdp", 2], ["tensor", 4]]


def test_load_pretrained_on_a_mesh(checkpoint_dir, programs):
    result = programs.run("models_sharded.py", "load", checkpoint_dir, devices=8).result
    params = result["params"]
    for path, (spec, shard_shape) in EXPECTED_SHARDS.items():
        arr = params["/".join(path)]
        assert arr["mesh"] == MESH_SHAPE, path
        assert arr["spec"] == str(spec), (path, arr["spec"])
        assert arr["shard_shapes"] == [list(shard_shape)], path
    for path, arr in params.items():
        assert arr["equals_single"], path
    assert result["maxdiff"] <= 1e-5, result["maxdiff"]


def test_splash_attention_under_shard_map_matches_xla(programs):
    """Also where the rows (3 over fsdp 2) and the query heads (6 over tensor 4) divide no mesh axis: each is
    then left whole rather than split, against the float64 statement."""
    result = programs.run("models_sharded.py", "splash", devices=8).result
    assert result["maxdiff"] <= 1e-5, result
    assert result["undivided_maxdiff"] <= 1e-5, result


def test_cudnn_packed_attention_runs_per_shard_and_matches_one_device(programs):
    """Under a mesh, cuDNN's packed mode calls the private API on each device's rows and heads (its own
    partitioning gives the offsets no rule of their own), so every call is the one-device call that was
    checked on a GPU; values and gradients are the one-device run's to bf16 rounding (k / v, repeated to
    the head shards, sum their gradients across them)."""
    result = programs.run("models_sharded.py", "cudnn_packed", devices=8).result
    # 4 rows over fsdp 2, 8 query heads over tensor 4 (2 kv heads repeated to them): two traced calls each
    # (forward; forward for the gradient), first under the mesh, then on one device.
    assert result["shapes"] == [[2, 32, 2, 16]] * 2 + [[4, 32, 8, 16]] * 2, result["shapes"]
    assert max(result["errors"]) <= 2**-7, result["errors"]  # output, dq, dk, dv


def test_generation_given_a_mesh_prefills_through_cudnn_packed_attention_per_device(programs):
    """`generate_ids(..., mesh=)` called outside `jax.set_mesh` (a library caller; `evaluate` sets it) puts
    the mesh in context itself, so the packed prefill runs on each device's rows and heads: it received the
    whole batch, which on a GPU would leave the call to the private API's own partitioning. Greedy tokens
    equal one device's."""
    result = programs.run("models_sharded.py", "cudnn_generate", devices=8).result
    # 4 prompts over data 2 x fsdp 2, 4 query heads over tensor 2 (2 kv heads repeated to them); the
    # one-token decode steps attend densely over the cache (no packed call).
    assert result["shapes"] == [[1, 16, 2, 8], [4, 16, 4, 8]], result["shapes"]
    assert result["same_tokens"], result["tokens"]


def test_blockwise_attention_on_sharded_inputs_matches_dense(programs):
    result = programs.run("models_sharded.py", "blockwise", devices=8).result
    assert sorted(result) == ["2", "4"]  # kv heads as many as query head shards, and fewer
    for kv_heads, r in result.items():
        value, ref_value = r["value"], r["ref_value"]
        assert abs(value - ref_value) <= 1e-5 * abs(ref_value), (kv_heads, value, ref_value)
        assert len(r["grad_errors"]) == 3
        for err in r["grad_errors"]:
            assert err <= 1e-5, (kv_heads, err)


def test_nf4_codes_are_sharded_as_their_kernels(programs):
    """A LoRA run's nf4 base, as `adapters.frozen_base` quantizes it on the mesh: the codes of kernels whose
    last axis is a multiple of the block are cut 8 ways, as the kernels are (flattened, they were cut 2 or
    4 ways: the mesh audit of 2026-12-04 found o_proj and down replicated under an fsdp-only mesh)."""
    result = programs.run("models_sharded.py", "nf4", devices=8).result
    assert sorted(result) == ["attn/o_proj", "attn/q_proj", "mlp/down", "mlp/gate"]
    for name, r in result.items():
        assert r["shards"] == 8 and r["equals_single"], (name, r)
