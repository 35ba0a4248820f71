"""CausalLM against transformers' PyTorch models (the reference), for each family, on tiny random
checkpoints built and saved by transformers itself: logits, left padding, packing, KV-cache decoding,
save/load round trips, bf16 compute."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from nextquill_jax.models import load_pretrained, save_pretrained

VOCAB = 300
# original_max_position_embeddings=16 with head_dim 16 puts RoPE wavelengths in all three llama3 regimes
# (kept, interpolated, divided by the factor).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# name -> (family, what differs from the `tiny_hf_config` fixture's sizes: vocab VOCAB, hidden 64, mlp 128,
# 2 layers, 4 heads, 2 kv heads, 256 positions, RMS eps 1e-6)
FAMILIES = {
    "llama3_tied": ("llama", dict(tied=True, rope_scaling=LLAMA3_ROPE, rope_theta=10000.0)),
    # Plain multi-head attention (as many kv heads as query heads), as in Llama 2.
    "llama_untied": ("llama", dict(tied=False, num_key_value_heads=4, rope_theta=500.0)),
    "qwen2_bias": ("qwen2", dict(tied=False, rope_theta=10000.0)),
    "qwen3_qknorm": ("qwen3", dict(tied=True, head_dim=24, rope_theta=10000.0)),
}


def random_checkpoint(config, directory):
    """A transformers model of `config` with seeded random parameters, saved to `directory`."""
    torch.manual_seed(0)
    torch_model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # move every parameter off its init (norms off 1, biases off 0)
        for p in torch_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch_model.save_pretrained(directory)
    return torch_model


class Case:
    """A transformers reference model, its saved directory, our model loaded from it, jitted entry points."""

    def __init__(self, name: str, config, tmp_dir):
        self.name = name
        self.dir = tmp_dir / "hf"
        self.torch_model = random_checkpoint(config, self.dir)
        self.model = load_pretrained(self.dir)
        graphdef, state = nnx.split(self.model)
        self.graphdef, self.state = graphdef, state
        self._forward = jax.jit(lambda s, ids, pos, seg: nnx.merge(graphdef, s)(ids, pos, seg))
        self._extend = jax.jit(
            lambda s, ids, cache, pos, seg: nnx.merge(graphdef, s).extend(ids, cache, pos, seg)
        )

    def forward(self, ids, positions=None, segment_ids=None) -> np.ndarray:
        # Explicit defaults keep one jit signature per shape (tests share compiled [3, 20] forwards).
        b, t = ids.shape
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)) if positions is None else positions
        segment_ids = np.ones((b, t), np.int32) if segment_ids is None else segment_ids
        return np.asarray(self._forward(self.state, ids, positions, segment_ids))

    def extend(self, ids, cache, positions=None, segment_ids=None):
        return self._extend(self.state, ids, cache, positions, segment_ids)

    def reference(self, ids, attention_mask=None, position_ids=None) -> np.ndarray:
        kwargs = {}
        if attention_mask is not None:
            kwargs = dict(
                attention_mask=torch.tensor(attention_mask), position_ids=torch.tensor(position_ids)
            )
        with torch.no_grad():
            return self.torch_model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory, tiny_hf_config) -> Case:
    family, arguments = FAMILIES[request.param]
    config = tiny_hf_config(family, vocab_size=VOCAB, **arguments)
    return Case(request.param, config, tmp_path_factory.mktemp(request.param))


def random_ids(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def left_padded(lengths: list[int], width: int, seed: int = 1):
    """ids, mask (1 = token), positions restarting at 0 at each row's first token; padding on the left."""
    ids = random_ids((len(lengths), width), seed)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


def test_logits_match_transformers(case):
    ids = random_ids((3, 20))
    ours = case.forward(ids)
    ref = case.reference(ids)
    assert ours.shape == ref.shape == (3, 20, VOCAB)
    assert np.abs(ours - ref).max() <= 1e-4, case.name


def test_left_padding_matches_transformers_attention_mask(case):
    ids, mask, positions = left_padded([20, 13, 6], 20)
    ours = case.forward(ids, positions, mask)  # segment ids: 0 on padding, 1 on tokens
    ref = case.reference(ids, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4, case.name


def test_packed_row_equals_each_sequence_alone(case):
    a, b = random_ids(7, seed=2), random_ids(9, seed=3)
    ids = np.zeros((3, 20), np.int32)
    segments = np.zeros((3, 20), np.int32)
    positions = np.zeros((3, 20), np.int32)
    # Row 0: a, b and 4 padding tokens packed; row 1: a alone; row 2: b alone (rows never see each other).
    ids[0, :16], segments[0, :16], positions[0, :16] = (
        np.concatenate([a, b]),
        [1] * 7 + [2] * 9,
        [*range(7), *range(9)],
    )
    ids[1, :7], segments[1, :7], positions[1, :7] = a, 1, np.arange(7)
    ids[2, :9], segments[2, :9], positions[2, :9] = b, 1, np.arange(9)
    logits = case.forward(ids, positions, segments)
    np.testing.assert_allclose(logits[0, :7], logits[1, :7], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[0, 7:16], logits[2, :9], atol=1e-5, rtol=0)
    # Alone in a row of its own, a matches transformers too (so the comparison above is not vacuous).
    assert np.abs(logits[1, :7] - case.reference(a[None])[0]).max() <= 1e-4


def test_llama_attention_biases_match_transformers(tmp_path, tiny_hf_config):
    """Llama's `attention_bias` gives all four projections a bias (the FAMILIES cases have q/k/v only, in
    qwen2): with every bias moved off 0, the logits are transformers'."""
    torch_model = random_checkpoint(tiny_hf_config("llama", vocab_size=VOCAB, attention_bias=True), tmp_path)
    assert float(torch_model.model.layers[0].self_attn.o_proj.bias.detach().abs().max()) > 0
    ids = random_ids((2, 11), seed=7)
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(load_pretrained(tmp_path)(ids)) - expected).max() <= 1e-4


def test_positions_with_gaps_match_transformers_position_ids(case):
    """Positions that are no constant offset from the slots (RoPE sees only differences, so the usual
    0..T-1, shifted or restarted per segment, cannot tell given positions from the default): forward and
    extend rotate by the positions given."""
    ids = random_ids((2, 10), seed=10)
    positions = np.array([[0, 1, 2, 6, 7, 8, 20, 21, 22, 23], [0, 3, 4, 5, 9, 10, 11, 12, 30, 31]], np.int32)
    expected = case.reference(ids, attention_mask=np.ones_like(ids), position_ids=positions)
    assert np.abs(case.forward(ids, positions) - expected).max() <= 1e-4
    logits, _ = case.extend(ids, case.model.init_cache(2, 10), positions)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4


def test_packed_prompt_through_extend_equals_each_sequence_alone(case):
    """`extend` on a packed row (two examples, then padding) into an empty cache: each example's logits are
    transformers' for it alone (its queries see its own segment's keys only)."""
    a, b = random_ids(7, seed=2), random_ids(9, seed=3)
    ids = np.zeros((1, 20), np.int32)
    ids[0, :16] = np.concatenate([a, b])
    segments = np.array([[1] * 7 + [2] * 9 + [0] * 4], np.int32)
    positions = np.array([[*range(7), *range(9), 0, 0, 0, 0]], np.int32)
    logits, _ = case.extend(ids, case.model.init_cache(1, 20), positions, segments)
    logits = np.asarray(logits)[0]
    assert np.abs(logits[:7] - case.reference(a[None])[0]).max() <= 1e-4
    assert np.abs(logits[7:16] - case.reference(b[None])[0]).max() <= 1e-4


def test_kv_cache_decode_matches_full_forward(case):
    prompt_len, steps = 14, 6
    ids, mask, positions = left_padded([20, 15, 9], prompt_len + steps, seed=4)
    # Rows are left-padded as a whole (prompt + continuation): the first `prompt_len` columns are the prompt.
    full = case.forward(ids, positions, mask)
    cache = case.model.init_cache(batch=3, max_len=prompt_len + steps + 3)
    logits, cache = case.extend(ids[:, :prompt_len], cache, positions[:, :prompt_len], mask[:, :prompt_len])
    real = mask[:, :prompt_len].astype(bool)
    assert np.abs(np.asarray(logits)[real] - full[:, :prompt_len][real]).max() <= 1e-5
    for t in range(prompt_len, prompt_len + steps):
        logits, cache = case.extend(ids[:, t : t + 1], cache, positions[:, t : t + 1])
        np.testing.assert_allclose(
            np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=0, err_msg=f"step {t}"
        )
    assert int(cache.index) == prompt_len + steps


def test_prefill_then_steps_with_default_positions_and_segments_match_transformers(case):
    """An unpadded prompt through `prefill`, then one-token `extend` steps given no positions or segment ids
    (defaults: the slot index, segment 1): every logit is transformers' for the whole sequence."""
    prompt_len, steps = 8, 4
    ids = random_ids((2, prompt_len + steps), seed=8)
    expected = case.reference(ids)
    prefill = jax.jit(lambda s, ids, cache: nnx.merge(case.graphdef, s).prefill(ids, cache))
    logits, cache = prefill(case.state, ids[:, :prompt_len], case.model.init_cache(2, prompt_len + steps))
    assert np.abs(np.asarray(logits) - expected[:, :prompt_len]).max() <= 1e-4
    for t in range(prompt_len, prompt_len + steps):
        logits, cache = case.extend(ids[:, t : t + 1], cache)
        assert np.abs(np.asarray(logits)[:, 0] - expected[:, t]).max() <= 1e-4, t


def test_save_pretrained_round_trip(case, tmp_path):
    out = save_pretrained(case.model, tmp_path / "ours", max_shard_bytes=40_000)  # force several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded_torch = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids((2, 11), seed=5)
    with torch.no_grad():
        theirs = reloaded_torch(torch.tensor(ids)).logits.numpy()
    assert np.abs(case.forward(ids) - theirs).max() <= 1e-5
    assert sorted(index["weight_map"]) == sorted(
        reloaded_torch.state_dict().keys() - _tied_head(reloaded_torch)
    )

    reloaded = load_pretrained(out)
    ours_flat = dict(nnx.to_flat_state(nnx.state(case.model, nnx.Param)))
    again_flat = dict(nnx.to_flat_state(nnx.state(reloaded, nnx.Param)))
    assert ours_flat.keys() == again_flat.keys()
    for path, var in ours_flat.items():
        assert np.array_equal(np.asarray(var.get_value()), np.asarray(again_flat[path].get_value())), path


def _tied_head(torch_model) -> set[str]:
    return {"lm_head.weight"} if torch_model.config.tie_word_embeddings else set()


def test_bf16_compute_with_fp32_params_close_to_fp32(case):
    model = load_pretrained(case.dir, compute_dtype="bfloat16")
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    ids = random_ids((3, 20), seed=6)
    graphdef, state = nnx.split(model)
    bf16 = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids))
    fp32 = case.forward(ids)
    assert bf16.dtype == np.float32
    rel = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 0 < rel < 2e-2, rel


def test_bf16_compute_decodes_into_a_float32_cache_close_to_transformers(case):
    """A cache wider than the compute dtype (`init_cache(dtype=float32)` for a bfloat16 model): prefill and
    decode steps read it back in bfloat16 and stay within bfloat16 rounding of transformers' float32
    logits, as the bf16 forward above does."""
    model = load_pretrained(case.dir, compute_dtype="bfloat16")
    graphdef, state = nnx.split(model)
    ids = random_ids((2, 10), seed=9)
    expected = case.reference(ids)
    call = lambda method: jax.jit(lambda s, ids, c: getattr(nnx.merge(graphdef, s), method)(ids, c))
    logits, cache = call("prefill")(state, ids[:, :8], model.init_cache(2, 10, dtype=jnp.float32))
    got = [np.asarray(logits)]
    for t in (8, 9):
        logits, cache = call("extend")(state, ids[:, t : t + 1], cache)
        got.append(np.asarray(logits))
    assert cache.k.dtype == jnp.float32
    got = np.concatenate(got, axis=1)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert 0 < rel < 2e-2, rel


LLAMA3_DEFAULT_CONTEXT = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}
# A key deleted from config.json by an `EDITED_CONFIGS` edit.
ABSENT = object()
# config.json files that transformers 5 reads in a way of its own: name -> (family, fields of the saved
# model that differ from `tiny_hf_config`'s, changes to its config.json: key -> value, or ABSENT).
EDITED_CONFIGS = {
    # A non-empty 4.x rope_scaling replaces the 5.x rope_parameters whole; θ then comes from the top level.
    "rope_scaling_replaces_default_rope_parameters": (
        "llama",
        {},
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
            "rope_theta": 5e5,
            "rope_scaling": LLAMA3_ROPE,
        },
    ),
    "rope_scaling_replaces_llama3_rope_parameters": (
        "llama",
        {},
        {
            "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 1e4},
            "rope_scaling": {"type": "linear", "factor": 2.0},
        },
    ),
    "rope_theta_inside_rope_scaling": (
        "llama",
        {},
        {
            "rope_parameters": ABSENT,
            "rope_theta": ABSENT,
            "rope_scaling": {**LLAMA3_ROPE, "rope_theta": 500.0},
        },
    ),
    # A top-level original_max_position_embeddings (Phi-3's spelling) overwrites the llama3 object's.
    "top_level_original_max_position_embeddings": (
        "llama",
        {},
        {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 1e4}, "original_max_position_embeddings": 64},
    ),
    # No context length anywhere: llama3's is transformers' default max_position_embeddings for the family.
    **{
        f"{family}_llama3_without_a_context_length": (
            family,
            {},
            {
                "rope_parameters": {**LLAMA3_DEFAULT_CONTEXT, "rope_theta": 1e4},
                "max_position_embeddings": ABSENT,
            },
        )
        for family in ("llama", "qwen2")
    },
    # transformers runs the activation "swish" as SiLU (it was refused here).
    "hidden_act_swish": ("qwen2", {}, {"hidden_act": "swish"}),
    # transformers' Qwen3Config defaults head_dim to 128, not hidden_size // num_attention_heads (16 here).
    "qwen3_without_head_dim": ("qwen3", {"head_dim": 128}, {"head_dim": ABSENT}),
    # transformers' Qwen2Config / Qwen3Config default num_key_value_heads to 32, not num_attention_heads.
    **{
        f"{family}_without_num_key_value_heads": (
            family,
            {"num_attention_heads": 64, "num_key_value_heads": 32, "head_dim": 4},
            {"num_key_value_heads": ABSENT},
        )
        for family in ("qwen2", "qwen3")
    },
}


@pytest.mark.parametrize("name", list(EDITED_CONFIGS))
def test_edited_config_json_reads_as_transformers_reads_it(name, tmp_path, tiny_hf_config):
    """Logits at positions 100-119 (where RoPE settings differ most) against transformers' model loaded from
    the same edited config.json."""
    family, fields, changes = EDITED_CONFIGS[name]
    random_checkpoint(tiny_hf_config(family, vocab_size=VOCAB, **fields), tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    for key, value in changes.items():
        if value is ABSENT:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = random_ids((2, 20))
    positions = np.broadcast_to(np.arange(100, 120, dtype=np.int32), ids.shape)
    with torch.no_grad():
        expected = reference(torch.tensor(ids), position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(load_pretrained(tmp_path)(ids, positions=positions))
    assert np.abs(ours - expected).max() <= 1e-4, name
