"""`optim.trainable` (partial fine-tuning) end to end: the loop sets up, trains and checkpoints a run whose
frozen parameters hold no optimizer state."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nextquill_jax.config import load_config
from nextquill_jax.train import loop
from nextquill_jax.train.model_setup import load_params
from nextquill_jax.train.optimizer import param_paths
from nextquill_jax.train.setup import build_mesh


def _params_after(tmp_path, data, tiny_config, read_state, name: str, steps: int = 2, **optim) -> dict:
    """The parameters a `steps`-step run `name` of the tiny config (with `optim` changes) ends with."""
    raw = tiny_config(data, tmp_path / name)
    raw["optim"].update(warmup_steps=0, **optim)  # step 0's update is a real one
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = steps
    result = loop.train(load_config(None, base=raw), tmp_path / name, echo=lambda _: None)
    assert (result.status, result.step) == ("finished", steps)
    return read_state(tmp_path / name / "checkpoints" / str(steps))["params"]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, write_random_data, tiny_config, read_state):
    """The start and one unclipped step (clipping couples all trained gradients through their norm) of the
    tiny config: training `embed` and `q_proj`, everything by patterns, and without `optim.trainable`."""
    tmp_path = tmp_path_factory.mktemp("trainable")
    data = write_random_data(tmp_path / "data")
    cfg = load_config(None, base=tiny_config(data, tmp_path / "start"))
    start = jax.device_get(load_params(cfg.model, build_mesh(cfg), cfg.train.seed)[1])  # a run starts here
    runs = {
        name: _params_after(tmp_path, data, tiny_config, read_state, name, 1, clip_norm=None, **trainable)
        for name, trainable in (
            ("part", {"trainable": ["embed", "q_proj"]}),
            ("everything", {"trainable": ["embed", "."]}),
            ("plain", {}),
        )
    }
    return start, runs


def test_a_partial_fine_tune_trains_only_its_parameters_as_adamw_on_all_would(one_step):
    """AdamW (unclipped) updates each parameter from its own gradient alone, so the trained parameters take
    the update a run training all of them gives, and the frozen ones keep their initial values; patterns
    that together match every parameter train exactly what a run without `optim.trainable` does."""
    start, runs = one_step
    paths = jax.tree.leaves(param_paths(start))
    assert jax.tree.leaves(param_paths(runs["part"])) == paths
    trained = [p for p in paths if "embed" in p or "q_proj" in p]
    assert trained and len(trained) < len(paths), paths
    leaves = (jax.tree.leaves(t) for t in (start, runs["part"], runs["plain"]))
    for path, before, after, full in zip(paths, *leaves, strict=True):
        if path in trained:  # weight-decayed: AdamW's first step moves every entry by about lr
            assert np.abs(after - before).max() > 1e-3, path
            np.testing.assert_allclose(after, full, rtol=0, atol=1e-7, err_msg=path)
        else:
            np.testing.assert_array_equal(after, before, err_msg=path)
    jax.tree.map(np.testing.assert_array_equal, runs["everything"], runs["plain"])


def test_a_partial_fine_tune_resumes_to_the_uninterrupted_state(
    tmp_path, monkeypatch, write_random_data, tiny_config, read_state
):
    """The optimizer state with frozen (MaskedNode) entries saves and restores: stopped after step 2 and
    resumed, a 3-step run ends with the state of the same run uninterrupted."""
    import dataclasses

    data = write_random_data(tmp_path / "data")

    def config(name: str):
        raw = tiny_config(data, tmp_path / name)
        raw["optim"].update(warmup_steps=0, trainable=["embed", "q_proj"])
        raw["checkpoint"].update(every_steps=100, async_save=False)
        raw["train"]["max_steps"] = 3
        return load_config(None, base=raw)

    whole = loop.train(config("whole"), tmp_path / "whole", echo=lambda _: None)
    schedule = loop.actions_at

    def stop_at_2(step, cfg, run, *, stop):
        due = schedule(step, cfg, run, stop=stop)
        return dataclasses.replace(due, stop=True, save=True) if step == 2 else due

    with monkeypatch.context() as patch:
        patch.setattr(loop, "actions_at", stop_at_2)
        stopped = loop.train(config("split"), tmp_path / "split", echo=lambda _: None)
    said: list[str] = []
    resumed = loop.train(config("split"), tmp_path / "split", echo=said.append)
    assert f"resuming from {tmp_path / 'split' / 'checkpoints' / '2'} (step 2)" in said, said
    assert [(r.status, r.step) for r in (whole, stopped, resumed)] == [
        ("finished", 3),
        ("preempted", 2),
        ("finished", 3),
    ]
    jax.tree.map(
        np.testing.assert_array_equal,
        read_state(tmp_path / "whole" / "checkpoints" / "3"),
        read_state(tmp_path / "split" / "checkpoints" / "3"),
    )
