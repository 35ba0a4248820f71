"""LoRA adapters (models/lora.py): the adapter term against a float64 NumPy statement, the adapted forward
against the merged kernels (float32, on a float32, bfloat16 or quantized base), PEFT's initialisation,
target selection errors, logical axes and dropout."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextquill_jax.models import CausalLM, ModelConfig, lora
from nextquill_jax.models.quantize import dequantize, quantize_base

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py

TINY = dict(
    family="qwen2", vocab_size=80, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=8, qkv_bias=True,
)  # fmt: skip
ALL = ["attn/(q|k|v|o)_proj", "mlp/(gate|up|down)"]
IDS = np.random.default_rng(0).integers(0, 80, (2, 9)).astype(np.int32)


def model_and_params(**overrides):
    model = CausalLM(ModelConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(0))
    return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.partial(jax.jit, static_argnums=0)
def _hidden_states(graphdef, state, adapters):
    return nnx.merge(graphdef, state).hidden_states(jnp.asarray(IDS), adapters=adapters)


def hidden(model, adapters=None):
    """The model's hidden states on IDS, compiled (eager op-by-op runs are slow). One jitted function for the
    module, the graph static: models of one structure (the plain and the merged model, each test's
    `model_and_params()`) reuse one program instead of compiling a new closure per call."""
    graphdef, state = nnx.split(model)
    return np.asarray(_hidden_states(graphdef, state, adapters))


def random_adapters(params, targets, rank=4, seed=1):
    """Adapters with B != 0 (fresh ones have B = 0 and change nothing)."""
    shapes = lora.adapter_shapes(params, lora.target_paths(params, targets), rank, jnp.float32)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [0.1 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves, strict=True)]
    )


@pytest.mark.parametrize(
    ("module", "name", "x_shape"), [("attn", "q_proj", (2, 5, 32)), ("attn", "o_proj", (2, 5, 4, 8))]
)
def test_adapter_term_equals_a_float64_statement(module, name, x_shape):
    rng = np.random.default_rng(3)
    n_in = lora.INPUT_AXES[(module, name)]
    ins, outs = x_shape[2:], (4, 8) if name == "q_proj" else (32,)
    a, b = rng.normal(size=(*ins, 6)), rng.normal(size=(6, *outs))
    x = rng.normal(size=x_shape)
    layer = lora.LayerAdapters(
        {module: {name: {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}}, 2.5, 0.0, None
    )
    got = np.asarray(layer.apply(module, name, jnp.asarray(x, jnp.float32)))
    want = 2.5 * np.tensordot(np.tensordot(x, a, axes=n_in), b, axes=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert layer.apply(module, "k_proj", jnp.asarray(x, jnp.float32)) is None


@pytest.mark.parametrize("remat", ["none", "full"])
def test_adapted_forward_equals_the_merged_kernels(remat):
    model, params = model_and_params(remat_policy=remat)
    weights = random_adapters(params, ALL)
    adapted = hidden(model, lora.Adapters(weights, 4.0))
    graphdef = nnx.split(model)[0]
    before = jax.tree.leaves(params)
    merged = hidden(nnx.merge(graphdef, lora.merge(params, weights, 4.0)))
    # A new dict: the caller's parameters (the base, which it may still run) keep their kernels.
    assert all(x is y for x, y in zip(jax.tree.leaves(params), before, strict=True))
    plain = hidden(model)
    scale = np.abs(plain).max()
    assert np.abs(adapted - plain).max() > 1e-2 * scale  # the adapters do something
    np.testing.assert_allclose(adapted, merged, atol=2e-5 * scale)


@pytest.mark.parametrize("storage", ["bfloat16", "int8", "nf4"])
def test_a_small_update_survives_merging_into_a_bfloat16_or_quantized_base(storage):
    """The merged kernels are float32: the merged model computes the adapted forward (training's: the base as
    stored, adapters apart) to float32 rounding on a base stored in bfloat16, or quantized (dequantized to
    bfloat16 where read). Rounding W + s·A·B to the base's bfloat16, as merge once did, loses ~40% of an
    update below bfloat16's resolution (B ~ 1e-4, as a few steps at lr 1e-4 leave it)."""
    model, params = model_and_params(param_dtype="bfloat16")  # compute float32: only storage rounds
    graphdef = nnx.split(model, nnx.Param)[0]
    base = params if storage == "bfloat16" else quantize_base(params, storage)
    weights = random_adapters(params, ALL)
    weights = jax.tree.map(lambda x: x if x.shape[-1] == 4 else 1e-3 * x, weights)  # A as drawn, B small

    @jax.jit
    def run(params, adapters):
        model = nnx.merge(graphdef, params)
        return model.logits(model.hidden_states(jnp.asarray(IDS), adapters=adapters))

    adapted = np.asarray(run(base, lora.Adapters(weights, 4.0)))
    plain = np.asarray(run(base, None))
    merged_params = lora.merge(dequantize(base), weights, 4.0)
    merged = np.asarray(run(merged_params, None))
    tolerance = 1e-5 * np.abs(adapted).max()  # float32 rounding, with room
    assert np.abs(adapted - plain).max() > 100 * tolerance  # the update matters at this tolerance
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=tolerance)
    rounded = jax.tree.map(lambda m, w: m.astype(w.dtype), merged_params, dequantize(base))
    assert np.abs(np.asarray(run(rounded, None)) - adapted).max() > 20 * tolerance  # what the test catches


def test_fresh_adapters_leave_the_model_unchanged_and_follow_peft_init():
    model, params = model_and_params()
    shapes = lora.adapter_shapes(params, lora.target_paths(params, ALL), 4, jnp.float32)
    weights = lora.init_adapters(jax.random.PRNGKey(0), shapes)
    for module, kernels in weights["layers"].items():
        for name, pair in kernels.items():
            bound = 1 / math.sqrt(math.prod(pair["a"].shape[1:-1]))
            a = np.asarray(pair["a"], np.float64)
            # U(-bound, bound): both ends reached, mean 0 within 5 sigma (sigma = bound / sqrt(3 n))
            assert a.max() <= bound and a.max() > bound / 2 and a.min() >= -bound and a.min() < -bound / 2
            assert abs(a.mean()) < 5 * bound / math.sqrt(3 * a.size), (module, name)
            assert not np.any(np.asarray(pair["b"])), (module, name)
    np.testing.assert_array_equal(hidden(model, lora.Adapters(weights, 2.0)), hidden(model))


def test_fresh_adapters_draw_each_kernel_apart_in_the_adapters_dtype():
    """As PEFT's one Kaiming draw per module: the five kernels whose A has the same shape [L, 32, r] (q, k, v,
    gate, up) get different values, not one draw copied five times; A and B are in the dtype asked for (the
    model's parameter dtype, which the train state and its shardings expect), not float32."""
    _, params = model_and_params()
    shapes = lora.adapter_shapes(params, lora.target_paths(params, ALL), 4, jnp.bfloat16)
    weights = lora.init_adapters(jax.random.PRNGKey(0), shapes)
    pairs = [weights["layers"][m][n] for m, n in [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")]]
    pairs += [weights["layers"]["mlp"][n] for n in ("gate", "up")]
    a = [np.asarray(p["a"], np.float32) for p in pairs]
    assert all(x.shape == a[0].shape for x in a)
    bound = 1 / math.sqrt(32)
    for i in range(len(a)):
        for j in range(i):
            # Two independent U(-bound, bound) values differ by 2/3 bound on average; one draw copied, by 0.
            assert np.abs(a[i] - a[j]).mean() > bound / 2, (i, j)
    dtypes = {(name, str(x.dtype)) for pair in pairs for name, x in pair.items()}
    assert dtypes == {("a", "bfloat16"), ("b", "bfloat16")}


def test_targets_select_projection_kernels_and_bad_ones_are_errors():
    _, params = model_and_params()
    assert lora.target_paths(params, ["attn/(q|v)_proj"]) == [
        ("layers", "attn", "q_proj"),
        ("layers", "attn", "v_proj"),
    ]
    # Whatever the order of the patterns, and where two select one kernel, each kernel once in the model's
    # order: the same targets written another way make the same adapters.
    assert lora.target_paths(params, ["mlp/down", "attn/v_proj", "attn/(q|v)_proj"]) == [
        ("layers", "attn", "q_proj"),
        ("layers", "attn", "v_proj"),
        ("layers", "mlp", "down"),
    ]
    with pytest.raises(ValueError, match=r"matches no parameter.*layers/attn/q_proj"):
        lora.target_paths(params, ["attention/q"])
    with pytest.raises(ValueError, match=r"take no adapter.*layers/mlp/down"):
        lora.target_paths(params, ["norm"])
    with pytest.raises(ValueError, match="take no adapter"):
        lora.target_paths(params, ["q_bias"])
    with pytest.raises(ValueError, match=r"'mlp/\[up' is not a valid regular expression \(unterminated"):
        lora.target_paths(params, ["attn/q_proj", "mlp/[up"])


def test_adapters_carry_their_kernels_axes():
    model, params = model_and_params()
    logical = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    axes = lora.adapter_logical_axes(logical, lora.target_paths(params, ["attn/(q|o)_proj"]))
    q, o = axes["layers"]["attn"]["q_proj"], axes["layers"]["attn"]["o_proj"]
    assert tuple(q["a"]) == ("layers", "embed", None) and tuple(q["b"]) == (
        "layers",
        None,
        "heads",
        "head_dim",
    )
    assert tuple(o["a"]) == ("layers", "heads", "head_dim", None) and tuple(o["b"]) == (
        "layers",
        None,
        "embed",
    )


def test_dropout_keeps_each_input_scaled_by_one_over_the_keep_probability():
    """Inverted dropout, as torch.nn.Dropout documents it: a kept input is divided by 1 - p. With x, A and B
    all ones (rank 1) and scale 1, each output is (inputs kept) / (1 - p): times 0.75 for p = 0.25, a whole
    count of at most 32 (it would be count * 0.75 under a multiplied scaling)."""
    ones = {"attn": {"q_proj": {"a": jnp.ones((32, 1)), "b": jnp.ones((1, 4, 8))}}}
    layer = lora.LayerAdapters(ones, 1.0, 0.25, jax.random.PRNGKey(0))
    got = np.asarray(layer.apply("attn", "q_proj", jnp.ones((2, 8, 32), jnp.float32)), np.float64)
    counts = got * 0.75
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    assert counts.min() > 0 and counts.max() <= 32 and np.unique(np.round(counts)).size > 1
    # p is the probability of dropping, as torch's: 3/4 of the inputs are kept (binomial, within 5 sigma).
    wide = np.asarray(layer.apply("attn", "q_proj", jnp.ones((16, 64, 32), jnp.float32)), np.float64)
    kept = wide[..., 0, 0] * 0.75 / 32  # [16, 64]: the fraction of each position's 32 inputs kept
    assert abs(kept.mean() - 0.75) < 5 * math.sqrt(0.75 * 0.25 / (kept.size * 32)), kept.mean()


def test_dropout_draws_its_own_mask_for_each_kernel_and_layer():
    """As PEFT's one `Dropout` module per adapted kernel: the q and v projections of a layer, and the same
    projection in two layers, drop different inputs of the same x."""
    ones = lambda: {"a": jnp.ones((32, 1)), "b": jnp.ones((1, 4, 8))}
    weights = {"attn": {"q_proj": ones(), "v_proj": ones()}}
    x = jnp.ones((2, 8, 32), jnp.float32)
    _, keys = lora.layer_slices(lora.Adapters({"layers": weights}, 1.0, 0.5, jax.random.PRNGKey(0)), 2)
    kept = lambda layer, name: np.asarray(
        lora.LayerAdapters(weights, 1.0, 0.5, keys[layer]).apply("attn", name, x)
    )[..., 0, 0]  # [2, 8]: inputs kept, times 2
    assert not np.array_equal(kept(0, "q_proj"), kept(0, "v_proj"))
    assert not np.array_equal(kept(0, "q_proj"), kept(1, "q_proj"))


def test_dropout_is_keyed_and_off_without_a_key():
    model, params = model_and_params()
    weights = random_adapters(params, ["attn/q_proj"])
    run = lambda key: hidden(model, lora.Adapters(weights, 2.0, dropout=0.5, key=key))
    no_dropout = hidden(model, lora.Adapters(weights, 2.0))
    np.testing.assert_array_equal(run(None), no_dropout)
    np.testing.assert_array_equal(run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1)))
    assert not np.allclose(run(jax.random.PRNGKey(1)), no_dropout)
    assert not np.allclose(run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2)))
