"""The benchmark harness's timed run (`bench.harness.TrainingHarness.time`) on a tiny model: the step it
times is the training step (its first loss is `train.step.batch_loss` of the initial parameters), and
`profile_dir` writes a `jax.profiler` trace of the timed steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nextquill_jax.bench.harness import TrainingHarness, synthetic_batch
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
