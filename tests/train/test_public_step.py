"""The train step with `normalize: example` and the public settings against the public step restated in
PyTorch (tests/reference/torch_public_step.py), on the same tiny Qwen2 model and the same 8 examples of
different lengths: loss and gradients agree, whether the examples are packed two per row and accumulated over
4 micro-batches or laid out one per row and sharded over 8 devices (programs/train_public_step.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py


def test_the_step_equals_the_public_step_in_pytorch(programs):
    result = programs.run("train_public_step.py", devices=8, fast_compile=True, timeout=300).result
    scale = result["grad_scale"]
    assert scale > 0.1, result  # a real gradient
    for name, run in result["runs"].items():
        assert run["examples"] == 8, (name, run)
        assert 0.02 < run["pref_fraction"] < 0.98, (name, run)  # both weights λ and ε occur
        assert run["loss"] == pytest.approx(result["torch_loss"], rel=1e-5), (name, run)
        assert run["grad_diff_to_torch"] <= 1e-5 * scale, (name, run, scale)
        assert run["grad_diff_to_packed"] <= 1e-5 * scale, (name, run, scale)
