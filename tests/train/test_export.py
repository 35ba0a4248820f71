"""`export`'s config.json end tokens: the token the run's targets end in is listed, as transformers'
generation reads it, whether or not the model's own config named it; the step exported is named (a damaged
newer one skipped)."""

from __future__ import annotations

import json
import shutil

from transformers import AutoConfig, GenerationConfig

from nextquill_jax.train.export import export
from tests.shared import TINY_EOS_ID


def test_the_token_the_targets_end_in_is_an_end_token_of_the_export(trained_run, tmp_path):
    notes = []
    same = tmp_path / "same"
    assert export(trained_run.workdir, same, echo=notes.append) == 2
    assert json.loads((same / "config.json").read_text())["eos_token_id"] == TINY_EOS_ID
    assert notes == []  # the tiny model's end token is its tokenizer's

    # The same run, had its data been prepared with a tokenizer whose end token is 2, as a model whose
    # config.json names another end token than its tokenizer's would be.
    workdir = tmp_path / "run"
    shutil.copytree(trained_run.workdir, workdir)
    meta_file = workdir / "prepared" / "train" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["eos_token_id"] == TINY_EOS_ID
    meta_file.write_text(json.dumps({**meta, "eos_token_id": 2}))
    other = tmp_path / "other"
    export(workdir, other, echo=notes.append)
    # What transformers' generate stops at, for a directory without generation_config.json.
    generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(other))
    assert generation.eos_token_id == [TINY_EOS_ID, 2]
    assert notes == [
        f"note: the run's targets end in token 2 (its tokenizer's end token), which the model's eos_token_id "
        f"[{TINY_EOS_ID}] lacks; {other / 'config.json'} lists [{TINY_EOS_ID}, 2], so that generation stops "
        "where the model learnt to end."
    ]


def test_export_names_the_step_it_exported_after_falling_back_from_a_damaged_one(
    trained_run, tmp_path, capsys
):
    from nextquill_jax.cli import main

    workdir = tmp_path / "run"
    shutil.copytree(trained_run.workdir, workdir)
    ckpts = workdir / "checkpoints"
    shutil.copytree(ckpts / "2", ckpts / "1")  # an older step that verifies
    (ckpts / "2" / "config" / "metadata").write_text("{}")  # the newer one no longer matches its manifest
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "hf")]) == 0
    out, err = capsys.readouterr()
    assert f"checkpoint {ckpts / '2'} is damaged and not restorable: " in err
    assert out.splitlines()[-1] == f"exported step 1 of {workdir} to {tmp_path / 'hf'}"


def test_the_adapters_of_step_0_are_refused_naming_the_merged_export(tmp_path, capsys):
    """Step 0 is the untrained start: its adapters are B = 0 (or `init_from`'s files), nothing to export."""
    from nextquill_jax.cli import main

    out = tmp_path / "out"
    assert main(["export", "--workdir", str(tmp_path), "--out", str(out), "--adapter", "--step", "0"]) == 1
    assert "Fix: --merged --step 0 exports the model the run starts from" in capsys.readouterr().err
    assert not out.exists()
