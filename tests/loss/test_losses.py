"""loss_from_logits against an independent float64 NumPy statement of NEXTQUILL.md's losses; edge cases.

The reference below is written from the specification's formulas and tables only; it does not call the code
under test. Gradients are compared with central finite differences of the reference (float64).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextquill_jax.loss import LossConfig, combine_aux, loss_from_aux, loss_from_logits, metrics_from_aux
from tests.shared import IGNORE, LOSS_CONFIG_IDS, LOSS_CONFIGS


# ----------------------------------------------------------------------------------------- NumPy reference
def np_log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_label_logprob(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.take_along_axis(np_log_softmax(z), np.where(y == IGNORE, 0, y)[..., None], -1)[..., 0]


def np_dce(zw: np.ndarray, zo: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.exp(np_label_logprob(zw, y)) - np.exp(np_label_logprob(zo, y))


def np_js(zw: np.ndarray, zo: np.ndarray) -> np.ndarray:
    pw, po = np.exp(np_log_softmax(zw)), np.exp(np_log_softmax(zo))
    m = (pw + po) / 2

    log_m = np.log(np.where(m > 0, m, 1.0))

    def kl(p):  # 0 log 0 = 0
        return np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - log_m), 0.0).sum(-1)

    return kl(pw) + kl(po)


def np_loss(
    zw,
    zo,
    y,
    variant,
    *,
    alpha=0.1,
    threshold=0.05,
    high=0.9,
    low=0.1,
    weight_alignment=False,
    dce=None,
    js=None,
) -> float:
    """L = L_n (+ α L_p), NEXTQUILL.md 'Losses' and 'Variants'. `dce` / `js` given = held fixed."""
    mask = (y != IGNORE).astype(np.float64)
    ce_w = -np_label_logprob(zw, y)
    ce_o = -np_label_logprob(zo, y)
    ce_effect = -np_label_logprob(zw - zo, y)
    dce = np_dce(zw, zo, y) if dce is None else dce
    target = np.where(dce > threshold, high, low)
    js = np_js(zw, zo) if js is None else js
    ones = np.ones_like(mask)
    w_n = {"sft": ones, "context_sft": ones, "mce": ones, "dce": target, "js": js, "nextquill": target}[
        variant
    ]
    ce_n = ce_o if variant == "sft" else ce_w
    den = (w_n * mask).sum()
    loss = (w_n * ce_n * mask).sum() / den if den > 0 else 0.0
    if variant in ("mce", "nextquill"):
        w_p = target if weight_alignment else ones
        den_p = (w_p * mask).sum()
        loss += alpha * ((w_p * ce_effect * mask).sum() / den_p if den_p > 0 else 0.0)
    return float(loss)


def np_fd_grads(zw, zo, y, variant, weight_alignment, js_detach, step=1e-6, **kw):
    """Central differences of the reference; DCE (and detached js) held at their values at (zw, zo)."""
    fixed = dict(dce=np_dce(zw, zo, y), js=np_js(zw, zo) if js_detach else None, **kw)
    grads = []
    for which in (0, 1):
        base = [zw.copy(), zo.copy()]
        g = np.zeros_like(base[which])
        for idx in np.ndindex(g.shape):
            plus = [a.copy() for a in base]
            minus = [a.copy() for a in base]
            plus[which][idx] += step
            minus[which][idx] -= step
            f_plus = np_loss(*plus, y, variant, weight_alignment=weight_alignment, **fixed)
            f_minus = np_loss(*minus, y, variant, weight_alignment=weight_alignment, **fixed)
            g[idx] = (f_plus - f_minus) / (2 * step)
        grads.append(g)
    return grads


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data():
    """Two rows of 6 target slots over V=13, some ignored; logits are float32 values held in float64."""
    rng = np.random.default_rng(7)
    b, r, v = 2, 6, 13
    zw = rng.normal(scale=2.0, size=(b, r, v)).astype(np.float32).astype(np.float64)
    zo = (zw + rng.normal(scale=1.5, size=zw.shape)).astype(np.float32).astype(np.float64)
    y = rng.integers(0, v, size=(b, r))
    y[0, 4:] = IGNORE
    y[1, 0] = IGNORE
    # Make some label tokens clearly more likely with the history, so both weights occur.
    rows, cols = np.nonzero(y != IGNORE)
    zw[rows[::2], cols[::2], y[rows[::2], cols[::2]]] += 3.0
    dce = np_dce(zw, zo, y)[y != IGNORE]
    assert (dce > 0.05).any() and (dce <= 0.05).any()
    assert np.abs(dce - 0.05).min() > 1e-4  # no float32-vs-float64 flip at the threshold
    return zw, zo, y


def cfg_of(variant, wa, det, **kw) -> LossConfig:
    return LossConfig(variant=variant, weight_alignment=wa, js_detach=det, **kw)


def jax_loss(zw, zo, y, cfg, **kw):
    return loss_from_logits(
        jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32), jnp.asarray(y), cfg, **kw
    )


def value_and_grads(zw, zo, y, cfg):
    """((loss, aux), (d/d logits_with, d/d logits_without)), run eagerly: op-by-op kernels are cached across
    configs, which is much cheaper here than compiling one program per config."""
    return jax.value_and_grad(lambda a, b: loss_from_logits(a, b, y, cfg), argnums=(0, 1), has_aux=True)(
        zw, zo
    )


def f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


# ------------------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize(("variant", "wa", "det"), LOSS_CONFIGS, ids=LOSS_CONFIG_IDS)
def test_loss_matches_numpy_reference(data, variant, wa, det):
    zw, zo, y = data
    (loss, aux), _ = value_and_grads(*f32(zw, zo), y, cfg_of(variant, wa, det))
    expected = np_loss(zw, zo, y, variant, weight_alignment=wa)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss_from_aux(aux, cfg_of(variant, wa, det))), expected, rtol=1e-6)


@pytest.mark.parametrize(("variant", "wa", "det"), LOSS_CONFIGS, ids=LOSS_CONFIG_IDS)
def test_gradients_match_finite_differences_of_reference(data, variant, wa, det):
    zw, zo, y = data
    _, grads = value_and_grads(*f32(zw, zo), y, cfg_of(variant, wa, det))
    for got, want in zip(grads, np_fd_grads(zw, zo, y, variant, wa, det), strict=True):
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * max(scale, 1e-3))
    if variant != "js" or det:  # no gradient reaches ignored slots
        assert np.all(np.asarray(grads[0])[y == IGNORE] == 0)


@pytest.mark.parametrize("variant", ["dce", "nextquill"])
def test_fixed_dce_from_reference_logits_and_values(data, variant):
    zw, zo, y = data
    rng = np.random.default_rng(3)
    ref_w = zw + rng.normal(size=zw.shape).astype(np.float32)
    ref_o = zo + rng.normal(size=zo.shape).astype(np.float32)
    ref_dce = np_dce(ref_w, ref_o, y)
    cfg = LossConfig(variant=variant, dce="fixed", threshold=float(np.median(ref_dce[y != IGNORE])) + 1e-3)
    expected = np_loss(zw, zo, y, variant, threshold=cfg.threshold, dce=ref_dce)
    assert expected != pytest.approx(np_loss(zw, zo, y, variant, threshold=cfg.threshold))
    refs = (jnp.asarray(ref_w, jnp.float32), jnp.asarray(ref_o, jnp.float32))
    loss, _ = jax_loss(zw, zo, y, cfg, reference_logits=refs)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    loss, aux = jax_loss(zw, zo, y, cfg, reference_dce=jnp.asarray(ref_dce, jnp.float32))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(aux["dce_sum"]), ref_dce[y != IGNORE].sum(), rtol=1e-5)
    if variant == "dce":  # the without stream is optional once the DCE is fixed
        loss, _ = loss_from_logits(
            jnp.asarray(zw, jnp.float32),
            None,
            jnp.asarray(y),
            cfg,
            reference_dce=jnp.asarray(ref_dce, jnp.float32),
        )
        np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_fixed_dce_refuses_a_reference_of_another_vocabulary_and_a_nan_dce_makes_the_loss_nan(data):
    """A reference with a smaller vocabulary than the labels need gave NaN DCE that silently weighed ε."""
    zw, zo, y = data
    zw32, zo32, yj = jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32), jnp.asarray(y)
    cfg = LossConfig(variant="dce", dce="fixed")
    for refs in ((zw32[..., :-1], zo32[..., :-1]), (zw32, zo32[..., :-1])):
        with pytest.raises(
            ValueError,
            match=r"reference_logits\[\d\] shape \(2, 6, 12\) and logits_with shape \(2, 6, 13\) differ",
        ):
            loss_from_logits(zw32, zo32, yj, cfg, reference_logits=refs)
    dce = np_dce(zw, zo, y)
    rows, cols = np.nonzero(y != IGNORE)
    dce[rows[0], cols[0]] = np.nan  # what a reference vocabulary without that label gives under jit
    for variant in ("dce", "nextquill"):
        loss, aux = loss_from_logits(
            zw32, zo32, yj, LossConfig(variant=variant, dce="fixed"), reference_dce=jnp.asarray(dce)
        )
        assert np.isnan(float(loss)) and np.isnan(float(aux["n_sum"])), variant


def test_streams_of_different_vocabularies_are_refused(data):
    """logits_without with V = 1 broadcast silently against logits_with (only shape[:-1] was checked)."""
    zw, zo, y = data
    zw32, zo32 = jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32)
    for v in (1, 12):
        with pytest.raises(
            ValueError, match=rf"logits_without shape \(2, 6, {v}\) and logits_with shape \(2, 6, 13"
        ):
            loss_from_logits(zw32, zo32[..., :v], jnp.asarray(y % v), LossConfig())


def test_sft_uses_only_the_without_stream(data):
    zw, zo, y = data
    full, _ = jax_loss(zw, zo, y, LossConfig(variant="sft"))
    alone, aux = loss_from_logits(
        None, jnp.asarray(zo, jnp.float32), jnp.asarray(y), LossConfig(variant="sft")
    )
    mask = y != IGNORE
    np.testing.assert_allclose(float(alone), -np_label_logprob(zo, y)[mask].mean(), rtol=1e-6)
    assert float(full) == pytest.approx(float(alone), rel=1e-7)
    assert "effect_count" not in aux and "ce_with_sum" not in aux


# ---------------------------------------------------------------------------------------------- aux, metrics
def test_metrics_from_aux_match_numpy(data):
    zw, zo, y = data
    cfg = LossConfig(variant="nextquill", weight_alignment=True)
    _, aux = jax_loss(zw, zo, y, cfg)
    m = metrics_from_aux(aux, cfg)
    mask = y != IGNORE
    dce = np_dce(zw, zo, y)[mask]
    target = np.where(dce > cfg.threshold, cfg.high, cfg.low)
    ce_w = -np_label_logprob(zw, y)[mask]
    ce_o = -np_label_logprob(zo, y)[mask]
    ce_e = -np_label_logprob(zw - zo, y)[mask]
    want = {
        "loss": np_loss(zw, zo, y, "nextquill", weight_alignment=True),
        "loss_n": (target * ce_w).sum() / target.sum(),
        "loss_p": (target * ce_e).sum() / target.sum(),
        "tokens": mask.sum(),
        "ce_with": ce_w.mean(),
        "ce_without": ce_o.mean(),
        "pref_fraction": (dce > cfg.threshold).mean(),
        "dce_mean": dce.mean(),
        "dce_std": dce.std(),
        "dce_p10": np.quantile(dce, 0.1),
        "dce_p50": np.quantile(dce, 0.5),
        "dce_p90": np.quantile(dce, 0.9),
    }
    assert set(m) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    # A count: int32 on the device (exact when summed over an evaluation split past 2**24), an int here.
    assert aux["tokens"].dtype == jnp.int32 and type(m["tokens"]) is int


def test_combine_aux_adds_sums_and_weights_quantiles(data):
    zw, zo, y = data
    cfg = LossConfig()
    auxes = [jax_loss(zw[i : i + 1], zo[i : i + 1], y[i : i + 1], cfg)[1] for i in range(2)]
    _, whole = jax_loss(zw, zo, y, cfg)
    combined = combine_aux(*auxes)
    assert list(combined) == list(whole)
    for k in ("n_sum", "n_den", "p_sum", "p_den", "tokens", "effect_count", "pref_count", "dce_sum"):
        np.testing.assert_allclose(float(combined[k]), float(whole[k]), rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(
        float(loss_from_aux(combined, cfg)), np_loss(zw, zo, y, "nextquill"), rtol=1e-6
    )
    counts = [float(a["effect_count"]) for a in auxes]
    want_p50 = sum(float(a["dce_p50"]) * c for a, c in zip(auxes, counts, strict=True)) / sum(counts)
    np.testing.assert_allclose(float(combined["dce_p50"]), want_p50, rtol=1e-6)
    _, sft_aux = jax_loss(zw, zo, y, LossConfig(variant="sft"))
    del sft_aux["ce_with_sum"]
    with pytest.raises(ValueError, match="same loss config"):
        combine_aux(whole, sft_aux)


@pytest.mark.parametrize("wrap", [list, tuple])
def test_combine_aux_refuses_one_list_of_aux_dicts_with_the_call_that_works(data, wrap):
    # Once a bare "unhashable type: 'dict'" from inside a comprehension: the message now gives the call.
    zw, zo, y = data
    auxes = [jax_loss(zw[i : i + 1], zo[i : i + 1], y[i : i + 1], LossConfig())[1] for i in range(2)]
    with pytest.raises(TypeError, match=r"argument 0 is a \w+, not an aux dict.*combine_aux\(\*auxes\)"):
        combine_aux(wrap(auxes))


# --------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize(("variant", "wa", "det"), LOSS_CONFIGS, ids=LOSS_CONFIG_IDS)
def test_no_target_tokens_gives_zero_loss_and_zero_gradient(data, variant, wa, det):
    zw, zo, y = data
    empty = np.full_like(y, IGNORE)
    cfg = cfg_of(variant, wa, det)
    (loss, aux), grads = value_and_grads(*f32(zw, zo), empty, cfg)
    assert float(loss) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in grads)
    assert all(np.isfinite(float(v)) for v in aux.values())
    assert all(np.isfinite(v) for v in metrics_from_aux(aux, cfg).values())


def test_all_dce_below_threshold_gives_plain_mean_ce(data):
    zw, zo, y = data
    mask = y != IGNORE
    mean_ce = -np_label_logprob(zw, y)[mask].mean()
    assert np_dce(zw, zo, y)[mask].max() < 0.99  # (a threshold >= 1, which no DCE exceeds, is refused)
    for cfg in (
        LossConfig(variant="dce", threshold=0.99),
        LossConfig(variant="nextquill", alpha=0.0, threshold=0.99),
    ):
        loss, aux = jax_loss(zw, zo, y, cfg)
        np.testing.assert_allclose(float(loss), mean_ce, rtol=1e-6)
        np.testing.assert_allclose(float(aux["n_den"]), cfg.low * mask.sum(), rtol=1e-6)
        assert float(aux["pref_count"]) == 0


@pytest.mark.parametrize(("variant", "wa", "det"), LOSS_CONFIGS, ids=LOSS_CONFIG_IDS)
def test_bfloat16_inputs_are_computed_in_float32(data, variant, wa, det):
    zw, zo, y = data
    cfg = cfg_of(variant, wa, det)
    zw16, zo16 = jnp.asarray(zw, jnp.bfloat16), jnp.asarray(zo, jnp.bfloat16)
    (loss, _), grads = value_and_grads(zw16, zo16, y, cfg)
    assert loss.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads)
    upcast = [np.asarray(z.astype(jnp.float32), np.float64) for z in (zw16, zo16)]
    np.testing.assert_allclose(float(loss), np_loss(*upcast, y, variant, weight_alignment=wa), rtol=1e-6)


@pytest.mark.parametrize(("variant", "wa", "det"), LOSS_CONFIGS, ids=LOSS_CONFIG_IDS)
def test_huge_logits_do_not_overflow(data, variant, wa, det):
    zw, zo, y = data
    big_w, big_o = (
        (zw * 1e4).astype(np.float32).astype(np.float64),
        (zo * 1e4).astype(np.float32).astype(np.float64),
    )
    cfg = cfg_of(variant, wa, det)
    (loss, aux), grads = value_and_grads(*f32(big_w, big_o), y, cfg)
    np.testing.assert_allclose(float(loss), np_loss(big_w, big_o, y, variant, weight_alignment=wa), rtol=1e-6)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert all(np.isfinite(float(v)) for v in aux.values())


@pytest.mark.parametrize(("variant", "wa", "det"), LOSS_CONFIGS, ids=LOSS_CONFIG_IDS)
def test_an_example_of_only_ignored_labels_changes_nothing(data, variant, wa, det):
    zw, zo, y = data
    cfg = cfg_of(variant, wa, det)
    padded_y = np.concatenate([y, np.full_like(y[:1], IGNORE)])
    padded_w = np.concatenate([zw, zw[:1] * 3.0])
    padded_o = np.concatenate([zo, zo[:1] - 1.0])
    (loss, _), grads = value_and_grads(*f32(padded_w, padded_o), padded_y, cfg)
    np.testing.assert_allclose(float(loss), np_loss(zw, zo, y, variant, weight_alignment=wa), rtol=1e-6)
    assert all(np.all(np.asarray(g)[-1] == 0) for g in grads)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(variant="dpo"), "unknown variant"),
        (dict(alpha=-0.1), "alpha must be >= 0"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        *[
            (dict(threshold=bad), rf"threshold must be in \[-1, 1\), got {bad}: DCE is a probability .* Fix")
            for bad in (1.0, 2.0, -1.5)
        ],
        (dict(high=0.1, low=0.9), r"high \(0.1\) < LossConfig.low"),
        (dict(low=-0.1), "low >= 0"),
        (dict(dce="frozen"), "'dynamic' or 'fixed'"),
        (dict(variant="dce", weight_alignment=True), "no alignment term"),
        (dict(variant="nextquill", js_detach=False), "only applies to variant 'js'"),
        (dict(weight_alignment=1), "must be a bool"),
        *[
            (dict(variant=v, dce="fixed"), f"variant '{v}' does not weight tokens by DCE.*set dce='dynamic'")
            for v in ("sft", "context_sft", "mce", "js")
        ],
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_numpy_scalars_are_stored_as_python_numbers():
    """`LossConfig(alpha=np.float32(0.2))` was refused as "must be a finite number": a NumPy scalar (an
    element of an array of settings) is kept as the Python number of its value, so the config equals, hashes
    and prints as one built from Python numbers, and NumPy's own NaN is still refused."""
    cfg = LossConfig(
        alpha=np.float32(0.2),
        threshold=np.float64(0.1),
        high=np.int64(1),
        low=np.float16(0.5),
        anchor=np.int8(0),
    )
    python = LossConfig(alpha=float(np.float32(0.2)), threshold=0.1, high=1, low=0.5, anchor=0)
    fields = ("alpha", "threshold", "high", "low", "anchor")
    assert [type(getattr(cfg, k)) for k in fields] == [float, float, int, float, int]
    assert cfg == python and hash(cfg) == hash(python) and repr(cfg) == repr(python)
    with pytest.raises(
        ValueError, match=r"alpha must be a finite number \(a Python int or float, or a NumPy"
    ):
        LossConfig(alpha=np.float32("nan"))
    with pytest.raises(ValueError, match=r"threshold must be a finite number .*got array\(0.1\)"):
        LossConfig(threshold=np.array(0.1))


@pytest.mark.parametrize(
    "kwargs", [dict(variant="dce"), dict(variant="nextquill"), dict(variant="mce", weight_alignment=True)]
)
def test_a_fixed_dce_is_accepted_where_the_loss_weights_tokens_by_it(kwargs):
    assert LossConfig(dce="fixed", **kwargs).uses_target_weights


def test_missing_or_unused_sources_raise(data):
    zw, zo, y = data
    zw32, zo32, yj = jnp.asarray(zw, jnp.float32), jnp.asarray(zo, jnp.float32), jnp.asarray(y)
    with pytest.raises(ValueError, match="needs logits_without"):
        loss_from_logits(zw32, None, yj, LossConfig(variant="nextquill"))
    with pytest.raises(ValueError, match="needs logits_with"):
        loss_from_logits(None, zo32, yj, LossConfig(variant="context_sft"))
    with pytest.raises(ValueError, match="dce='fixed' needs reference_dce"):
        loss_from_logits(zw32, zo32, yj, LossConfig(dce="fixed"))
    with pytest.raises(ValueError, match="set dce='fixed'"):
        loss_from_logits(zw32, zo32, yj, LossConfig(), reference_dce=jnp.zeros(y.shape))
    with pytest.raises(ValueError, match="must be labels shape"):
        loss_from_logits(zw32[:, :-1], zo32, yj, LossConfig())
    bad = y.copy()
    bad[1, 2] = 13
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 13 is outside \[0, 13\)"):
        loss_from_logits(zw32, zo32, jnp.asarray(bad), LossConfig())
    _, aux = loss_from_logits(zw32, zo32, yj, LossConfig())
    with pytest.raises(ValueError, match=r"denominators lacks \['n_sum'\]"):
        loss_from_logits(
            zw32, zo32, yj, LossConfig(variant="js", js_detach=False), denominators={"n_den": 1.0}
        )
    with pytest.raises(ValueError, match=r"denominators lacks \['p_den'\]"):
        loss_from_logits(zw32, zo32, yj, LossConfig(), denominators={"n_den": aux["n_den"]})


def test_metrics_from_an_aux_without_its_keys_name_them_and_where_an_aux_comes_from(data):
    """metrics_from_aux of a hand-made aux failed with a bare KeyError: 'tokens'; it names the missing keys
    (each term's denominator, the DCE statistics with effect_count) and the functions whose aux it takes."""
    zw, zo, y = data
    _, aux = loss_from_logits(*(jnp.asarray(z, jnp.float32) for z in (zw, zo)), jnp.asarray(y), LossConfig())
    source = "metrics_from_aux takes the aux that loss_from_logits or loss_from_hidden returns .* combine_aux"
    for cfg, partial, missing in (
        (LossConfig(variant="context_sft"), {"n_sum": 1.0, "n_den": 2.0}, ["tokens"]),
        (LossConfig(), {k: v for k, v in aux.items() if k != "p_den"}, ["p_den"]),
        (
            LossConfig(),
            {k: v for k, v in aux.items() if k not in ("dce_sum", "dce_p50")},
            ["dce_sum", "dce_p50"],
        ),
    ):
        with pytest.raises(ValueError, match=rf"aux lacks {re.escape(str(missing))} \(it has .*\): {source}"):
            metrics_from_aux(partial, cfg)
    assert metrics_from_aux(aux, LossConfig())["tokens"] == int(aux["tokens"])


def test_the_loss_package_exports_the_ignore_index_of_the_data():
    """Labels mark slots outside the loss with IGNORE_INDEX; a caller of the loss API imports it from
    nextquill_jax.loss (it lived only in data.batch), the same constant, not a copy."""
    import nextquill_jax.loss as loss
    from nextquill_jax.data.batch import IGNORE_INDEX

    assert "IGNORE_INDEX" in loss.__all__ and loss.IGNORE_INDEX is IGNORE_INDEX == IGNORE == -100
    assert all(hasattr(loss, name) for name in loss.__all__)


def test_js_weights_of_near_equal_streams_are_never_negative_and_the_loss_stays_a_weighted_ce():
    """Streams 1e-5 apart: float32 cancellation leaves JS at about ±1e-8. Here two of the three tokens' raw
    JS are negative and their sum is below 0, so the loss, Σ ω CE / Σ ω with its denominator replaced by 1
    where not positive, collapsed to ~1e-7. Cut at 0, the weights leave the one positive token: the loss is
    its cross-entropy."""
    from nextquill_jax.loss.effects import js_weights

    rng = np.random.default_rng(3)
    zw = jnp.asarray(rng.normal(size=(1, 3, 50)) * 3, jnp.float32)
    zo = zw + jnp.asarray(rng.normal(size=zw.shape) * 1e-5, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 50, (1, 3)))
    logp = jnp.stack([jax.nn.log_softmax(zw, axis=-1), jax.nn.log_softmax(zo, axis=-1)])
    log_mid = jnp.logaddexp(logp[0], logp[1]) - jnp.log(2.0)
    raw = np.asarray((jnp.exp(logp) * (logp - log_mid)).sum(axis=(0, -1)))[0]  # the formula, uncut
    assert raw.sum() < 0 and (raw > 0).tolist() == [False, True, False], raw
    weights = np.asarray(js_weights(zw, zo, labels >= 0))[0]
    assert weights[0] == weights[2] == 0.0 and weights[1] == raw[1]
    z = np.asarray(zw, np.float64)[0, 1]
    ce = np.log(np.exp(z - z.max()).sum()) + z.max() - z[int(labels[0, 1])]  # float64, token 1
    for cfg in (LossConfig(variant="js"), LossConfig(variant="js", js_detach=False)):
        assert float(loss_from_logits(zw, zo, labels, cfg)[0]) == pytest.approx(ce, rel=1e-6)


@pytest.mark.parametrize("bad", [-np.inf, np.nan])
@pytest.mark.parametrize("variant", ["context_sft", "nextquill", "js"])
def test_a_non_finite_logit_at_an_ignored_slot_leaves_the_gradient_finite(variant, bad):
    """An additive -inf (or NaN) at an ignored slot was left out of the loss but not out of its gradient,
    which was NaN there and, through the model, everywhere."""
    rng = np.random.default_rng(1)
    zw, zo = (jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32) for _ in range(2))
    labels = jnp.asarray([[1, IGNORE, 3, 0, IGNORE], [IGNORE, 2, 2, 6, 4]])
    cfg = LossConfig(variant=variant, **({"js_detach": False} if variant == "js" else {}))
    loss = lambda a, b: loss_from_logits(a, b, labels, cfg)[0]
    ignored = (labels == IGNORE)[..., None]
    spoilt = lambda z: jnp.where(ignored, bad, z)  # the logits as the model hands them over
    got = jax.value_and_grad(loss, (0, 1))(spoilt(zw), spoilt(zo))
    want = jax.value_and_grad(loss, (0, 1))(zw, zo)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):  # 0 at ignored slots, as with finite logits there
        np.testing.assert_allclose(g, np.where(ignored, 0.0, w), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_normalize_example_of_a_batch_without_slots_is_zero(fused):
    """R = 0 under `normalize: example` raised ZeroDivisionError (a reshape to [-1, 0]); `token` gave 0."""
    from nextquill_jax.loss import loss_from_hidden

    cfg = LossConfig(normalize="example")
    labels = jnp.zeros((2, 0), jnp.int32)
    if fused:
        hidden, head = jnp.zeros((2, 0, 4)), jnp.ones((7, 4))
        loss = loss_from_hidden(hidden, hidden, head, labels, cfg)[0]
    else:
        loss = loss_from_logits(jnp.zeros((2, 0, 7)), jnp.zeros((2, 0, 7)), labels, cfg)[0]
    assert float(loss) == 0.0


def test_variant_losses_take_each_variants_stream_weights_and_alpha():
    """variant_losses from hand-set terms: sft is the without-history CE, context_sft the with-history CE,
    mce that plus α L_p, dce L_n, nextquill L_n + α L_p (NEXTQUILL.md, "Variants"); js is not derivable."""
    from nextquill_jax.loss.losses import variant_losses

    terms = {"ce_with": 2.0, "ce_without": 3.0, "loss_n": 1.5, "loss_p": 4.0}
    got = variant_losses(terms, alpha=0.25)
    assert got == pytest.approx(
        {"sft": 3.0, "context_sft": 2.0, "mce": 2.0 + 0.25 * 4.0, "dce": 1.5, "nextquill": 1.5 + 0.25 * 4.0},
        rel=1e-12,
    )


def test_loss_from_aux_of_an_aux_without_the_anchor_terms_names_them(data):
    """An aux made without the anchor, read under an anchored config, is refused with the keys it lacks (a
    ValueError naming them, not a bare KeyError)."""
    zw, zo, y = data
    _, aux = jax_loss(zw, zo, y, LossConfig())
    with pytest.raises(ValueError, match=r"aux lacks \['a_sum', 'a_den'\] needed by variant 'nextquill'"):
        loss_from_aux(aux, LossConfig(anchor=0.5))


def test_given_denominators_are_constants_of_the_gradient(data):
    """`denominators` are "treated as constants": a loss divided by a traced global Σω d has value
    n_sum / d + α p_sum / d (float64 here), yet no gradient with respect to d, which would otherwise add
    −(n_sum + α p_sum) / d² to it."""
    zw, zo, y = data
    cfg = LossConfig()
    _, aux = jax_loss(zw, zo, y, cfg)
    value, grad = jax.value_and_grad(
        lambda d: jax_loss(zw, zo, y, cfg, denominators={"n_den": d, "p_den": d})[0]
    )(jnp.float32(7.0))
    sums = float(aux["n_sum"]) + cfg.alpha * float(aux["p_sum"])
    assert float(value) == pytest.approx(sums / 7.0, rel=1e-6)
    assert float(grad) == 0.0


def test_config_bounds_accept_their_closed_ends_and_refuse_the_open_ones():
    """The documented ranges at their ends: δ in [-1, 1) takes -1, λ >= ε takes λ = ε, ε >= 0 takes 0,
    α >= 0 takes 0; λ > 0 refuses 0 (with ε = 0 every weight would be 0), and a bool is no number."""
    LossConfig(threshold=-1.0)
    LossConfig(high=0.5, low=0.5)
    LossConfig(low=0.0)
    LossConfig(alpha=0.0)
    with pytest.raises(ValueError, match=r"low >= 0 and high > 0, got high=0.0, low=0.0"):
        LossConfig(high=0.0, low=0.0)
    with pytest.raises(ValueError, match=r"LossConfig.alpha must be a finite number .*got True"):
        LossConfig(alpha=True)


def test_both_reference_logits_and_reference_dce_are_refused(data):
    """Two fixed-DCE sources at once would leave one silently unused: refused, naming both."""
    zw, zo, y = data
    zw32, zo32 = f32(zw, zo)
    with pytest.raises(ValueError, match="pass reference_logits or reference_dce, not both"):
        loss_from_logits(
            zw32,
            zo32,
            jnp.asarray(y),
            LossConfig(dce="fixed"),
            reference_logits=(zw32, zo32),
            reference_dce=jnp.zeros(y.shape),
        )


def test_combined_quantiles_of_parts_without_target_tokens_are_zero(data):
    """combine_aux weights the quantiles by effect_count; parts without any target token (count 0) give the
    quantiles 0, as `effect_stats` does for one such part, not 0 / 0 = NaN."""
    zw, zo, y = data
    empty = np.full_like(y, IGNORE)
    auxes = [jax_loss(zw[i : i + 1], zo[i : i + 1], empty[i : i + 1], LossConfig())[1] for i in range(2)]
    combined = combine_aux(*auxes)
    assert float(combined["effect_count"]) == 0.0
    for key in ("dce_p10", "dce_p50", "dce_p90"):
        assert float(combined[key]) == 0.0, key
