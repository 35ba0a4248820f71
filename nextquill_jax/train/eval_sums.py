"""The eval step's sums over the batches of a split, with a bounded number of batches queued on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from nextquill_jax.loss import combine_aux

# Batches dispatched and not yet waited for. Work already queued on a device cannot be cancelled, and a
# process waits for it at exit: with every batch of a split dispatched at once, `compare` stopped by SIGTERM
# during an evaluation said so and then went on computing the rest of the split (about a minute, 96 examples
# of the study on CPU). Two keep the device busy while the host prepares the next batch.
IN_FLIGHT = 2


def summed_eval_aux(
    step: Callable[[Any], Mapping[str, jax.Array]], batches: Iterable[Any]
) -> dict[str, jax.Array]:
    """`combine_aux` of `step(batch)` over `batches` (each a host batch as the pipeline yields it; `step` runs
    the eval step on it and returns its aux dict), waiting for each batch's aux once the next `IN_FLIGHT - 1`
    are dispatched, so that at most `IN_FLIGHT` batches are queued when the host is stopped.

    Raises:
        ValueError: `batches` is empty (from `combine_aux`).
    """
    auxes: list[Mapping[str, jax.Array]] = []
    for batch in batches:
        auxes.append(step(batch))
        if len(auxes) >= IN_FLIGHT:
            jax.block_until_ready(auxes[-IN_FLIGHT])
    return combine_aux(*auxes)
