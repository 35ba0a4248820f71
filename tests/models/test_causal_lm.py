"""CausalLM's public pieces beyond the forward: the LM head contract, remat, KV-cache limits."""

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


def test_full_remat_gives_the_same_gradients_as_none(tiny_model_config):
    grads = {}
    for policy in ("none", "full"):
        model = CausalLM(tiny_model_config(vocab_size=VOCAB, remat_policy=policy), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        loss = lambda s, graphdef=graphdef: jnp.mean(nnx.merge(graphdef, s)(IDS) ** 2)
        grads[policy] = jax.jit(jax.grad(loss))(state)
    leaves_none, leaves_full = jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["full"])
    assert len(leaves_none) == len(leaves_full) > 0
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves_none)
    for a, b in zip(leaves_none, leaves_full, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)


def test_cache_overflow_outside_jit_is_an_error(tiny_model_config):
    model = CausalLM(tiny_model_config(vocab_size=VOCAB), rngs=nnx.Rngs(0))
    cache = model.init_cache(batch=2, max_len=6)
    assert cache.k.shape == (2, 2, 6, 2, 8) and int(cache.index) == 0
    with pytest.raises(ValueError, match="KV cache overflow: 0 slots used \\+ 8 new > max_len 6"):
        model.extend(IDS, cache)
