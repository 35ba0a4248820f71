"""How far the host runs ahead of the device: at most `IN_FLIGHT` dispatched computations not yet waited for,
in training (`PendingMetrics`) and in evaluation (`summed_eval_aux`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from nextquill_jax.loss import combine_aux

# Work already queued on a device cannot be cancelled, and a process waits for it at exit; a stop's
# checkpoint waits for it too. With every batch of a split dispatched at once, `compare` stopped by SIGTERM
# during an evaluation said so and then went on computing the rest of the split (about a minute, 96 examples
# of the study on CPU); training, fetching its metrics every `logging.every_steps` steps, ran that many steps
# ahead, each to be computed before a stop's checkpoint is saved. Two keep the device busy while the host
# prepares the next batch.
IN_FLIGHT = 2


def wait_behind(results: Sequence[Any]) -> None:
    """Called after each dispatch with the results dispatched so far (oldest first): wait until
    `results[-IN_FLIGHT]` is computed, so that at most `IN_FLIGHT` are queued; nothing while fewer."""
    if len(results) >= IN_FLIGHT:
        jax.block_until_ready(results[-IN_FLIGHT])


def summed_eval_aux(
    step: Callable[[Any], Mapping[str, jax.Array]], batches: Iterable[Any]
) -> dict[str, jax.Array]:
    """`combine_aux` of `step(batch)` over `batches` (each a host batch as the pipeline yields it; `step` runs
    the eval step on it and returns its aux dict), with at most `IN_FLIGHT` batches queued (`wait_behind`).

    Raises:
        ValueError: `batches` is empty (from `combine_aux`).
    """
    auxes: list[Mapping[str, jax.Array]] = []
    for batch in batches:
        auxes.append(step(batch))
        wait_behind(auxes)
    return combine_aux(*auxes)
