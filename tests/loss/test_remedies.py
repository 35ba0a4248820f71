"""The counterfactual remedies (`counterfactual_grad=False`, `anchor=β`) against a float64 NumPy statement:
values, gradients by central differences, the fused path against the logits path, and exact combination.

The statement: with `counterfactual_grad=False`, L_p = CE(z_h − sg(z_∅)) (z_∅ a constant in L_p only); with
`anchor=β`, L += β · Σ CE(z_∅) / (target tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextquill_jax.loss import LossConfig, combine_aux, loss_from_aux, loss_from_logits
from tests.loss.test_fused_head import assert_close, fused_and_dense
from tests.loss.test_losses import np_dce, np_label_logprob
from tests.shared import IGNORE


def np_remedy_loss(zw, zo, y, variant, *, anchor=0.0, zo_in_alignment=None, dce=None, alpha=0.1) -> float:
    """L of `variant` (mce, nextquill or context_sft) with the remedies; `zo_in_alignment` is the z_∅ that
    L_p sees (held fixed for counterfactual_grad=False), `dce` the fixed DCE weights' source."""
    mask = (y != IGNORE).astype(np.float64)
    dce = np_dce(zw, zo, y) if dce is None else dce
    weights = np.where(dce > 0.05, 0.9, 0.1) if variant == "nextquill" else np.ones_like(mask)
    loss = (weights * -np_label_logprob(zw, y) * mask).sum() / (weights * mask).sum()
    if variant in ("mce", "nextquill"):
        z_effect = zw - (zo if zo_in_alignment is None else zo_in_alignment)
        loss += alpha * (-np_label_logprob(z_effect, y) * mask).sum() / mask.sum()
    return float(loss + anchor * (-np_label_logprob(zo, y) * mask).sum() / mask.sum())


def np_fd(zw, zo, y, variant, *, counterfactual_grad, anchor, step=1e-6):
    fixed = dict(dce=np_dce(zw, zo, y), zo_in_alignment=None if counterfactual_grad else zo.copy())
    grads = []
    for which in (0, 1):
        g = np.zeros_like(zw)
        for idx in np.ndindex(g.shape):
            args = {0: [zw.copy(), zo.copy()], 1: [zw.copy(), zo.copy()]}
            args[0][which][idx] += step
            args[1][which][idx] -= step
            f = [np_remedy_loss(*a, y, variant, anchor=anchor, **fixed) for a in args.values()]
            g[idx] = (f[0] - f[1]) / (2 * step)
        grads.append(g)
    return grads


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    b, r, v = 2, 5, 11
    zw = rng.normal(scale=2.0, size=(b, r, v)).astype(np.float32).astype(np.float64)
    zo = (zw + rng.normal(scale=1.5, size=zw.shape)).astype(np.float32).astype(np.float64)
    y = rng.integers(0, v, size=(b, r))
    y[0, 3:] = IGNORE
    rows, cols = np.nonzero(y != IGNORE)
    zw[rows[::2], cols[::2], y[rows[::2], cols[::2]]] += 3.0
    dce = np_dce(zw, zo, y)[y != IGNORE]
    assert np.abs(dce - 0.05).min() > 1e-4
    return zw, zo, y


CASES = [
    ("nextquill", False, 0.0),
    ("mce", False, 0.0),
    ("nextquill", True, 0.5),
    ("context_sft", True, 0.5),
    ("nextquill", False, 0.5),
]


@pytest.mark.parametrize(("variant", "counterfactual_grad", "anchor"), CASES)
def test_values_and_gradients_equal_the_float64_statement(data, variant, counterfactual_grad, anchor):
    zw, zo, y = data
    extra = {} if variant == "context_sft" else {"counterfactual_grad": counterfactual_grad}
    cfg = LossConfig(variant=variant, anchor=anchor, **extra)
    fn = lambda a, b: loss_from_logits(a, b, jnp.asarray(y), cfg)[0]
    value, grads = jax.value_and_grad(fn, argnums=(0, 1))(
        jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32)
    )
    want = np_remedy_loss(zw, zo, y, variant, anchor=anchor)
    assert float(value) == pytest.approx(want, rel=1e-6)
    for got, ref in zip(
        grads, np_fd(zw, zo, y, variant, counterfactual_grad=counterfactual_grad, anchor=anchor), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-6)


def test_without_counterfactual_gradient_l_p_cannot_lower_the_without_logits(data):
    zw, zo, y = data
    only_lp = LossConfig(variant="mce", alpha=1.0, counterfactual_grad=False)
    grad = jax.grad(lambda b: loss_from_logits(jnp.asarray(zw, jnp.float32), b, jnp.asarray(y), only_lp)[0])(
        jnp.asarray(zo, jnp.float32)
    )
    assert not np.any(np.asarray(grad))


@pytest.mark.parametrize(("variant", "counterfactual_grad", "anchor"), CASES)
def test_the_fused_path_equals_the_logits_path(variant, counterfactual_grad, anchor):
    rng = np.random.default_rng(2)
    hw, ho = (jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(scale=0.5, size=(21, 16)), jnp.float32)
    labels = rng.integers(0, 21, size=(2, 5))
    labels[0, 4] = IGNORE
    y = jnp.asarray(labels)
    extra = {} if variant == "context_sft" else {"counterfactual_grad": counterfactual_grad}
    cfg = LossConfig(variant=variant, anchor=anchor, **extra)
    fused, dense = fused_and_dense(hw, ho, w, y, cfg=cfg, token_chunk=4, vocab_chunk=8)
    assert_close(fused, dense, grad_atol=1e-5)


def test_the_anchor_combines_exactly_over_halves(data):
    zw, zo, y = data
    cfg = LossConfig(variant="nextquill", anchor=0.3, counterfactual_grad=False)
    args = [jnp.asarray(a, jnp.float32) for a in (zw, zo)]
    whole = loss_from_logits(*args, jnp.asarray(y), cfg)[0]
    halves = [
        loss_from_logits(args[0][i : i + 1], args[1][i : i + 1], jnp.asarray(y[i : i + 1]), cfg)[1]
        for i in (0, 1)
    ]
    assert float(loss_from_aux(combine_aux(*halves), cfg)) == pytest.approx(float(whole), rel=1e-6)


def test_bad_remedy_settings_are_errors():
    with pytest.raises(ValueError, match="counterfactual_grad=False: variant 'dce' has no alignment"):
        LossConfig(variant="dce", counterfactual_grad=False)
    with pytest.raises(ValueError, match="sft already trains the without-history stream"):
        LossConfig(variant="sft", anchor=0.1)
    with pytest.raises(ValueError, match="anchor must be >= 0"):
        LossConfig(anchor=-1.0)
