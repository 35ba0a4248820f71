"""Effect functions against float64 NumPy statements of NEXTQUILL.md's definitions (not calling the code)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextquill_jax.loss.effects import (
    dce_from_hidden,
    dce_from_logits,
    effect_stats,
    js_weights,
    model_effect,
    target_mask,
    target_weights,
    token_logprobs,
)

IGNORE = -100


def np_logprobs(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_label_logprob(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    lp = np.take_along_axis(np_logprobs(z), np.where(y == IGNORE, 0, y)[..., None], -1)[..., 0]
    return np.where(y == IGNORE, 0.0, lp)


def np_js(zw: np.ndarray, zo: np.ndarray) -> np.ndarray:
    pw, po = np.exp(np_logprobs(zw)), np.exp(np_logprobs(zo))
    m = (pw + po) / 2
    return (pw * np.log(pw / m)).sum(-1) + (po * np.log(po / m)).sum(-1)


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(11)
    zw = rng.normal(scale=2.0, size=(3, 5, 17)).astype(np.float32).astype(np.float64)
    zo = (zw + rng.normal(size=zw.shape)).astype(np.float32).astype(np.float64)
    y = rng.integers(0, 17, size=(3, 5))
    y[0, 3:] = IGNORE
    y[2] = IGNORE
    return zw, zo, y


def test_token_logprobs_and_model_effect(logits):
    zw, zo, y = logits
    got = token_logprobs(jnp.asarray(zw, jnp.bfloat16).astype(jnp.float32), jnp.asarray(y))
    want = np_label_logprob(np.asarray(jnp.asarray(zw, jnp.bfloat16).astype(jnp.float32), np.float64), y)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(got)[y == IGNORE] == 0)
    np.testing.assert_array_equal(np.asarray(target_mask(jnp.asarray(y))), y != IGNORE)
    mce = model_effect(jnp.asarray(zw, jnp.bfloat16), jnp.asarray(zo, jnp.float32))
    assert mce.dtype == jnp.float32 and mce.shape == zw.shape
    # z_h - z_∅ in float64, from the bf16-rounded with-history logits the function was given.
    zw_rounded = np.asarray(jnp.asarray(zw, jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(mce), zw_rounded - np.asarray(zo, np.float64), rtol=0, atol=1e-6)


def test_dce_from_logits_is_probability_difference_without_gradient(logits):
    zw, zo, y = logits
    want = np.exp(np_label_logprob(zw, y)) - np.exp(np_label_logprob(zo, y))
    want = np.where(y == IGNORE, 0.0, want)
    zw32, zo32 = jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32)
    np.testing.assert_allclose(np.asarray(dce_from_logits(zw32, zo32, jnp.asarray(y))), want, atol=1e-6)
    grads = jax.grad(lambda a, b: dce_from_logits(a, b, jnp.asarray(y)).sum(), argnums=(0, 1))(zw32, zo32)
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_target_weights():
    dce = np.array([[-0.3, 0.05, 0.0501, 0.7], [0.2, -1.0, 0.06, 0.0]])
    mask = np.array([[True, True, True, True], [True, False, True, False]])
    got = target_weights(jnp.asarray(dce, jnp.float32), jnp.asarray(mask), threshold=0.05, high=0.9, low=0.1)
    want = np.where(mask, np.where(dce > 0.05, 0.9, 0.1), 0.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-7)


def test_a_nan_dce_gives_a_nan_weight_at_target_slots_only():
    """NaN > δ is False: without propagation a NaN DCE (a label outside a vocabulary, under jit) would
    silently weigh ε."""
    dce = np.array([[np.nan, 0.7, np.nan, -0.2]], np.float32)
    mask = np.array([[True, True, False, True]])
    got = np.asarray(target_weights(jnp.asarray(dce), jnp.asarray(mask), threshold=0.05, high=0.9, low=0.1))
    np.testing.assert_array_equal(got, np.array([[np.nan, 0.9, 0.0, 0.1]], np.float32))


def test_dce_functions_refuse_concrete_labels_outside_the_vocabulary_and_give_nan_under_jit(logits):
    zw, zo, _ = logits
    v = zw.shape[-1]
    zw32, zo32 = jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32)
    y = np.zeros(zw.shape[:-1], np.int64)
    y[1, 2] = v
    rng = np.random.default_rng(2)
    hw, ho = (jnp.asarray(rng.normal(size=(*y.shape, 6)), jnp.float32) for _ in range(2))
    head = jnp.asarray(rng.normal(size=(v, 6)), jnp.float32)
    for bad in (v, -1):
        y[1, 2] = bad
        with pytest.raises(ValueError, match=rf"labels\[1, 2\] = {bad} is outside \[0, {v}\)"):
            dce_from_logits(zw32, zo32, jnp.asarray(y))
        with pytest.raises(ValueError, match=rf"labels\[1, 2\] = {bad} is outside \[0, {v}\)"):
            dce_from_hidden(hw, ho, head, jnp.asarray(y))
        for got in (
            jax.jit(dce_from_logits)(zw32, zo32, jnp.asarray(y)),
            jax.jit(dce_from_hidden)(hw, ho, head, jnp.asarray(y)),
        ):
            nan = np.isnan(np.asarray(got))
            assert nan[1, 2] and nan.sum() == 1
    with pytest.raises(ValueError, match=r"must both be labels shape \(3, 5\) \+ \(V,\)"):
        dce_from_logits(zw32, zo32[..., :-1], jnp.asarray(y % v))


def test_js_weights_value_and_gradient_switch(logits):
    zw, zo, y = logits
    mask = y != IGNORE
    zw32, zo32 = jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32)
    got = js_weights(zw32, zo32, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.where(mask, np_js(zw, zo), 0.0), rtol=1e-5, atol=1e-7)
    assert float(got.max()) <= 2 * np.log(2)

    coeff = np.random.default_rng(0).normal(size=y.shape)

    def weighted(a, b, detach):
        return (js_weights(a, b, jnp.asarray(mask), detach=detach) * coeff).sum()

    detached = jax.grad(weighted, argnums=(0, 1))(zw32, zo32, True)
    assert all(np.all(np.asarray(g) == 0) for g in detached)
    grads = jax.grad(weighted, argnums=(0, 1))(zw32, zo32, False)
    step = 1e-6
    for which, got_grad in enumerate(grads):
        fd = np.zeros_like(zw)
        for idx in np.ndindex(zw.shape):
            pair = [zw.copy(), zo.copy()]
            pair[which][idx] += step
            up = (np.where(mask, np_js(*pair), 0) * coeff).sum()
            pair[which][idx] -= 2 * step
            down = (np.where(mask, np_js(*pair), 0) * coeff).sum()
            fd[idx] = (up - down) / (2 * step)
        np.testing.assert_allclose(np.asarray(got_grad), fd, rtol=1e-3, atol=1e-5 * np.abs(fd).max())


def np_js_0log0(zw: np.ndarray, zo: np.ndarray) -> np.ndarray:
    """JS with 0 log 0 = 0, for streams with -inf logits (probability 0)."""
    pw, po = np.exp(np_logprobs(zw)), np.exp(np_logprobs(zo))
    log_m = np.log(np.where(pw + po > 0, (pw + po) / 2, 1.0))

    def kl(p):
        return np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - log_m), 0.0).sum(-1)

    return kl(pw) + kl(po)


def test_js_weights_with_minus_inf_logits_are_finite_with_finite_gradients(logits):
    """Masked vocabulary columns (-inf in both streams, or in one) gave NaN: 0 · (-inf − -inf). Now they add
    0 log 0 = 0, the value of the streams without the columns masked in both, and get a zero gradient."""
    zw, zo, y = logits
    mask = y != IGNORE
    both, one = [3, 11, 16], 5
    zw_inf, zo_inf = zw.copy(), zo.copy()
    zw_inf[..., both] = zo_inf[..., both] = -np.inf
    zw_inf[..., one] = -np.inf
    kept = [c for c in range(zw.shape[-1]) if c not in both]
    want = np.where(mask, np_js_0log0(zw_inf[..., kept], zo_inf[..., kept]), 0.0)
    assert np.isfinite(want).all() and want[mask].min() > 0
    args = [jnp.asarray(a, jnp.float32) for a in (zw_inf, zo_inf)]
    np.testing.assert_allclose(np.asarray(js_weights(*args, jnp.asarray(mask))), want, rtol=1e-5, atol=1e-7)

    coeff = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)

    def weighted(a, b):
        return (js_weights(a, b, jnp.asarray(mask), detach=False) * coeff).sum()

    grads = jax.grad(weighted, argnums=(0, 1))(*args)
    dropped = jax.grad(weighted, argnums=(0, 1))(*(a[..., jnp.asarray(kept)] for a in args))
    for got, reduced in zip(grads, dropped, strict=True):
        got = np.asarray(got)
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got[..., both], 0.0)
        np.testing.assert_allclose(got[..., kept], np.asarray(reduced), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(grads[0])[..., one], 0.0)


def test_js_weights_of_finite_logits_are_the_plain_formula_exactly():
    """The -inf guard changes no value or gradient of finite logits, also where a probability underflows to 0
    (logits spread over more than ~100): the plain formula, written out here, exactly eagerly and to float32
    rounding jitted."""
    rng = np.random.default_rng(4)
    zw, zo = (jnp.asarray(rng.normal(scale=40.0, size=(4, 6, 33)), jnp.float32) for _ in range(2))
    assert float((jax.nn.softmax(zw, axis=-1) == 0).mean()) > 0.1  # underflows occur
    mask = jnp.asarray(rng.random((4, 6)) > 0.2)

    def plain(a, b):  # with float32 noise below 0 cut, as js_weights does
        logp = jnp.stack([jax.nn.log_softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1)])
        log_mid = jnp.logaddexp(logp[0], logp[1]) - jnp.log(2.0)
        return jnp.where(mask, jnp.maximum((jnp.exp(logp) * (logp - log_mid)).sum(axis=(0, -1)), 0.0), 0.0)

    coeff = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    ours = jax.value_and_grad(lambda a, b: (js_weights(a, b, mask, detach=False) * coeff).sum(), (0, 1))
    theirs = jax.value_and_grad(lambda a, b: (plain(a, b) * coeff).sum(), (0, 1))
    np.testing.assert_array_equal(np.asarray(js_weights(zw, zo, mask)), np.asarray(plain(zw, zo)))
    for got, want in zip(jax.tree.leaves(ours(zw, zo)), jax.tree.leaves(theirs(zw, zo)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Jitted, XLA fuses the ignored slots' zeroing into the softmax otherwise: equal to float32 rounding.
    jitted = (jax.tree.leaves(jax.jit(f)(zw, zo)) for f in (ours, theirs))
    for got, want in zip(*jitted, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("valid", [0, 1, 2, 23])
def test_effect_stats_match_numpy(valid):
    rng = np.random.default_rng(valid)
    dce = rng.uniform(-1, 1, size=(4, 6)).astype(np.float32)
    mask = np.zeros(24, bool)
    mask[rng.permutation(24)[:valid]] = True
    mask = mask.reshape(4, 6)
    stats = {
        k: float(v) for k, v in effect_stats(jnp.asarray(dce), jnp.asarray(mask), threshold=0.05).items()
    }
    values = dce[mask].astype(np.float64)
    assert stats["effect_count"] == valid
    assert stats["pref_count"] == (values > 0.05).sum()
    np.testing.assert_allclose(stats["dce_sum"], values.sum(), atol=1e-6)
    np.testing.assert_allclose(stats["dce_sq_sum"], (values**2).sum(), rtol=1e-6, atol=1e-7)
    for key, q in (("dce_p10", 0.1), ("dce_p50", 0.5), ("dce_p90", 0.9)):
        want = np.quantile(values, q) if valid else 0.0
        np.testing.assert_allclose(stats[key], want, rtol=1e-6, atol=1e-7, err_msg=key)


def test_pref_count_counts_dce_strictly_above_the_threshold_as_the_weights_do():
    """A DCE equal to δ is not preference-bearing (DCE > δ): the count beside the weights agrees with them at
    the boundary, against the same float64 statement as `test_target_weights`."""
    dce = np.array([[0.05, 0.0499, 0.0501, -0.2], [0.05, 0.3, 0.05, 0.0501]])
    mask = np.array([[True, True, True, True], [True, False, True, True]])
    got = effect_stats(jnp.asarray(dce, jnp.float32), jnp.asarray(mask), threshold=0.05)["pref_count"]
    assert float(got) == (dce[mask] > 0.05).sum() == 2


@pytest.mark.parametrize("shape", [(0, 6), (4, 0)])
def test_effect_stats_of_an_empty_batch_are_zero(shape):
    """No slot at all: the counts, sums and quantiles are 0 as for a batch with no target token (indexing
    the empty sorted DCE raised IndexError), and so is a nextquill loss of such a batch."""
    from nextquill_jax.loss import LossConfig, loss_from_hidden, loss_from_logits

    dce, mask = jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool)
    stats = lambda d, m: effect_stats(d, m, threshold=0.05)
    for got in (stats(dce, mask), jax.jit(stats)(dce, mask)):
        assert {k: float(v) for k, v in got.items()} == dict.fromkeys(got, 0.0)
    logits = jnp.zeros((*shape, 5), jnp.float32)
    loss, aux = loss_from_logits(logits, logits, jnp.full(shape, IGNORE), LossConfig(variant="nextquill"))
    assert float(loss) == 0.0 and float(aux["tokens"]) == 0
    hidden, head = jnp.zeros((*shape, 8)), jnp.ones((5, 8))
    fused = lambda h, w: loss_from_hidden(h, h, w, jnp.full(shape, IGNORE), LossConfig(variant="nextquill"))[
        0
    ]
    loss, grads = jax.value_and_grad(fused, (0, 1))(hidden, head)
    assert float(loss) == 0.0 and all(not np.asarray(g).any() for g in grads)


def test_model_and_data_effects_refuse_streams_of_other_shapes():
    """They would broadcast into another shape silently ([2, 3, 1] against [2, 3, 5] gave [2, 3, 5])."""
    from nextquill_jax.loss.effects import data_effect

    with pytest.raises(
        ValueError, match=r"shapes differ: logits_with \(2, 3, 5\), logits_without \(2, 3, 1\)"
    ):
        model_effect(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match=r"logprob_without \(1, 3\)"):
        data_effect(jnp.zeros((2, 3)), jnp.zeros((1, 3)), jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"mask \(3,\)"):
        data_effect(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((3,), bool))


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_dce_from_hidden_matches_dense_numpy(layout):
    rng = np.random.default_rng(5)
    b, r, d, v = 2, 7, 24, 211
    hw = rng.normal(size=(b, r, d)).astype(np.float32)
    ho = (hw + 0.7 * rng.normal(size=hw.shape)).astype(np.float32)
    w = (rng.normal(size=(v, d)) * 0.4).astype(np.float32)
    y = rng.integers(0, v, size=(b, r))
    y[1, 5:] = IGNORE
    zw, zo = hw.astype(np.float64) @ w.T.astype(np.float64), ho.astype(np.float64) @ w.T.astype(np.float64)
    want = np.where(y == IGNORE, 0.0, np.exp(np_label_logprob(zw, y)) - np.exp(np_label_logprob(zo, y)))
    head = jnp.asarray(w if layout == "vd" else w.T)

    def dce(a, c):
        return dce_from_hidden(
            a, jnp.asarray(ho), c, jnp.asarray(y), head_layout=layout, token_chunk=3, vocab_chunk=50
        )

    got = dce(jnp.asarray(hw), head)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    grads = jax.grad(lambda a, c: dce(a, c).sum(), argnums=(0, 1))(jnp.asarray(hw), head)
    assert all(np.all(np.asarray(g) == 0) for g in grads)
    with pytest.raises(ValueError, match="must match"):
        dce_from_hidden(jnp.asarray(hw), jnp.asarray(ho[:1]), head, jnp.asarray(y), head_layout=layout)


def test_js_weights_of_near_equal_streams_are_never_negative():
    """JS >= 0: float32 cancellation between near-equal streams leaves about ±1e-7, whose negative part
    is cut. The float64 statement is ~1e-9 here; 52 of these 128 tokens came out below 0 uncut."""
    rng = np.random.default_rng(0)
    zw = rng.normal(scale=3.0, size=(8, 16, 50)).astype(np.float32)
    zo = zw + rng.normal(scale=1e-4, size=zw.shape).astype(np.float32)
    mask = np.ones((8, 16), bool)
    got = np.asarray(js_weights(jnp.asarray(zw), jnp.asarray(zo), jnp.asarray(mask)))
    assert got.min() >= 0.0
    np.testing.assert_allclose(got, np_js(zw.astype(np.float64), zo.astype(np.float64)), rtol=0, atol=3e-7)


def test_non_finite_logits_at_ignored_slots_change_no_value_or_gradient(logits):
    """token_logprobs and js_weights give 0 at ignored slots in value and gradient whatever the logits there:
    NaN and -inf at an ignored slot must not make the gradient of the target slots (or any) NaN. The values
    at the target slots are the float64 statements', the gradients those of the same logits with the ignored
    slots' logits finite (the ignored slots contribute nothing either way)."""
    zw, zo, y = logits
    mask = y != IGNORE
    finite = [jnp.asarray(z, jnp.float32) for z in (zw, zo)]
    broken = [np.asarray(z, np.float32).copy() for z in (zw, zo)]
    broken[0][0, 4] = np.nan  # y[0, 3:] and y[2] are ignored
    broken[1][2, 1, 5] = -np.inf
    broken = [jnp.asarray(z) for z in broken]
    labels = jnp.asarray(y)
    np.testing.assert_allclose(
        np.asarray(token_logprobs(broken[0], labels)), np_label_logprob(zw, y), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(js_weights(*broken, jnp.asarray(mask))), np.where(mask, np_js(zw, zo), 0.0), atol=1e-6
    )
    coeff = jnp.asarray(np.random.default_rng(3).normal(size=y.shape), jnp.float32)
    for loss in (
        lambda a, b: (token_logprobs(a, labels) * coeff).sum() + (token_logprobs(b, labels) * coeff).sum(),
        lambda a, b: (js_weights(a, b, jnp.asarray(mask), detach=False) * coeff).sum(),
    ):
        got = jax.grad(loss, argnums=(0, 1))(*broken)
        want = jax.grad(loss, argnums=(0, 1))(*finite)
        for g, w in zip(got, want, strict=True):
            assert np.isfinite(np.asarray(g)).all()
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)


def test_dce_from_logits_refuses_labels_of_another_shape_and_dce_from_hidden_passes_jvp(logits):
    zw, zo, y = logits
    zw32, zo32 = jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32)
    with pytest.raises(ValueError, match=r"must both be labels shape \(5,\) \+ \(V,\)"):
        dce_from_logits(zw32, zo32, jnp.asarray(np.where(y[0] == IGNORE, 0, y[0])))  # would broadcast
    # dce_from_hidden stops its inputs' gradients, so forward-mode differentiation passes with zero tangents
    rng = np.random.default_rng(6)
    hw, ho = (jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32) for _ in range(2))
    head = jnp.asarray(rng.normal(size=(17, 6)), jnp.float32)
    value, tangent = jax.jvp(
        lambda h, w: dce_from_hidden(h, ho, w, jnp.asarray(y)),
        (hw, head),
        (jnp.ones_like(hw), jnp.ones_like(head)),
    )
    zw64, zo64 = (np.asarray(h, np.float64) @ np.asarray(head, np.float64).T for h in (hw, ho))
    want = np.where(y == IGNORE, 0.0, np.exp(np_label_logprob(zw64, y)) - np.exp(np_label_logprob(zo64, y)))
    np.testing.assert_allclose(np.asarray(value), want, atol=2e-6)
    assert not np.asarray(tangent).any()


@pytest.mark.parametrize("shape", [(0, 6), (4, 0)])
def test_effect_stats_of_an_empty_batch_report_every_documented_key(shape):
    """An empty batch's statistics hold the same keys as any other's (the docstring's four sums and three
    quantiles), so its aux combines with others' and `metrics_from_aux` finds its quantiles."""
    dce, mask = jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool)
    documented = {"effect_count", "pref_count", "dce_sum", "dce_sq_sum", "dce_p10", "dce_p50", "dce_p90"}
    assert set(effect_stats(dce, mask, threshold=0.05)) == documented
