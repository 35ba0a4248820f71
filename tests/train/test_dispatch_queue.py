"""dispatch_queue: at most two computations queued on the device, in evaluation (`summed_eval_aux`) and in
training (`PendingMetrics`)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextquill_jax.train import dispatch_queue, loop
from nextquill_jax.train.dispatch_queue import summed_eval_aux


@jax.jit
def sums_step(batch: jax.Array) -> dict[str, jax.Array]:
    """A stand-in eval step: the sums `combine_aux` adds, of one batch [rows, slots]."""
    return {
        "n_sum": jnp.sum(batch * 0.5),
        "n_den": jnp.sum(batch > 0).astype(jnp.float32),
        "tokens": batch.size,
    }


def test_the_sums_are_every_batchs_added():
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1, 1, (3, 7)).astype(np.float32) for _ in range(5)]
    aux = summed_eval_aux(sums_step, batches)
    stacked = np.stack(batches).astype(np.float64)
    np.testing.assert_allclose(float(aux["n_sum"]), (stacked * 0.5).sum(), rtol=1e-6)
    assert float(aux["n_den"]) == (stacked > 0).sum() and int(aux["tokens"]) == stacked.size


def test_each_batch_is_waited_for_once_the_next_is_dispatched(monkeypatch):
    """At most two batches are queued when the host stops: a signal that stops `compare` during an evaluation
    leaves one batch to finish, not the rest of the split (device work cannot be cancelled)."""
    events = []

    def step(k):
        events.append(f"dispatch {k}")
        return {"n_sum": k}

    def wait(aux):
        events.append(f"wait {aux['n_sum']}")
        return aux

    monkeypatch.setattr(dispatch_queue.jax, "block_until_ready", wait)
    summed_eval_aux(step, range(4))
    assert events == ["dispatch 0", "dispatch 1", "wait 0", "dispatch 2", "wait 1", "dispatch 3", "wait 2"]


def test_no_batch_is_an_error():
    with pytest.raises(ValueError, match="at least one aux dict"):
        summed_eval_aux(sums_step, [])


def test_training_waits_for_the_step_before_each_step_it_dispatches(monkeypatch):
    """`PendingMetrics.add`, called as each step is dispatched, waits for the step before it: the host is at
    most two steps ahead however rarely metrics are fetched, so a stop's checkpoint waits for two steps, not
    `logging.every_steps`. After a fetch (`flush` empties the list) nothing is left to wait for."""
    waited = []
    monkeypatch.setattr(
        dispatch_queue.jax, "block_until_ready", lambda metrics: waited.append(metrics["step"])
    )
    pending = SimpleNamespace(steps=[], data_wait_s=0.0)
    for step in (1, 2, 3, 4):
        loop.PendingMetrics.add(pending, step, {"step": step}, data_wait_s=0.5)
    assert waited == [1, 2, 3] and pending.data_wait_s == 2.0
    pending.steps = []
    loop.PendingMetrics.add(pending, 5, {"step": 5}, data_wait_s=0.0)
    assert waited == [1, 2, 3]
