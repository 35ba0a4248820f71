"""A resume under another mesh: train/resume.py lets a resume change `mesh` (Orbax reshards the state onto
the new layout); the resumed run must be the uninterrupted one, to float32 reduction-order noise."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from nextquill_jax.config import load_config
from tests.shared import TINY_EOS_ID, TINY_QWEN

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py

STEPS, CHECKPOINT = 6, 3
FSDP8 = {"data": 1, "fsdp": 8, "tensor": 1}
DATA2_TENSOR4 = {"data": 2, "fsdp": 1, "tensor": 4}
# The metrics compared step by step: the training loss and gradient norm, the schedule's learning rate, and
# the validation loss at the end of each epoch (every 3 steps here) and of the run.
COMPARED = ("loss", "grad_norm", "learning_rate", "eval/loss")
LORA = {"rank": 4, "alpha": 8.0, "targets": ["attn/(q|k|v|o)_proj", "mlp/(gate|up|down)"]}


def _metrics(workdir) -> dict[tuple[int, str], float]:
    """(step, key) -> value of every row of `workdir`/metrics.jsonl, asserting that no (step, key) repeats
    and that every step trained has its row."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    pairs = [((r["step"], k), v) for r in rows for k, v in r.items() if k != "step"]
    assert len(dict(pairs)) == len(pairs), workdir
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1)), rows
    return dict(pairs)


def _assert_close_state(reference: dict, resumed: dict, learning_rate: float) -> None:
    """Integer leaves (step counts, the RNG key) equal; float leaves within rtol 1e-5 plus an atol per kind.

    Parameters: atol 1e-2 x the learning rate, a hundredth of the most Adam moves an element in one step.
    Adam moves every element by up to ~lr a step however small its gradient, so float noise in a gradient
    that is 0 in exact arithmetic (the key bias: softmax ignores a shift shared by all keys) shows as a
    difference on the scale of lr, not of the parameter: 4e-7 in the key bias here (1.3e-6 with blockwise
    attention; 3.1e-6 after 6 steps under each mesh from the start), where every other parameter is within
    6e-8. A restore that zeroed the Adam moments, kept the initial parameters or swapped the layers leaves
    parameters 3e-3 or more away after the 3 resumed steps. Adam's moments: atol 1e-5 x the leaf's largest
    value, as a moment of tiny gradients is tiny (the key bias's second moment is ~4e-12): an absolute atol
    would pass anything there."""
    flat_ref = jax.tree_util.tree_flatten_with_path(reference)[0]
    flat_res = jax.tree_util.tree_flatten_with_path(resumed)[0]
    assert [p for p, _ in flat_ref] == [p for p, _ in flat_res]
    for (path, want), (_, got) in zip(flat_ref, flat_res, strict=True):
        name = jax.tree_util.keystr(path)
        if want.dtype.kind not in "fc":
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        atol = 1e-2 * learning_rate if name.startswith("['params']") else 1e-5 * float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_a_run_checkpointed_under_fsdp_8_resumes_under_data_2_tensor_4_as_the_uninterrupted_run(
    lora, tmp_path, train_runs, read_state
):
    """Proves that a run checkpointed under one mesh and resumed under another trains on as if it had never
    stopped. The reference: the same run uninterrupted, 6 steps under fsdp 8 (8 simulated CPU devices, in a
    subprocess) with a checkpoint every 3. Its checkpoint 6 is then deleted and the run resumed from
    checkpoint 3 under data 2 x tensor 4 (a new subprocess; Orbax reshards the state onto the new mesh).
    Steps 4-6's losses, gradient norms and learning rates, the validation loss at step 6, and the final
    parameters, Adam moments and counters equal the reference's to float32 reduction-order noise: for full
    fine-tuning, and for LoRA adapters over a frozen base. 4 kv heads, so that tensor 4 splits them; dense
    XLA attention, which compiles fastest."""
    r = train_runs(tmp_path, STEPS)
    model = {
        "overrides": {**TINY_QWEN, "num_kv_heads": 4, "eos_token_ids": [TINY_EOS_ID]},
        "attention_impl": "xla_dense",
    }
    sections = dict(model=model, checkpoint={"every_steps": CHECKPOINT, "keep": 2})
    uninterrupted = r.config("run", lora=lora, mesh=FSDP8, **sections)
    first = r.finish(r.start(uninterrupted, 8)).result
    assert (first["status"], first["step"], first["mesh"]) == ("finished", STEPS, FSDP8), first
    work, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    reference_metrics, reference = _metrics(work), read_state(ckpts / str(STEPS))
    for later in [p for p in ckpts.iterdir() if int(p.name.split(".")[0]) > CHECKPOINT]:
        shutil.rmtree(later)

    resumed_cfg = r.config("run", lora=lora, mesh=DATA2_TENSOR4, **sections)  # the same run, another mesh
    second = r.finish(r.start(resumed_cfg, 8))
    assert f"resuming from {ckpts / str(CHECKPOINT)} (step {CHECKPOINT})" in second.stdout, second.stdout
    assert (second.result["status"], second.result["step"]) == ("finished", STEPS), second.result
    assert second.result["mesh"] == DATA2_TENSOR4

    # Steps 1-3 were not trained again: their rows are the uninterrupted run's as written, timings included.
    # The rows after the checkpoint are the resumed run's: a resume drops the ones it trains again.
    metrics = _metrics(work)
    before = lambda pairs: {(s, k): pairs[s, k] for s, k in pairs if s <= CHECKPOINT}
    assert before(metrics) == before(reference_metrics)
    resumed = lambda pairs: {(s, k) for s, k in pairs if s > CHECKPOINT}
    assert resumed(metrics) == resumed(reference_metrics)  # the same rows, with the same keys
    compared = sorted((s, k) for s, k in resumed(reference_metrics) if k in COMPARED)
    assert (STEPS, "eval/loss") in compared, compared
    for step, key in compared:
        want, got = reference_metrics[step, key], metrics[step, key]
        assert abs(got - want) <= 1e-5 * abs(want), (step, key, want, got)
    learning_rate = load_config(uninterrupted).optim.learning_rate
    _assert_close_state(reference, read_state(ckpts / str(STEPS)), learning_rate)
