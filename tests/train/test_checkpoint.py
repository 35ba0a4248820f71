"""Checkpoint retention (the last K plus the best by an eval metric); restoring state and data position."""

from __future__ import annotations

import grain
import jax
import numpy as np

from nextquill_jax.config import CheckpointConfig
from nextquill_jax.train.checkpoint import Checkpointer


def test_keeps_the_last_k_plus_the_best_and_restores_the_data_position(tmp_path):
    cfg = CheckpointConfig(keep=2, best_metric="eval/loss", best_mode="min", async_save=False)
    ckpt = Checkpointer(tmp_path, cfg)
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    eval_losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: None, 5: 3.0, 6: None}  # None: no evaluation at that step
    for step, loss in eval_losses.items():
        for _ in range(step):
            next(data)  # after saving step s, the next element is 1 + 2 + ... + s
        metrics = {} if loss is None else {"eval/loss": loss}
        state = {"w": np.full((3,), step, np.float32)}
        ckpt.save(step, state, data, config={"x": 1}, progress={"step": step}, metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]  # the last two, plus step 2 with the lowest eval/loss

    fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=device)}
    state, progress = ckpt.restore(2, abstract, fresh)
    np.testing.assert_array_equal(np.asarray(state["w"]), [2, 2, 2])
    assert progress == {"step": 2} and next(fresh) == 1 + 2
    assert ckpt.read_config(5) == {"x": 1}
    ckpt.close()


def test_a_read_only_checkpointer_logs_no_warnings_and_reads_progress(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt.save(1, {"w": np.zeros(2, np.float32)}, data, config={"x": 1}, progress={"step": 1, "base": None})
    ckpt.close()
    with caplog.at_level("WARNING"):
        reader = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    assert [r.getMessage() for r in caplog.records if "read only" in r.getMessage().lower()] == []
    assert reader.read_progress(1) == {"step": 1, "base": None} and reader.read_config(1) == {"x": 1}
    reader.close()
