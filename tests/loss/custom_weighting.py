"""Weighting functions that tests name in `loss.weighting` (`tests.loss.custom_weighting:NAME`)."""

import jax
import jax.numpy as jnp

TAU = 0.02  # the soft step's width, in DCE units


def soft_weights(dce: jax.Array, mask: jax.Array, cfg) -> jax.Array:
    """ε + (λ − ε) · sigmoid((DCE − δ) / τ): the paper's step weights, smoothed."""
    return cfg.low + (cfg.high - cfg.low) * jax.nn.sigmoid((dce - cfg.threshold) / TAU)


def one_per_row(dce: jax.Array, mask: jax.Array, cfg) -> jax.Array:
    """A weight per row instead of per token: the wrong shape."""
    return jnp.ones(dce.shape[:-1])


def negative_below_zero(dce: jax.Array, mask: jax.Array, cfg) -> jax.Array:
    """-1 where the history lowers the label's probability: a weight the contract forbids."""
    return jnp.where(dce < 0, -1.0, 1.0)


def linear_in_dce(dce: jax.Array, mask: jax.Array, cfg) -> jax.Array:
    """(1 + DCE) / 2: in [0, 1] wherever DCE, a difference of two probabilities, can be."""
    return (1.0 + dce) / 2.0


NOT_A_FUNCTION = 3


def hard_step(dce: jax.Array, mask: jax.Array, cfg) -> jax.Array:
    """The paper's step written out, which maps a NaN DCE to ε (NaN > δ is False): the library's own
    NaN-propagation must still make that token's weight NaN."""
    return jnp.where(dce > cfg.threshold, cfg.high, cfg.low)
