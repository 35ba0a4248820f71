"""NextQuill losses (NEXTQUILL.md, "Losses" and "Variants") as pure, jit-compatible functions.

Two entry points compute the same value and the same `aux`:

- `loss_from_logits(logits_with, logits_without, labels, cfg)`: the definition, over [..., R, V] logits.
- `loss_from_hidden(hidden_with, hidden_without, lm_head, labels, cfg)`: the fused path over [..., R, D] final
  hidden states; it never builds a [tokens, V] array (see `fused_head`), and the alignment logits z_h − z_∅
  come from the LM head applied to h_h − h_∅.

With CE(z, y) = logsumexp(z) − z[y] over the target tokens t of the batch (labels != -100) and weights ω_t:

    L_n = Σ ω_t CE(z_n(t), y_t) / Σ ω_t          L_p = Σ ω'_t CE(z_h(t) − z_∅(t), y_t) / Σ ω'_t

| variant       | z_n | ω_t                                        | L              |
| sft           | z_∅ | 1                                          | L_n            |
| context_sft   | z_h | 1                                          | L_n            |
| mce           | z_h | 1                                          | L_n + α L_p    |
| dce           | z_h | λ if DCE(t) > δ else ε                     | L_n            |
| js            | z_h | KL(p_h ‖ m) + KL(p_∅ ‖ m), m = (p_h+p_∅)/2 | L_n            |
| nextquill     | z_h | λ if DCE(t) > δ else ε                     | L_n + α L_p    |

ω'_t = 1 (the public code), or with `weight_alignment` the target weights λ/ε (the paper's equation; this
makes `mce` compute DCE too). `cfg.weighting` replaces "λ if DCE(t) > δ else ε" with a function of your own
(`weighting.token_weights`) wherever the table uses it. The `js` weights are normalised like the target
weights (Σ ω CE / Σ ω); with `js_detach=False` the gradient also flows through ω in numerator and
denominator. DCE is `dynamic` (the model being trained, no gradient) or `fixed` (from `reference_logits` /
`reference_dce`). A sum whose denominator is 0 (no target token) contributes 0, with zero gradient.

Two remedies for the without-history stream, off by default (the public code): `counterfactual_grad=False`
makes L_p = CE(z_h − sg(z_∅)), so L_p cannot improve by lowering z_∅ on the label; `anchor=β` adds
β · Σ CE(z_∅) / (target tokens), so that stream stays a language model (aux `a_sum`, `a_den`).

Normalisation (`cfg.normalize`): `token` (above) divides each term's Σ over all target tokens of the batch by
its Σ of weights; `example` is the public code's mean of per-example means,

    L_n = (1/N) Σ_e [Σ_{t∈e} ω_t CE_t / Σ_{t∈e} ω_t]      (likewise L_p and the anchor)

over the N examples with at least one target token; an example whose weights sum to 0 adds 0. Examples
are told apart by `example_ids` [..., R] (a row may pack several; the train step passes the segment id of
each response slot); without them every row [..., R] is one example. An example lies within one row, so
its own sums never straddle micro-batches or data shards: the per-example means add up exactly.

`aux` holds scalars that add across micro-batches and data shards (`combine_aux`), so `loss_from_aux` of the
combined aux is exactly the global-batch loss (float32, but `tokens` int32):

- `n_sum`, `n_den`: Σ ω CE and Σ ω of L_n; `p_sum`, `p_den`: the same for L_p (variants mce, nextquill);
  with `normalize: example`, `*_sum` is the Σ over examples of their means and `*_den` the example count N;
- `tokens`: target tokens, int32, so that it stays exact when summed over a whole evaluation split (float32
  counts exactly only up to 2**24 = 16,777,216; int32 up to 2**31 - 1); `ce_with_sum`, `ce_without_sum`:
  Σ CE of each stream computed (for logging);
- when a DCE is available: `effect_count`, `pref_count`, `dce_sum`, `dce_sq_sum` and the per-call quantiles
  `dce_p10`, `dce_p50`, `dce_p90` (see `effects.effect_stats`).

The other counts (`effect_count`, `pref_count`, and `*_den` where they count tokens or examples) are
float32, exact up to 2**24 per combined aux; they are logged only as the denominators of ratios, where
rounding past that changes the ratio by at most 2**-24 relatively.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nextquill_jax.loss.config import VARIANTS, LossConfig, streams_needed
from nextquill_jax.loss.effects import (
    DCE_QUANTILES,
    check_labels,
    concrete_values,
    data_effect,
    dce_from_logits,
    effect_stats,
    js_weights,
    model_effect,
    target_mask,
    token_logprobs,
)
from nextquill_jax.loss.fused_head import (
    DEFAULT_TOKEN_CHUNK,
    DEFAULT_VOCAB_CHUNK,
    HeadLayout,
    head_token_stats,
    head_vocab,
)
from nextquill_jax.loss.weighting import token_weights

DENOMINATOR_KEYS: tuple[str, ...] = ("n_den", "p_den", "a_den")


def loss_from_logits(
    logits_with: jax.Array | None,
    logits_without: jax.Array | None,
    labels: jax.Array,
    cfg: LossConfig,
    reference_logits: tuple[jax.Array, jax.Array] | None = None,
    reference_dce: jax.Array | None = None,
    *,
    denominators: Mapping[str, jax.Array] | None = None,
    example_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The NextQuill loss from two aligned logit streams: the definition (module docstring).

    Args:
        logits_with: [..., R, V] logits z_h with the history; None allowed for variant sft.
        logits_without: [..., R, V] logits z_∅ with the placeholder; None allowed for context_sft and for
            dce with a fixed DCE. -inf logits (masked vocabulary columns) are fine for L_n, the DCE and the
            js weights; the alignment term L_p (mce, nextquill) needs finite ones: z_h − z_∅ is NaN where
            both are -inf.
        labels: [..., R] int target ids, already shifted, IGNORE_INDEX (-100) outside the loss.
        cfg: the loss settings.
        reference_logits: (with, without) [..., R, V] logits of a frozen model, for `cfg.dce == "fixed"`.
        reference_dce: [..., R] precomputed DCE values, for `cfg.dce == "fixed"` (instead of
            reference_logits).
        denominators: global-batch denominators (`DENOMINATOR_KEYS`; a combined aux works) to normalise by
            instead of this call's, treated as constants, so that the losses and gradients of micro-batches
            add up to the global batch's. For js with `js_detach=False` it must also hold the global `n_sum`
            (normalize token).
        example_ids: [..., R] int in [0, R], for `cfg.normalize == "example"`: slots of one row with the
            same id belong to one example (ignored slots' ids do not matter); None: each row is one example.
            Concrete ids outside [0, R] at target slots raise ValueError (under jit those slots would be
            left out).

    Returns:
        (loss, aux): float32 scalar loss and the aux dict of scalars, float32 but `tokens` int32 (module
            docstring).

    Raises:
        ValueError: a stream or reference the variant needs is missing, a reference is given for a dynamic
            DCE, both reference_logits and reference_dce are given, shapes disagree, `denominators` lacks a
            key the variant normalises by, or (for concrete values) a label is neither IGNORE_INDEX nor in
            [0, V), or an example id at a target slot is outside [0, R].
        ConfigError: `cfg.weighting` names a function whose weights are not of the DCE's shape
            (`weighting.token_weights`).
    """
    _check_sources(
        cfg,
        logits_with is not None,
        logits_without is not None,
        reference_logits is not None or reference_dce is not None,
        "logits",
    )
    if reference_logits is not None and reference_dce is not None:
        raise ValueError("pass reference_logits or reference_dce, not both")
    given = {"logits_with": logits_with, "logits_without": logits_without}
    if reference_logits is not None:
        given.update({"reference_logits[0]": reference_logits[0], "reference_logits[1]": reference_logits[1]})
    vocab = _check_logit_shapes({k: v for k, v in given.items() if v is not None}, labels)
    check_labels(labels, vocab)
    mask = target_mask(labels)

    logprob_with = None if logits_with is None else token_logprobs(logits_with, labels)
    logprob_without = None if logits_without is None else token_logprobs(logits_without, labels)
    ce_effect = None
    if cfg.spec.alignment:
        counterfactual = logits_without if cfg.counterfactual_grad else jax.lax.stop_gradient(logits_without)
        ce_effect = -token_logprobs(model_effect(logits_with, counterfactual), labels)
    js = None
    if cfg.spec.next_weights == "js":
        js = js_weights(logits_with, logits_without, mask, detach=cfg.js_detach)

    if reference_logits is not None:
        dce = dce_from_logits(*reference_logits, labels)
    elif reference_dce is not None:
        dce = _fixed_dce(reference_dce, labels)
    elif logprob_with is not None and logprob_without is not None:
        dce = data_effect(logprob_with, logprob_without, mask)
    else:
        dce = None
    return _assemble(
        cfg,
        mask,
        ce_with=None if logprob_with is None else -logprob_with,
        ce_without=None if logprob_without is None else -logprob_without,
        ce_effect=ce_effect,
        dce=dce,
        js=js,
        denominators=denominators,
        example_ids=example_ids,
    )


def loss_from_hidden(
    hidden_with: jax.Array | None,
    hidden_without: jax.Array | None,
    lm_head: jax.Array,
    labels: jax.Array,
    cfg: LossConfig,
    *,
    head_layout: HeadLayout = "vd",
    reference_dce: jax.Array | None = None,
    denominators: Mapping[str, jax.Array] | None = None,
    example_ids: jax.Array | None = None,
    frozen_head: bool = False,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    operand_dtype: str = "float32",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The value of `loss_from_logits(hidden_with @ Wᵀ, hidden_without @ Wᵀ, ...)` without [tokens, V] arrays.

    Per-token logsumexps and label logits come from `fused_head.head_token_stats`, tile by tile, with a
    backward pass that recomputes tiles: memory is bounded by (token_chunk × vocab_chunk) in both passes.
    Streams that get a gradient share one call; streams needed only for DCE (which carries no gradient) or for
    detached js weights go through a second, forward-only call. L_p's logits z_h − z_∅ are formed per tile
    from the two streams' logits (no third matrix product).

    Args:
        hidden_with: [..., R, D] final hidden states at the target positions with the history; None for sft.
        hidden_without: [..., R, D] the same with the placeholder; None for context_sft (and dce with a fixed
            DCE). Passing a stream the variant does not need adds its forward pass to log its CE and the DCE.
        lm_head: [V, D] tied embedding (`head_layout="vd"`) or [D, V] untied kernel ("dv"); any float dtype.
        labels: [..., R] int target ids, IGNORE_INDEX (-100) outside the loss.
        cfg: the loss settings.
        reference_dce: [..., R] fixed DCE values (for `cfg.dce == "fixed"`), e.g. from
            `effects.dce_from_hidden`.
        denominators, example_ids: as in `loss_from_logits`.
        frozen_head: `lm_head` is not trained (LoRA): its gradient is zero and not computed.
        token_chunk: tokens per tile across the leading rows (at least one slot per row).
        vocab_chunk: vocabulary columns per tile.
        operand_dtype: "float32" (default) or "bfloat16": the operands of the with/without logits products
            (float32 accumulation; `fused_head`). The alignment logits and the gradient stay float32.

    Returns:
        (loss, aux) as `loss_from_logits`; all arithmetic in float32 (the logits products' operands in
        `operand_dtype`).

    Reverse mode only: `head_token_stats` is a `jax.custom_vjp`, so `jax.grad` / `vjp` work and `jax.jvp` /
    `jacfwd` raise TypeError; for forward mode use `loss_from_logits` on `hidden @ Wᵀ`.

    Raises:
        ValueError: as `loss_from_logits`, for hidden states that do not match lm_head or labels, and for a
            `token_chunk`, `vocab_chunk` or `operand_dtype` that `head_token_stats` refuses.
        ConfigError: as `loss_from_logits`.
    """
    spec = cfg.spec
    have_with, have_without = hidden_with is not None, hidden_without is not None
    _check_sources(cfg, have_with, have_without, reference_dce is not None, "hidden")
    for name, hidden in (("hidden_with", hidden_with), ("hidden_without", hidden_without)):
        if hidden is not None and hidden.shape[:-1] != labels.shape:
            raise ValueError(f"{name} shape {hidden.shape} must be labels shape {labels.shape} + (D,)")
    if have_with and have_without and hidden_with.shape != hidden_without.shape:
        raise ValueError(f"hidden_with {hidden_with.shape} and hidden_without {hidden_without.shape} differ")
    width = (hidden_with if have_with else hidden_without).shape[-1]
    check_labels(labels, head_vocab(lm_head, head_layout, width))
    mask = target_mask(labels)
    head = dict(
        head_layout=head_layout, token_chunk=token_chunk, vocab_chunk=vocab_chunk, operand_dtype=operand_dtype
    )

    streams: dict[str, jax.Array] = {}
    if have_with:
        streams["with"] = hidden_with.astype(jnp.float32)
    if have_without:
        streams["without"] = hidden_without.astype(jnp.float32)

    js_with_grad = spec.next_weights == "js" and not cfg.js_detach
    if spec.next_stream == "without":
        grad_names = ["without"]
    elif js_with_grad or spec.alignment or cfg.anchor > 0:
        grad_names = ["with", "without"]
    else:
        grad_names = ["with"]
    out = head_token_stats(
        jnp.stack([streams[n] for n in grad_names]),
        lm_head,
        labels,
        with_js=js_with_grad,
        with_effect=spec.alignment,
        counterfactual_grad=cfg.counterfactual_grad,
        frozen_head=frozen_head,
        **head,
    )
    stats = {n: (out.lse[k], out.label_logit[k]) for k, n in enumerate(grad_names)}
    if spec.alignment:
        stats["effect"] = (out.lse[-1], out.label_logit[-1])
        if not js_with_grad and cfg.anchor == 0:  # its own CE feeds only the (gradient-free) DCE
            stats["without"] = jax.lax.stop_gradient(stats["without"])
    js = out.js

    js_detached = spec.next_weights == "js" and cfg.js_detach
    if js_detached:
        frozen_names = ["with", "without"]
    else:  # every stream given is reported (its CE, and the dynamic DCE), with or without a gradient
        frozen_names = [n for n in ("with", "without") if n in streams and n not in stats]
    if frozen_names:
        frozen = head_token_stats(
            jax.lax.stop_gradient(jnp.stack([streams[n] for n in frozen_names])),
            jax.lax.stop_gradient(lm_head),
            labels,
            with_js=js_detached,
            **head,
        )
        for k, n in enumerate(frozen_names):
            stats.setdefault(n, (frozen.lse[k], frozen.label_logit[k]))
        if js_detached:
            js = frozen.js

    ce = {n: jnp.where(mask, lse - label_logit, 0.0) for n, (lse, label_logit) in stats.items()}
    if reference_dce is not None:
        dce = _fixed_dce(reference_dce, labels)
    elif "with" in ce and "without" in ce:
        dce = data_effect(-ce["with"], -ce["without"], mask)
    else:
        dce = None
    return _assemble(
        cfg,
        mask,
        ce_with=ce.get("with"),
        ce_without=ce.get("without"),
        ce_effect=ce.get("effect"),
        dce=dce,
        js=None if js is None else jnp.where(mask, js, 0.0),
        denominators=denominators,
        example_ids=example_ids,
    )


def combine_aux(*auxes: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Merge the aux dicts of micro-batches or data shards of one global batch.

    Sums and counts add, so `loss_from_aux(combine_aux(*auxes), cfg)` is the global-batch loss exactly. The
    per-call DCE quantiles (`dce_p10`, `dce_p50`, `dce_p90`) cannot be combined exactly: the result holds
    their mean weighted by `effect_count`, an approximation for logging only. Works inside `jax.jit`.

    Raises:
        TypeError: for an argument that is not a mapping, such as a list of aux dicts passed as one
            argument (the message gives the call: `combine_aux(*auxes)`).
        ValueError: for no argument, or aux dicts with different keys (from different configs or streams).
    """
    if not auxes:
        raise ValueError("combine_aux needs at least one aux dict")
    for i, aux in enumerate(auxes):
        if not isinstance(aux, Mapping):
            # A list of dicts would otherwise fail deep inside as "unhashable type: 'dict'".
            fix = (
                "; it takes the aux dicts as separate arguments: call combine_aux(*auxes), not "
                "combine_aux(auxes)"
                if isinstance(aux, list | tuple)
                else ""
            )
            raise TypeError(f"combine_aux argument {i} is a {type(aux).__name__}, not an aux dict{fix}")
    keys = list(auxes[0])
    for i, aux in enumerate(auxes[1:], start=1):
        if set(aux) != set(keys):
            raise ValueError(
                f"aux {i} has keys {sorted(aux)}, aux 0 has {sorted(keys)}; combine only aux dicts "
                "of the same loss config and streams"
            )
    combined = {k: sum(aux[k] for aux in auxes) for k in keys if k not in DCE_QUANTILES}
    for k in DCE_QUANTILES:
        if k in keys:
            weighted = sum(aux[k] * aux["effect_count"] for aux in auxes)
            combined[k] = weighted / _safe_denominator(combined["effect_count"])
    return {k: combined[k] for k in keys}


def loss_from_aux(aux: Mapping[str, jax.Array], cfg: LossConfig) -> jax.Array:
    """The loss from (combined) aux sums: L_n = n_sum / n_den, plus α p_sum / p_den for mce and nextquill,
    plus β a_sum / a_den with an anchor (`cfg.anchor` = β > 0).

    Raises:
        ValueError: if a key the variant needs is missing (`aux` is the aux of `loss_from_logits` /
            `loss_from_hidden` under the same config, or several merged with `combine_aux`).
    """
    return _loss_from_sums(aux, cfg, None)


def metrics_from_aux(aux: Mapping[str, jax.Array], cfg: LossConfig) -> dict[str, float]:
    """Loggable numbers from a (combined) aux, as Python numbers: `tokens` an int (a count), the others
    floats.

    Always: loss, loss_n, tokens. With L_p: loss_p. Per stream computed: ce_with, ce_without (mean CE over
    target tokens, nats). With a DCE: pref_fraction, dce_mean, dce_std and the quantiles dce_p10/p50/p90 (see
    `combine_aux` for what they mean after combination). Means over zero tokens are reported as 0.

    Raises:
        ValueError: `aux` lacks a key these numbers or `cfg`'s loss need (`tokens`, the sums and their
            denominators), naming them: pass the aux of `loss_from_logits` / `loss_from_hidden` computed
            under `cfg`, or several such merged with `combine_aux`.
    """
    # The keys read below; those of the variant's loss terms `loss_from_aux` checks itself.
    needed = ["n_sum", "n_den", "tokens", *(f"{t}_den" for t in ("p", "a") if f"{t}_sum" in aux)]
    if "effect_count" in aux:
        needed += ["pref_count", "dce_sum", "dce_sq_sum", *DCE_QUANTILES]
    missing = [k for k in needed if k not in aux]
    if missing:
        raise ValueError(
            f"aux lacks {missing} (it has {sorted(aux)}): metrics_from_aux takes the aux that "
            "loss_from_logits or loss_from_hidden returns under the same config, or several merged with "
            "combine_aux(*auxes)"
        )
    host = {k: np.asarray(v).item() for k, v in jax.device_get(dict(aux)).items()}  # int32 -> int
    return _metrics_from_sums(host, float(loss_from_aux(aux, cfg)))


def _metrics_from_sums(host: Mapping[str, float], loss: float) -> dict[str, float]:
    """`metrics_from_aux` from the aux as floats and its loss: plain Python, no JAX op."""

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else 0.0

    metrics = {
        "loss": loss,
        "loss_n": ratio(host["n_sum"], host["n_den"]),
        "tokens": host["tokens"],
    }
    if "p_sum" in host:
        metrics["loss_p"] = ratio(host["p_sum"], host["p_den"])
    if "a_sum" in host:
        metrics["loss_anchor"] = ratio(host["a_sum"], host["a_den"])
    for stream in ("with", "without"):
        if f"ce_{stream}_sum" in host:
            metrics[f"ce_{stream}"] = ratio(host[f"ce_{stream}_sum"], host["tokens"])
    if "effect_count" in host:
        count = host["effect_count"]
        mean = ratio(host["dce_sum"], count)
        metrics["pref_fraction"] = ratio(host["pref_count"], count)
        metrics["dce_mean"] = mean
        metrics["dce_std"] = math.sqrt(max(ratio(host["dce_sq_sum"], count) - mean * mean, 0.0))
        metrics.update({k: host[k] for k in DCE_QUANTILES})
    return metrics


def metric_names(cfg: LossConfig) -> tuple[str, ...]:
    """The names `metrics_from_aux` reports, in its order, for the aux of a batch that the train and eval
    steps compute under `cfg`: `loss_from_hidden` given the streams `streams_needed(cfg)` names and, with a
    fixed DCE, `reference_dce`. Found by tracing `loss_from_hidden` on [1, 1] shapes (nothing computed or
    compiled), so the names are the code's own, for every variant and switch.

    Raises:
        ConfigError: `cfg.weighting`'s function returns weights of another shape than the DCE's
            (`weighting.token_weights`), found by this trace before any step runs.
    """
    need_with, need_without = streams_needed(cfg)
    hidden = jax.ShapeDtypeStruct((1, 1, 1), jnp.float32)
    labels = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    _, aux = jax.eval_shape(
        lambda w, o, head, y, dce: loss_from_hidden(w, o, head, y, cfg, reference_dce=dce),
        hidden if need_with else None,
        hidden if need_without else None,
        jax.ShapeDtypeStruct((1, 1), jnp.float32),
        labels,
        jax.ShapeDtypeStruct((1, 1), jnp.float32) if cfg.dce == "fixed" else None,
    )
    return tuple(_metrics_from_sums(dict.fromkeys(aux, 0.0), 0.0))


def variant_losses(terms: Mapping[str, float], alpha: float) -> dict[str, float]:
    """The loss each variant but `js` has, from the terms that `metrics_from_aux` reports for a `nextquill`
    config (`ce_with`, `ce_without`, `loss_n`, `loss_p`, nats per target token): L_n from the variant's stream
    and weights (the table in `config.VARIANTS`), plus `alpha` L_p where the variant has the alignment term.
    """
    out = {}
    for name, spec in VARIANTS.items():
        if spec.next_weights == "js":
            continue
        loss_n = terms["loss_n"] if spec.next_weights == "target" else terms[f"ce_{spec.next_stream}"]
        out[name] = loss_n + alpha * terms["loss_p"] if spec.alignment else loss_n
    return out


def _assemble(
    cfg: LossConfig,
    mask: jax.Array,
    *,
    ce_with: jax.Array | None,
    ce_without: jax.Array | None,
    ce_effect: jax.Array | None,
    dce: jax.Array | None,
    js: jax.Array | None,
    denominators: Mapping[str, jax.Array] | None,
    example_ids: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token CE [..., R] (0 at ignored slots), DCE and js weights → (loss, aux)."""
    spec = cfg.spec
    ones = mask.astype(jnp.float32)
    pref = None
    if cfg.uses_target_weights:
        pref = token_weights(dce, mask, cfg)
    # JS is >= 0, but float32 cancellation between near-equal streams leaves ±1e-7 noise, and negative
    # weights could sum to Σω <= 0, which `_safe_denominator` would turn into a loss of about 0.
    js = None if js is None else jnp.maximum(js, 0.0)
    next_weights = {None: ones, "target": pref, "js": js}[spec.next_weights]
    next_ce = ce_without if spec.next_stream == "without" else ce_with
    terms = {"n": (next_weights, next_ce)}
    if spec.alignment:
        terms["p"] = (pref if cfg.weight_alignment else ones, ce_effect)
    if cfg.anchor > 0:
        terms["a"] = (ones, ce_without)
    aux = {}
    if cfg.normalize == "example":
        slots = example_slots(mask, example_ids)
        examples = example_count(mask, example_ids)
        for name, (weights, ce) in terms.items():
            # An example's weights sum to 0 only where all its slots are 0 (ignored or ε = 0): it adds 0.
            means = example_sums(weights * ce, slots) / _safe_denominator(example_sums(weights, slots))
            aux[f"{name}_sum"] = means.sum()
            aux[f"{name}_den"] = examples
    else:
        for name, (weights, ce) in terms.items():
            aux[f"{name}_sum"] = (weights * ce).sum()
            aux[f"{name}_den"] = weights.sum()
    aux["tokens"] = mask.sum(dtype=jnp.int32)
    if ce_with is not None:
        aux["ce_with_sum"] = ce_with.sum()
    if ce_without is not None:
        aux["ce_without_sum"] = ce_without.sum()
    if dce is not None:
        aux.update(effect_stats(dce, mask, threshold=cfg.threshold))
    loss = _loss_from_sums(aux, cfg, denominators)
    float_aux = lambda v: jax.lax.stop_gradient(v).astype(jnp.float32)
    return loss, {k: v if k == "tokens" else float_aux(v) for k, v in aux.items()}


def _loss_from_sums(
    aux: Mapping[str, jax.Array], cfg: LossConfig, denominators: Mapping[str, jax.Array] | None
) -> jax.Array:
    """L from sums, normalised by aux's own denominators or by the given global ones (constants)."""
    spec = cfg.spec
    needed = ("n_sum", "n_den", "p_sum", "p_den") if spec.alignment else ("n_sum", "n_den")
    if cfg.anchor > 0:
        needed = (*needed, "a_sum", "a_den")
    missing = [k for k in needed if k not in aux]
    if missing:
        raise ValueError(
            f"aux lacks {missing} needed by variant {cfg.variant!r}; was it made with another config?"
        )
    dens = aux
    if denominators is not None:
        wanted = [k for k in DENOMINATOR_KEYS if k in needed]
        if spec.next_weights == "js" and not cfg.js_detach and cfg.normalize == "token":
            wanted.append("n_sum")  # the gradient through Σ ω needs the global ratio n_sum / n_den
        missing = [k for k in wanted if k not in denominators]
        if missing:
            raise ValueError(
                f"denominators lacks {missing} (variant {cfg.variant!r}); pass the combined aux of "
                "the global batch"
            )
        dens = {k: jax.lax.stop_gradient(jnp.asarray(denominators[k], jnp.float32)) for k in wanted}
    n_den = _safe_denominator(dens["n_den"])
    loss = aux["n_sum"] / n_den
    if denominators is not None and "n_sum" in dens:
        # d(S/D) = dS/D − (S/D)·dD/D with the global S, D: the local share of the second term, value 0.
        local_den = aux["n_den"]
        loss = loss - (dens["n_sum"] / n_den) * (local_den - jax.lax.stop_gradient(local_den)) / n_den
    if spec.alignment:
        loss = loss + cfg.alpha * aux["p_sum"] / _safe_denominator(dens["p_den"])
    if cfg.anchor > 0:
        loss = loss + cfg.anchor * aux["a_sum"] / _safe_denominator(dens["a_den"])
    return loss.astype(jnp.float32)


def example_slots(mask: jax.Array, example_ids: jax.Array | None) -> jax.Array:
    """[..., R] int32: 1 + the example id of every target slot (example 0 when `example_ids` is None), 0 at
    ignored slots; the segment ids `example_sums` sums over.

    Raises:
        ValueError: `example_ids` of another shape than `mask`, or (concrete ids, not under jit) an id outside
            [0, R] at a target slot, naming the slot. Under jit such a slot is left out of every sum.
    """
    ids = jnp.zeros(mask.shape, jnp.int32) if example_ids is None else example_ids.astype(jnp.int32)
    if ids.shape != mask.shape:
        raise ValueError(f"example_ids shape {ids.shape} must equal labels shape {mask.shape}")
    if example_ids is not None:
        _check_example_ids(concrete_values(example_ids), concrete_values(mask))
    return jnp.where(mask, ids + 1, 0)


def _check_example_ids(ids: np.ndarray | None, mask: np.ndarray | None) -> None:
    """Raise ValueError at the first target slot (mask True) whose example id is outside [0, R]; nothing when
    either is unknown (traced)."""
    if ids is None or mask is None:
        return
    r = mask.shape[-1]
    bad = mask & ((ids < 0) | (ids > r))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"example_ids{list(where)} = {ids[where]} is outside [0, {r}] (R = {r} response slots per row): "
            "example ids number the examples within a row, e.g. each slot's segment id. Fix: renumber "
            "dataset-wide ids per row (np.unique(row_ids, return_inverse=True)[1])"
        )


def example_count(mask: jax.Array, example_ids: jax.Array | None) -> jax.Array:
    """Examples with at least one target slot in `mask` [..., R] (`example_ids` as in `loss_from_logits`):
    the denominators of `normalize: example`, a float32 scalar.

    Raises:
        ValueError: as `example_slots`.
    """
    slots = example_slots(mask, example_ids)
    return (example_sums(mask.astype(jnp.float32), slots) > 0).sum(dtype=jnp.float32)


def example_sums(x: jax.Array, slots: jax.Array) -> jax.Array:
    """Σ of x [..., R] over the slots of each example of its row: [rows, R + 1] (rows = the leading dims
    flattened; column k - 1 holds slot id k of `example_slots`, ignored slots are left out). slots: int32 of
    x's shape, `example_slots`' ids (0 for a position in no example)."""
    r = x.shape[-1]
    rows = math.prod(x.shape[:-1])  # not reshape(-1, r), which R = 0 cannot infer
    flat_x, flat_slots = x.reshape(rows, r), slots.reshape(rows, r)  # [rows, R]
    sums = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=r + 2))(flat_x, flat_slots)
    return sums[:, 1:]  # [rows, R + 1]


def _safe_denominator(den: jax.Array) -> jax.Array:
    """den where positive, else 1 (its numerator is then 0): no NaN value or gradient for empty batches."""
    return jnp.where(den > 0, den, 1.0)


def _fixed_dce(reference_dce: jax.Array, labels: jax.Array) -> jax.Array:
    """reference_dce [..., R] (precomputed with the data), labels [..., R] -> the fixed DCE [..., R] float32:
    0 on padding slots, no gradient. Raises ValueError unless the two shapes are equal."""
    if reference_dce.shape != labels.shape:
        raise ValueError(f"reference_dce shape {reference_dce.shape} must equal labels shape {labels.shape}")
    dce = jnp.where(target_mask(labels), reference_dce.astype(jnp.float32), 0.0)
    return jax.lax.stop_gradient(dce)


def _check_logit_shapes(logits: Mapping[str, jax.Array], labels: jax.Array) -> int | None:
    """The vocabulary V of the given [..., R, V] logits (None if none is given); raise ValueError naming the
    array unless each is labels' shape + (V,) with one V for all: the streams and a reference model must
    share one vocabulary (a V of 1 would otherwise broadcast)."""
    vocab, first = None, None
    for name, z in logits.items():
        if z.shape[:-1] != labels.shape:
            raise ValueError(f"{name} shape {z.shape} must be labels shape {labels.shape} + (V,)")
        if vocab is None:
            vocab, first = z.shape[-1], name
        elif z.shape[-1] != vocab:
            raise ValueError(
                f"{name} shape {z.shape} and {first} shape {logits[first].shape} differ in their vocabulary "
                "size: the two streams and the reference logits must all come from models with one "
                "vocabulary"
            )
    return vocab


def _check_sources(
    cfg: LossConfig, have_with: bool, have_without: bool, have_reference: bool, kind: str
) -> None:
    """Raise ValueError if the variant lacks a stream it needs, or the DCE source does not match cfg.dce."""
    needs_with, needs_without = streams_needed(cfg)
    for needed, have, stream in ((needs_with, have_with, "with"), (needs_without, have_without, "without")):
        if needed and not have:
            raise ValueError(f"variant {cfg.variant!r} (dce={cfg.dce!r}) needs {kind}_{stream}, got None")
    if cfg.dce == "fixed" and not have_reference:
        raise ValueError(
            "LossConfig.dce='fixed' needs reference_dce (or reference_logits for loss_from_logits)"
        )
    if cfg.dce == "dynamic" and have_reference:
        raise ValueError(
            "a reference DCE was given but LossConfig.dce='dynamic' would ignore it; set dce='fixed'"
        )
