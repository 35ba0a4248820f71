"""`normalize: example` (the public code's mean of per-example means) against a float64 NumPy statement, over
rows that pack several examples: values, gradients by central differences, exact combination of micro-batch
aux and micro-batch gradients, the fused path, and its agreement with `token` for a one-example batch.

The statement (NEXTQUILL.md, the normalisation paragraph): L = (1/N) Σ_e [Σ_{t∈e} ω_t CE(z_h(t)) / Σ_{t∈e} ω_t
+ α Σ_{t∈e} CE(z_h(t) − z_∅(t)) / n_e] over the N examples e with target tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextquill_jax.loss import (
    LossConfig,
    combine_aux,
    example_count,
    loss_from_aux,
    loss_from_logits,
)
from tests.loss.test_fused_head import assert_close, fused_and_dense
from tests.loss.test_losses import np_dce, np_js, np_label_logprob
from tests.shared import IGNORE

# Two rows of 7 slots: row 0 packs examples 1 (3 tokens) and 2 (2 tokens), then 2 ignored slots; row 1 packs
# examples 1 (1 token), 2 (4 tokens) and 3 (2 tokens). Ignored slots carry id 0.
EXAMPLE_IDS = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 2, 3, 3]])


def np_example_loss(zw, zo, y, ids, variant, *, alpha=0.1, anchor=0.0, dce=None, js=None) -> float:
    """The mean over examples of each example's weighted means (`dce`, `js` given: held fixed)."""
    dce = np_dce(zw, zo, y) if dce is None else dce
    weights = {
        "nextquill": np.where(dce > 0.05, 0.9, 0.1),
        "mce": np.ones_like(dce),
        "js": np_js(zw, zo) if js is None else js,
    }[variant]
    ce_w, ce_o = -np_label_logprob(zw, y), -np_label_logprob(zo, y)
    ce_effect = -np_label_logprob(zw - zo, y)
    per_example = []
    for row in range(y.shape[0]):
        for e in np.unique(ids[row][y[row] != IGNORE]):
            t = (ids[row] == e) & (y[row] != IGNORE)
            w = weights[row][t]
            loss = (w * ce_w[row][t]).sum() / w.sum()
            if variant in ("mce", "nextquill"):
                loss += alpha * ce_effect[row][t].mean()
            per_example.append(loss + anchor * ce_o[row][t].mean())
    return float(np.mean(per_example))


def np_fd(zw, zo, y, ids, variant, step=1e-6, **kw):
    """Central differences with the DCE held at its values (js weights carry a gradient here)."""
    fixed = dict(dce=np_dce(zw, zo, y), **kw)
    grads = []
    for which in (0, 1):
        g = np.zeros_like(zw)
        for idx in np.ndindex(g.shape):
            args = [[zw.copy(), zo.copy()], [zw.copy(), zo.copy()]]
            args[0][which][idx] += step
            args[1][which][idx] -= step
            f = [np_example_loss(*a, y, ids, variant, **fixed) for a in args]
            g[idx] = (f[0] - f[1]) / (2 * step)
        grads.append(g)
    return grads


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    b, r, v = (*EXAMPLE_IDS.shape, 9)
    zw = rng.normal(scale=2.0, size=(b, r, v)).astype(np.float32).astype(np.float64)
    zo = (zw + rng.normal(scale=1.5, size=zw.shape)).astype(np.float32).astype(np.float64)
    y = rng.integers(0, v, size=(b, r))
    y[EXAMPLE_IDS == 0] = IGNORE
    rows, cols = np.nonzero(y != IGNORE)
    zw[rows[::2], cols[::2], y[rows[::2], cols[::2]]] += 3.0
    dce = np_dce(zw, zo, y)[y != IGNORE]
    assert (dce > 0.05).any() and (dce <= 0.05).any() and np.abs(dce - 0.05).min() > 1e-4
    return zw, zo, y


CASES = [
    ("nextquill", {}),
    ("mce", {"alpha": 0.01, "anchor": 0.5}),
    ("js", {"js_detach": False}),  # the gradient also flows through each example's Σω
]


def _loss(zw, zo, y, cfg, ids=EXAMPLE_IDS, **kw):
    return loss_from_logits(zw, zo, jnp.asarray(y), cfg, example_ids=jnp.asarray(ids), **kw)


@pytest.mark.parametrize(("variant", "extra"), CASES, ids=[c[0] for c in CASES])
def test_values_and_gradients_equal_the_float64_statement(data, variant, extra):
    zw, zo, y = data
    cfg = LossConfig(variant=variant, normalize="example", **extra)
    (value, aux), grads = jax.value_and_grad(lambda a, b: _loss(a, b, y, cfg), argnums=(0, 1), has_aux=True)(
        jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32)
    )
    kw = {k: v for k, v in extra.items() if k in ("alpha", "anchor")}
    assert float(value) == pytest.approx(np_example_loss(zw, zo, y, EXAMPLE_IDS, variant, **kw), rel=1e-6)
    assert float(aux["n_den"]) == 5  # examples, not tokens
    for got, want in zip(grads, np_fd(zw, zo, y, EXAMPLE_IDS, variant, **kw), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("variant", "extra"), [CASES[2]], ids=["js"])
def test_micro_batches_add_up_exactly(data, variant, extra):
    """Each row alone, normalised by the global example count: losses, gradients and aux add up to the
    whole batch's."""
    zw, zo, y = (jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else a for a in data)
    cfg = LossConfig(variant=variant, normalize="example", **extra)

    def value_and_grad(rows, denominators=None):
        f = lambda a, b: _loss(a, b, y[rows], cfg, EXAMPLE_IDS[rows], denominators=denominators)
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(zw[rows], zo[rows])

    (whole, _), whole_grads = value_and_grad(slice(0, 2))
    auxes = [value_and_grad(slice(i, i + 1))[0][1] for i in (0, 1)]
    combined = combine_aux(*auxes)
    assert float(loss_from_aux(combined, cfg)) == pytest.approx(float(whole), rel=1e-6)
    parts = [value_and_grad(slice(i, i + 1), combined) for i in (0, 1)]
    assert sum(float(p[0][0]) for p in parts) == pytest.approx(float(whole), rel=1e-6)
    for k in (0, 1):
        stacked = np.concatenate([np.asarray(p[1][k]) for p in parts])
        np.testing.assert_allclose(stacked, np.asarray(whole_grads[k]), rtol=1e-6, atol=1e-8)
    assert float(example_count(jnp.asarray(y) != IGNORE, jnp.asarray(EXAMPLE_IDS))) == 5


def test_the_fused_path_equals_the_logits_path(data):
    rng = np.random.default_rng(3)
    hw, ho = (jnp.asarray(rng.normal(size=(*EXAMPLE_IDS.shape, 16)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(scale=0.5, size=(21, 16)), jnp.float32)
    y = jnp.asarray(np.where(EXAMPLE_IDS == 0, IGNORE, rng.integers(0, 21, size=EXAMPLE_IDS.shape)))
    ids = jnp.asarray(EXAMPLE_IDS)
    cfg = LossConfig(normalize="example")
    fused, dense = fused_and_dense(hw, ho, w, y, ids, cfg=cfg, token_chunk=4, vocab_chunk=8)
    assert_close(fused, dense, grad_atol=1e-5)


def test_one_example_gives_the_token_loss_and_several_do_not(data):
    zw, zo, y = (jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else a for a in data)
    one, ids = y[1:], np.ones_like(EXAMPLE_IDS[1:])  # row 1 as a single example
    token = loss_from_logits(zw[1:], zo[1:], jnp.asarray(one), LossConfig())[0]
    example = _loss(zw[1:], zo[1:], one, LossConfig(normalize="example"), ids)[0]
    assert float(example) == pytest.approx(float(token), rel=1e-6)
    # Without ids each row is one example (the float64 statement with every target's id 1): the packed
    # batch as two examples differs from five.
    rows = loss_from_logits(zw, zo, jnp.asarray(y), LossConfig(normalize="example"))[0]
    packed = _loss(zw, zo, y, LossConfig(normalize="example"))[0]
    want = np_example_loss(*data, np.ones_like(EXAMPLE_IDS), "nextquill")
    assert float(rows) == pytest.approx(want, rel=1e-6)
    assert abs(float(rows) - float(packed)) > 1e-3
    # Ids counted from 0 (0 a real example, not padding, where the label is a target).
    from_zero = np.maximum(EXAMPLE_IDS - 1, 0)
    got = _loss(zw, zo, y, LossConfig(normalize="example"), from_zero)[0]
    assert float(got) == pytest.approx(np_example_loss(*data, EXAMPLE_IDS - 1, "nextquill"), rel=1e-6)


def test_bad_settings_are_errors(data):
    with pytest.raises(ValueError, match="normalize must be 'token' or 'example'"):
        LossConfig(normalize="row")
    zw, zo, y = (jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else a for a in data)
    with pytest.raises(ValueError, match=r"example_ids shape \(2, 6\) must equal labels shape \(2, 7\)"):
        _loss(zw, zo, y, LossConfig(normalize="example"), EXAMPLE_IDS[:, :6])


def test_example_ids_outside_0_to_r_at_target_slots_are_refused(data):
    """Ids outside [0, R] were dropped by the segment sums: dataset-wide ids 17/18/40 gave a loss of 0."""
    zw, zo, y = (jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else a for a in data)
    cfg = LossConfig(normalize="example")
    want = float(_loss(zw, zo, y, cfg)[0])
    ignored = EXAMPLE_IDS == 0
    assert float(_loss(zw, zo, y, cfg, np.where(EXAMPLE_IDS == 3, 7, EXAMPLE_IDS))[0]) == want  # R = 7 is in
    assert float(_loss(zw, zo, y, cfg, np.where(ignored, 99, EXAMPLE_IDS))[0]) == want  # ignored: any id
    for shifted, bad in (
        (EXAMPLE_IDS + 16, 17),
        (EXAMPLE_IDS - 2, -1),
        (np.where(EXAMPLE_IDS == 3, 8, EXAMPLE_IDS), 8),
    ):
        first = tuple(int(i) for i in np.argwhere(~ignored & (shifted == bad))[0])
        match = rf"example_ids\[{first[0]}, {first[1]}\] = {bad} is outside \[0, 7\]"
        with pytest.raises(ValueError, match=match):
            _loss(zw, zo, y, cfg, shifted)
        with pytest.raises(ValueError, match=match):
            example_count(jnp.asarray(y) != IGNORE, jnp.asarray(shifted))


def test_public_alpha_follows_the_variant():
    assert LossConfig(variant="mce", alpha="public").alpha == 0.01
    assert LossConfig(variant="nextquill", alpha="public").alpha == 0.1
    assert LossConfig(variant="context_sft", alpha="public").alpha == 0.1  # unused without L_p


def test_the_logged_terms_of_example_normalisation_are_means_over_examples(data):
    """metrics_from_aux's loss_n, loss_p and loss_anchor under `normalize: example` are each the mean over
    the 5 examples of that term's per-example mean (the float64 statement's pieces), not a per-token mean."""
    from nextquill_jax.loss import metrics_from_aux

    zw, zo, y = data
    cfg = LossConfig(variant="mce", alpha=0.01, anchor=0.5, normalize="example")
    _, aux = _loss(jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32), y, cfg)
    got = metrics_from_aux(aux, cfg)
    ce = {
        "loss_n": -np_label_logprob(zw, y),
        "loss_p": -np_label_logprob(zw - zo, y),
        "loss_anchor": -np_label_logprob(zo, y),
    }
    for key, per_token in ce.items():
        means = [
            per_token[row][(EXAMPLE_IDS[row] == e) & (y[row] != IGNORE)].mean()
            for row in range(y.shape[0])
            for e in np.unique(EXAMPLE_IDS[row][y[row] != IGNORE])
        ]
        assert len(means) == 5
        assert got[key] == pytest.approx(np.mean(means), rel=1e-6), key


def test_example_sums_column_k_minus_1_holds_example_slot_k():
    """example_sums' [rows, R + 1] layout: column k - 1 sums the slots whose example_slots id is k (example
    id k - 1), and slots of id 0 (ignored) are in no column; against sums written out by hand."""
    from nextquill_jax.loss.losses import example_slots, example_sums

    x = np.array([[1.0, 2.0, 4.0, 8.0], [16.0, 32.0, 64.0, 128.0]])
    mask = np.array([[True, True, False, True], [True, True, True, True]])
    ids = np.array([[0, 0, 1, 4], [2, 2, 0, 3]])
    got = np.asarray(
        example_sums(jnp.asarray(x, jnp.float32), example_slots(jnp.asarray(mask), jnp.asarray(ids)))
    )
    # Row 0: id 0 -> 1 + 2, the ignored slot (4) in no column, id 4 -> 8; row 1: id 0 -> 64,
    # id 2 -> 16 + 32, id 3 -> 128.
    want = np.array([[3.0, 0.0, 0.0, 0.0, 8.0], [64.0, 0.0, 48.0, 128.0, 0.0]])
    np.testing.assert_array_equal(got, want)
