"""The optax chain: global-norm clipping, AdamW with a warm-up/decay schedule, optional frozen parameters.

Defaults follow the public NextQuill code (Hugging Face Trainer + torch AdamW): the learning rate rises
linearly from 0 over `ceil(warmup_ratio * total_steps)` steps, then decays linearly to 0 at `total_steps`
(the last update, step total_steps - 1, uses the rate one decay step above 0); weight decay is decoupled
(`p -= lr * wd * p`) and skips norm scales and biases.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from nextquill_jax.config import OptimConfig

# A nested dict (or other pytree) of parameters: arrays, or shape structs where only the structure matters.
PyTree = Any


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warm-up length in optimizer steps: `cfg.warmup_steps`, else ceil(warmup_ratio * total_steps), the
    product rounded to 9 decimals first so that float error does not add a step (0.07 * 100 is
    7.000000000000001 in floats: 7 steps, where the Trainer's plain ceil gives 8). A `warmup_steps` longer
    than the run is kept, as the Trainer's schedules keep it: the run ends part-way up the ramp."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(round(cfg.warmup_ratio * total_steps, 9))


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step count (0-based: step 0's update uses `lr(0)`).

    Raises:
        ValueError: `total_steps` < 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    lr, warm = cfg.learning_rate, warmup_steps(cfg, total_steps)
    decay_steps = max(total_steps - warm, 1)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(lr, lr * cfg.min_lr_ratio, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.min_lr_ratio)
    else:
        decay = optax.constant_schedule(lr)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def param_paths(params: PyTree) -> PyTree:
    """A pytree like `params` whose leaves are "/"-joined key paths, e.g. "layers/attn/q_proj"."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), params
    )


def matches(params: PyTree, patterns: Sequence[str]) -> PyTree:
    """A bool pytree like `params`: True where the parameter path matches any regex in `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree.map(lambda path: any(c.search(path) for c in compiled), param_paths(params))


def trainable_mask(cfg: OptimConfig, params: PyTree) -> PyTree:
    """A bool pytree like `params`: which parameters are updated (all when `cfg.trainable` is empty).

    Raises:
        ValueError: `cfg.trainable` matches no parameter (naming a few paths to choose from).
    """
    if not cfg.trainable:
        return jax.tree.map(lambda _: True, params)
    mask = matches(params, cfg.trainable)
    if not any(jax.tree.leaves(mask)):
        examples = jax.tree.leaves(param_paths(params))[:6]
        raise ValueError(
            f"optim.trainable {cfg.trainable} matches no parameter. Fix: use regular expressions over paths "
            f"such as {examples}."
        )
    return mask


def schedule_count(opt_state: optax.OptState) -> jax.Array | None:
    """The step count the learning-rate schedule of `make_optimizer`'s state reads (optax's own, in its
    `ScaleByScheduleState`): the number of updates applied, which a skipped non-finite update leaves as is.
    None when the state holds none (an optimizer with a fixed rate, as some tests and benchmarks use).

    Raises:
        ValueError: `opt_state` holds more than one schedule count.
    """
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    found = [x.count for x in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(x)]
    if len(found) > 1:
        raise ValueError(
            f"expected at most one ScaleByScheduleState in the optimizer state, found {len(found)}"
        )
    return found[0] if found else None


DEFAULT_NO_DECAY = ("norm", "bias")  # architecture-neutral defaults: a model may have no biases


def check_patterns(cfg: OptimConfig, params: PyTree) -> None:
    """Raise ValueError naming each `cfg.trainable` pattern, and each `cfg.no_decay` pattern other than the
    defaults ("norm", "bias"), that matches no parameter path of `params` (listing a few real paths)."""
    paths = jax.tree.leaves(param_paths(params))
    for name, patterns, exempt in (
        ("trainable", cfg.trainable, ()),
        ("no_decay", cfg.no_decay, DEFAULT_NO_DECAY),
    ):
        for pattern in patterns:
            if pattern not in exempt and not any(re.search(pattern, path) for path in paths):
                raise ValueError(
                    f"optim.{name} pattern {pattern!r} matches no parameter. "
                    f"Fix: remove it, or write a regular expression searched in parameter paths such as "
                    f"{paths[:6]}."
                )


def make_optimizer(cfg: OptimConfig, params: PyTree, total_steps: int) -> optax.GradientTransformation:
    """Clip → AdamW (decay masked by `cfg.no_decay`) with the schedule; frozen parameters get zero updates
    and no optimizer state.

    `params` (arrays or shape structs) fixes the masks' structure. Raises ValueError as `trainable_mask`.
    """
    # A callable mask: inside multi_transform the tree it sees has the frozen leaves masked out.
    decay_mask = lambda tree: jax.tree.map(lambda skip: not skip, matches(tree, cfg.no_decay))
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm is not None else []
    chain.append(
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*chain)
    if not cfg.trainable:
        return tx
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(cfg, params))
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
