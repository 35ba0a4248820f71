"""Target weights ω from a function of the user's: `LossConfig.weighting` names it as `module:function`.

The paper weights a target token λ where its DCE exceeds δ, else ε (`effects.target_weights`). A research
extension that weights tokens otherwise (a soft threshold, a rank-based share, a clipped DCE) writes one pure
function and names it in the config; the step, micro-batching's global denominators, both normalisations,
the logged metrics and the effect report then use its weights wherever the paper's would be used. The
function:

    def weights(dce: jax.Array, mask: jax.Array, cfg: LossConfig) -> jax.Array: ...

takes DCE [..., R] float32 (no gradient; 0 where `mask` is False), the target mask [..., R] bool and the
run's `LossConfig` (its δ, λ, ε to read, or ignore), and returns ω [..., R], finite and >= 0 at target
slots. It runs traced, inside the compiled step: use `jnp`, not Python control flow on values. Extra
parameters go into the function itself (`functools.partial` in the module that `weighting` names), so
that the config names everything the weights depend on.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from nextquill_jax.loss.effects import target_weights

if TYPE_CHECKING:
    from nextquill_jax.loss.config import LossConfig

IMPORT_FIX = (
    "Fix: name a function as package.module:function, importable where the command runs (an installed "
    "package, or its directory on PYTHONPATH, e.g. `PYTHONPATH=. nextquill-jax train ...`)"
)


@functools.cache
def weighting_function(name: str) -> Callable:
    """The function `name` ("package.module:function", or "module:Class.attr") names, imported.

    Raises:
        ValueError: `name` is not of that form, its module does not import (with the import error), the
            module has no such attribute, or it is not callable; each message gives the fix.
    """
    module_name, colon, attribute = name.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{name!r} is not of the form 'module:function'. {IMPORT_FIX}")
    try:
        found = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"module {module_name!r} of {name!r} does not import ({e}). {IMPORT_FIX}") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(
                f"module {module_name!r} has no attribute {attribute!r} (from {name!r}). Fix: name a "
                "function the module defines"
            )
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"{name!r} is a {type(found).__name__}, not a function. Fix: name a function")
    return found


def token_weights(dce: jax.Array, mask: jax.Array, cfg: LossConfig) -> jax.Array:
    """ω of `cfg`: the function `cfg.weighting` names (module docstring), else the paper's λ where DCE > δ,
    else ε (`effects.target_weights`).

    Args:
        dce: [..., R] float32 data-side effects (NaN where a label was outside a stream's vocabulary).
        mask: [..., R] bool, True at target slots.

    Returns:
        [..., R] float32, 0 where `mask` is False, NaN where `dce` is NaN (so such a token makes the loss NaN
        instead of being weighted silently), no gradient.

    Raises:
        ValueError: the named function returns an array of another shape than `dce`.
    """
    if cfg.weighting is None:
        return target_weights(dce, mask, threshold=cfg.threshold, high=cfg.high, low=cfg.low)
    weights = jnp.asarray(weighting_function(cfg.weighting)(dce, mask, cfg))
    if weights.shape != dce.shape:
        raise ValueError(
            f"loss.weighting {cfg.weighting!r} returned weights of shape {weights.shape} for DCE of shape "
            f"{dce.shape}. Fix: return one weight per target slot, of the DCE's shape"
        )
    weights = jnp.where(jnp.isnan(dce), jnp.nan, weights.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.where(mask, weights, 0.0))
