"""`export`'s config.json end tokens: the token the run's targets end in is listed, as transformers'
generation reads it, whether or not the model's own config named it; the step exported is named (a damaged
newer one skipped); a LoRA run on a bfloat16 or nf4 base is evaluated and exported as it trained (float32
merged kernels)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from transformers import AutoConfig, GenerationConfig

from nextquill_jax.config import load_config
from nextquill_jax.eval.evaluate import load_model_path
from nextquill_jax.models import CausalLM, load_pretrained, lora, model_preset, save_pretrained
from nextquill_jax.models.peft import write_peft_adapter
from nextquill_jax.train import adapters, model_setup
from nextquill_jax.train.export import export
from nextquill_jax.train.workdir import restore_model, single_device_mesh
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


def test_a_run_whose_tokenizer_moved_is_exported_naming_its_new_place_with_tokenizer(
    trained_run, tmp_path, monkeypatch, capsys
):
    """The checkpoint's config names the run's tokenizer; once that path was gone, `export` failed with no
    way to name where it went. The error now names `--tokenizer`, which writes what the run's own did."""
    from nextquill_jax.cli import main
    from nextquill_jax.train import export as export_module

    before = tmp_path / "before"
    export(trained_run.workdir, before)
    moved = tmp_path / "moved_tok"
    shutil.copytree(load_config(trained_run.workdir / "config.yaml").data.tokenizer, moved)
    gone, restore = str(tmp_path / "gone_tok"), export_module.restore_model

    def restored_with_its_tokenizer_gone(*args, **kwargs):
        loaded = restore(*args, **kwargs)
        data = dataclasses.replace(loaded.config.data, tokenizer=gone)
        return dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, data=data))

    monkeypatch.setattr(export_module, "restore_model", restored_with_its_tokenizer_gone)
    args = ["export", "--workdir", str(trained_run.workdir)]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert f"error: data.tokenizer: no tokenizer {gone!r}: " in err
    assert err.rstrip().endswith(
        "; it is the run's tokenizer (data.tokenizer of the run's config): where it moved, pass --tokenizer "
        "with its new place"
    )
    assert not list((tmp_path / "refused").glob("*"))
    assert main([*args, "--out", str(tmp_path / "after"), "--tokenizer", str(moved)]) == 0
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (tmp_path / "after" / name).read_bytes() == (before / name).read_bytes(), name
    assert main([*args, "--out", str(tmp_path / "adapter"), "--adapter", "--tokenizer", str(moved)]) == 1
    assert "--tokenizer: --adapter writes the adapters alone, no tokenizer" in capsys.readouterr().err


def test_export_names_a_tokenizer_typo_before_reading_the_checkpoint_and_notes_another_tokenizer(
    trained_run, tmp_path, monkeypatch, save_tiny_tokenizer
):
    """`--tokenizer` loads before the restore (a typo cost minutes of reading a large checkpoint first), and
    one the run's data was not prepared with gets a note: by content where summary.json records its digest,
    else by the end token the targets end in. The run's tokenizer at another path gets none."""
    from nextquill_jax.data.prepare import load_fast_tokenizer
    from nextquill_jax.train import export as export_module

    restores = []
    restore = export_module.restore_model

    def counted_restore(*args, **kwargs):
        restores.append(args)
        return restore(*args, **kwargs)

    monkeypatch.setattr(export_module, "restore_model", counted_restore)
    typo = str(tmp_path / "no_such_tok")
    with pytest.raises(ValueError, match=f"^--tokenizer: no tokenizer {typo!r}"):
        export(trained_run.workdir, tmp_path / "typo", tokenizer=typo)
    assert restores == [] and not (tmp_path / "typo").exists()

    workdir = tmp_path / "run"
    shutil.copytree(trained_run.workdir, workdir)
    own = tmp_path / "own_tok"
    shutil.copytree(load_config(workdir / "config.yaml").data.tokenizer, own)
    other = save_tiny_tokenizer(tmp_path / "other_tok", vocab_size=600)

    def notes_exporting(name, tokenizer):
        notes = []
        export(workdir, tmp_path / name, tokenizer=str(tokenizer), echo=notes.append)
        return notes

    assert notes_exporting("own", own) == []
    summary_file = workdir / "prepared" / "summary.json"
    summary = json.loads(summary_file.read_text())
    data = workdir / "prepared"
    assert notes_exporting("other", other) == [
        f"note: --tokenizer {str(other)!r} holds other content than the tokenizer the run's data ({data}) "
        f"was prepared with ({summary['tokenizer']!r}); it is saved as the model's tokenizer, and with "
        "another vocabulary the model's text decodes to nonsense. Fix, where that was not meant: pass the "
        "run's tokenizer (its new place)."
    ]
    # A summary written before it recorded the digest: the end token decides.
    summary_file.write_text(json.dumps({k: v for k, v in summary.items() if k != "tokenizer_sha256"}))
    assert notes_exporting("other_same_end", other) == []  # both end text with token 0
    assert load_fast_tokenizer(str(other)).eos_token_id == TINY_EOS_ID
    meta_file = data / "train" / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "eos_token_id": 2}))
    ends_other = notes_exporting("other_end", other)
    assert ends_other[0] == (
        f"note: --tokenizer {str(other)!r} ends text with token {TINY_EOS_ID}, not token 2 as the tokenizer "
        f"the run's data ({data}) was prepared with ({summary['tokenizer']!r}); it is saved as the model's "
        "tokenizer, and with another vocabulary the model's text decodes to nonsense. Fix, where that was "
        "not meant: pass the run's tokenizer (its new place)."
    )


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


def test_a_run_saved_with_an_attention_this_backend_lacks_is_exported_without_the_xla_note(
    trained_run, tmp_path, capsys
):
    """A GPU run (model.attention_impl: cudnn) exported on CPU: the same weights as its `xla` twin's export,
    and no note that the model is read with `xla` attention: export runs no attention. Reading it to run
    the model still gives the note (here `restore_model`; evaluate, initial_model and a --model path:
    tests/eval/test_evaluate.py::test_a_run_saved_with_an_attention_this_backend_lacks_is_read_with_xla)."""
    from nextquill_jax.cli import main
    from nextquill_jax.config_schema import ConfigError
    from nextquill_jax.train.export import export_adapter
    from tests.conftest import as_saved_with

    workdir = tmp_path / "cudnn"
    shutil.copytree(trained_run.workdir, workdir)
    as_saved_with(workdir, compute_dtype="bfloat16", attention_impl="cudnn", cudnn_max_segments=1)
    note = "sets model.attention_impl='cudnn', which JAX cannot run on 'cpu'"
    capsys.readouterr()
    for step in ("2", "0"):  # a checkpoint's saved config; config.yaml (the model the run starts from)
        out = tmp_path / f"hf{step}"
        assert main(["export", "--workdir", str(workdir), "--step", step, "--out", str(out)]) == 0
        assert note not in capsys.readouterr().err
    with pytest.raises(ConfigError, match="full fine-tuning checkpoint"):
        export_adapter(workdir, tmp_path / "adapter")
    assert note not in capsys.readouterr().err
    exported = load_pretrained(tmp_path / "hf2", dtype="float32")
    reference = load_pretrained(trained_run.exported, dtype="float32")
    leaves = lambda m: jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    for a, b in zip(leaves(exported), leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    assert restore_model(workdir, mesh=single_device_mesh()).model.cfg.attention_impl == "xla"
    assert note in capsys.readouterr().err


def test_a_run_whose_weighting_module_is_not_here_is_exported_and_not_evaluated(trained_run, tmp_path):
    """Export writes weights and computes no loss, so a run's `loss.weighting` module need not import where it
    runs (it was refused as the saved config was read): checkpoint 2 and config.yaml (step 0) export, with the
    trained run's weights; reading the run to run the model still refuses, naming the module."""
    from nextquill_jax.cli import main
    from nextquill_jax.config_schema import ConfigError
    from tests.conftest import as_saved_with

    workdir = tmp_path / "weighted"
    shutil.copytree(trained_run.workdir, workdir)
    as_saved_with(workdir, "loss", variant="nextquill", weighting="not_installed_here:weights")
    for step in ("2", "0"):
        assert main(["export", "--workdir", str(workdir), "--step", step, "--out", str(tmp_path / step)]) == 0
    exported = load_pretrained(tmp_path / "2", dtype="float32")
    reference = load_pretrained(trained_run.exported, dtype="float32")
    leaves = lambda m: jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    for a, b in zip(leaves(exported), leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="module 'not_installed_here' of 'not_installed_here:weights' does"):
        restore_model(workdir, mesh=single_device_mesh())


def test_the_adapters_of_step_0_are_refused_naming_the_merged_export(tmp_path, capsys):
    """Step 0 is the untrained start: its adapters are B = 0 (or `init_from`'s files), nothing to export."""
    from nextquill_jax.cli import main

    out = tmp_path / "out"
    assert main(["export", "--workdir", str(tmp_path), "--out", str(out), "--adapter", "--step", "0"]) == 1
    assert "Fix: --merged --step 0 exports the model the run starts from" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("checkpoints", ["none", "empty"])
def test_the_adapters_of_a_run_without_a_checkpoint_are_refused_naming_training_not_step_0(
    tmp_path, checkpoints, capsys, tiny_config, write_config
):
    """`export --adapter` used to end as `evaluate` and `export --merged` do, "pass `--step 0`", which it then
    refused (step 0's adapters are untrained)."""
    from nextquill_jax.cli import main

    workdir, out = tmp_path / "run", tmp_path / "out"
    raw = tiny_config(None, workdir)
    raw["model"]["lora"] = {"rank": 4, "targets": ["attn/q_proj"]}
    workdir.mkdir()
    write_config(raw, workdir / "config.yaml")  # a run's directory before its first checkpoint
    directory = workdir / "checkpoints"
    if checkpoints == "empty":
        directory.mkdir()
    assert main(["export", "--workdir", str(workdir), "--out", str(out), "--adapter"]) == 1
    found = {
        "none": f"{workdir} holds a run's config.yaml but no checkpoints ({directory} does not exist): a "
        "compare `train: false` variant, or a run stopped before its first save.",
        "empty": f"{directory} holds no complete checkpoint. Fix: train until the run saves one "
        "(checkpoint.every_steps, or the end of an epoch).",
    }[checkpoints]
    assert capsys.readouterr().err == (
        f"error: {found} No trained adapters exist until the run saves a checkpoint. Fix: train it "
        "(`nextquill-jax train`) until it saves one, then export its adapters; `--merged --step 0` exports "
        "the untrained model it starts from.\n"
    )
    assert not out.exists()


TINY_LORA_BASE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, bos_token_id=TINY_EOS_ID, eos_token_ids=(TINY_EOS_ID,), compute_dtype="float32",
)  # fmt: skip
LORA_TARGETS = ["attn/(q|k|v|o)_proj", "mlp/(gate|up|down)"]


@pytest.mark.parametrize("base_dtype", ["bfloat16", "nf4"])
def test_a_lora_run_on_a_bfloat16_or_nf4_base_is_evaluated_and_exported_as_it_trained(
    tmp_path, base_dtype, save_tiny_tokenizer, tiny_config, write_config
):
    """The model `evaluate` / `effects` read (`restore_model`, here step 0 of a run starting from init_from
    adapters with a small update, B ~ 2e-4) and the `export --merged` directory transformers (and `evaluate
    --model`) loads compute
    what training computes (the base as stored, the adapters apart) to float32 rounding. With the merged
    kernels rounded to the base's bfloat16, as they were, about half of the update was lost (0.0005 of
    0.0011)."""
    hf_dir, adapter_dir, workdir = tmp_path / "base", tmp_path / "adapter", tmp_path / "run"
    save_pretrained(CausalLM(model_preset("qwen2.5-0.5b", **TINY_LORA_BASE), rngs=nnx.Rngs(5)), hf_dir)
    ours = load_pretrained(hf_dir, compute_dtype="float32")
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    shapes = lora.adapter_shapes(params, lora.target_paths(params, LORA_TARGETS), 4, jnp.float32)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    draw = lambda k, s: (0.1 if s.shape[-1] == 4 else 2e-4) * jax.random.normal(k, s.shape)  # a, then b
    weights = jax.tree.unflatten(tree, [draw(k, s) for k, s in zip(keys, leaves, strict=True)])
    write_peft_adapter(weights, ours.cfg, adapter_dir, rank=4, alpha=8.0)
    raw = tiny_config(None, workdir)
    lora_cfg = {"rank": 4, "alpha": 8.0, "targets": LORA_TARGETS, "base_dtype": base_dtype}
    raw["model"] = {"path": str(hf_dir), "compute_dtype": "float32", "lora": lora_cfg}
    raw["model"]["lora"]["init_from"] = str(adapter_dir)
    raw["data"]["tokenizer"] = str(save_tiny_tokenizer(tmp_path / "tok"))
    workdir.mkdir()
    write_config(raw, workdir / "config.yaml")  # a run's directory before its first checkpoint: step 0

    # What training computes: the base as stored (bfloat16, or nf4 codes), the adapters apart.
    cfg = load_config(workdir / "config.yaml")
    mesh = single_device_mesh()
    graphdef, base = model_setup.load_params(adapters.base_section(cfg.model), mesh, cfg.train.seed)
    trained = nnx.merge(graphdef, adapters.frozen_base(base, cfg.model.lora))
    ids = np.random.default_rng(0).integers(1, 128, (2, 11))
    want = np.asarray(
        trained.logits(trained.hidden_states(jnp.asarray(ids), adapters=lora.Adapters(weights, 2.0)))
    )
    plain = np.asarray(trained(jnp.asarray(ids)))
    tolerance = 1e-5 * np.abs(want).max()  # float32 rounding, with room
    assert np.abs(want - plain).max() > 100 * tolerance  # the update matters at this tolerance

    evaluated = np.asarray(restore_model(workdir, 0, mesh).model(jnp.asarray(ids)))
    np.testing.assert_allclose(evaluated, want, rtol=0, atol=tolerance)
    notes = []
    export(workdir, tmp_path / "hf", step=0, echo=notes.append)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
    assert notes[-1].startswith(f"note: the base was stored as {base_dtype} (model.lora.base_dtype)")
    assert "The adapted kernels are written in float32" in notes[-1]
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # dtype as declared
    with torch.no_grad():
        got = exported(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
    # `evaluate --workdir <run> --model <the export>` too (it read the export in the base's bfloat16)
    evaluated_export = load_model_path(workdir, str(tmp_path / "hf")).model
    np.testing.assert_allclose(evaluated_export(jnp.asarray(ids)), want, rtol=0, atol=tolerance)
    if base_dtype == "bfloat16":  # and peft's own forward, on the base rounded to bfloat16 as stored
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).float()
        with torch.no_grad():
            theirs = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()(torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(theirs, want, rtol=0, atol=tolerance)


@pytest.mark.parametrize("changed", ["overrides", "nf4"])
def test_the_adapters_of_a_base_they_do_not_fit_come_with_a_note_naming_the_base_to_load(
    tmp_path, write_random_data, tiny_config, write_config, changed
):
    """adapter_config.json names `model.path`, which loads the base without the run's `model.overrides`
    (here `rope_theta`), or unquantized where the run stored it as nf4: PEFT on that base computes another
    model than the one trained, so `export --adapter` says so and names the base that does (`export --step
    0`), which PEFT then matches. adapter_config.json carries the run's LoRA dropout."""
    from nextquill_jax.train.export import export_adapter
    from nextquill_jax.train.loop import train

    hf_dir, workdir = tmp_path / "base", tmp_path / "run"
    save_pretrained(CausalLM(model_preset("qwen2.5-0.5b", **TINY_LORA_BASE), rngs=nnx.Rngs(5)), hf_dir)
    assert json.loads((hf_dir / "config.json").read_text())["rope_theta"] != 100.0
    raw = tiny_config(write_random_data(tmp_path / "data"), workdir)
    lora_cfg = {"rank": 4, "alpha": 8.0, "targets": LORA_TARGETS, "dropout": 0.1}
    raw["model"] = {"path": str(hf_dir), "lora": lora_cfg, "compute_dtype": "float32"}
    if changed == "overrides":
        raw["model"]["overrides"] = {"rope_theta": 100.0}
        difference = f"the run's base is model.path {hf_dir} with model.overrides {{'rope_theta': 100.0}}"
    else:
        lora_cfg["base_dtype"] = "nf4"
        difference = "the adapters were trained on the base quantized to nf4 (model.lora.base_dtype)"
    raw["train"]["max_steps"] = 2
    train(load_config(write_config(raw, tmp_path / "run.yaml")), workdir, echo=lambda _: None)

    notes = []
    export_adapter(workdir, tmp_path / "adapter", echo=notes.append)
    assert notes == [
        f"note: {difference}, which {tmp_path / 'adapter'}/adapter_config.json's base_model_name_or_path "
        f"cannot say: loaded from that path alone, the base computes otherwise than the one trained; load "
        f"the base from `nextquill-jax export --workdir {workdir} --step 0 --out BASE_DIR` instead (the "
        f"model the run started from)."
    ]
    # adapter_config.json carries the run's LoRA dropout (eval runs without it) and names the run's
    # model.path as its base; written as 0.0 and as null, both survived mutation audit 6a
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["lora_dropout"], adapter_config["base_model_name_or_path"]) == (0.1, str(hf_dir))
    export(workdir, tmp_path / "step0", step=0, echo=lambda _: None)
    ids = np.random.default_rng(0).integers(1, 128, (2, 40))
    want = np.asarray(restore_model(workdir, None, single_device_mesh()).model(jnp.asarray(ids)))
    tolerance = 1e-5 * np.abs(want).max()

    def peft_logits(base_dir):
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with torch.no_grad():
            adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
            return adapted(torch.tensor(ids)).logits.numpy()

    np.testing.assert_allclose(peft_logits(tmp_path / "step0"), want, rtol=0, atol=tolerance)
    assert np.abs(peft_logits(hf_dir) - want).max() > 100 * tolerance


@pytest.mark.parametrize(
    ("path", "overrides", "base_dtype", "said"),
    [("smollm2-135m", {}, None, "packaged"), ("SmolLM2-135M", {"eos_token_ids": [2]}, None, "packaged"),
     ("/models/base", {}, None, None), (None, {}, None, None), ("smollm2-135m", {}, "nf4", "quantized"),
     (" smollm2-135m", {}, None, "packaged, init_from")],
)  # fmt: skip
def test_the_adapters_of_a_packaged_base_come_with_a_note_naming_the_base_to_load(
    path, overrides, base_dtype, said
):
    """adapter_config.json names a packaged base as written (`smollm2-135m`), which transformers does not
    load, so `AutoPeftModel` cannot: the note that named the base to load for a changed or quantized base
    said nothing here."""
    from nextquill_jax.config import LoraConfig, ModelRunConfig
    from nextquill_jax.train.export import base_note

    section = ModelRunConfig(path=path, preset=None if path else "smollm2-135m", overrides=overrides)
    init_from = {"init_from": "/adapters"} if said == "packaged, init_from" else {}
    lora = LoraConfig(rank=4, alpha=8.0, **({"base_dtype": base_dtype} if base_dtype else {}), **init_from)
    note = base_note(section, lora, "runs/r", "out")
    step_0 = "`nextquill-jax export --workdir runs/r --step 0 --out BASE_DIR`"
    if said == "packaged":
        assert note == (
            f"note: out/adapter_config.json's base_model_name_or_path is the packaged model {path}, a name "
            f"transformers does not load (this package ships it as a GGUF file); load the base from {step_0} "
            "instead (the model the run started from), and `peft.PeftModel.from_pretrained(base, 'out')` "
            "loads the adapters onto it."
        )
    elif said == "packaged, init_from":  # its step 0 carries the adapters it started from, merged
        assert note.endswith(
            "a name transformers does not load (this package ships it as a GGUF file); a run started from "
            "model.lora.init_from has no such base on disk (its step 0 carries those adapters merged): use "
            "`export --merged` for the trained model."
        ), note
    elif said == "quantized":
        assert note.startswith("note: the adapters were trained on the base quantized to nf4"), note
        assert step_0 in note
    else:
        assert note is None


@pytest.mark.parametrize("command", ["export", "effects"])
def test_export_and_effects_refuse_to_run_as_one_of_several_processes(command, tmp_path, monkeypatch, capsys):
    """Run as the processes of a multi-host job, each read on its own device and wrote the same files at
    once (two `export`s raced: one usually failed, finding the other's weights)."""
    from nextquill_jax.cli import main

    monkeypatch.setenv("NEXTQUILL_NUM_PROCESSES", "2")
    out = tmp_path / "out"
    assert main([command, "--workdir", str(tmp_path), "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"error: `{command}` runs as one process (it reads the model on one device), but "
        "NEXTQUILL_NUM_PROCESSES=2 starts this one as one of 2, each of which would do all the work and "
        "write the same files. Fix: run it once, on one host, without NEXTQUILL_COORDINATOR, "
        "NEXTQUILL_NUM_PROCESSES and NEXTQUILL_PROCESS_ID set.\n"
    )
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def test_export_of_step_0_in_a_one_process_multi_host_environment_reads_on_its_device(
    trained_run, programs, tmp_path
):
    """A job of one process (a one-node SLURM job sets NEXTQUILL_NUM_PROCESSES=1): `export --step 0` took its
    device first, then started JAX's multi-process runtime from the run's config, which must come before
    any device is touched: a RuntimeError traceback. Export reads on one device and starts no runtime."""
    out = tmp_path / "hf"
    (host,) = programs.hosts(1)
    argv = ["export", "--workdir", str(trained_run.workdir), "--step", "0", "--out", str(out)]
    done = programs.finish(programs.start("cli_run.py", *argv, env=host), 300)
    assert done.stdout.splitlines()[-1] == f"exported step 0 of {trained_run.workdir} to {out}"
    assert (out / "config.json").exists()


def test_the_base_note_names_an_int8_base_and_leaves_a_preset_base_alone():
    """`base_note` for a `model.path` base stored as int8 names the quantization as it does for nf4 (both
    are `lora.base_dtype`s whose dequantized base differs from the original); a `model.preset` base with
    architecture overrides gets no note: its adapter_config.json names no base (null), so no path loads
    another network; overrides of the context length and special ids change no computation and get none.
    Survived before (mutation audit 6a): checking only nf4, the overrides clause without its
    `section.path is not None`, and max_position_embeddings dropped from the same-network fields."""
    from nextquill_jax.config import LoraConfig, ModelRunConfig
    from nextquill_jax.train.export import base_note

    note = base_note(
        ModelRunConfig(path="/models/base"), LoraConfig(rank=4, alpha=8.0, base_dtype="int8"), "runs/r", "out"
    )
    assert note.startswith(
        "note: the adapters were trained on the base quantized to int8 (model.lora.base_dtype), which "
        "out/adapter_config.json's base_model_name_or_path cannot say"
    ), note
    preset = ModelRunConfig(preset="qwen2.5-0.5b", overrides={"rope_theta": 100.0})
    assert base_note(preset, LoraConfig(rank=4, alpha=8.0), "runs/r", "out") is None
    # The declared context length and the special ids change nothing the network computes (no position is
    # limited by max_position_embeddings): the path still loads the trained-on base.
    same = ModelRunConfig(
        path="/models/base", overrides={"max_position_embeddings": 65536, "pad_token_id": 0}
    )
    assert base_note(same, LoraConfig(rank=4, alpha=8.0), "runs/r", "out") is None


def test_the_merged_dtype_note_says_a_quantized_base_is_dequantized():
    """For an int8 or nf4 base the merged weights are that base dequantized plus the adapters, which differs
    from the original base by the quantization error: the note says so for both, and not for bfloat16.
    Survived before (mutation audit 6a): the clause for int8 only (the nf4 export test reads the note's
    start and its float32 sentence)."""
    from nextquill_jax.train.export import merged_dtype_note

    clause = "the merged weights are that base dequantized plus the adapters"
    for dtype in ("int8", "nf4"):
        assert clause in merged_dtype_note(dtype), dtype
    assert clause not in merged_dtype_note("bfloat16")


def test_targets_end_token_reads_the_train_splits_record_or_none(tmp_path):
    """The end token comes from the prepared train split's meta.json; data moved away (no meta.json) or
    prepared without a tokenizer (a null id) gives None, so `export` goes on without the extra end token.
    Survived before (mutation audit 6a): dropping the missing-file check, which raised FileNotFoundError."""
    from nextquill_jax.train.export import targets_end_token

    assert targets_end_token(tmp_path / "moved") is None
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "meta.json").write_text(json.dumps({"eos_token_id": None}))
    assert targets_end_token(tmp_path) is None
    (tmp_path / "train" / "meta.json").write_text(json.dumps({"eos_token_id": 7, "examples": 3}))
    assert targets_end_token(tmp_path) == 7
