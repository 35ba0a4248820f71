"""Target weights ω from a function of the user's: `LossConfig.weighting` names it as `module:function`.

The paper weights a target token λ where its DCE exceeds δ, else ε (`effects.target_weights`). A research
extension that weights tokens otherwise (a soft threshold, a clipped or rescaled DCE) writes one pure
function and names it in the config; the step, micro-batching's global denominators, both normalisations,
the logged metrics and the effect report then use its weights wherever the paper's would be used. The
function:

    def weights(dce: jax.Array, mask: jax.Array, cfg: LossConfig) -> jax.Array: ...

takes DCE [..., R] float32 (no gradient; 0 where `mask` is False), the target mask [..., R] bool and the
run's `LossConfig` (its δ, λ, ε to read, or ignore), and returns ω [..., R], finite and >= 0 at target
slots. It runs traced, inside the compiled step: use `jnp`, not Python control flow on values. Extra
parameters go into the function itself (`functools.partial` in the module that `weighting` names), so
that the config names everything the weights depend on.

ω_t must depend on token t's own DCE (and `cfg`) alone, element by element: the array it is given is
whatever its caller holds (a micro-batch, a step's stacked micro-batches [m, B / m, R] for the global
denominators, packed rows of several examples, an evaluation batch, the effect report's rows of one example
each). A weight that reduces over tokens (a rank, a share of a sum, a per-row normalisation) would change
with `micro_batches`, packing and batch sizes, and the step's denominators would not be its numerators'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nextquill_jax.config_schema import ConfigError
from nextquill_jax.loss.config import LossConfig, weighting_function
from nextquill_jax.loss.effects import target_weights


def token_weights(dce: jax.Array, mask: jax.Array, cfg: LossConfig) -> jax.Array:
    """ω of `cfg`: the function `cfg.weighting` names (module docstring), else the paper's λ where DCE > δ,
    else ε (`effects.target_weights`).

    Args:
        dce: [..., R] float32 data-side effects (NaN where a label was outside a stream's vocabulary).
        mask: [..., R] bool, True at target slots.
        cfg: the run's loss settings: `weighting`, or δ, λ, ε.

    Returns:
        [..., R] float32, 0 where `mask` is False, NaN where `dce` is NaN (so such a token makes the loss NaN
        instead of being weighted silently), no gradient.

    Raises:
        ConfigError: the named function returns an array of another shape than `dce` (found while the step
            or `metric_names` traces it, before a step runs; a ConfigError, so the command prints the fix as
            one line, not a traceback).
    """
    if cfg.weighting is None:
        return target_weights(dce, mask, threshold=cfg.threshold, high=cfg.high, low=cfg.low)
    weights = jnp.asarray(weighting_function(cfg.weighting)(dce, mask, cfg))
    if weights.shape != dce.shape:
        raise ConfigError(
            f"loss.weighting {cfg.weighting!r} returned weights of shape {weights.shape} for DCE of shape "
            f"{dce.shape}. Fix: return one weight per target slot, of the DCE's shape"
        )
    weights = jnp.where(jnp.isnan(dce), jnp.nan, weights.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.where(mask, weights, 0.0))


# DCE values the weights are probed at before training: DCE is a difference of two probabilities, so it
# lies in [-1, 1]; 0, ±1e-4 .. ±1 (both ends included).
_PROBE_DCE = np.concatenate([-np.logspace(0, -4, 9), [0.0], np.logspace(-4, 0, 9)]).astype(np.float32)


def check_weighting_values(cfg: LossConfig) -> None:
    """Check `cfg.weighting`'s function (if any) against its contract's values before a run trains: at DCE
    values from -1 to 1 (the range of a difference of two probabilities; 0 and ±1e-4 .. ±1), every ω must be
    finite and >= 0. A negative weight makes the loss reward what it should penalise, and nothing later would
    say so (the loss falls without bound).

    Raises:
        ConfigError: a probed DCE gives a negative or non-finite ω, naming both and the fix; or as
            `token_weights` (a wrong shape).
    """
    if cfg.weighting is None:
        return
    dce = jnp.asarray(_PROBE_DCE)[None]  # [1, 19]
    weights = np.asarray(token_weights(dce, jnp.ones(dce.shape, bool), cfg))[0]  # [19]
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        raise ConfigError(
            f"loss.weighting {cfg.weighting!r} gives the weight {weights[at]:g} to a target token of DCE "
            f"{_PROBE_DCE[at]:g} ({int(bad.sum())} of {bad.size} probed DCE values from -1 to 1 get a "
            f"negative or non-finite weight). Fix: return weights that are finite and >= 0 at target slots"
        )
