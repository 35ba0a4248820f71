"""CausalLM's public pieces beyond the forward: the LM head contract, remat, scan unroll, KV-cache limits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextquill_jax.models import CausalLM

# The `tiny_model_config` fixture's model (hidden 32, 2 layers, 4 heads and 2 kv heads of 8), vocab 80.
VOCAB = 80
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 8)).astype(np.int32)


@pytest.mark.parametrize(("tied", "layout"), [(True, "vd"), (False, "dv")])
def test_logits_are_hidden_states_times_the_lm_head(tied, layout, tiny_model_config):
    model = CausalLM(tiny_model_config(vocab_size=VOCAB, tie_word_embeddings=tied), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    logits, hidden = jax.jit(
        lambda s: (nnx.merge(graphdef, s)(IDS), nnx.merge(graphdef, s).hidden_states(IDS))
    )(state)  # fmt: skip
    w, got_layout = model.lm_head_weight()
    assert got_layout == layout and hidden.shape == (2, 8, 32)
    w64, h64 = np.asarray(w, np.float64), np.asarray(hidden, np.float64)
    expected = h64 @ w64.T if layout == "vd" else h64 @ w64
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)
    if tied:
        assert np.array_equal(np.asarray(w), np.asarray(model.embed[...]))


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_logits_are_products_in_bfloat16_accumulated_in_float32(tied, tiny_model_config):
    """Compute dtype bfloat16 over float32 parameters: the head's weights are rounded to bfloat16 like the
    hidden states, and the logits are float32 sums of those products (float64 statement; unrounded weights
    move them by ~1e-3)."""
    cfg = tiny_model_config(vocab_size=VOCAB, tie_word_embeddings=tied, compute_dtype="bfloat16")
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    hidden, logits = model.hidden_states(IDS), model(IDS)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    w, layout = model.lm_head_weight()
    assert w.dtype == jnp.float32
    w64 = np.asarray(w.astype(jnp.bfloat16), np.float64)
    h64 = np.asarray(hidden, np.float64)
    expected = h64 @ w64.T if layout == "vd" else h64 @ w64
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


# `full` and per-part policies: one name, two names, every name the decoder layer sets.
EVERY_NAME = "save:qkv,attention,attn_out,mlp_gate_up"
REMAT_CASES = [
    "full",
    "dots_with_no_batch_dims_saveable",
    "save:attention",
    "save:qkv,mlp_gate_up",
    EVERY_NAME,
]


def _loss_fn(tiny_model_config, policy: str, **fields):
    """(loss(state), state) of the tiny model (with `fields` changed) under remat `policy`: mean squared
    logits of IDS."""
    model = CausalLM(tiny_model_config(vocab_size=VOCAB, remat_policy=policy, **fields), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    return (lambda s: jnp.mean(nnx.merge(graphdef, s)(IDS) ** 2)), state


def _value_and_grad(tiny_model_config, policy: str):
    loss, state = _loss_fn(tiny_model_config, policy)
    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.fixture(scope="module")
def without_remat(tiny_model_config):
    """(loss, gradients) of the tiny model at remat `none`, computed once for the comparisons."""
    return _value_and_grad(tiny_model_config, "none")


@pytest.mark.parametrize("policy", REMAT_CASES)
def test_remat_policies_give_the_same_loss_and_gradients_as_none(policy, tiny_model_config, without_remat):
    _assert_same_loss_and_grads(_value_and_grad(tiny_model_config, policy), without_remat)


def _assert_same_loss_and_grads(got, want) -> None:
    """(loss, gradients) `got` equals `want` to float32 rounding; `want`'s gradients are not all zero."""
    (loss_got, grads_got), (loss_want, grads_want) = got, want
    np.testing.assert_allclose(float(loss_got), float(loss_want), rtol=1e-6)
    leaves_want, leaves_got = jax.tree.leaves(grads_want), jax.tree.leaves(grads_got)
    assert len(leaves_want) == len(leaves_got) > 0
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves_want)
    for a, b in zip(leaves_want, leaves_got, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-7, rtol=1e-5)


def _names_saved_by_scans(jaxpr) -> set[str]:
    """Checkpoint names of the values a `scan` in `jaxpr` (or in a jaxpr nested in it) hands out of its body:
    in a vjp's forward pass, those are the residuals kept for the backward pass. A kept value may leave
    through `reduce_precision` (what remat puts on saved values), so it is looked through, as
    `jax.ad_checkpoint.print_saved_residuals` does."""
    names = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            producer = {v: e for e in body.eqns for v in e.outvars}
            for var in body.outvars:
                e = producer.get(var)
                if e is not None and e.primitive.name == "reduce_precision":
                    e = producer.get(e.invars[0])
                if e is not None and e.primitive.name == "name":
                    names.add(e.params["name"])
        for param in eqn.params.values():
            if isinstance(param, jax.extend.core.ClosedJaxpr):
                names |= _names_saved_by_scans(param.jaxpr)
    return names


@pytest.mark.parametrize(
    ("policy", "saved"),
    [
        ("full", set()),
        ("save:attention", {"attention"}),
        ("save:qkv,mlp_gate_up", {"qkv", "mlp_gate_up"}),
        (EVERY_NAME, {"qkv", "attention", "attn_out", "mlp_gate_up"}),
    ],
)
def test_save_policies_keep_exactly_the_named_values_of_the_layer(policy, saved, tiny_model_config):
    # Fails if a checkpoint_name call is missing: its value would be recomputed, not kept.
    loss, state = _loss_fn(tiny_model_config, policy)
    forward = jax.make_jaxpr(lambda s: jax.vjp(loss, s))(state)
    assert _names_saved_by_scans(forward.jaxpr) == saved


# Three layers, so that unroll 2 leaves a remainder after the loop and 3 unrolls all (as does any value above
# the count: jax.lax.scan then runs every step as the remainder, with no loop).
UNROLL_LAYERS = 3


def _layer_scan_unrolls(jaxpr, num_layers: int) -> list[int]:
    """The `unroll` of every scan in `jaxpr` (or nested in it) that runs over `num_layers` steps."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == num_layers:
            found.append(eqn.params["unroll"])
        for param in eqn.params.values():
            if isinstance(param, jax.extend.core.ClosedJaxpr):
                found += _layer_scan_unrolls(param.jaxpr, num_layers)
    return found


@pytest.fixture(scope="module")
def rolled(tiny_model_config):
    """(loss, gradients) of the 3-layer tiny model at scan_unroll 1, the scan the parity tests check."""
    loss, state = _loss_fn(tiny_model_config, "none", num_layers=UNROLL_LAYERS)
    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("unroll", [2, UNROLL_LAYERS])
def test_scan_unroll_gives_the_same_loss_and_gradients_as_the_rolled_scan(unroll, tiny_model_config, rolled):
    loss, state = _loss_fn(tiny_model_config, "none", num_layers=UNROLL_LAYERS, scan_unroll=unroll)
    # The option reaches the layers' scan, forward and backward (else the values alone would agree too).
    unrolls = _layer_scan_unrolls(jax.make_jaxpr(jax.value_and_grad(loss))(state).jaxpr, UNROLL_LAYERS)
    assert unrolls and set(unrolls) == {unroll}
    _assert_same_loss_and_grads(jax.jit(jax.value_and_grad(loss))(state), rolled)


def test_scan_unroll_reaches_prefill_extend_and_hidden_states(tiny_model_config):
    # Traced only (nothing compiled): generation's programs run the layers through the same scan.
    model = CausalLM(tiny_model_config(vocab_size=VOCAB, scan_unroll=2), rngs=nnx.Rngs(0))
    cache = model.init_cache(batch=2, max_len=12)
    for program in (
        lambda: model.prefill(IDS, cache),
        lambda: model.extend(IDS[:, :1], cache),
        lambda: model.hidden_states(IDS),
    ):
        assert _layer_scan_unrolls(jax.make_jaxpr(program)().jaxpr, 2) == [2]


def test_cache_overflow_outside_jit_is_an_error(tiny_model_config):
    model = CausalLM(tiny_model_config(vocab_size=VOCAB), rngs=nnx.Rngs(0))
    cache = model.init_cache(batch=2, max_len=6)
    assert cache.k.shape == (2, 2, 6, 2, 8) and int(cache.index) == 0
    with pytest.raises(ValueError, match="KV cache overflow: 0 slots used \\+ 8 new > max_len 6"):
        model.extend(IDS, cache)


def test_inputs_of_the_wrong_shape_are_named(tiny_model_config):
    """No tokens failed as "block must be a positive int, got 0" (attention's block size); [T] positions
    with an IndexError inside RoPE. Each entry point now names the input and its shape."""
    model = CausalLM(tiny_model_config(vocab_size=VOCAB), rngs=nnx.Rngs(0))
    cache = model.init_cache(batch=2, max_len=12)
    b, t = IDS.shape
    calls = {
        "hidden_states": lambda ids, **kw: model.hidden_states(ids, **kw),
        "logits": lambda ids, **kw: model(ids, **kw),
        "prefill": lambda ids, **kw: model.prefill(ids, cache, **kw),
        "extend": lambda ids, **kw: model.extend(ids, cache, **kw),
    }
    for call in calls.values():
        with pytest.raises(
            ValueError, match=r"^input_ids must be \[B, T\] with T >= 1 tokens, got shape \(2, 0\)"
        ):
            call(IDS[:, :0])
        with pytest.raises(
            ValueError, match=r"^input_ids must be \[B, T\] with T >= 1 tokens, got shape \(8,\)"
        ):
            call(IDS[0])  # prefill read the cache's rows from it first ("the KV cache holds 2 rows ...")
        with pytest.raises(
            ValueError, match=rf"^positions must be \[B, T\] like input_ids \({b}, {t}\), got shape \({t},\)"
        ):
            call(IDS, positions=jnp.arange(t))
        with pytest.raises(
            ValueError, match=rf"^segment_ids must be \[B, T\] like input_ids .*got shape \(1, {t}\)"
        ):
            call(IDS, segment_ids=jnp.ones((1, t), jnp.int32))


def test_named_remat_policies_are_jax_policies_of_that_name():
    """A named `remat_policy` is JAX's checkpoint policy of the same name (`full`: none, save nothing); the
    values test above cannot tell one policy from another, as every policy gives the same numbers."""
    from nextquill_jax.models.causal_lm import remat_policy

    assert remat_policy("full") is None
    for name in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        assert remat_policy(name) is getattr(jax.checkpoint_policies, name), name


def test_cache_defaults_to_the_compute_dtype_and_may_be_filled_exactly(tiny_model_config):
    """init_cache's dtype is the compute dtype (bfloat16 here, parameters float32); a prompt of exactly
    max_len tokens, and steps that reach max_len exactly, fit (outside jit too) and fill every slot."""
    model = CausalLM(tiny_model_config(vocab_size=VOCAB, compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert model.embed[...].dtype == jnp.float32
    assert model.init_cache(batch=2, max_len=8).k.dtype == jnp.bfloat16
    for fill in (model.prefill, model.extend):
        logits, cache = fill(IDS, model.init_cache(batch=2, max_len=8))
        assert int(cache.index) == 8 and np.isfinite(np.asarray(logits)).all(), fill.__name__
        assert np.asarray(cache.segment_ids).tolist() == [[1] * 8] * 2
    _, cache = model.prefill(IDS[:, :6], model.init_cache(batch=2, max_len=8))
    logits, cache = model.extend(IDS[:, 6:], cache)
    assert int(cache.index) == 8 and np.isfinite(np.asarray(logits)).all()
    fix = r"init_cache\(batch, max_len\) with max_len >= 8 \+ the tokens to generate$"
    with pytest.raises(
        ValueError, match=r"^prompt of 8 tokens does not fit the KV cache's max_len 7\. Fix: " + fix
    ):
        model.prefill(IDS, model.init_cache(batch=2, max_len=7))


def test_extend_under_jit_gives_nan_logits_exactly_when_the_tokens_overflow(tiny_model_config):
    """Under jit the overflow cannot be refused before running: steps that reach max_len exactly give finite
    logits, one past it NaN logits (the docstring's promise, which the refusal outside jit does not cover)."""
    model = CausalLM(tiny_model_config(vocab_size=VOCAB), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, ids, cache: nnx.merge(graphdef, s).extend(ids, cache))
    logits, cache = step(state, IDS[:, :6], model.init_cache(batch=2, max_len=8))
    assert np.isfinite(np.asarray(logits)).all()
    logits, full = step(state, IDS[:, 6:], cache)
    assert np.isfinite(np.asarray(logits)).all() and int(full.index) == 8
    logits, _ = step(state, IDS[:, 6:], full)
    assert np.isnan(np.asarray(logits)).all()
