"""The train state: everything a step reads and writes, as one pytree (checkpointed whole)."""

from __future__ import annotations

import jax
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """step: optimizer steps taken, int32 []. params: the model's parameters as a nested dict of arrays (the
    pure-dict form of `nnx.state(model, nnx.Param)`; `nnx.merge(graphdef, params)` rebuilds the model).
    opt_state: the optax state. rng: a PRNG key [2] uint32 for anything random in the step. skipped: updates
    skipped because the loss was not finite, int32 []."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    skipped: jax.Array
