"""`optim.trainable` (partial fine-tuning) end to end: the loop sets up, trains and checkpoints a run whose
frozen parameters hold no optimizer state."""

from __future__ import annotations

import jax
import numpy as np

from nextquill_jax.config import load_config
from nextquill_jax.train import loop
from nextquill_jax.train.model_setup import load_params
from nextquill_jax.train.optimizer import param_paths
from nextquill_jax.train.setup import build_mesh


def _params_after(tmp_path, data, tiny_config, read_state, name: str, **optim) -> dict:
    """The parameters a 2-step run `name` of the tiny config (with `optim` changes) ends with."""
    raw = tiny_config(data, tmp_path / name)
    raw["optim"].update(warmup_steps=0, **optim)  # step 0's update is a real one
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 2
    result = loop.train(load_config(None, base=raw), tmp_path / name, echo=lambda _: None)
    assert (result.status, result.step) == ("finished", 2)
    return read_state(tmp_path / name / "checkpoints" / "2")["params"]


def test_a_partial_fine_tune_trains_only_its_parameters(tmp_path, write_random_data, tiny_config, read_state):
    data = write_random_data(tmp_path / "data")
    cfg = load_config(None, base=tiny_config(data, tmp_path / "start"))
    start = jax.device_get(load_params(cfg.model, build_mesh(cfg), cfg.train.seed)[1])  # a run starts here
    part = _params_after(tmp_path, data, tiny_config, read_state, "part", trainable=["embed", "q_proj"])
    paths = jax.tree.leaves(param_paths(start))
    assert jax.tree.leaves(param_paths(part)) == paths
    trained = [p for p in paths if "embed" in p or "q_proj" in p]
    assert trained and len(trained) < len(paths), paths
    for path, before, after in zip(paths, jax.tree.leaves(start), jax.tree.leaves(part), strict=True):
        if path in trained:
            assert not np.array_equal(before, after), path
        else:
            np.testing.assert_array_equal(after, before, err_msg=path)
    # Patterns that together match every parameter train exactly what a run without optim.trainable does.
    everything = _params_after(tmp_path, data, tiny_config, read_state, "all", trainable=["embed", "."])
    plain = _params_after(tmp_path, data, tiny_config, read_state, "plain")
    jax.tree.map(np.testing.assert_array_equal, everything, plain)
