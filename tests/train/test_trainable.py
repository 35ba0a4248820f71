"""`optim.trainable` (partial fine-tuning) end to end: the loop sets up, trains and checkpoints a run whose
frozen parameters hold no optimizer state."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from nextquill_jax.config import load_config
from nextquill_jax.train import loop
from nextquill_jax.train.model_setup import load_params
from nextquill_jax.train.optimizer import param_paths
from nextquill_jax.train.setup import build_mesh

PART = ["embed", "q_proj"]  # the partial fine-tune: the embedding and the query projections


def _train(tmp_path, data, tiny_config, name: str, *, stop_at: int | None = None, echo=None, **sections):
    """`loop.train` of the tiny config as run `name` (3 steps, no warm-up, so step 0's update is a real one;
    unclipped: clipping couples all trained gradients through their norm), with `sections` updated;
    `stop_at`: stopped after that step as by a preemption (its state saved)."""
    import dataclasses

    raw = tiny_config(data, tmp_path / name)
    raw["optim"].update(warmup_steps=0, clip_norm=None)
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 3
    for section, values in sections.items():
        raw[section].update(values)
    schedule = loop.actions_at

    def stop(step, cfg, run, *, stop):
        due = schedule(step, cfg, run, stop=stop)
        return dataclasses.replace(due, stop=True, save=True) if step == stop_at else due

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "actions_at", stop)
        return loop.train(load_config(None, base=raw), tmp_path / name, echo=echo or (lambda _: None))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, write_random_data, tiny_config):
    """(root, data, the start of a run of the tiny config): the runs `whole` (training PART for 3 steps,
    every step saved), `everything` (trainable patterns that together match every parameter) and `plain`
    (no `optim.trainable`), the last two stopped after step 1. The 3-step schedule of every run has the
    same step-0 learning rate; `whole` compiles the step the resume test's runs reuse."""
    root = tmp_path_factory.mktemp("trainable")
    data = write_random_data(root / "data")
    cfg = load_config(None, base=tiny_config(data, root / "start"))
    start = jax.device_get(load_params(cfg.model, build_mesh(cfg), cfg.train.seed)[1])  # a run starts here
    whole = _train(
        root, data, tiny_config, "whole", optim={"trainable": PART}, checkpoint={"every_steps": 1, "keep": 3}
    )
    assert (whole.status, whole.step) == ("finished", 3)
    for name, trainable in (("everything", {"trainable": ["embed", "."]}), ("plain", {})):
        result = _train(root, data, tiny_config, name, stop_at=1, optim=trainable)
        assert (result.status, result.step) == ("preempted", 1)
    return root, data, start


def test_a_partial_fine_tune_trains_only_its_parameters_as_adamw_on_all_would(runs, read_state):
    """AdamW (unclipped) updates each parameter from its own gradient alone, so after one step the trained
    parameters take the update a run training all of them gives, and the frozen ones keep their initial
    values; patterns that together match every parameter train exactly what a run without
    `optim.trainable` does."""
    root, _, start = runs
    part, plain, everything = (
        read_state(root / name / "checkpoints" / "1")["params"] for name in ("whole", "plain", "everything")
    )
    paths = jax.tree.leaves(param_paths(start))
    assert jax.tree.leaves(param_paths(part)) == paths
    trained = [p for p in paths if "embed" in p or "q_proj" in p]
    assert trained and len(trained) < len(paths), paths
    leaves = (jax.tree.leaves(t) for t in (start, part, plain))
    for path, before, after, full in zip(paths, *leaves, strict=True):
        if path in trained:  # weight-decayed: AdamW's first step moves every entry by about lr
            assert np.abs(after - before).max() > 1e-3, path
            np.testing.assert_allclose(after, full, rtol=0, atol=1e-7, err_msg=path)
        else:
            np.testing.assert_array_equal(after, before, err_msg=path)
    jax.tree.map(np.testing.assert_array_equal, everything, plain)
    # The same first step's gradient norm: over the trained parameters alone (the frozen ones get none), so
    # below the norm over all of them; patterns matching everything give the full one.
    grad_norm = {
        name: next(
            row["grad_norm"]
            for row in map(json.loads, (root / name / "metrics.jsonl").read_text().splitlines())
            if row.get("step") == 1 and "grad_norm" in row
        )
        for name in ("whole", "plain", "everything")
    }
    assert 0 < grad_norm["whole"] < grad_norm["plain"] == pytest.approx(grad_norm["everything"], rel=1e-6)


def test_a_partial_fine_tune_resumes_to_the_uninterrupted_state(runs, tiny_config, read_state):
    """The optimizer state with frozen (MaskedNode) entries saves and restores: stopped after step 2 and
    resumed, a 3-step run ends with the state of the same run uninterrupted (`whole`)."""
    root, data, _ = runs
    stopped = _train(root, data, tiny_config, "split", stop_at=2, optim={"trainable": PART})
    said: list[str] = []
    resumed = _train(root, data, tiny_config, "split", echo=said.append, optim={"trainable": PART})
    assert f"resuming from {root / 'split' / 'checkpoints' / '2'} (step 2)" in said, said
    assert [(r.status, r.step) for r in (stopped, resumed)] == [("preempted", 2), ("finished", 3)]
    jax.tree.map(
        np.testing.assert_array_equal,
        read_state(root / "whole" / "checkpoints" / "3"),
        read_state(root / "split" / "checkpoints" / "3"),
    )
