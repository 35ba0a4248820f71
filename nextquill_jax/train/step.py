"""The pure train step: `(state, batch) -> (state, metrics)`, compiled once with `jax.jit`.

Inside: rebuild the model from the state's parameters (`nnx.merge`), run the forward passes to final hidden
states (with and without history; only those the loss needs, e.g. one for `sft` / `context_sft`), gather the
response positions with the batch's response indices, `loss_from_hidden`, gradients, clipping + AdamW.

Gradient accumulation is a `lax.scan` over micro-batches whose losses are normalised by the GLOBAL batch's
denominators (`n_den`, `p_den`: Σω or the token count), which carry no gradient. The micro-batch gradients
therefore add up exactly to the gradient of the global-batch loss. Where the denominators depend on the model
(dynamic DCE weights, JS weights), a forward-only pre-pass over the micro-batches computes them first; where
they depend only on the labels, or on fixed DCE values, they are counted directly. With `loss.normalize:
example` the denominators are example counts (from the labels and segment ids) and each example's own sums
stay within its row, so no pre-pass is needed. Data parallelism needs nothing extra: the sums inside the
loss run over the whole sharded global batch and XLA inserts the reductions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nextquill_jax.loss import (
    DENOMINATOR_KEYS,
    LossConfig,
    combine_aux,
    effects,
    example_count,
    loss_from_aux,
    loss_from_hidden,
    streams_needed,
)
from nextquill_jax.loss.weighting import token_weights
from nextquill_jax.models.lora import Adapters
from nextquill_jax.parallel import DEFAULT_RULES, LogicalRules, logical_to_mesh_spec
from nextquill_jax.train.optimizer import schedule_count
from nextquill_jax.train.state import TrainState

Batch = dict[str, jax.Array]


@dataclass(frozen=True)
class StepSettings:
    """Static settings of the step.

    `micro_batches` must divide the rows of every batch shard. `token_chunk`, `vocab_chunk`, `operand_dtype`:
    the fused LM head's tiling and logits operands (`loss_from_hidden`). `joint_forward`: both streams in one
    forward call (`joint_response_hidden`) when the loss needs both. `reference_graphdef`: the graph of a
    frozen reference model for `dce: fixed` when batches carry no `reference_dce` (its parameters are the
    step's third argument). `lora_scale`: None for full fine-tuning (the state's parameters are the model's);
    else the state's parameters are LoRA adapters (`models.lora`) on the frozen base, the step's fourth
    argument, with this alpha / rank and `lora_dropout` on their input.
    """

    loss: LossConfig
    micro_batches: int = 1
    skip_nonfinite: bool = False
    token_chunk: int = 1024
    vocab_chunk: int = 8192
    operand_dtype: str = "float32"
    joint_forward: bool = False
    reference_graphdef: Any = None
    lora_scale: float | None = None
    lora_dropout: float = 0.0


def model_and_adapters(
    graphdef: Any, params: dict, base: dict | None, settings: StepSettings, key: jax.Array | None = None
) -> tuple[nnx.Module, Adapters | None]:
    """The model a step runs and its adapters: `params` merged into `graphdef` (full fine-tuning), or the
    frozen `base` with `params` as LoRA adapters (dropout keyed by `key`; None: no dropout)."""
    if settings.lora_scale is None:
        return nnx.merge(graphdef, params), None
    return nnx.merge(graphdef, base), Adapters(params, settings.lora_scale, settings.lora_dropout, key)


def response_hidden(
    model: nnx.Module, batch: Batch, stream: str, adapters: Adapters | None = None
) -> jax.Array:
    """Final hidden states at the response positions of one stream ("with" or "without"): [B, R, D].

    Raises:
        ValueError: `stream` is neither "with" nor "without" (case counts), naming both.
    """
    if stream not in ("with", "without"):  # else a KeyError for the batch key f"{stream}_ids"
        raise ValueError(f'response_hidden: stream must be "with" or "without", got {stream!r}')
    hidden = model.hidden_states(
        batch[f"{stream}_ids"],
        batch[f"{stream}_positions"],
        batch[f"{stream}_segment_ids"],
        adapters=adapters,
    )  # [B, T, D]
    index = batch[f"response_index_{stream}"]  # [B, R]
    return jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, R, D]


def response_examples(batch: Batch) -> jax.Array:
    """The example (segment id within its row) of every response slot: [..., B, R] int32."""
    return jnp.take_along_axis(batch["with_segment_ids"], batch["response_index_with"], axis=-1)


def joint_response_hidden(
    model: nnx.Module, batch: Batch, adapters: Adapters | None = None
) -> tuple[jax.Array, jax.Array]:
    """Both streams' response hidden states ([B, R, D] each) from one forward call: one pass over the
    weights, matmuls over both streams' tokens at once. The values are those of two `response_hidden` calls
    (each token sees the same tokens at the same positions); with LoRA dropout the masks are another draw.

    Streams of one length T are interleaved into [2B, T] rows (row 2i with history, 2i + 1 without: a pair
    stays on the device that holds row i). Otherwise each row is the with-history row followed by the
    without-history row, [B, T_w + T_o], the latter's segment ids shifted past the former's so that no token
    attends across streams (its attention covers (T_w + T_o)² slot pairs, not T_w² + T_o²).
    """
    ids, pos, seg = ((batch[f"with_{k}"], batch[f"without_{k}"]) for k in ("ids", "positions", "segment_ids"))
    index_w, index_o = batch["response_index_with"], batch["response_index_without"]  # [B, R]
    rows, t_w = ids[0].shape
    if ids[0].shape == ids[1].shape:
        interleave = lambda pair: jnp.stack(pair, axis=1).reshape(2 * rows, t_w)  # [2B, T]
        hidden = model.hidden_states(interleave(ids), interleave(pos), interleave(seg), adapters=adapters)
        hidden = hidden.reshape(rows, 2, t_w, -1)  # [B, 2, T, D]
        h_w, h_o, offset = hidden[:, 0], hidden[:, 1], 0
    else:
        shift = seg[0].max(axis=1, keepdims=True)  # [B, 1]
        seg = (seg[0], jnp.where(seg[1] > 0, seg[1] + shift, 0))
        join = lambda pair: jnp.concatenate(pair, axis=1)  # [B, T_w + T_o]
        h_w = h_o = model.hidden_states(join(ids), join(pos), join(seg), adapters=adapters)
        offset = t_w
    gather = lambda h, index: jnp.take_along_axis(h, index[..., None], axis=1)  # [B, R, D]
    return gather(h_w, index_w), gather(h_o, index_o + offset)


def joins_streams(joint_forward: bool, loss: LossConfig) -> bool:
    """Whether the step runs both streams as one forward call (`joint_response_hidden`): `joint_forward`
    (`train.joint_forward`) and a `loss` that needs both."""
    return joint_forward and all(streams_needed(loss))


def stream_hidden(
    model: nnx.Module, batch: Batch, settings: StepSettings, adapters: Adapters | None = None
) -> tuple[jax.Array | None, jax.Array | None]:
    """(with, without) response hidden states [B, R, D] of the streams the loss needs (None for the other),
    from one forward call where the step `joins_streams`, else one call each."""
    if joins_streams(settings.joint_forward, settings.loss):
        return joint_response_hidden(model, batch, adapters)
    need_with, need_without = streams_needed(settings.loss)
    return (
        response_hidden(model, batch, "with", adapters) if need_with else None,
        response_hidden(model, batch, "without", adapters) if need_without else None,
    )


def reference_dce(graphdef: Any, params: dict, batch: Batch, settings: StepSettings) -> jax.Array:
    """Data-side effects [B, R] of the labels under a frozen reference model (no gradient)."""
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    w, layout = model.lm_head_weight()
    return effects.dce_from_hidden(
        response_hidden(model, batch, "with"),
        response_hidden(model, batch, "without"),
        w,
        batch["labels"],
        head_layout=layout,
        token_chunk=settings.token_chunk,
        vocab_chunk=settings.vocab_chunk,
    )


def with_fixed_dce(batch: Batch, reference_params: dict | None, settings: StepSettings) -> Batch:
    """`batch` with its `reference_dce` [B, R] where `dce: fixed` needs one and the batch (the prepared data)
    carries none: from the frozen reference model's `reference_params` (`reference_dce`).

    Raises:
        ValueError: `dce: fixed`, no `reference_dce` in the batch and no reference model (while tracing).
    """
    if settings.loss.dce != "fixed" or "reference_dce" in batch:
        return batch
    if reference_params is None:
        raise ValueError("loss.dce is 'fixed' but the batch has no reference_dce and no reference model")
    dce = reference_dce(settings.reference_graphdef, reference_params, batch, settings)
    return {**batch, "reference_dce": dce}


def batch_loss(
    params: dict,
    graphdef: Any,
    batch: Batch,
    settings: StepSettings,
    denominators: dict | None = None,
    base: dict | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Loss and aux of `batch` [B, ...] under `params` (with the frozen `base` under LoRA; `key` for the
    adapters' dropout). Fixed DCE comes from `batch["reference_dce"]`; `denominators` are the global ones
    (None: this batch's own)."""
    model, adapters = model_and_adapters(graphdef, params, base, settings, key)
    w, layout = model.lm_head_weight()
    return loss_from_hidden(
        *stream_hidden(model, batch, settings, adapters),
        w,
        batch["labels"],
        settings.loss,
        head_layout=layout,
        reference_dce=batch.get("reference_dce") if settings.loss.dce == "fixed" else None,
        denominators=denominators,
        example_ids=response_examples(batch) if settings.loss.normalize == "example" else None,
        frozen_head=settings.lora_scale is not None,  # under LoRA the head is the base's
        token_chunk=settings.token_chunk,
        vocab_chunk=settings.vocab_chunk,
        operand_dtype=settings.operand_dtype,
    )


def split_micro_batches(batch: Batch, count: int, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Batch:
    """[B, ...] leaves -> [count, B / count, ...]; micro-batch m takes rows m, m + count, m + 2 count, ...

    Interleaving keeps every micro-batch spread over all batch shards: when each shard's row count is a
    multiple of `count`, the reshape moves no data.
    """
    sharding = NamedSharding(mesh, logical_to_mesh_spec((None, "batch"), rules))

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)  # [count, B / count, ...]
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split, batch)


def label_denominators(batch: Batch, cfg: LossConfig) -> dict[str, jax.Array] | None:
    """The global denominators when they do not depend on the model: token counts for unweighted terms,
    Σω from the batch's fixed `reference_dce` for weighted ones, example counts with `normalize: example`;
    None when a model pass is needed. `batch` leaves may carry a leading micro-batch axis."""
    mask = effects.target_mask(batch["labels"])
    count = mask.sum(dtype=jnp.float32)
    if cfg.normalize == "example":
        examples = example_count(mask, response_examples(batch))
        return {"n_den": examples, "p_den": examples, "a_den": examples}
    if cfg.spec.next_weights == "js":
        return None
    if cfg.uses_target_weights:
        if cfg.dce != "fixed":
            return None
        weights = token_weights(batch["reference_dce"], mask, cfg).sum()
    else:
        weights = count
    n_den = weights if cfg.spec.next_weights == "target" else count
    p_den = weights if cfg.weight_alignment else count
    return {"n_den": n_den, "p_den": p_den, "a_den": count}


def batch_token_stats(batch: Batch) -> dict[str, jax.Array]:
    """Real input tokens of both streams (int32: a large global batch of long rows passes the 2**24 that
    float32 counts exactly) and their padding efficiency (real / slots, float32), as scalars."""
    real = sum((batch[f"{s}_segment_ids"] > 0).sum(dtype=jnp.int32) for s in ("with", "without"))
    slots = batch["with_segment_ids"].size + batch["without_segment_ids"].size
    return {"input_tokens": real, "padding_efficiency": real.astype(jnp.float32) / slots}


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    settings: StepSettings,
    mesh: Mesh,
    trainable: Any = None,
    *,
    rules: LogicalRules = DEFAULT_RULES,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch, reference_params=None, base_params=None) -> (state, metrics)`, pure, to be wrapped
    in `jax.jit` (`base_params`: the frozen base under LoRA, see `StepSettings`).

    `trainable`: a bool pytree like the parameters (None: all); frozen ones are stop-gradient, so no weight
    gradient is computed for them. Metrics (float32 scalars, the counts `tokens`, `skipped` and `input_tokens`
    int32): the combined loss aux (`losses` module: n_sum, n_den, tokens, ..., effect statistics), `loss`,
    `grad_norm`, `learning_rate`, `nonfinite` (1 when the loss or the gradient was not finite), `skipped`
    (updates skipped so far), `input_tokens`, `padding_efficiency`.
    """
    m = settings.micro_batches

    def freeze(params: dict) -> dict:
        if trainable is None:
            return params
        return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)

    def loss_fn(params, batch, denominators, base, key):
        return batch_loss(freeze(params), graphdef, batch, settings, denominators, base, key)

    def accumulated(params, batch, reference_params, base, key):
        micro = split_micro_batches(batch, m, mesh, rules)
        keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(m))
        if settings.loss.dce == "fixed" and "reference_dce" not in micro:
            _, dce = jax.lax.scan(
                lambda c, mb: (c, with_fixed_dce(mb, reference_params, settings)["reference_dce"]), 0, micro
            )
            micro = {**micro, "reference_dce": dce}  # [m, B / m, R]
        denominators = label_denominators(micro, settings.loss)
        if denominators is None:  # they depend on the model: a forward-only pre-pass
            _, auxes = jax.lax.scan(
                lambda c, xs: (c, loss_fn(jax.lax.stop_gradient(params), xs[0], None, base, xs[1])[1]),
                0,
                (micro, keys),
            )
            combined = combine_stacked(auxes, m)
            denominators = {k: combined[k] for k in (*DENOMINATOR_KEYS, "n_sum") if k in combined}

        def body(acc, xs):
            mb, mb_key = xs
            (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, denominators, base, mb_key)
            return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, g), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        grads, auxes = jax.lax.scan(body, zeros, (micro, keys))
        # Summed in float32, handed on in each parameter's dtype, as one pass's gradient is: optax takes
        # Adam's first moment's dtype from the gradient, so float32 sums for bfloat16 parameters would
        # change the optimizer state's dtype after the first step (a second compile, and a resume that
        # casts it back).
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return grads, combine_stacked(auxes, m)

    def step(state: TrainState, batch: Batch, reference_params: dict | None = None, base_params=None):
        key = None
        if settings.lora_scale is not None and settings.lora_dropout > 0:
            key = jax.random.fold_in(state.rng, state.step)
        if m == 1:
            batch = with_fixed_dce(batch, reference_params, settings)
            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, batch, None, base_params, key
            )
        else:
            grads, aux = accumulated(state.params, batch, reference_params, base_params, key)
        loss = loss_from_aux(aux, settings.loss)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skipped = state.skipped
        if settings.skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            skipped = skipped + (~finite).astype(skipped.dtype)
        # The logged rate is the one this update applies (or would have, when skipped): the schedule at the
        # optimizer's own count, which skipped updates do not advance (state.step does). An optimizer
        # without a schedule state (a fixed rate) logs schedule(state.step).
        count = schedule_count(state.opt_state)
        metrics = {
            **aux,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state.step if count is None else count), jnp.float32),
            "nonfinite": (~finite).astype(jnp.float32),
            "skipped": skipped,
            **batch_token_stats(batch),
        }
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng, skipped=skipped
        )
        return new_state, metrics

    return step


def make_eval_step(graphdef: Any, settings: StepSettings) -> Callable[..., dict]:
    """`eval_step(params, batch, reference_params=None, base_params=None) -> aux` (forward only, no dropout);
    combine the auxes of all batches with `combine_aux`, then `loss.metrics_from_aux`."""

    def eval_step(
        params: dict, batch: Batch, reference_params: dict | None = None, base_params: dict | None = None
    ) -> dict:
        batch = with_fixed_dce(batch, reference_params, settings)
        return batch_loss(params, graphdef, batch, settings, base=base_params)[1]

    return eval_step


def combine_stacked(auxes: dict, count: int) -> dict:
    """`combine_aux` over the leading [count] axis of stacked aux dicts."""
    return functools.reduce(combine_aux, [jax.tree.map(lambda x, i=i: x[i], auxes) for i in range(count)])
