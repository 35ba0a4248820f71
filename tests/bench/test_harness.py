"""The benchmark harness's timed run (`bench.harness.TrainingHarness.time`) on a tiny model: the step it
times is the training step (its first loss is `train.step.batch_loss` of the initial parameters), and
`profile_dir` writes a `jax.profiler` trace of the timed steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nextquill_jax.bench import harness
from nextquill_jax.bench.harness import TrainingHarness, alternating_best_seconds, synthetic_batch
from nextquill_jax.parallel import make_mesh
from nextquill_jax.train.step import batch_loss


def test_timed_steps_run_the_training_step_and_are_profiled(tiny_model_config, tmp_path):
    cfg = tiny_model_config(vocab_size=128, compute_dtype="float32")
    batch, _ = synthetic_batch(
        4, 64, 2, context_tokens=8, entry_tokens=10, target_tokens=8, vocab=128, length_multiple=8
    )
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    harness = TrainingHarness(cfg, mesh)
    initial = jax.device_get(harness.state.params)
    loss = jax.jit(lambda p, b: batch_loss(p, harness.graphdef, b, harness.settings)[0])
    want = loss(initial, jax.tree.map(jnp.asarray, batch))
    timing = harness.time(batch, warmup=1, steps=2, profile_dir=tmp_path / "trace")
    assert len(timing.step_s) == 2 and min(timing.step_s) > 0
    np.testing.assert_allclose(timing.first_loss, float(want), rtol=1e-6)
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), sorted(tmp_path.rglob("*"))


def test_a_stepper_runs_the_training_step_and_advances_the_state(tiny_model_config):
    """`stepper(batch)` (what benchmarks/lora.py alternates): each call is one training step from the state
    as it is, its loss `batch_loss` of the parameters before it."""
    cfg = tiny_model_config(vocab_size=128, compute_dtype="float32")
    batch, _ = synthetic_batch(
        4, 64, 2, context_tokens=8, entry_tokens=10, target_tokens=8, vocab=128, length_multiple=8
    )
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    harness = TrainingHarness(cfg, mesh)
    loss = jax.jit(lambda p, b: batch_loss(p, harness.graphdef, b, harness.settings)[0])
    step = harness.stepper(batch)
    for _ in range(2):
        want = float(loss(jax.device_get(harness.state.params), jax.tree.map(jnp.asarray, batch)))
        state, metrics = step()
        assert state is harness.state
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-6)
    assert int(harness.state.step) == 2


def test_alternating_best_seconds_warms_each_up_then_calls_them_in_turn_keeping_each_ones_best(monkeypatch):
    """On a clock each call advances by its own programmed time: the warm-up calls are not timed, the rounds
    interleave the calls (load from other jobs then biases none against the others), and each keeps its
    fastest."""
    clock, order = [0.0], []
    durations = {"a": iter([9.0, 3.0, 1.0, 2.0]), "b": iter([9.0, 5.0, 6.0, 4.0])}  # warm-up first

    def call(name):
        def run():
            order.append(name)
            clock[0] += next(durations[name])

        return run

    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    best = alternating_best_seconds({"a": call("a"), "b": call("b")}, rounds=3)
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert best == {"a": 1.0, "b": 4.0}
