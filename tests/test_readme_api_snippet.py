"""The README's "Python API for research extensions" snippet from token ids to aligned hidden states, run as
written on the session's trained run: it must run, and slot j of `h_with` must give the model's own logits at
the position that predicts `labels[:, j]`."""

from __future__ import annotations

import numpy as np

from tests.conftest import readme_python_block


def test_the_readme_hidden_state_snippet_runs_and_aligns_with_the_labels(trained_run):
    code = readme_python_block("From token ids to the aligned")
    assert code.count('"runs/my_run"') == 1, code
    namespace = {}
    prelude = "from nextquill_jax.loss import LossConfig, loss_from_hidden\ncfg = LossConfig()\n"
    exec(prelude + code.replace('"runs/my_run"', repr(str(trained_run.workdir))), namespace)
    model, batch, labels = namespace["model"], namespace["batch"], namespace["labels"]
    h_with, w, layout = namespace["h_with"], namespace["W"], namespace["layout"]
    assert h_with.shape == namespace["h_without"].shape == (*labels.shape, model.cfg.hidden_size)
    assert np.isfinite(float(namespace["loss"]))
    logits = model(batch["with_ids"], batch["with_positions"], batch["with_segment_ids"])  # [B, T, V]
    want = np.take_along_axis(np.asarray(logits), batch["response_index_with"][..., None], axis=1)
    got = np.asarray(h_with @ (w.T if layout == "vd" else w))  # [B, R, V]
    used = labels != -100
    assert used.sum() == 9
    np.testing.assert_allclose(got[used], want[used], rtol=1e-4, atol=1e-4)
    assert (labels[used] == np.concatenate([np.array([21, 22, 23])] * 3)).all()


def test_the_readme_training_snippet_runs_and_a_second_call_resumes(
    tmp_path, monkeypatch, write_random_data, tiny_config, write_config
):
    """The "Training from Python" block as written, but on the tiny test config (its own, tiny_synthetic's
    60 steps take minutes here) and in a scratch directory: it trains, and the same call again in the same
    process finds the run finished, saying so through `echo`."""
    import re

    code = readme_python_block("### Training from Python")
    assert code.count('"configs/tiny_synthetic.yaml"') == 1 and code.count('"runs/from_python"') == 1, code
    config = write_config(
        tiny_config(write_random_data(tmp_path / "data"), tmp_path / "unused"), tmp_path / "c.yaml"
    )
    code = code.replace('"configs/tiny_synthetic.yaml"', repr(str(config)))
    code = re.sub(r'\["train\.max_steps=20"\]', '["train.max_steps=2"]', code)
    monkeypatch.chdir(tmp_path)
    said = []
    namespace = {"print": lambda *args: said.append(" ".join(map(str, args)))}
    exec(code, namespace)
    assert (namespace["result"].status, namespace["result"].step) == ("finished", 2)
    assert said[-1] == f"finished 2 {namespace['result'].last_checkpoint}"
    exec(code, namespace)
    assert any("already finished at step 2 of 2" in line for line in said), said
