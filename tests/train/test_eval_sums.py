"""`summed_eval_aux`: the eval step's sums over a split, with at most two batches queued on the device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextquill_jax.train import eval_sums
from nextquill_jax.train.eval_sums import summed_eval_aux


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

    monkeypatch.setattr(eval_sums.jax, "block_until_ready", wait)
    summed_eval_aux(step, range(4))
    assert events == ["dispatch 0", "dispatch 1", "wait 0", "dispatch 2", "wait 1", "dispatch 3", "wait 2"]


def test_no_batch_is_an_error():
    with pytest.raises(ValueError, match="at least one aux dict"):
        summed_eval_aux(sums_step, [])
