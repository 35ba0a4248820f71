"""loss_from_hidden (tiled LM head, custom VJP) against loss_from_logits on dense logits, plus accumulation.

loss_from_logits is itself checked against a float64 NumPy reference in test_losses.py; here the dense path is
`loss_from_logits(hidden @ Wᵀ, ...)`, the fused path never forms those logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextquill_jax.loss import LossConfig, combine_aux, loss_from_aux, loss_from_hidden, loss_from_logits
from nextquill_jax.loss.fused_head import OPERAND_DTYPES, head_token_stats
from tests.loss.test_losses import np_log_softmax
from tests.shared import IGNORE, LOSS_CONFIG_IDS, LOSS_CONFIGS

# The test programs are tiny: LLVM optimisation would only add compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fused_value_and_grads(
    hw, ho, w, y, cfg, layout, token_chunk, vocab_chunk, denominators=None, operand_dtype="float32",
    example_ids=None,
):  # fmt: skip
    """((loss, aux), (d hw, d ho, d W)) of loss_from_hidden."""

    def loss(a, b, c):
        return loss_from_hidden(
            a,
            b,
            c,
            y,
            cfg,
            head_layout=layout,
            token_chunk=token_chunk,
            vocab_chunk=vocab_chunk,
            denominators=denominators,
            operand_dtype=operand_dtype,
            example_ids=example_ids,
        )

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(hw, ho, w)


def dense_value_and_grads(hw, ho, w, y, cfg, layout, example_ids=None):
    """The same from dense logits hidden @ Wᵀ through loss_from_logits."""

    def loss(a, b, c):
        c_vd = c if layout == "vd" else c.T
        return loss_from_logits(a @ c_vd.T, b @ c_vd.T, y, cfg, example_ids=example_ids)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(hw, ho, w)


@functools.partial(
    jax.jit, static_argnames=("cfg", "layout", "token_chunk", "vocab_chunk"), compiler_options=FAST_COMPILE
)
def fused_and_dense(hw, ho, w, y, example_ids=None, *, cfg, layout="vd", token_chunk=5, vocab_chunk=64):
    """Both paths in one program: one compilation per config, layout and tiling."""
    fused = fused_value_and_grads(
        hw, ho, w, y, cfg, layout, token_chunk, vocab_chunk, example_ids=example_ids
    )
    return fused, dense_value_and_grads(hw, ho, w, y, cfg, layout, example_ids)


@functools.partial(jax.jit, static_argnames=("cfg",), compiler_options=FAST_COMPILE)
def fused_only(hw, ho, w, y, denominators=None, *, cfg):
    return fused_value_and_grads(hw, ho, w, y, cfg, "vd", 5, 40, denominators)


@pytest.fixture(scope="module")
def data():
    """B=3 rows (row 1 wholly ignored), R=11 slots, D=32, V=301 (no chunk size below divides it)."""
    rng = np.random.default_rng(1)
    b, r, d, v = 3, 11, 32, 301
    hw = rng.normal(size=(b, r, d)).astype(np.float32)
    ho = (hw + 0.6 * rng.normal(size=hw.shape)).astype(np.float32)
    w = (0.35 * rng.normal(size=(v, d))).astype(np.float32)
    y = rng.integers(0, v, size=(b, r)).astype(np.int32)
    y[0, 7:] = IGNORE
    y[1] = IGNORE
    return jnp.asarray(hw), jnp.asarray(ho), jnp.asarray(w), jnp.asarray(y)


def assert_close(
    fused, dense, loss_rtol=1e-5, grad_rtol=1e-4, grad_atol=1e-6, names=("hidden_with", "hidden_without", "W")
):
    """Loss and aux to loss_rtol; gradients elementwise to grad_rtol, plus grad_atol × their largest entry."""
    (loss_f, aux_f), grads_f = fused
    (loss_d, aux_d), grads_d = dense
    np.testing.assert_allclose(float(loss_f), float(loss_d), rtol=loss_rtol)
    assert list(aux_f) == list(aux_d)
    for k in aux_d:
        np.testing.assert_allclose(float(aux_f[k]), float(aux_d[k]), rtol=loss_rtol, atol=1e-6, err_msg=k)
    for name, gf, gd in zip(names, grads_f, grads_d, strict=True):
        gd = np.asarray(gd)
        atol = grad_atol * np.abs(gd).max()
        np.testing.assert_allclose(np.asarray(gf), gd, rtol=grad_rtol, atol=atol, err_msg=name)


def cfg_of(variant, wa, det, **kw):
    return LossConfig(variant=variant, weight_alignment=wa, js_detach=det, **kw)


@pytest.mark.parametrize(("variant", "wa", "det"), LOSS_CONFIGS, ids=LOSS_CONFIG_IDS)
def test_fused_equals_dense_tied_head_uneven_chunks(data, variant, wa, det):
    hw, ho, w, y = data
    cfg = cfg_of(variant, wa, det, threshold=0.0)  # DCE straddles 0 here, so both weights occur
    fused, dense = fused_and_dense(hw, ho, w, y, cfg=cfg)
    assert 0 < float(fused[0][1]["pref_count"]) < float(fused[0][1]["tokens"])
    assert_close(fused, dense)
    assert all(np.all(np.asarray(g)[1] == 0) for g in fused[1][:2])  # the wholly ignored row


@pytest.mark.parametrize(
    ("variant", "det", "token_chunk", "vocab_chunk"),
    [
        (
            "nextquill",
            True,
            4,
            100,
        ),  # 301 = 3 × 100 + 1: the last block overlaps the one before by 99 columns
        ("js", False, 4, 100),
        ("sft", True, 10_000, 10_000),  # one tile holds everything
    ],
)
def test_fused_equals_dense_untied_head(data, variant, det, token_chunk, vocab_chunk):
    hw, ho, w, y = data
    cfg = cfg_of(variant, False, det, threshold=0.0)
    w_dv = w.T  # untied kernel [D, V]
    assert_close(
        *fused_and_dense(
            hw, ho, w_dv, y, cfg=cfg, layout="dv", token_chunk=token_chunk, vocab_chunk=vocab_chunk
        )
    )


def test_fused_edge_cases(data):
    hw, ho, w, y = data
    cfg = LossConfig(threshold=0.0)  # the nextquill config of the tied test: its program is reused
    # no target token at all: loss 0, zero gradient, finite aux
    ((loss, aux), grads), _ = fused_and_dense(hw, ho, w, jnp.full_like(y, IGNORE), cfg=cfg)
    assert float(loss) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads)
    assert all(np.isfinite(float(v)) for v in aux.values())
    # logits of order 1e3-1e4: no overflow, still equal to the dense path (gradients to 1e-5 of their scale)
    fused, dense = fused_and_dense(hw * 300.0, ho * 300.0, w, y, cfg=cfg)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in fused[1])
    assert_close(fused, dense, grad_rtol=1e-4, grad_atol=1e-5)
    # bf16 inputs: computed in float32, gradients come back in bf16
    h16, o16, w16 = (a.astype(jnp.bfloat16) for a in (hw, ho, w))
    ((loss16, _), grads16), _ = fused_and_dense(h16, o16, w16, y, cfg=cfg)
    ((loss32, _), _), _ = fused_and_dense(*(a.astype(jnp.float32) for a in (h16, o16, w16)), y, cfg=cfg)
    assert loss16.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads16)
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=1e-6)
    # a label outside [0, V) cannot pass unnoticed under jit: the loss is NaN on both paths
    bad = y.at[0, 0].set(w.shape[0])
    (fused_bad, _), (dense_bad, _) = (out[0] for out in fused_and_dense(hw, ho, w, bad, cfg=cfg))
    assert np.isnan(float(fused_bad)) and np.isnan(float(dense_bad))


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def fixed_dce_fused_and_dense(hw, w, y, reference_dce):
    """Variant dce with a fixed DCE needs no without-history stream: loss and grads of both paths."""
    cfg = LossConfig(variant="dce", dce="fixed")

    def fused(a, c):
        return loss_from_hidden(
            a, None, c, y, cfg, reference_dce=reference_dce, token_chunk=5, vocab_chunk=64
        )

    def dense(a, c):
        return loss_from_logits(a @ c.T, None, y, cfg, reference_dce=reference_dce)

    return [jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hw, w) for f in (fused, dense)]


def test_fused_fixed_dce_without_the_second_stream(data):
    hw, _, w, y = data
    reference_dce = jnp.asarray(np.random.default_rng(9).uniform(-0.3, 0.3, size=y.shape), jnp.float32)
    fused, dense = fixed_dce_fused_and_dense(hw, w, y, reference_dce)
    assert 0 < float(fused[0][1]["pref_count"]) < float(fused[0][1]["tokens"])
    assert_close(fused, dense, names=("hidden_with", "W"))


@pytest.mark.parametrize(("variant", "det"), [("nextquill", True), ("js", False)])
def test_four_micro_batches_combine_to_the_global_batch(variant, det):
    rng = np.random.default_rng(4)
    b, r, d, v = 8, 6, 16, 97
    hw = jnp.asarray(rng.normal(size=(b, r, d)), jnp.float32)
    ho = hw + jnp.asarray(0.6 * rng.normal(size=(b, r, d)), jnp.float32)
    w = jnp.asarray(0.4 * rng.normal(size=(v, d)), jnp.float32)
    y = rng.integers(0, v, size=(b, r)).astype(np.int32)
    y[3] = IGNORE
    y[5, 2:] = IGNORE
    y = jnp.asarray(y)
    cfg = LossConfig(variant=variant, js_detach=det, threshold=0.0)
    (loss, aux), grads = fused_only(hw, ho, w, y, cfg=cfg)

    parts = [slice(2 * i, 2 * i + 2) for i in range(4)]
    # a no-gradient pre-pass gives the global denominators, then each micro-batch is differentiated
    global_aux = combine_aux(*(fused_only(hw[s], ho[s], w, y[s], cfg=cfg)[0][1] for s in parts))
    np.testing.assert_allclose(float(loss_from_aux(global_aux, cfg)), float(loss), rtol=1e-6)
    for k in ("n_sum", "n_den", "tokens", "dce_sum"):
        np.testing.assert_allclose(float(global_aux[k]), float(aux[k]), rtol=1e-6, err_msg=k)

    total_loss = 0.0
    total = [np.zeros(hw.shape), np.zeros(ho.shape), np.zeros(w.shape)]
    for s in parts:
        (part_loss, _), part_grads = fused_only(hw[s], ho[s], w, y[s], global_aux, cfg=cfg)
        total_loss += float(part_loss)
        total[0][s] += np.asarray(part_grads[0])
        total[1][s] += np.asarray(part_grads[1])
        total[2] += np.asarray(part_grads[2])
    np.testing.assert_allclose(total_loss, float(loss), rtol=1e-6)
    for got, want in zip(total, grads, strict=True):
        want = np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_head_token_stats_with_several_leading_dims():
    rng = np.random.default_rng(2)
    s, lead, r, d, v = 2, (2, 3), 5, 8, 37
    h = rng.normal(size=(s, *lead, r, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    y = rng.integers(0, v, size=(*lead, r))
    y[1, 2, 1:] = IGNORE
    stats = jax.jit(
        head_token_stats,
        static_argnames=("head_layout", "with_js", "with_effect", "token_chunk", "vocab_chunk"),
        compiler_options=FAST_COMPILE,
    )(
        jnp.asarray(h),
        jnp.asarray(w),
        jnp.asarray(y),
        head_layout="dv",
        with_js=True,
        with_effect=True,
        token_chunk=4,
        vocab_chunk=10,
    )
    z = h.astype(np.float64) @ w.astype(np.float64)  # [S, 2, 3, R, V]
    z = np.concatenate([z, z[:1] - z[1:2]])  # the effect stream z_0 - z_1 comes last
    zmax = z.max(-1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(-1, keepdims=True)))[..., 0]
    label = np.where(
        y == IGNORE, 0.0, np.take_along_axis(z, np.where(y == IGNORE, 0, y)[None, ..., None], -1)[..., 0]
    )
    p = np.exp(z[:2] - lse[:2, ..., None])
    m = (p[0] + p[1]) / 2
    js = (p * np.log(p / m)).sum((0, -1))
    np.testing.assert_allclose(np.asarray(stats.lse), lse, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.label_logit), label, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.js), js, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="with_effect needs at least 2 streams"):
        head_token_stats(
            jnp.asarray(h[:1]), jnp.asarray(w), jnp.asarray(y), head_layout="dv", with_effect=True
        )
    with pytest.raises(ValueError, match="head_layout='vd'"):
        head_token_stats(jnp.asarray(h), jnp.asarray(w.T), jnp.asarray(y), head_layout="dv")
    with pytest.raises(ValueError, match="vocab_chunk must be a positive int"):
        head_token_stats(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), head_layout="dv", vocab_chunk=0)
    with pytest.raises(ValueError, match="token_chunk must be a positive int, got True"):
        head_token_stats(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), head_layout="dv", token_chunk=True)
    # NumPy integers are sizes too (they were refused), and give the Python ints' values.
    numpy_sizes = head_token_stats(
        jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), head_layout="dv", token_chunk=np.int64(3),
        vocab_chunk=np.int32(16), with_js=True,
    )  # fmt: skip
    python_sizes = head_token_stats(
        jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), head_layout="dv", token_chunk=3, vocab_chunk=16,
        with_js=True,
    )  # fmt: skip
    for got, want in zip(numpy_sizes, python_sizes, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="labels shape"):
        head_token_stats(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y[0]), head_layout="dv")
    with pytest.raises(ValueError, match="operand_dtype must be one of"):
        head_token_stats(jnp.asarray(h), jnp.asarray(w.T), jnp.asarray(y), operand_dtype="float16")


def test_fused_memory_is_bounded_by_tiles_not_vocabulary():
    """Compile only: XLA temporary memory of value+grad, fused vs dense, and fused at twice the vocabulary."""
    tokens, d = 2048, 64
    cfg = LossConfig()

    def temp_bytes(vocab, path):
        spec = jax.ShapeDtypeStruct((1, tokens, d), jnp.float32)
        args = (
            spec,
            spec,
            jax.ShapeDtypeStruct((vocab, d), jnp.float32),
            jax.ShapeDtypeStruct((1, tokens), jnp.int32),
        )
        if path == "fused":
            f = functools.partial(
                fused_value_and_grads, cfg=cfg, layout="vd", token_chunk=256, vocab_chunk=2048
            )
        else:
            f = functools.partial(dense_value_and_grads, cfg=cfg, layout="vd")
        compiled = jax.jit(f, compiler_options=FAST_COMPILE).lower(*args).compile()  # buffers as at -O2
        return compiled.memory_analysis().temp_size_in_bytes

    fused, dense = temp_bytes(32_768, "fused"), temp_bytes(32_768, "dense")
    assert fused <= dense / 8, (fused, dense)
    assert temp_bytes(65_536, "fused") <= 1.05 * fused  # doubling V adds no temporary memory


def test_loss_from_hidden_input_errors(data):
    hw, ho, w, y = data
    with pytest.raises(ValueError, match="needs hidden_with"):
        loss_from_hidden(None, ho, w, y, LossConfig())
    with pytest.raises(ValueError, match="must be labels shape"):
        loss_from_hidden(hw[:, :-1], ho, w, y, LossConfig())
    with pytest.raises(ValueError, match="differ"):
        loss_from_hidden(hw, ho[..., :-1], w, y, LossConfig())
    with pytest.raises(ValueError, match="head_layout='dv'"):
        loss_from_hidden(hw, ho, w.T, y, LossConfig())
    with pytest.raises(ValueError, match="outside"):
        loss_from_hidden(hw, ho, w, y.at[2, 0].set(-5), LossConfig())


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_the_same():
    rng = np.random.default_rng(3)
    hw, ho = (jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(scale=0.5, size=(21, 16)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 21, size=(2, 5)))
    cfg = LossConfig(variant="nextquill")
    grads = {
        frozen: jax.grad(
            lambda a, b, c, f=frozen: loss_from_hidden(
                a, b, c, y, cfg, frozen_head=f, token_chunk=4, vocab_chunk=8
            )[0],
            argnums=(0, 1, 2),
        )(hw, ho, w)
        for frozen in (False, True)
    }
    for trained, frozen in zip(grads[False][:2], grads[True][:2], strict=True):
        np.testing.assert_array_equal(np.asarray(trained), np.asarray(frozen))
    assert float(jnp.abs(grads[False][2]).max()) > 0 and not np.any(np.asarray(grads[True][2]))


def bf16_round(x: jax.Array) -> jax.Array:
    """x rounded to the nearest bfloat16, back in float32."""
    return jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "operand_dtype"), compiler_options=FAST_COMPILE)
def fused_operands(hw, ho, w, y, *, cfg, operand_dtype):
    return fused_value_and_grads(hw, ho, w, y, cfg, "vd", 5, 64, operand_dtype=operand_dtype)


@pytest.mark.parametrize(("variant", "det"), [("nextquill", True), ("js", False)])
def test_bfloat16_operands_are_the_definition_on_rounded_operands(data, variant, det):
    """bf16 logits operands: the value is the dense definition on bf16-rounded h and W, within bf16 rounding
    of the float32 path; the gradients (float32 passes) within bf16 rounding of float32's."""
    hw, ho, w, y = data
    cfg = cfg_of(variant, False, det, threshold=0.0)
    exact = fused_operands(hw, ho, w, y, cfg=cfg, operand_dtype="float32")
    rounded = fused_operands(hw, ho, w, y, cfg=cfg, operand_dtype="bfloat16")
    dense = jax.jit(dense_value_and_grads, static_argnums=(4, 5), compiler_options=FAST_COMPILE)
    definition = dense(bf16_round(hw), bf16_round(ho), bf16_round(w), y, cfg, "vd")
    (loss_r, aux_r), (loss_d, aux_d), (loss_e, _) = rounded[0], definition[0], exact[0]
    np.testing.assert_allclose(float(loss_r), float(loss_d), rtol=1e-5)
    for k in aux_d:
        np.testing.assert_allclose(float(aux_r[k]), float(aux_d[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(loss_r) != float(loss_e)  # the operands were rounded...
    np.testing.assert_allclose(float(loss_r), float(loss_e), rtol=4e-3)  # ...by bf16's 2**-8
    for name, g_r, g_e in zip(("hidden_with", "hidden_without", "W"), rounded[1], exact[1], strict=True):
        g_e = np.asarray(g_e)
        np.testing.assert_allclose(np.asarray(g_r), g_e, rtol=0, atol=2e-2 * np.abs(g_e).max(), err_msg=name)


def test_bfloat16_operands_are_exact_on_bfloat16_values(data):
    """Inputs already bfloat16 (a bf16 model's hidden states and head): products are exact in float32, so
    the bf16-operand path gives the float32 path's values and gradients."""
    hw, ho, w, y = data
    hw, ho, w = bf16_round(hw), bf16_round(ho), bf16_round(w)
    cfg = cfg_of("nextquill", False, True, threshold=0.0)
    paths = [fused_operands(hw, ho, w, y, cfg=cfg, operand_dtype=dt) for dt in ("bfloat16", "float32")]
    assert_close(*paths, loss_rtol=1e-6, grad_rtol=1e-5)


def test_bfloat16_operands_keep_the_dce_threshold_decisions():
    """DCE per token from bf16-operand statistics: the float64 DCE of the rounded operands, within 5e-3 of
    the float32 path's, and every threshold decision (DCE > 0.05) the same on a batch whose DCE spreads
    over both sides of the threshold."""
    rng = np.random.default_rng(4)
    b, r, d, v = 4, 16, 64, 301
    hw = rng.normal(size=(b, r, d)).astype(np.float32)
    ho = (hw + 0.5 * rng.normal(size=hw.shape)).astype(np.float32)
    w = (0.25 * rng.normal(size=(v, d))).astype(np.float32)
    # Half the labels are the with-history argmax, so label probabilities (and DCE) spread over [-1, 1].
    y = np.where(rng.random((b, r)) < 0.5, (hw @ w.T).argmax(-1), rng.integers(0, v, (b, r))).astype(np.int32)
    stats_fn = jax.jit(
        head_token_stats, static_argnames=("token_chunk", "vocab_chunk", "operand_dtype"),
        compiler_options=FAST_COMPILE,
    )  # fmt: skip
    h = jnp.asarray(np.stack([hw, ho]))
    dce = {}
    for dt in OPERAND_DTYPES:
        stats = stats_fn(h, jnp.asarray(w), jnp.asarray(y), token_chunk=16, vocab_chunk=64, operand_dtype=dt)
        logprob = np.asarray(stats.label_logit - stats.lse, np.float64)  # [2, B, R]
        dce[dt] = np.exp(logprob[0]) - np.exp(logprob[1])
    z = np.asarray(bf16_round(h), np.float64) @ np.asarray(bf16_round(jnp.asarray(w)), np.float64).T
    logprob = np.take_along_axis(z, y[None, ..., None], -1)[..., 0] - np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(dce["bfloat16"], np.exp(logprob[0]) - np.exp(logprob[1]), atol=1e-5)
    np.testing.assert_allclose(dce["bfloat16"], dce["float32"], atol=5e-3)
    preference = {dt: x > 0.05 for dt, x in dce.items()}
    assert 0.1 < preference["float32"].mean() < 0.9
    np.testing.assert_array_equal(preference["bfloat16"], preference["float32"])


@pytest.mark.parametrize("det", [True, False])
def test_fused_js_weights_below_zero_count_as_zero(det):
    """Two streams equal but for 1e-6: the fused JS of each token is float32 noise around 0, negative for
    tokens 1 and 2. JS is >= 0 by definition, so those weigh nothing, and the js loss is token 0's CE alone
    (float64); unclamped, the weighted mean of the three CEs left [min CE, max CE]."""
    rng = np.random.default_rng(0)
    hw = jnp.asarray(rng.normal(size=(1, 3, 16)), jnp.float32)  # [B, T, D]
    ho = hw + jnp.asarray(rng.normal(size=hw.shape) * 1e-6, jnp.float32)
    w = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)  # [V, D]
    y = jnp.asarray(rng.integers(0, 50, (1, 3)))
    js = np.asarray(head_token_stats(jnp.stack([hw, ho]), w, y, with_js=True).js)[0]
    assert js[0] > 0 > max(js[1], js[2])  # the case under test
    z = np.asarray(hw, np.float64)[0] @ np.asarray(w, np.float64).T  # [T, V]
    top = z.max(-1)
    ce = np.log(np.exp(z - top[:, None]).sum(-1)) + top - z[np.arange(3), np.asarray(y)[0]]
    loss = float(loss_from_hidden(hw, ho, w, y, LossConfig(variant="js", js_detach=det))[0])
    assert loss == pytest.approx(ce[0], rel=1e-6)


def test_logits_far_below_zero_keep_the_logsumexp_and_label_logit():
    """Every logit near -2e4 (W's first column 1, h's first coordinate -2e4; the rest O(1) noise): the
    online logsumexp must not depend on where the logits lie. Reference: float64 NumPy on the same float32
    operands; float32 logits near 2e4 are exact to 2e-3, hence the absolute tolerance. V = 37 in blocks of
    16 (the last block overlaps the one before). Survived before (mutation audit 12b): the running maximum
    started at 0 instead of -inf (F16: exp(-2e4) underflows to a sum of 0, lse -inf), and the columns a
    block's overlap masks set to -1e4 instead of -inf (F65: larger than every real logit here)."""
    rng = np.random.default_rng(5)
    s, r, d, v = 2, 5, 8, 37
    h = rng.normal(size=(s, 1, r, d)).astype(np.float32)
    h[..., 0] = -2e4
    w = rng.normal(scale=0.5, size=(v, d)).astype(np.float32)
    w[:, 0] = 1.0
    y = rng.integers(0, v, size=(1, r)).astype(np.int32)
    y[0, 3] = IGNORE
    stats = head_token_stats(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), token_chunk=2, vocab_chunk=16)
    z = h.astype(np.float64) @ w.astype(np.float64).T  # [S, 1, R, V], all near -2e4
    assert z.max() < -1.9e4
    lse = (z - np_log_softmax(z))[..., 0]  # z - log softmax(z) is lse(z) in every column
    label = np.where(
        y == IGNORE, 0.0, np.take_along_axis(z, np.where(y == IGNORE, 0, y)[None, ..., None], -1)[..., 0]
    )
    np.testing.assert_allclose(np.asarray(stats.lse), lse, rtol=0, atol=2e-2)
    np.testing.assert_allclose(np.asarray(stats.label_logit), label, rtol=0, atol=2e-2)


def test_a_label_outside_the_vocabulary_gives_a_nan_label_logit_an_ignored_one_zero():
    """`head_token_stats`'s contract: label_logit is the label's logit, 0 where the label is IGNORE_INDEX,
    NaN where it is outside [0, V): below 0 (-1, -5; not -100) as well as V or above. Reference: float64
    NumPy logits. Survived before (mutation audit 12b, F41): dropping `y < 0` from the check, which gave a
    negative label other than -100 the logit 0 (a label no column matches) and a finite loss under jit."""
    rng = np.random.default_rng(6)
    r, d, v = 8, 8, 21
    h = rng.normal(size=(1, 1, r, d)).astype(np.float32)
    w = rng.normal(size=(v, d)).astype(np.float32)
    y = np.array([[3, -1, IGNORE, 20, v, -5, 0, v + 7]], np.int32)
    got = np.asarray(
        head_token_stats(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), vocab_chunk=8).label_logit
    )
    z = h[0, 0].astype(np.float64) @ w.astype(np.float64).T  # [R, V]
    bad = (y[0] != IGNORE) & ((y[0] < 0) | (y[0] >= v))
    np.testing.assert_array_equal(np.isnan(got[0, 0]), bad)
    assert got[0, 0, 2] == 0.0
    ok = ~bad & (y[0] != IGNORE)
    np.testing.assert_allclose(got[0, 0][ok], z[ok, y[0][ok]], rtol=1e-5, atol=1e-5)


def test_bfloat16_hidden_states_given_directly_are_computed_in_float32_with_bfloat16_gradients():
    """`head_token_stats` called directly on bfloat16 hidden states and head (the loss functions cast to
    float32 first, so only a direct caller sees this): values and gradients are the float32 computation on
    those values, the gradients returned in bfloat16. Reference: float64 NumPy, d(Σ lse + Σ label logit)/dz
    = softmax + one-hot at the label, dh = dz W, dW = dzᵀ h. Survived before (mutation audit 12b, F42):
    dropping the float32 cast of the hidden states (the backward pass then summed dh in bfloat16, or
    failed)."""
    rng = np.random.default_rng(7)
    s, r, d, v = 2, 6, 16, 45
    h = jnp.asarray(rng.normal(size=(s, 1, r, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(scale=0.4, size=(v, d)), jnp.bfloat16)
    y = rng.integers(0, v, size=(1, r)).astype(np.int32)
    y[0, 2] = IGNORE

    def total(a, b):
        stats = head_token_stats(a, b, jnp.asarray(y), token_chunk=2, vocab_chunk=16)
        return stats.lse.sum() + stats.label_logit.sum()

    value, (dh, dw) = jax.value_and_grad(total, argnums=(0, 1))(h, w)
    assert value.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    z = h64 @ w64.T  # [S, 1, R, V]
    logp = np_log_softmax(z)
    lse, p = (z - logp)[..., 0], np.exp(logp)
    onehot = (np.arange(v) == y[..., None]) & (y[..., None] != IGNORE)  # [1, R, V]
    label = (z * onehot).sum(-1)
    dz = p + onehot
    np.testing.assert_allclose(float(value), lse.sum() + label.sum(), rtol=1e-5)
    want_dh, want_dw = dz @ w64, np.einsum("smrv,smrd->vd", dz, h64)
    for got, want in ((dh, want_dh), (dw, want_dw)):  # bfloat16's rounding of the float32 result: 2**-8
        np.testing.assert_allclose(
            np.asarray(got, np.float64), want, rtol=2**-8, atol=1e-6 * np.abs(want).max()
        )


def test_without_counterfactual_grad_the_effect_stream_sends_no_gradient_to_stream_1_even_with_js():
    """`counterfactual_grad=False`: the effect stream z_0 − z_1 treats z_1 as a constant, whatever else is
    asked (here also the JS statistic, which no loss variant combines with the effect stream). Reference,
    float64 NumPy: d Σ lse_effect / d h_0 = softmax(z_0 − z_1) W, d / d h_1 = 0. Survived before (mutation
    audit 12b, F70): the JS statistic switching the counterfactual gradient back on."""
    rng = np.random.default_rng(8)
    r, d, v = 5, 8, 29
    h = jnp.asarray(rng.normal(size=(2, 1, r, d)), jnp.float32)
    w = jnp.asarray(rng.normal(scale=0.5, size=(v, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, size=(1, r)), jnp.int32)

    def effect_lse(a):
        stats = head_token_stats(
            a, w, y, with_js=True, with_effect=True, counterfactual_grad=False, token_chunk=2, vocab_chunk=16
        )
        return stats.lse[2].sum()

    dh = np.asarray(jax.grad(effect_lse)(h))
    w64 = np.asarray(w, np.float64)
    z = np.asarray(h, np.float64) @ w64.T
    p = np.exp(np_log_softmax(z[0] - z[1]))
    np.testing.assert_allclose(dh[0], p @ w64, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dh[1], 0.0)
