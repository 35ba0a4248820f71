"""`train` on a `model.path` whose files cannot be loaded: one `error:` line naming model.path and the fix,
before the workdir is created or the data prepared."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from nextquill_jax import cli
from nextquill_jax.config import ModelRunConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.models import CausalLM, save_pretrained
from nextquill_jax.models.presets import model_preset
from nextquill_jax.train import model_setup
from nextquill_jax.train.workdir import single_device_mesh
from tests.shared import TINY_EOS_ID, TINY_QWEN

TINY = dict(**TINY_QWEN, eos_token_ids=(TINY_EOS_ID,), compute_dtype="float32")
COPY_AGAIN = "Fix: copy or download the model's files again from their source"
RESTORE = "Fix: restore config.json from the model's source (the download or export that wrote its weights)"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny qwen2-family Hugging Face directory (2 layers, intermediate size 64)."""
    out = tmp_path_factory.mktemp("base") / "model"
    save_pretrained(CausalLM(model_preset("qwen2.5-0.5b", **TINY), rngs=nnx.Rngs(0)), out)
    return out


def _edit_config(model: Path, **fields) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **fields}))


def _truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


# (damage to a copy of the model directory, model.overrides, the error after `model.path '<path>': `)
CASES = {
    # json.JSONDecodeError
    "config.json not JSON": (
        lambda m: (m / "config.json").write_text('{"model_type": "qwen2", '),
        {},
        "{m}/config.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 column "
        f"25 (char 24)). {RESTORE}",
    ),
    # AttributeError in from_hf_config
    "config.json a list": (
        lambda m: (m / "config.json").write_text("[]"),
        {},
        f"{{m}}/config.json holds a list, not a JSON object. {RESTORE}",
    ),
    # safetensors' SafetensorError, then Orbax's 'cannot schedule new futures after shutdown' at exit
    "truncated weights": (
        _truncate_weights,
        {},
        "{m}/model.safetensors is not a readable safetensors file (Error while deserializing header: "
        f"incomplete metadata, file not fully covered): it is truncated or damaged. {COPY_AGAIN}",
    ),
    # json.JSONDecodeError, and a KeyError for the missing weight_map
    "index not JSON": (
        lambda m: (m / "model.safetensors.index.json").write_text("{"),
        {},
        "{m}/model.safetensors.index.json is not valid JSON (Expecting property name enclosed in double "
        f"quotes: line 1 column 2 (char 1)). {COPY_AGAIN}",
    ),
    "index without weight_map": (
        lambda m: (m / "model.safetensors.index.json").write_text("{}"),
        {},
        "{m}/model.safetensors.index.json holds no weight_map object, so it is no sharded index. "
        + COPY_AGAIN,
    ),
    # ValueError from model_from_hf, once the data was prepared
    "config.json of another shape": (
        lambda m: _edit_config(m, intermediate_size=96),
        {},
        "its weights do not fit the model its config.json describes: tensor shape mismatch: "
        + "; ".join(
            f"model.layers.{i}.mlp.{name}: file has {have}, config implies {want}"
            for name, have, want in [
                ("down_proj.weight", (32, 64), (32, 96)),
                ("gate_proj.weight", (64, 32), (96, 32)),
                ("up_proj.weight", (64, 32), (96, 32)),
            ]
            for i in range(2)
        )
        + f". {RESTORE}.",
    ),
}


def _run_train(tmp_path: Path, model: Path, overrides: dict, capsys, tiny_config, write_config) -> str:
    """stderr of `nextquill-jax train` on `model`, which must exit with status 1 leaving no workdir, and
    name the config file's line of `model.path` (taken off the returned text)."""
    cfg = tiny_config(tmp_path / "no_data", tmp_path / "work")
    cfg["model"] = {"path": str(model), "overrides": overrides, "compute_dtype": "float32"}
    config = write_config(cfg, tmp_path / "cfg.yaml")
    status = cli.main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert status == 1, err
    assert not (tmp_path / "work").exists()
    line = next(i for i, text in enumerate(config.read_text().splitlines(), 1) if text.startswith("  path: "))
    located = f"error: {config}, line {line}: "
    assert err.startswith(located), err
    return "error: " + err.removeprefix(located)


@pytest.mark.parametrize("case", CASES)
def test_a_model_directory_that_cannot_be_loaded_is_one_error_before_the_workdir_is_made(
    case, model_dir, tmp_path, capsys, tiny_config, write_config
):
    damage, overrides, message = CASES[case]
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    damage(model)
    err = _run_train(tmp_path, model, overrides, capsys, tiny_config, write_config)
    assert err == f"error: model.path {str(model)!r}: {message.format(m=model)}\n"


def test_overrides_that_change_a_models_layer_count_are_named_as_the_cause(
    model_dir, tmp_path, capsys, tiny_config, write_config
):
    # A KeyError from model_from_hf, once the data was prepared.
    err = _run_train(tmp_path, model_dir, {"num_layers": 1}, capsys, tiny_config, write_config)
    with safe_open(model_dir / "model.safetensors", framework="numpy") as f:
        names = f.keys()  # safe_open has no __iter__
    unexpected = sorted(name for name in names if name.startswith("model.layers.1."))
    assert err == (
        f"error: model.path {str(model_dir)!r} with model.overrides {{'num_layers': 1}}: checkpoint tensors "
        f"do not match a 'qwen2' model with this config: missing [] (0 in all); unexpected {unexpected} "
        f"({len(unexpected)} in all). The weights fit the model its config.json describes, so "
        f"model.overrides change the architecture they were trained with. Fix: remove from model.overrides "
        f"the keys that change the layer count or a tensor's shape (for a smaller model, use model.preset, "
        f"which starts from random weights).\n"
    )


def test_a_gguf_file_that_is_not_one_is_one_error(tmp_path, capsys, tiny_config, write_config):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"junk" * 64)  # read_gguf_config's ValueError
    err = _run_train(tmp_path, junk, {}, capsys, tiny_config, write_config)
    assert err == (
        f"error: model.path {str(junk)!r}: {junk}: not a GGUF file (it starts with b'junk', not b'GGUF'). "
        f"Fix: give a GGUF file of a Llama, Qwen2 or Qwen3 model as llama.cpp's tools write it, or the "
        f"model's Hugging Face directory\n"
    )


def test_a_stored_head_that_differs_from_tied_embeddings_is_an_error_naming_the_model(model_dir, tmp_path):
    """What the headers cannot show, found while the tensors load (here for `evaluate`, `export` and a
    reference model, which load with `load_params`)."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    tensors = load_file(model / "model.safetensors")
    assert "lm_head.weight" not in tensors  # the preset ties them
    head = tensors["model.embed_tokens.weight"] + 1
    save_file({**tensors, "lm_head.weight": head}, model / "model.safetensors")
    section = ModelRunConfig(path=str(model), compute_dtype="float32")
    with pytest.raises(ConfigError) as e:  # was the ValueError of model_from_hf
        model_setup.load_params(section, single_device_mesh(), seed=0)
    assert str(e.value) == (
        f"model.path {str(model)!r}: config says tie_word_embeddings=true but lm_head.weight differs from "
        f"model.embed_tokens.weight; fix: set tie_word_embeddings=false in config.json"
    )


def test_declared_dtype_reads_dtype_then_transformers_4s_torch_dtype(tmp_path):
    """transformers 5 writes `dtype`, transformers 4 `torch_dtype`; a file from 4.56+ holds both, and
    `dtype` is the current name. A float32 model found under either key is loaded in float32 (`evaluate`);
    a preset, or a directory that declares neither, declares nothing."""
    declared = {}
    for name, fields in {
        "dtype only": {"dtype": "float32"},
        "torch_dtype only": {"torch_dtype": "float32"},
        "both": {"dtype": "bfloat16", "torch_dtype": "float32"},
        "neither": {},
    }.items():
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "qwen2", **fields}))
        declared[name] = model_setup.declared_dtype(ModelRunConfig(path=str(model)))
    assert declared == {
        "dtype only": "float32",
        "torch_dtype only": "float32",
        "both": "bfloat16",
        "neither": None,
    }
    assert model_setup.declared_dtype(ModelRunConfig(preset="qwen2.5-0.5b")) is None


def test_overrides_are_not_blamed_for_weights_that_do_not_fit_without_them_either(model_dir, tmp_path):
    """A config.json from another model with an override that shapes no tensor: the weights fit neither the
    overridden nor the plain config, so the message blames config.json, not model.overrides."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    _edit_config(model, intermediate_size=96)  # the weights' MLP is 64 wide
    section = ModelRunConfig(path=str(model), overrides={"rope_theta": 5000.0}, compute_dtype="float32")
    with pytest.raises(ConfigError) as e:
        model_setup.check_weights(section, model_setup.model_config(section))
    assert str(e.value).startswith(
        f"model.path {str(model)!r}: its weights do not fit the model its config.json (with model.overrides "
        "{'rope_theta': 5000.0}) describes: "
    ), str(e.value)
    assert str(e.value).endswith(f"{RESTORE}.") and "The weights fit" not in str(e.value)
    with pytest.raises(ConfigError) as loading:  # `evaluate`, `export`: the same check, before any loading
        model_setup.load_params(section, single_device_mesh(), seed=0)
    assert str(loading.value) == str(e.value)
