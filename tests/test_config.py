"""The training config: YAML loading, typed overrides, errors that name the key and the fix, and set-up errors
that stop a run before anything is compiled."""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from jax.sharding import AbstractMesh, AxisType

from nextquill_jax import config_reference
from nextquill_jax.bench.sweep import load_scaling_config
from nextquill_jax.config import (
    Config,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    MeshConfig,
    OptimConfig,
    config_to_dict,
    load_config,
    save_config,
)
from nextquill_jax.config_schema import ConfigError, convert
from nextquill_jax.data.config import SPLITS
from nextquill_jax.data.pipeline import BatchPipeline
from nextquill_jax.data.prepared_split import TOKEN_FIELDS, PreparedSplit, TokenizedExample, write_split
from nextquill_jax.mesh_sizes import mesh_entry
from nextquill_jax.models.config import RUNTIME_FIELDS, ModelConfig, RopeScaling
from nextquill_jax.models.presets import model_preset
from nextquill_jax.parallel import MESH_AXES, resolve_mesh_shape
from nextquill_jax.train import adapters, model_setup
from nextquill_jax.train.loop import train
from nextquill_jax.train.resume import may_change
from tests.shared import FIXTURES

REPO = Path(__file__).resolve().parents[1]
CUDNN = ["model.attention_impl=cudnn", "model.compute_dtype=bfloat16"]  # cuDNN's attention takes bf16


@pytest.fixture
def cfg_file(tmp_path, write_config, tiny_config):
    return write_config(tiny_config(tmp_path / "data", tmp_path / "work"), tmp_path / "cfg.yaml")


def _line_of(path: Path, key: str) -> int:
    """The 1-based line of `key` (`optim.learning_rate`) in a block-style YAML file indented by two spaces
    (as `yaml.safe_dump` writes it), found by reading the text: each part of the key is the first line after
    its section's that starts with the part at its depth."""
    lines = path.read_text().splitlines()
    at = -1
    for depth, part in enumerate(key.split(".")):
        at = next(i for i in range(at + 1, len(lines)) if lines[i].startswith("  " * depth + f"{part}:"))
    return at + 1


def test_tiny_synthetic_config_loads_and_starts_with_a_comment():
    path = REPO / "configs" / "tiny_synthetic.yaml"
    assert path.read_text().startswith("# ")
    cfg = load_config(path)
    assert cfg.loss.variant == "nextquill" and cfg.optim.learning_rate == 3e-3
    assert cfg.model.model_config().hidden_size == 64


def test_a_key_written_twice_is_an_error_naming_both_lines(tmp_path, cfg_file):
    """PyYAML keeps the last of two equal keys: the loader refuses instead of dropping the first silently, in
    a nested section as at the top, and names the file, both lines and the fix."""
    lines = cfg_file.read_text().splitlines()
    train_at = lines.index("train:")
    lines.insert(train_at + 1, "  max_steps: 5")
    lines.insert(train_at + 2, "  max_steps: 7")
    twice = tmp_path / "twice.yaml"
    twice.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(twice)
    assert str(e.value) == (
        f"{twice}, line {train_at + 3}: key `max_steps` is written a second time in the same mapping "
        f"(first at line {train_at + 2}); YAML would keep only the last value. Fix: delete one of the two."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "optim:\n  learning_rate: 1.0e-3\nloss:\n  alpha: [0.1\ntrain:\n  seed: 1\n",
            "line 5, column 6: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow "
            "sequence at line 4, column 10). Fix the YAML syntax there (an unclosed bracket or quote shows "
            "only where the parser gave up).",
        ),
        (
            "loss:\n\talpha: 0.1\n",
            "line 2, column 1: not valid YAML: found character '\\t' that cannot start any token (while "
            "scanning for the next token). Fix: indent with spaces; YAML allows no tab there.",
        ),
    ],
)
def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, text, expected):
    """PyYAML's own message calls the file "<unicode string>" and draws a caret over two lines: the error
    names the file, the line and column (1-based) and where the unclosed construct began, in one paragraph."""
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}, {expected}"


def test_equal_keys_in_different_mappings_and_merge_keys_are_not_duplicates(tmp_path):
    """The same key in two items of a list, or in two sections, is not a repeat; neither is a key that
    overrides one merged in with `<<: *anchor` (YAML's own override)."""
    from nextquill_jax.config_schema import read_yaml

    path = tmp_path / "ok.yaml"
    path.write_text("base: &base {a: 1, b: 2}\nx: {<<: *base, a: 3}\ny: [{a: 1}, {a: 2}]\nz: {a: 4}\n")
    assert read_yaml(path) == {
        "base": {"a": 1, "b": 2}, "x": {"a": 3, "b": 2}, "y": [{"a": 1}, {"a": 2}], "z": {"a": 4}
    }  # fmt: skip


def test_overrides_are_converted_by_the_schema(cfg_file):
    cfg = load_config(
        cfg_file,
        [
            "optim.learning_rate=1e-4",  # a float written without a dot (PyYAML reads it as a string)
            "train.max_steps=7",
            "train.nonfinite=skip",
            "loss.variant=sft",
            "data.batching.rows_per_batch=4",
            "optim.trainable=[q_proj, k_proj]",
            "checkpoint.best_metric=null",
            "model.overrides.num_layers=3",
            "mesh.fsdp=1",
        ],
    )
    assert cfg.optim.learning_rate == 1e-4 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.train.max_steps == 7 and cfg.train.nonfinite == "skip"
    assert cfg.loss.loss_config().variant == "sft"
    assert cfg.data.batching.rows_per_batch == 4
    assert cfg.optim.trainable == ["q_proj", "k_proj"]
    assert cfg.checkpoint.best_metric is None
    assert cfg.model.model_config().num_layers == 3 and cfg.mesh.fsdp == 1


def test_a_mapping_given_to_a_section_sets_its_keys_and_keeps_the_files_others(cfg_file):
    """`data.batching={mode: bucket}` must not reset the file's other batching keys to their defaults; a
    free-form mapping (`model.overrides`) is a value, replaced whole."""
    file = load_config(cfg_file).data
    cfg = load_config(
        cfg_file,
        [
            "data.batching={mode: bucket, rows_per_batch: 3}",
            "data.batching={num_epochs: 4}",
            "model.overrides={num_layers: 3}",
        ],
    )
    assert (cfg.data.batching.mode, cfg.data.batching.rows_per_batch, cfg.data.batching.num_epochs) == (
        "bucket",
        3,
        4,
    )
    kept = ("seq_len_with", "length_multiple", "read_threads")
    assert [getattr(cfg.data.batching, k) for k in kept] == [getattr(file.batching, k) for k in kept]
    assert cfg.model.overrides == {"num_layers": 3}


def test_an_override_of_a_key_of_a_section_the_file_sets_to_null_starts_it(cfg_file):
    raw = yaml.safe_load(cfg_file.read_text())
    raw["model"]["lora"] = None
    cfg_file.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_file, ["model.lora.rank=4"])
    assert cfg.model.lora is not None and cfg.model.lora.rank == 4


@pytest.mark.parametrize(
    "override, value",
    [
        ("data.template=no", "no"),  # YAML: false
        ("train.workdir=2024-01-01", "2024-01-01"),  # a date
        ("data.tokenizer=123", "123"),  # an int
        ("logging.tensorboard_dir=0x1F", "0x1F"),  # an int (31) for a string-or-null key
        ("mesh.distributed=off", "off"),  # false for a choice of words
    ],
)
def test_a_key_that_takes_text_gets_the_text_typed_where_yaml_reads_another_type(cfg_file, override, value):
    key, _, _ = override.partition("=")
    cfg = load_config(cfg_file, [override])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_a_key_whose_type_yaml_reads_keeps_it_and_null_stays_null(cfg_file):
    cfg = load_config(cfg_file, ["train.max_steps=5", "logging.tensorboard_dir=null", "model.lora=null"])
    assert cfg.train.max_steps == 5 and cfg.logging.tensorboard_dir is None and cfg.model.lora is None


# The end of an error for a value YAML typed where the key takes text.
QUOTE = (
    "; YAML reads unquoted yes, no, on, off, true and false as bools, and numbers and dates as such: put the "
    "value in quotes."
)
# How to quote list items, in an error for a list override that is not valid YAML.
QUOTE_ITEMS = (
    "Fix: put in double quotes each item that starts with a character YAML reserves (*, &, !, %, @, `) or "
    "holds ': ' or ' #', e.g. "
)


@pytest.mark.parametrize(
    "override, message",
    [
        # an unset shell variable: `train.max_steps=$STEPS` became null, running the epochs out
        ("train.max_steps=",
         "`train.max_steps=` gives `train.max_steps` no value (an unset shell variable?). Fix: write its "
         "value after `=`, or `train.max_steps=null` for null."),
        ("data.template= ",
         "`data.template= ` gives `data.template` no value (an unset shell variable?). Fix: write its value "
         "after `=`."),
        # null reset the file's batching section to the defaults
        ("data.batching=null",
         "`data.batching=null`: `data.batching` is a section, which cannot be null (null would reset each of "
         "its keys to its default, dropping the file's). Fix: set its keys, `data.batching.KEY=VALUE`."),
        # a glob item is a YAML alias: "expects a list, got '[*.jsonl, b.jsonl]' (str)" did not say why
        ("data.sources=[*.jsonl, b.jsonl]",
         "`data.sources=[*.jsonl, b.jsonl]`: `data.sources` takes a list, and the value is not valid YAML "
         "(while scanning an alias: expected alphabetic or numeric character, but found '.'). "
         f"{QUOTE_ITEMS}'data.sources=[\"*.jsonl\", \"b.jsonl\"]'."),
        ("optim.no_decay=[@x]",
         "`optim.no_decay=[@x]`: `optim.no_decay` takes a list, and the value is not valid YAML (while "
         "scanning for the next token: found character '@' that cannot start any token). "
         f"{QUOTE_ITEMS}'optim.no_decay=[\"@x\"]'."),
        # text YAML cannot read, for a key that is no list: the type error as before
        ("train.max_steps=@3",
         "`train.max_steps` expects an int, got '@3' (str). Fix: write an int value for `train.max_steps`."),
        # an item YAML reads as a bool, in a list of strings
        ("optim.no_decay=[no]",
         f"`optim.no_decay[0]` expects a str, got False (bool). Fix: write a str value for "
         f"`optim.no_decay[0]`{QUOTE}"),
    ],
)  # fmt: skip
def test_an_override_yaml_cannot_give_the_key_says_why(cfg_file, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    assert str(e.value) == f"command line: {message}"


@pytest.mark.parametrize(
    "section, key, text, message",
    [
        ("data", "template", "no",
         "`data.template` expects a str, got False (bool). Fix: write a str value for "
         f"`data.template`{QUOTE}"),
        ("mesh", "distributed", "off",
         f"`mesh.distributed` is False, not one of ['auto', 'off']. Fix: set `mesh.distributed` to one of "
         f"them{QUOTE}"),
    ],
)  # fmt: skip
def test_a_file_value_yaml_typed_says_to_quote_it(tmp_path, tiny_config, section, key, text, message):
    raw = tiny_config(tmp_path / "data", tmp_path / "work")
    raw.setdefault(section, {})[key] = "UNQUOTED"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw).replace("UNQUOTED", text))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}, line {_line_of(path, f'{section}.{key}')}: {message}"


def test_cudnn_max_segments_reaches_the_model_config_only_with_cudnn(cfg_file):
    cfg = load_config(cfg_file, ["model.attention_impl=cudnn", "model.cudnn_max_segments=4"])
    assert cfg.model.model_config().cudnn_max_segments == 4
    with pytest.raises(ConfigError, match=r"attention_impl is 'xla'\. Fix: set model\.attention_impl: cudnn"):
        load_config(cfg_file, ["model.cudnn_max_segments=4"])


@pytest.mark.parametrize("impl", ["xla", "xla_dense", "splash", "cudnn"])
def test_cudnn_packed_mode_is_the_default_for_cudnn_and_null_for_every_other_attention(cfg_file, impl):
    """`auto` is the default; only cuDNN has a packed mode, so under any other attention it reads as null
    (which the workdir's config.yaml then records), set or not."""
    expected = "auto" if impl == "cudnn" else None
    for overrides in ([], ["model.cudnn_max_segments=auto"]):
        cfg = load_config(cfg_file, [f"model.attention_impl={impl}", *overrides])
        assert cfg.model.cudnn_max_segments == expected
    dense = load_config(cfg_file, [f"model.attention_impl={impl}", "model.cudnn_max_segments=null"])
    assert dense.model.cudnn_max_segments is None


@pytest.mark.parametrize(("saved", "read"), [({}, None), ({"cudnn_max_segments": 3}, 3)])
def test_a_saved_cudnn_run_without_the_packed_key_is_read_with_the_dense_mask(
    tmp_path, monkeypatch, write_config, tiny_config, saved, read
):
    """A run saves the `cudnn_max_segments` it chose; a config.yaml saved before the key existed (that run
    used cuDNN's dense mask) is read with null, not with the `auto` default that no reader resolves (on a GPU
    it raised in ModelConfig)."""
    from nextquill_jax.models import attention
    from nextquill_jax.train import model_setup
    from nextquill_jax.train.workdir import saved_config

    monkeypatch.setattr(attention, "check_attention_backend", lambda impl, **_: None)  # as on a GPU
    workdir = tmp_path / "work"
    workdir.mkdir()
    cfg = tiny_config(tmp_path / "data", workdir)
    cfg["model"].update(attention_impl="cudnn", compute_dtype="bfloat16", **saved)
    write_config(cfg, workdir / "config.yaml")
    model = saved_config(workdir).model
    assert model.attention_impl == "cudnn" and model.cudnn_max_segments == read
    assert model_setup.model_config(model).cudnn_max_segments == read


@pytest.mark.parametrize("source", [[], ["model.preset=null", "model.path=some/dir"]])
@pytest.mark.parametrize("value", ["0", "-1", "foo", "1.5", "true"])
def test_a_bad_cudnn_max_segments_names_the_key_and_the_allowed_values(cfg_file, source, value):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [*source, "model.attention_impl=cudnn", f"model.cudnn_max_segments={value}"])
    message = str(e.value)
    assert "model.cudnn_max_segments" in message and "Fix" in message, message
    assert "int" in message and "auto" in message and "null" in message, message


def test_yaml_exponent_float_and_int_for_float(tmp_path, tiny_config, write_config):
    raw = tiny_config(tmp_path, tmp_path)
    raw["optim"] = {"learning_rate": "5e-6", "weight_decay": 0}
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    assert cfg.optim.learning_rate == 5e-6 and cfg.optim.weight_decay == 0.0


@pytest.mark.parametrize(
    "override, named, suggested",
    [
        ("optim.learnig_rate=1e-3", "optim.learnig_rate", "`optim.learning_rate` or `optim.warmup_ratio`?"),
        ("optm.learning_rate=1e-3", "optm", "`optim.learning_rate`?"),
        ("data.batching.rows_per_bach=4", "data.batching.rows_per_bach", "`data.batching.rows_per_batch`?"),
        ("loss.variant=nextqill", "loss.variant", "'nextquill'?"),
        ("optim.b=0.9", "optim.b", "`optim.b2` or `optim.b1`?"),  # the own section's two nearest
        # A key put in the wrong section: the nearest keys of other sections (close ones only, three at most).
        ("train.lerning_rate=1e-3", "train.lerning_rate", "`optim.learning_rate`?"),
        (
            "eval.every_step=5",
            "eval.every_step",
            "`eval.every_steps` or `checkpoint.every_steps` or `logging.every_steps`?",
        ),
        ("train.see=1", "train.see", "`train.seed` or `data.batching.seed` or `eval.generation.seed`?"),
        ("model.lora.rnk=4", "model.lora.rnk", "`model.lora.rank`?"),
    ],
)
def test_unknown_command_line_keys_are_blamed_on_the_command_line_with_nearest_keys(
    cfg_file, override, named, suggested
):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    message = str(e.value)
    assert message.startswith("command line: ") and str(cfg_file) not in message, message
    assert named in message and f"Did you mean {suggested}" in message, message


def test_unknown_file_keys_are_blamed_on_the_file(tmp_path, tiny_config, write_config):
    raw = tiny_config(tmp_path, tmp_path)
    raw["optim"]["learnig_rate"] = 1e-3
    path = write_config(raw, tmp_path / "c.yaml")
    line = _line_of(path, "optim.learnig_rate")
    with pytest.raises(
        ConfigError, match=rf"^{path}, line {line}: unknown key `optim.learnig_rate`.*`optim.learning_rate`"
    ):
        load_config(path, ["train.max_steps=3"])


def test_a_dotted_key_written_in_the_file_is_named_at_its_own_line_with_the_nesting(
    tmp_path, tiny_config, write_config
):
    """`optim.learning_rate: -5` appended at the top level (an override's spelling) was reported at the line
    of the nested `learning_rate` under `optim:`, as an unknown key whose 'valid keys' included `optim`."""
    path = write_config(tiny_config(tmp_path, tmp_path), tmp_path / "c.yaml")
    path.write_text(path.read_text() + "optim.learning_rate: -5\n")
    line = len(path.read_text().splitlines())
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}, line {line}: unknown key `optim.learning_rate`: a dotted key is one YAML key, not "
        "`learning_rate` under `optim`. Fix: write it nested, as `learning_rate: ...` under `optim:`."
    )


@pytest.mark.parametrize(
    ("section", "text", "expected"),
    [
        # a misspelt section, a list item of the wrong type in flow style, a section's own check: each
        # message named the file but not the line (the file's last lines are `text`; line 1 is its first)
        ("optim", "optimizer:\n  learning_rate: 1.0e-3\n", "line 1: unknown key `optimizer`. Did you mean"),
        ("optim", "optim:\n  learning_rate: 1.0e-3\n  no_decay: [bias,\n    5]\n",
         "line 4: `optim.no_decay[1]` expects a str, got 5 (int)"),
        ("train", "train:\n  seed: 1\n  max_steps: 0\n",
         "line 3: invalid `train`: max_steps must be >= 1 or null, got 0"),
    ],
)  # fmt: skip
def test_a_bad_file_key_or_value_names_its_line(tmp_path, tiny_config, write_config, section, text, expected):
    raw = tiny_config(tmp_path / "data", tmp_path / "work")
    raw.pop(section, None)
    path = write_config(raw, tmp_path / "c.yaml")
    before = len(path.read_text().splitlines())
    path.write_text(path.read_text() + text)
    line = int(re.match(r"line (\d+)", expected)[1])
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}, line {before + line}: {expected.partition(': ')[2]}"), message


def test_a_section_check_failing_on_an_override_names_the_override(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["model.overrides.hiden_size=8"])
    message = str(e.value)
    assert "`model.overrides.hidden_size`" in message, message
    # The file alone is valid, so the override is what to fix: the message starts there, not at the file.
    assert message.startswith("command line: `model.overrides.hiden_size`"), message
    assert message.endswith(" (overrides: model.overrides.hiden_size=8)") and str(cfg_file) not in message


def test_a_section_check_the_file_fails_too_names_the_file_and_the_overrides(tmp_path, cfg_file):
    """When the file alone already fails the check, the file is the source and the overrides are listed."""
    broken = tmp_path / "broken.yaml"
    raw = yaml.safe_load(cfg_file.read_text())
    raw["optim"]["learning_rate"] = -1
    broken.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(broken, ["train.max_steps=3"])
    message = str(e.value)
    line = _line_of(broken, "optim.learning_rate")  # the key the check names, not its section's line
    assert message.startswith(f"{broken}, line {line}: invalid `optim`: learning_rate must be > 0"), message
    assert message.endswith(" (command line overrides applied: train.max_steps=3)"), message


def test_a_missing_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist.*Fix"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "yaml_files, fix",
    [
        ([], "a YAML file"),
        (
            ["d.yml", "c.yaml", "b.yaml", "a.yaml"],
            "one of the YAML files in it (a.yaml, b.yaml, c.yaml, ...)",
        ),
    ],
)
def test_a_config_directory_names_the_yaml_files_in_it(tmp_path, yaml_files, fix):
    for name in [*yaml_files, "notes.txt"]:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(e.value) == f"config file {tmp_path} is a directory, not a YAML file. Fix: pass {fix}."


def test_an_unreadable_config_file_gives_the_systems_reason(tmp_path, monkeypatch):
    # The suite may run as root, which reads a file whatever its permissions: the OS error is raised here.
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "cfg.yaml")
    assert str(e.value) == (
        f"config file {tmp_path}/cfg.yaml cannot be read: Permission denied. Fix: make it readable, or pass "
        "another."
    )


def _float_keys() -> list[tuple[str, str, bool]]:
    """(part title, key, whether null is allowed) for every float key of configs/REFERENCE.md's tables: the
    keys the schema documents, so a float key added to any of them is walked by the test below."""
    found = []
    for part in config_reference.PARTS:
        for table in config_reference.tables(part):
            hints = typing.get_type_hints(table.cls)
            for name in table.keys:
                tp = hints[name]
                options = (
                    typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
                )
                if float in options:
                    found.append((part.title, f"{table.path}.{name}".lstrip("."), type(None) in options))
    return found


FLOAT_KEYS = _float_keys()


def test_the_float_key_walk_finds_every_kind_of_float_key():
    keys = {key for _, key, _ in FLOAT_KEYS}
    # a plain float, a nullable one, a float or a word, a section's, a mapping's, another file kind's
    assert {"optim.learning_rate", "optim.clip_norm", "loss.alpha", "model.lora.alpha"} <= keys, keys
    assert {"model.overrides.rope_theta", "model.overrides.rope_scaling.factor", "peak_tflops"} <= keys, keys


@pytest.mark.parametrize("part, key, nullable", FLOAT_KEYS, ids=[key for _, key, _ in FLOAT_KEYS])
def test_every_float_key_refuses_nan_and_infinity(part, key, nullable, tmp_path, tiny_config):
    # The file each part is loaded from, and the loader of its command. A float key in another part (the
    # compare file has none yet) fails here with a KeyError: add that part's file and loader.
    base, load = {
        "Training config": (tiny_config(tmp_path / "data", tmp_path / "work"), load_config),
        "Scaling sweep": (
            yaml.safe_load((REPO / "configs/scaling/tiny_cpu.yaml").read_text()),
            load_scaling_config,
        ),
    }[part]
    path = tmp_path / "f.yaml"
    for value, shown in (
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        ("nan", "nan"),
    ):
        raw = copy.deepcopy(base)
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError) as e:
            load(path)
        null = ", or null" if nullable else ""
        assert str(e.value) == (
            f"{path}, line {_line_of(path, key)}: `{key}` is {shown}, not a finite number. Fix: write a "
            f"finite number for `{key}`{null}."
        ), value


@pytest.mark.parametrize(
    "override, shown, null",
    [
        ("optim.learning_rate=nan", "nan", ""),
        ("optim.learning_rate=.inf", "inf", ""),
        ("optim.learning_rate=inf", "inf", ""),
        ("optim.clip_norm=nan", "nan", ", or null"),
        ("mesh.peer_timeout_s=.inf", "inf", ""),
        ("logging.health_ce_ratio=nan", "nan", ""),
        ("loss.alpha=.nan", "nan", ""),  # not "expects a float or 'public'"
    ],
)
def test_a_nan_or_infinite_override_is_refused_naming_the_key(cfg_file, override, shown, null):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    assert str(e.value) == (
        f"command line: `{key}` is {shown}, not a finite number. Fix: write a finite number for "
        f"`{key}`{null}."
    )


def test_an_endless_run_without_max_steps_is_refused_when_the_config_is_read(cfg_file):
    """It was refused only once the data was prepared (minutes for real data)."""
    with pytest.raises(
        ConfigError, match=r"never end\. Fix: set data\.batching\.num_epochs or train\.max_steps"
    ):
        load_config(cfg_file, ["data.batching.num_epochs=null"])
    assert load_config(cfg_file, ["data.batching.num_epochs=null", "train.max_steps=3"]).train.max_steps == 3


@pytest.mark.parametrize(
    "override, section, message",
    [
        ("optim.weight_decay=-5", "optim", "weight_decay must be >= 0, got -5.0"),
        ("optim.b1=7", "optim", "b1 must be in [0, 1), got 7.0"),
        ("optim.b1=1", "optim", "b1 must be in [0, 1), got 1.0"),
        ("optim.b2=-0.1", "optim", "b2 must be in [0, 1), got -0.1"),
        ("optim.eps=-1", "optim", "eps must be > 0, got -1.0"),
        ("optim.eps=0", "optim", "eps must be > 0, got 0.0"),
        ("optim.min_lr_ratio=1.5", "optim", "min_lr_ratio must be in [0, 1], got 1.5"),
        ("optim.warmup_ratio=1", "optim", "warmup_ratio must be in [0, 1), got 1.0"),
        ("optim.warmup_steps=-1", "optim", "warmup_steps must be >= 0, got -1"),
        ("checkpoint.keep=0", "checkpoint", "need every_steps >= 0 and keep >= 1, got 3, 0"),
        (
            "logging.health_pref_fraction=0",
            "logging",
            "health_pref_fraction must be in (0, 1) or null, got 0.0",
        ),
        (
            "logging.profile_steps=[3]",
            "logging",
            "profile_steps must be [first, last] with 1 <= first <= last (optimizer steps), got [3]",
        ),
        ("optim.min_lr_ratio=-0.5", "optim", "min_lr_ratio must be in [0, 1], got -0.5"),
        # JAX keeps a seed's low 32 bits (2**32 draws as 0); one past 2**63 crashed once training had started
        ("train.seed=4294967296", "train", "seed must be in [0, 2**32), got 4294967296"),
        ("train.seed=-1", "train", "seed must be in [0, 2**32), got -1"),
        ("train.seed=99999999999999999999", "train", "seed must be in [0, 2**32), got 99999999999999999999"),
        ("mesh.peer_timeout_s=0", "mesh", "peer_timeout_s must be > 0 and <= 1e9 seconds, got 0.0"),
        (
            "mesh.peer_timeout_s=2e9",
            "mesh",
            "peer_timeout_s must be > 0 and <= 1e9 seconds, got 2000000000.0",
        ),
    ],
)
def test_a_value_outside_its_documented_range_is_refused(cfg_file, override, section, message):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    assert str(e.value) == (
        f"command line: invalid `{section}`: {message}. Fix the value under `{section}`. "
        f"(overrides: {override})"
    )


def test_the_ends_of_the_documented_ranges_that_are_in_them_are_accepted(cfg_file):
    ends = [
        "mesh.peer_timeout_s=1e9",
        "optim.min_lr_ratio=1",
        "optim.min_lr_ratio=0",
        "optim.warmup_ratio=0",
        "optim.b1=0",
        "checkpoint.every_steps=0",
        "checkpoint.keep=1",
        "logging.profile_steps=[1, 1]",
        "logging.health_pref_fraction=null",
        "model.lora={rank: 1}",
    ]
    cfg = load_config(cfg_file, ends)
    assert (cfg.mesh.peer_timeout_s, cfg.optim.min_lr_ratio, cfg.checkpoint.keep) == (1e9, 0.0, 1)
    assert cfg.model.lora.rank == 1 and list(cfg.logging.profile_steps) == [1, 1]


def test_lora_refuses_rank_0_and_optim_trainable_beside_it(cfg_file):
    with pytest.raises(ConfigError, match=r"invalid `model.lora`: rank must be >= 1, got 0\."):
        load_config(cfg_file, ["model.lora={rank: 0}"])
    with pytest.raises(ConfigError, match=r"optim.trainable and model.lora both choose what trains"):
        load_config(cfg_file, ["model.lora={rank: 4}", "optim.trainable=[q_proj]"])


def test_the_ends_of_the_documented_ranges_are_accepted(cfg_file):
    cfg = load_config(cfg_file, ["optim.weight_decay=0", "optim.b1=0", "optim.b2=0", "optim.min_lr_ratio=1"])
    assert (cfg.optim.weight_decay, cfg.optim.b1, cfg.optim.b2, cfg.optim.min_lr_ratio) == (0, 0, 0, 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # Keep probability 0: every adapter input would be zero, and the adapters would get no gradient.
        (["model.lora.dropout=1"], "dropout must be in [0, 1), got 1.0"),
        # Every ω 0: the normalised loss Σ ω CE / Σ ω would be 0 / 0.
        (["loss.high=0", "loss.low=0"], "low >= 0 and high > 0, got high=0.0, low=0.0"),
        # The last two targets are the val and test ones: two would leave no train target.
        (["data.dpl_num_targets=2"], "dpl_num_targets must be an integer >= 3, got 2"),
    ],
    ids=["lora_dropout_1", "high_0", "dpl_num_targets_2"],
)
def test_a_value_just_past_its_bound_is_refused(cfg_file, overrides, message):
    """Each bound's first value outside it (a bound written one step off was unseen), by the reason given."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(cfg_file, overrides)


@pytest.mark.parametrize(
    "section, field, message",
    [
        (LoraConfig, "alpha", "alpha must be > 0, got nan"),
        (OptimConfig, "learning_rate", "learning_rate must be > 0, got nan"),
        (OptimConfig, "weight_decay", "weight_decay must be >= 0, got nan"),
        (OptimConfig, "eps", "eps must be > 0, got nan"),
        (OptimConfig, "clip_norm", "clip_norm must be > 0 or null, got nan"),
        (MeshConfig, "peer_timeout_s", "peer_timeout_s must be > 0 and <= 1e9 seconds, got nan"),
        (LoggingConfig, "health_ce_ratio", "health_ce_ratio must be > 1, got nan"),
    ],
)
def test_a_section_built_in_python_refuses_nan_too(section, field, message):
    # The schema refuses NaN in a file; a section made in code (`dataclasses.replace`) is checked by its own
    # ranges, written so that NaN fails them.
    with pytest.raises(ValueError) as e:
        dataclasses.replace(section(), **{field: float("nan")})
    assert str(e.value) == message


def test_a_model_config_refuses_a_nan_from_config_json():
    with pytest.raises(ValueError) as e:
        dataclasses.replace(model_preset("qwen2.5-0.5b"), rope_theta=float("nan"))
    assert str(e.value) == "ModelConfig.rms_norm_eps and rope_theta must be > 0, got 1e-06 and nan"
    with pytest.raises(ValueError) as e:
        RopeScaling(type="linear", factor=float("nan"))
    assert str(e.value) == "rope scaling factor must be > 0, got nan"
    with pytest.raises(ValueError) as e:
        RopeScaling("llama3", 8.0, float("nan"), 4.0, 8192)
    assert str(e.value) == "llama3 rope scaling needs high_freq_factor > low_freq_factor, got 4.0 <= nan"


def test_a_sweep_refuses_a_peak_tflops_that_is_not_positive():
    cfg = load_scaling_config(REPO / "configs/scaling/tiny_cpu.yaml")
    for value in (0.0, float("nan")):
        with pytest.raises(ValueError) as e:
            dataclasses.replace(cfg, peak_tflops=value)
        assert str(e.value) == f"`peak_tflops` must be > 0 or null, got {value}"


@pytest.mark.parametrize(
    "override, named, expected",
    [
        ("train.seed=abc", "train.seed", "expects an int"),
        ("model.overrides=3", "model.overrides", "expects a mapping"),
        ("optim.learning_rate=fast", "optim.learning_rate", "float"),
        ("checkpoint.async_save=maybe", "checkpoint.async_save", "bool"),
        ("optim.trainable=q_proj", "optim.trainable", "list"),
        ("train.micro_batches=0", "train", "micro_batches"),
        ("train.max_skips=-1", "train", "max_skips must be >= 0, got -1"),  # it stopped every run
        ("eval.max_batches=0", "eval", "max_batches must be >= 1 or null, got 0"),  # a traceback mid-run
        # JAX keeps a seed's low 32 bits: 2**32 sampled as 0 does
        ("eval.generation.seed=4294967296", "eval.generation", "seed must be an int in [0, 2**32), got"),
        ("loss.alpha=-1", "loss", "alpha"),
        ("loss.alpha=foo", "loss.alpha", "expects a float or 'public', got 'foo'"),  # a Literal's values
        ("logging.profile_steps=[3, 2]", "logging", "profile_steps must be [first, last]"),
        ("model.scan_unroll=0", "model.scan_unroll", "` must be an int >= 1, got 0. Fix: "),
        ("model.scan_unroll=2.5", "model.scan_unroll", "expects an int"),
        # YAML's true is a bool, which Python counts as an int: not a step count or a learning rate.
        ("train.max_steps=true", "train.max_steps", "expects an int, got True (bool)"),
        ("optim.learning_rate=true", "optim.learning_rate", "expects a float, got True (bool)"),
    ],
)
def test_wrong_types_and_invalid_values_name_the_key(cfg_file, override, named, expected):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    message = str(e.value)
    assert f"`{named}" in message and expected in message and "Fix" in message, message
    assert message.startswith("command line: ") or message.endswith(f"overrides applied: {override})")
    assert " a int" not in message and " a a " not in message  # "an int", "a mapping"


@pytest.mark.parametrize("override", ["optim={learning_rate: 0.1}", "optim..learning_rate=0.1", "=1"])
def test_an_override_without_a_section_and_key_is_refused_with_an_example(cfg_file, override):
    """A whole section given a mapping on the command line (or an empty part) is no key=value override."""
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    assert str(e.value) == (
        f"override {override!r} is not of the form section.key=value (e.g. optim.learning_rate=1e-4)"
    )


def test_model_overrides_are_recorded_as_their_values_so_a_resume_reads_one_value_in_any_spelling(cfg_file):
    """YAML reads `1e4` as text: `rope_theta=1e4` was recorded as "1e4", and a resume with `10000.0` (the
    same model) was refused as a changed config."""
    from nextquill_jax.train.resume import config_changes, normalised

    spellings = ["1e4", "10000.0", "10000", "'1e4'"]
    configs = [
        load_config(cfg_file, [f"model.overrides={{rope_theta: {v}, eos_token_ids: [3], num_layers: 2}}"])
        for v in spellings
    ]
    recorded = [json.loads(json.dumps(config_to_dict(c))) for c in configs]
    assert {json.dumps(r["model"]["overrides"]) for r in recorded} == {
        '{"rope_theta": 10000.0, "eos_token_ids": [3], "num_layers": 2}'
    }
    for before, after in itertools.product(recorded, configs):
        assert config_changes(normalised(before), config_to_dict(after)) == []
    assert configs[0].model.model_config().rope_theta == 10000.0
    scaled = load_config(cfg_file, ["model.overrides={rope_scaling: {type: linear, factor: '2'}}"])
    assert scaled.model.overrides == {"rope_scaling": {"type": "linear", "factor": 2.0}}  # the keys written


def test_a_resume_naming_the_same_files_by_another_spelling_is_no_change(tmp_path):
    """`train --config ../runs/r/config.yaml data.sources=[../data/a.jsonl]` from `cfgs/` names the files
    the run recorded as `<dir>/data/a.jsonl` as `<dir>/cfgs/../data/a.jsonl`: its resume was refused as
    another config. Through a symbolic link `..` leaves the link's target, as the OS reads it: that is
    another file, still a change."""
    from nextquill_jax.train.resume import config_changes

    (tmp_path / "cfgs").mkdir()
    (tmp_path / "deep" / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "inner")
    recorded = {"data": {"sources": [f"{tmp_path}/data/a.jsonl"], "template": f"{tmp_path}/tpl/t.yaml"},
                "optim": {"learning_rate": 1e-4}}  # fmt: skip
    same = {"data": {"sources": [f"{tmp_path}/cfgs/../data/a.jsonl"], "template": f"{tmp_path}/tpl/./t.yaml"},
            "optim": {"learning_rate": 1e-4}}  # fmt: skip
    assert config_changes(recorded, same) == []
    linked = {"data": {"sources": [f"{tmp_path}/link/../data/a.jsonl"], "template": f"{tmp_path}/tpl/t.yaml"},
              "optim": {"learning_rate": 1e-4}}  # fmt: skip
    assert config_changes(recorded, linked) == [
        ("data.sources", [f"{tmp_path}/data/a.jsonl"], [f"{tmp_path}/link/../data/a.jsonl"])
    ]
    named = {**same, "optim": {"learning_rate": 2e-4}}
    assert [key for key, *_ in config_changes(recorded, named)] == ["optim.learning_rate"]


def test_scan_unroll_is_a_runtime_key_of_its_own_that_reaches_the_model_and_a_resume_may_change(cfg_file):
    cfg = load_config(cfg_file, ["model.scan_unroll=2", "model.remat_policy=full"])
    assert cfg.model.model_config().scan_unroll == 2
    # A LoRA run's frozen base runs the layers as the run says: every runtime field but the base's dtype.
    with_lora = dataclasses.replace(cfg.model, lora=LoraConfig())
    base = adapters.base_section(with_lora)
    assert {f: getattr(base, f) for f in RUNTIME_FIELDS if f != "param_dtype"} == {
        f: getattr(with_lora, f) for f in RUNTIME_FIELDS if f != "param_dtype"
    }
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["model.overrides={scan_unroll: 2}"])
    assert "(`model.scan_unroll` is a key of its own)" in str(e.value)
    # It changes the compiled program, not what is trained.
    assert may_change("model.scan_unroll")


@pytest.mark.parametrize("source", [[], ["model.preset=null", "model.path=some/dir"]])
def test_a_save_remat_policy_is_read_and_a_bad_name_in_it_is_a_config_error(cfg_file, source):
    cfg = load_config(cfg_file, [*source, "model.remat_policy=save:qkv,attention"])
    assert cfg.model.remat_policy == "save:qkv,attention"
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [*source, "model.remat_policy=save:qkv,atention"])
    message = str(e.value)
    assert "invalid `model`: remat_policy 'save:qkv,atention': 'atention' is not a checkpoint name" in message
    assert "allowed: qkv, attention, attn_out, mlp_gate_up" in message and "Fix" in message, message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.overrides.param_dtype=bfloat16", "(`model.param_dtype` is a key of its own)"),
        ("model.overrides.num_layer=3", "did you mean `model.overrides.num_layers`?"),
        ("model.overrides.eos_token_ids=7", "`model.overrides.eos_token_ids` expects a list, got 7 (int)"),
    ],
)
@pytest.mark.parametrize("source", [[], ["model.preset=null", "model.path=some/dir"]])
def test_a_bad_model_override_is_a_load_time_error_for_a_preset_and_a_path_model(
    cfg_file, source, override, expected
):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [*source, override])
    message = str(e.value)
    # The message starts with the key it names: no `invalid `model`` or second source before it; the file
    # alone is valid, so the source is the command line.
    assert message.startswith("command line: `model.overrides."), message
    assert expected in message and message.count("Fix") == 1 and str(cfg_file) not in message, message


@pytest.mark.parametrize(
    "override, start, fix",
    [
        # A check whose message names its key and its fix: the file, then the message, once each.
        (
            "model.overrides.eos_token_ids=7",
            "`model.overrides.eos_token_ids` expects a list, got 7 (int). Fix: write a list value",
            "Fix: write",
        ),
        (
            "model.cudnn_max_segments=4",
            "model.cudnn_max_segments: 4 chooses cuDNN's packed attention",
            "Fix: set model.attention_impl: cudnn, or model.cudnn_max_segments: auto or null. (",
        ),
        (
            "model.overrides.num_layer=3",
            "`model.overrides.num_layer` is not a ModelConfig architecture field; did you mean "
            "`model.overrides.num_layers`?",
            "`model.overrides.num_layers`? Fix the value under `model`. (",
        ),
        # A check that names neither: the section and a fix added.
        (
            "optim.learning_rate=-1",
            "invalid `optim`: learning_rate must be > 0, got -1.0",
            "-1.0. Fix the value ",
        ),
        (
            "loss.reference_model=base",
            "loss.reference_model: base names the frozen base",
            "Fix: set model.lora",
        ),
    ],
)
def test_a_section_check_error_says_each_thing_once(cfg_file, override, start, fix):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    message = str(e.value)
    # The file alone is valid: the override is named as the source, once, and the file not at all.
    assert message.startswith(f"command line: {start}"), message
    assert fix in message and message.count("Fix") == 1 and str(cfg_file) not in message, message
    assert ".." not in message and "?." not in message and "`: model" not in message, message
    assert message.endswith(f" (overrides: {override})"), message


@pytest.mark.parametrize(
    "hint, value, expected",
    [
        (tuple[int, ...], 7, "`k` expects a list, got 7 (int)"),
        (dict[str, int] | None, 3, "`k` expects a mapping, got 3 (int)"),
        (int | tuple[int, ...] | None, "a", "`k` expects an int or list or null, got 'a' (str)"),
    ],
)
def test_type_errors_name_types_as_yaml_writes_them(hint, value, expected):
    with pytest.raises(ConfigError) as e:
        convert(value, hint, "k", "f.yaml")
    assert str(e.value).startswith(f"f.yaml: {expected}. Fix: write a"), str(e.value)
    assert "tuple" not in str(e.value) and "dict" not in str(e.value)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("optim.learning_rate=null", "optim.learning_rate", "a float"),
        ("train.seed=null", "train.seed", "an int"),
        ("model.overrides=null", "model.overrides", "a mapping"),
        ("optim.no_decay=[null]", "optim.no_decay[0]", "a str"),
    ],
)
def test_a_null_for_a_key_that_refuses_it_is_named_null_as_yaml_writes_it(cfg_file, override, key, expected):
    """null is refused for these keys (no default stands in for it), and named `null` as the config wrote it,
    not Python's "None (NoneType)"."""
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    assert str(e.value) == (
        f"command line: `{key}` expects {expected}, got null. Fix: write {expected} value for `{key}`."
    )


def test_a_null_in_a_yaml_file_for_an_int_key_is_named_null(cfg_file, tmp_path, write_config):
    raw = yaml.safe_load(cfg_file.read_text())
    raw["train"]["seed"] = None
    path = write_config(raw, tmp_path / "null_seed.yaml")
    assert "seed: null" in path.read_text()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}, line {_line_of(path, 'train.seed')}: `train.seed` expects an int, got null. Fix: write an "
        "int value for `train.seed`."
    )


def test_a_path_model_gets_its_overrides_as_typed_values(cfg_file, tmp_path):
    """A YAML list and mapping become the tuple and `RopeScaling` the fields hold, as for a preset."""
    hf = model_preset("llama3.2-1b").to_hf_config()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(hf))
    section = load_config(
        cfg_file,
        [
            "model.preset=null",
            f"model.path={tmp_path / 'model'}",
            "model.overrides={eos_token_ids: [5, 6], rope_scaling: {type: linear, factor: 2}, num_layers: 3}",
        ],
    ).model
    expected = ModelConfig.from_hf_config(hf, **section.runtime()).replace(
        eos_token_ids=(5, 6), rope_scaling=RopeScaling(type="linear", factor=2.0), num_layers=3
    )
    assert model_setup.model_config(section) == expected


def test_a_file_of_a_model_directory_as_model_path_names_the_directory(cfg_file, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(model_preset("llama3.2-1b").to_hf_config()))
    (model / "model.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    for file, fix in [
        (model / "model.safetensors", f"pass the directory holding it (model.path={str(model)!r})"),
        (model / "config.json", f"pass the directory holding it (model.path={str(model)!r})"),
        (tmp_path / "notes.txt", "pass a Hugging Face model directory (config.json + *.safetensors)"),
    ]:
        section = load_config(cfg_file, ["model.preset=null", f"model.path={file}"]).model
        with pytest.raises(ConfigError) as e:
            model_setup.check_model_source(section)
        assert str(e.value) == (
            f"model.path {str(file)!r} is a file, not a model directory (only a .gguf file is a model by"
            f" itself). Fix: {fix}, or a .gguf file."
        )


def test_a_model_source_error_names_the_setting_it_came_from_and_a_peft_directory_as_such(tmp_path):
    """`evaluate --model` named `model.path`, advised `model.path=...` and `model.preset`, which that
    command does not take; a PEFT adapter directory read as 'a directory without config.json'."""
    from nextquill_jax.config import ModelRunConfig

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    merged = "or give a merged export (`nextquill-jax export --merged`)."
    holder = "Fix: pass the directory holding it"
    cases = [
        (adapter, "model.path", "is a PEFT adapter directory (adapter_config.json), not a model. Fix: point "
         "model.path at the base model they were trained on, and model.lora.init_from at this directory."),
        (adapter, "--model", "is a PEFT adapter directory (adapter_config.json), not a model. Fix: leave out "
         f"--model to read the run's own checkpoint, {merged}"),
        (model / "config.json", "--model", f"{holder} (--model {model}), or a .gguf"),
        (model / "config.json", "model.path", f"{holder} (model.path={str(model)!r})"),
        (tmp_path / "nothing", "--model", "and is not a packaged model name. Fix: give a Hugging Face "),
        # a fixed-DCE reference was named `model.path`, with model.preset's fix
        (adapter, "loss.reference_model", "not a model. Fix: give a merged export (`nextquill-jax export "
         "--merged`), or the training workdir the adapters come from."),
        (tmp_path / "nothing", "loss.reference_model", "and is not a packaged model name. Fix: give a "),
    ]  # fmt: skip
    for path, key, said in cases:
        with pytest.raises(ConfigError) as e:
            model_setup.check_model_source(ModelRunConfig(path=str(path)), key=key)
        assert str(e.value).startswith(f"{key} {str(path)!r} ") and said in str(e.value), str(e.value)
        assert ("model.preset" in str(e.value)) == (key == "model.path" and path.name == "nothing")


def test_a_model_directory_that_also_holds_an_adapter_config_is_a_model(tmp_path):
    """Only a directory without config.json is refused as a PEFT adapter directory: one that holds both (a
    model directory that kept the adapter_config.json of adapters merged into it) is a model to load."""
    from nextquill_jax.config import ModelRunConfig

    both = tmp_path / "merged"
    both.mkdir()
    (both / "adapter_config.json").write_text("{}")
    (both / "config.json").write_text("{}")
    for key in ("model.path", "--model", "loss.reference_model"):
        assert model_setup.check_model_source(ModelRunConfig(path=str(both)), key=key) is None


def test_a_directory_without_config_json_is_refused_as_no_model_directory(tmp_path):
    """A directory of weights alone (no config.json, no adapter_config.json) has no architecture to build:
    it is refused before anything is loaded, naming the setting and what a model directory holds."""
    from nextquill_jax.config import ModelRunConfig

    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        model_setup.check_model_source(ModelRunConfig(path=str(weights_only)))
    assert str(e.value) == (
        f"model.path {str(weights_only)!r} is a directory without config.json. Fix: point model.path at a "
        "Hugging Face model directory (config.json + *.safetensors)."
    )


def test_eval_split_takes_exactly_the_prepared_splits(cfg_file, tmp_path, tiny_config, write_config):
    assert typing.get_args(typing.get_type_hints(EvalConfig)["split"]) == SPLITS
    raw = tiny_config(tmp_path, tmp_path)
    raw["eval"].pop("split", None)
    assert load_config(write_config(raw, tmp_path / "absent.yaml")).eval.split == "val"
    assert load_config(cfg_file, ["eval.split=test"]).eval.split == "test"
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["eval.split=vall"])
    message = str(e.value)
    assert message.startswith("command line: `eval.split` is 'vall', not one of ['train', 'val', 'test']")
    assert "Did you mean 'val'?" in message and "Fix" in message, message
    raw["eval"]["split"] = "validation"
    wrong = write_config(raw, tmp_path / "wrong.yaml")
    line = _line_of(wrong, "eval.split")
    with pytest.raises(ConfigError, match=rf"wrong\.yaml, line {line}: `eval\.split` is 'validation', not"):
        load_config(wrong)
    with pytest.raises(ConfigError, match=r"`eval\.split` is null, not one of"):  # null is no split either
        load_config(cfg_file, ["eval.split=null"])


def test_model_needs_exactly_one_source(tmp_path, tiny_config, write_config):
    raw = tiny_config(tmp_path, tmp_path)
    raw["model"]["path"] = "some/dir"
    with pytest.raises(ConfigError, match=r"exactly one of model\.path"):
        load_config(write_config(raw, tmp_path / "c.yaml"))
    # a path given on the command line over a file's preset: the fix says how to unset the other
    preset = tiny_config(tmp_path, tmp_path)["model"]["preset"]
    with pytest.raises(
        ConfigError,
        match=rf"^command line: .*: both are set \(model\.path='some/dir', model\.preset='{preset}'\)\. Fix: "
        r"unset the one you do not want: delete its line from the file, or override it with "
        r"`model\.preset=null` \(or `model\.path=null`\)\. \(overrides: model\.path=some/dir\)$",
    ):
        load_config(
            write_config(tiny_config(tmp_path, tmp_path), tmp_path / "p.yaml"), ["model.path=some/dir"]
        )
    with pytest.raises(
        ConfigError, match=r": neither is set\. Fix: add one, such as `model\.path=smollm2-135m`\."
    ):
        load_config(tmp_path / "p.yaml", ["model.preset=null"])


def test_saved_config_reloads_identically(cfg_file, tmp_path):
    cfg = load_config(cfg_file, ["optim.trainable=[q_proj]", "data.batching.bucket_boundaries=[16, 32]"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert isinstance(again, Config) and again == cfg
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["optim"]["weight_decay"] == 0.025


def test_a_full_disk_while_saving_the_config_leaves_the_old_one(cfg_file, tmp_path, monkeypatch):
    """A resume rewrites its workdir's config.yaml; a write cut short must leave the config the next resume
    reads, not a truncated one (a plain rewrite truncates the file first)."""
    from nextquill_jax import atomic_file

    path = tmp_path / "saved.yaml"
    save_config(load_config(cfg_file), path)
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_file.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_config(load_config(cfg_file, ["optim.learning_rate=0.5"]), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("saved")) == ["saved.yaml"]


def test_mesh_sizes_resolve_and_reject_misfits():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert resolve_mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 4) == (4, 1, 1)
    with pytest.raises(ValueError, match=r"has 4 devices but 8 are available.*mesh.fsdp=-1"):
        resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    # The example fits: with fsdp filling, the fixed axes are cut to divide the devices (`mesh.fsdp=-1`
    # alone left tensor=3 on one device, refused again).
    with pytest.raises(ValueError, match=r"\(e\.g\. mesh\.fsdp=-1 mesh\.tensor=1\)\.$"):
        resolve_mesh_shape({"data": 1, "fsdp": 1, "tensor": 3}, 1)
    assert resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 1) == (1, 1, 1)
    with pytest.raises(ValueError, match=r"does not divide 8\. Fix: .* e\.g\. mesh\.data=1\.$"):
        resolve_mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
    # one device said as such, and the fix names the overrides that fit: each fixed axis cut to what divides
    with pytest.raises(
        ValueError,
        match=r"^mesh \(data=3, fsdp=-1, tensor=1\) cannot fill 1 device: the fixed axes multiply to 3, "
        r"which does not divide 1\. Fix: choose sizes whose product divides 1, e\.g\. mesh\.data=1\.$",
    ):
        resolve_mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 1)
    with pytest.raises(
        ValueError, match=r"multiply to 8, which does not divide 4\. .* e\.g\. mesh\.tensor=2\.$"
    ):
        resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 4}, 4)
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 4) == (2, 1, 2)  # what that fix gives
    with pytest.raises(ValueError, match=r"e\.g\. mesh\.data=2 mesh\.tensor=3\.$"):
        resolve_mesh_shape({"data": 4, "fsdp": -1, "tensor": 9}, 6)
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 3}, 6) == (2, 1, 3)
    # A sweep file's `mesh:` entries take no overrides: the same messages, spelt as entries.
    with pytest.raises(
        ValueError,
        match=r"^mesh entry \{data: 4, fsdp: -1, tensor: 9\} cannot fill 6 devices: .* e\.g\. "
        r"\{data: 2, fsdp: -1, tensor: 3\}\.$",
    ):
        resolve_mesh_shape({"data": 4, "fsdp": -1, "tensor": 9}, 6, spelling="entry")
    with pytest.raises(ValueError, match=r"4 devices but 8 .* e\.g\. \{data: 2, fsdp: -1, tensor: 1\}\.$"):
        resolve_mesh_shape({"data": 2, "fsdp": 2}, 8, spelling="entry")
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_mesh_sizes_that_fit_no_device_count_are_refused_when_the_file_is_read(tmp_path, cfg_file):
    """A misspelt axis or an impossible size in a sweep's `mesh:` entry was found only at run time, where the
    sweep skipped every point of that entry and went on with the others; a training config's was found when
    the mesh was made. Both are now refused as the file is read, naming its line (or the override)."""
    raw = yaml.safe_load((REPO / "configs/scaling/tiny_cpu.yaml").read_text())
    head = yaml.safe_dump({k: v for k, v in raw.items() if k != "mesh"})
    path, line = tmp_path / "sweep.yaml", len(head.splitlines()) + 3  # the second entry's line
    for entry, said in (
        (
            {"data": 1, "fsdb": -1},
            "mesh axes ['fsdb'] are unknown; the mesh axes are ['data', 'fsdp', 'tensor']. "
            "Fix: name only those axes.",
        ),
        (
            {"data": 0},
            "invalid mesh sizes data: 0 in mesh entry {data: 0}: each axis size must be a positive "
            "integer, and at most one axis may be -1",
        ),
        ({"data": -1, "fsdp": -1}, "invalid mesh sizes data: -1, fsdp: -1 in mesh entry"),
    ):
        path.write_text(f"{head}mesh:\n  - {{data: 1, fsdp: -1}}\n  - {mesh_entry(entry)}\n")
        with pytest.raises(ConfigError) as e:
            load_scaling_config(path)
        assert str(e.value).startswith(f"{path}, line {line}: `mesh[1]`: {said}"), e.value
    with pytest.raises(
        ConfigError, match=r"^command line: invalid `mesh`: invalid mesh sizes mesh\.tensor=0: "
    ):
        load_config(cfg_file, ["mesh.tensor=0"])


def test_a_mesh_axis_that_does_not_divide_a_parameter_names_it(cfg_file):
    model = load_config(cfg_file).model.model_config()  # 4 heads, 2 kv heads
    mesh = AbstractMesh((1, 1, 4), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    with pytest.raises(
        ValueError,
        match=r"\['attn'\]\['k_.*dimension \d \(`kv_heads`\) of size 2 cannot be split 4 ways .*Fix: make "
        r"mesh\.tensor a divisor of 2",
    ):
        model_setup.param_shardings(model, mesh)


@pytest.mark.parametrize(
    ("rows", "micro_batches", "multiple"),
    [
        (8, 2, None),  # 4 batch shards (data 2 x fsdp 2) of 2 rows, each 2 micro-batches of 1
        (6, 1, 4),  # 6 rows do not split over 4 shards
        (8, 4, 16),  # 8 is a multiple of 4 micro-batches, but a shard's 2 rows are not
    ],
)
def test_micro_batches_must_split_each_batch_shards_rows(cfg_file, rows, micro_batches, multiple):
    from nextquill_jax.train.setup import check_micro_batches

    cfg = load_config(
        cfg_file, [f"data.batching.rows_per_batch={rows}", f"train.micro_batches={micro_batches}"]
    )
    mesh = AbstractMesh((2, 2, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    if multiple is None:
        check_micro_batches(cfg, mesh)
        return
    with pytest.raises(ConfigError) as e:
        check_micro_batches(cfg, mesh)
    assert str(e.value) == (
        f"a global batch of {rows} rows (data.batching.rows_per_batch={rows} x 1 processes) does not split "
        f"into 4 batch shards (mesh data x fsdp) of train.micro_batches={micro_batches} equal micro-batches. "
        f"Fix: make rows_per_batch x processes a multiple of {multiple}, or change train.micro_batches / the "
        "mesh."
    )


@pytest.mark.parametrize("lora", [False, True])
def test_the_steps_settings_are_the_configs_own(cfg_file, lora):
    """Each setting of the compiled step is its config key's value, none other's: token_chunk and vocab_chunk
    apart, every one off its default."""
    from nextquill_jax.train.setup import step_settings

    overrides = [
        "loss.variant=sft", "loss.token_chunk=32", "loss.vocab_chunk=16", "loss.operand_dtype=bfloat16",
        "train.micro_batches=2", "train.nonfinite=skip", "train.joint_forward=true",
    ]  # fmt: skip
    if lora:
        overrides += ["model.lora.rank=4", "model.lora.alpha=2.0", "model.lora.dropout=0.25"]
    cfg = load_config(cfg_file, overrides)
    settings = step_settings(cfg, reference_graphdef="GRAPHDEF")
    assert settings.loss.variant == "sft"
    assert (settings.token_chunk, settings.vocab_chunk, settings.operand_dtype) == (32, 16, "bfloat16")
    assert (settings.micro_batches, settings.skip_nonfinite, settings.joint_forward) == (2, True, True)
    assert settings.reference_graphdef == "GRAPHDEF"
    assert (settings.lora_scale, settings.lora_dropout) == ((2.0 / 4, 0.25) if lora else (None, 0.0))


def test_logical_axes_map_onto_mesh_axes_each_mesh_axis_used_once():
    """Expected specs derived by hand from DEFAULT_RULES (batch -> data x fsdp, embed -> fsdp; vocab, heads
    and mlp -> tensor; head_dim and layers replicated). A batch split over `data` alone, or a mesh axis used
    by two dimensions of one array, passed every other test."""
    from jax.sharding import PartitionSpec as P

    from nextquill_jax.data.global_batch import BATCH_SPEC
    from nextquill_jax.parallel import batch_shard_count, batch_sharding, logical_to_mesh_spec

    assert logical_to_mesh_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_mesh_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    # A mesh axis an earlier dimension took is not taken again: the later dimension stays replicated.
    assert logical_to_mesh_spec(("batch", "embed")) == P(("data", "fsdp"), None)
    assert logical_to_mesh_spec(("embed", "batch")) == P("fsdp", "data")
    assert logical_to_mesh_spec(("heads", "mlp")) == P("tensor", None)
    mesh = AbstractMesh((2, 4, 3), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    assert batch_shard_count(mesh) == 2 * 4  # data x fsdp; tensor's 3 do not split rows
    # The train step's batch sharding is the layout to_global_batch assembles the rows in (no reshuffle).
    assert batch_sharding(mesh).spec == BATCH_SPEC == P(("data", "fsdp"))


def test_two_of_the_three_multi_host_settings_are_refused_before_anything_starts(monkeypatch):
    from nextquill_jax import parallel

    for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)

    def started(*args, **kwargs):
        raise AssertionError("jax.distributed.initialize called with incomplete settings")

    monkeypatch.setattr(parallel.jax.distributed, "initialize", started)
    with pytest.raises(
        ValueError,
        match=r"^multi-host settings incomplete: \['coordinator', 'num_processes'\] given "
        r"but \['process_id'\] missing",
    ):
        parallel.initialize_distributed("localhost:1234", 2)
    monkeypatch.setenv(parallel.ENV_PROCESS_ID, "1")
    with pytest.raises(ValueError, match=r"\['num_processes', 'process_id'\] given but \['coordinator'\]"):
        parallel.initialize_distributed(num_processes=2)


def test_the_peer_watchdog_names_the_process_whose_counter_stopped_once_the_timeout_has_passed(
    monkeypatch, capfd
):
    """Process 0 of 3 with peer_timeout_s 6 (a beat each second) on a fake clock and key-value store: process
    1 beats until t=9 and then stops (its last counter stays in the store), process 2 beats on. Process 1's
    counter last moved at t=9, so at t=16 it has been silent 7 s > 6 s: exit(4) then, naming process 1 alone.
    Only the slow multi-process run in tests/train/test_runs.py covered the watchdog before."""
    from nextquill_jax import parallel

    store, now, exits = {}, [0.0], []

    class Client:
        def key_value_set(self, key, value, allow_overwrite):
            store[key] = value

        def key_value_try_get(self, key):
            return store[key]  # KeyError before the first beat, as the real store raises

    def sleep(seconds):
        assert now[0] < 100, "the watchdog never ended the process"
        now[0] += seconds
        for peer in (1, 2) if now[0] <= 9 else (2,):
            store[f"nextquill/alive/{peer}"] = str(int(now[0]))

    monkeypatch.setattr(parallel.time, "sleep", sleep)
    watchdog = parallel.PeerWatchdog(Client(), 0, 3, 6.0, exit=exits.append, clock=lambda: now[0])
    watchdog.run()
    assert exits == [parallel.EXIT_PEER_LOST] and now[0] == 16
    assert store["nextquill/alive/0"] == "17"  # its own counter, once a beat from t=0 to t=16
    assert capfd.readouterr().err.startswith(
        "error: process 1 of this 3-process run has not answered for 7 s (mesh.peer_timeout_s=6): "
    )


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """Set-up's backend check of `model.attention_impl` lifted, as on a GPU: for the checks of a cuDNN run's
    config that come after it (on CPU it would refuse `cudnn` first)."""
    from nextquill_jax.models import attention

    monkeypatch.setattr(attention, "check_attention_backend", lambda impl, **_: None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["mesh.data=2", "mesh.fsdp=1"],
            r"mesh: mesh \(data=2, fsdp=1, tensor=1\) has 2 devices but 1 is available\. Fix",
        ),
        (["model.preset=null", "model.path=/no/such"], r"model.path '/no/such' does not exist and is not a"),
        (["model.preset=null", "model.path=no/such"],
         r"model.path 'no/such' does not exist \(relative to the current directory, /.*\) and is not a"),
        (["train.micro_batches=3"], r"train.micro_batches=3 .*Fix"),
        (["optim.trainable=[no_such_param]"], r"optim.trainable pattern 'no_such_param' matches no param"),
        (["loss.variant=dce", "loss.dce=fixed"], r"loss.dce is 'fixed' but .* Fix: set loss.reference_model"),
        (["loss.variant=dce", "loss.dce=fixed", "loss.reference_model=/no/such"],
         r"^loss.reference_model '/no/such' does not exist and is not a packaged model name\. Fix: give a"),
        (["checkpoint.best_metric=eval/lss"], r"^checkpoint.best_metric `eval/lss` is not a .*`eval/loss`"),
        # sft computes no DCE, so it reports no pref_fraction; the message lists what it reports.
        (["loss.variant=sft", "checkpoint.best_metric=eval/pref_fraction"],
         r"variant sft\), .* kept\. Fix: .* of eval/loss, eval/loss_n, eval/tokens, eval/ce_without, or"),
        # The tests run on CPU.
        (CUDNN, r"^model.attention_impl='cudnn' needs an NVIDIA GPU .* 'cpu'. Fix: set model.attention"),
        (["model.attention_impl=splash"], r"^model.attention_impl='splash' needs a TPU .* 'cpu'. Fix: set"),
    ],
)  # fmt: skip
def test_bad_setups_fail_with_one_paragraph_before_compiling(
    tmp_path, compilations, overrides, message, write_random_data, write_config, tiny_config
):
    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    cfg = load_config(path, overrides)
    with pytest.raises(ConfigError, match=message) as e:
        train(cfg, tmp_path / "work")
    assert "\n" not in str(e.value)
    assert compilations == [], "compiled before reporting the config error"


@pytest.mark.parametrize(
    ("change", "message"),
    [({"model_type": "gpt2"}, r"config\.json model_type 'gpt2'"), ({"mlp_bias": True}, r"mlp_bias")],
)
def test_a_models_architecture_is_refused_before_the_data_is_prepared(
    tmp_path, change, message, tiny_config, write_config, save_tiny_tokenizer, tiny_hf_config
):
    """A model.path whose config.json describes a network this package lacks (no weights needed to tell)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**tiny_hf_config("llama").to_dict(), **change}))
    cfg = tiny_config(None, tmp_path / "work")
    cfg["model"] = {"path": str(model), "compute_dtype": "float32"}
    cfg["data"].update(
        format="generic",
        template="plain",
        sources=[str(FIXTURES / "generic" / "records.jsonl")],
        tokenizer=str(save_tiny_tokenizer(tmp_path / "tok")),
    )
    cfg["train"]["data_dir"] = None
    with pytest.raises(ConfigError, match=rf"^model\.path {re.escape(str(model))}: .*{message}"):
        train(load_config(write_config(cfg, tmp_path / "cfg.yaml")), tmp_path / "work")
    assert not (tmp_path / "work" / "prepared").exists()


@pytest.mark.parametrize(
    ("override", "key", "pattern", "error"),
    [
        ("optim.trainable=['(']", "trainable", "(", "missing ), unterminated subpattern at position 0"),
        ("optim.no_decay=[norm, '[bias']", "no_decay", "[bias", "unterminated character set at position 0"),
    ],
)
def test_an_optim_pattern_that_is_no_regular_expression_is_refused_at_load(
    cfg_file, override, key, pattern, error
):
    # re.error is no ValueError: it escaped set-up as a traceback.
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    message = str(e.value)
    assert (
        f"optim.{key} pattern {pattern!r} is not a regular expression ({error}). Fix: correct it" in message
    )
    assert "\n" not in message


@pytest.mark.parametrize(
    ("optim", "message"),
    [
        # One useless pattern among useful ones used to pass.
        (
            {"trainable": ["embed", "no_such"]},
            r"^optim\.trainable pattern 'no_such' matches no parameter\. Fix: remove it,.* \['embed', 'final",
        ),
        # A no_decay pattern that matches nothing was accepted silently (the defaults are exempt: a model may
        # have no biases).
        (
            {"no_decay": ["norm", "bias", "layernorm"]},
            r"^optim\.no_decay pattern 'layernorm' matches no parameter",
        ),
    ],
)
def test_an_optim_pattern_matching_no_parameter_is_refused_before_the_workdir_is_created(
    tmp_path, write_random_data, write_config, tiny_config, optim, message
):
    from nextquill_jax.train.setup import set_up_run

    cfg = tiny_config(write_random_data(tmp_path / "data", train=16, val=0), tmp_path / "work", optim=optim)
    with pytest.raises(ConfigError, match=message) as e:
        set_up_run(load_config(write_config(cfg, tmp_path / "cfg.yaml")), tmp_path / "work", echo=print)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"targets": ["no_such_param"]}, r"^model\.lora\.targets: 'no_such_param' matches no parameter"),
        # re.error is no ValueError: it used to escape as a traceback.
        (
            {"targets": ["attn/(q"]},
            r"^model\.lora\.targets: 'attn/\(q' is not a valid regular expression \(missing \), "
            r"unterminated subpattern at position 5\)\. Fix: correct the pattern",
        ),
        # init_from (a directory under tmp_path) used to be read only after the data was prepared, leaving a
        # workdir behind.
        (
            {"init_from": "nowhere"},
            r"^model\.lora\.init_from '.*/nowhere': .*/nowhere does not exist\. Fix: point it at a PEFT",
        ),
        (
            {"init_from": "rank4"},
            r"^model\.lora\.init_from '.*/rank4': the adapter has r=4, lora_alpha=16; the config asks for "
            r"rank=8, alpha=16\.0\. Fix",
        ),
    ],
)
def test_bad_lora_settings_are_refused_in_one_line_before_the_workdir_is_created(
    tmp_path, write_random_data, write_config, tiny_config, lora, message
):
    from safetensors.numpy import save_file

    from nextquill_jax.train.setup import set_up_run

    adapter = tmp_path / "rank4"  # a PEFT directory of another rank (its tensors are not read to tell)
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 16}))
    save_file({}, adapter / "adapter_model.safetensors")
    data = write_random_data(tmp_path / "data", train=16, val=8)
    cfg = tiny_config(data, tmp_path / "work")
    if "init_from" in lora:  # a directory under tmp_path
        lora = {**lora, "init_from": str(tmp_path / lora["init_from"])}
    cfg["model"]["lora"] = lora
    with pytest.raises(ConfigError, match=message) as e:
        set_up_run(load_config(write_config(cfg, tmp_path / "cfg.yaml")), tmp_path / "work", echo=print)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "work").exists()


def test_fixed_dce_on_data_with_a_precomputed_reference_dce_needs_no_reference_model(
    tmp_path, write_random_data, write_config, tiny_config
):
    """`loss.dce: fixed` is refused without a reference model only where the data carries no reference_dce:
    train data prepared with one sets up, and no reference model is loaded."""
    from nextquill_jax.train.setup import set_up_run

    data = write_random_data(tmp_path / "data", train=16, val=0)
    old = PreparedSplit(data, "train")
    examples = [{k: np.array(v) for k, v in old[i].items()} for i in range(len(old))]
    dce = lambda e: np.full(len(e["target"]), 0.5, np.float32)
    write_split(data, "train", (TokenizedExample(**e, reference_dce=dce(e)) for e in examples))
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    fixed = ["loss.variant=dce", "loss.dce=fixed"]
    run = set_up_run(load_config(path, fixed), tmp_path / "work", echo=lambda _: None)
    assert run.train_data.has_reference_dce and run.reference is None


def test_the_optimizer_applies_the_linear_decay_over_the_runs_own_steps(
    tmp_path, write_random_data, write_config, tiny_config
):
    """The run's optimizer decays over the steps the run takes, the schedule its rows log: on a constant
    unit gradient, Adam's bias-corrected step is exactly lr_k / (1 + eps) with lr_k = lr (1 - k / T) (no
    warm-up, no weight decay, no clipping), T = the run's total steps, counted here from its batches."""
    from nextquill_jax.train.setup import set_up_run

    path = write_config(
        tiny_config(write_random_data(tmp_path / "data", train=16, val=0), tmp_path / "work"),
        tmp_path / "c.yaml",
    )
    settings = [
        "optim.learning_rate=0.1",
        "optim.warmup_steps=0",
        "optim.weight_decay=0",
        "optim.clip_norm=null",
    ]
    run = set_up_run(load_config(path, settings), tmp_path / "work", echo=lambda _: None)
    steps = sum(run.train_data.num_batches(epoch) for epoch in range(2))  # data.batching.num_epochs: 2
    assert run.total_steps == steps >= 2
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), run.abstract_params)
    ones = jax.tree.map(np.ones_like, params)
    opt_state = run.tx.init(params)
    for k in range(steps):
        updates, opt_state = run.tx.update(ones, opt_state, params)
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_allclose(
                leaf, -0.1 * (1 - k / steps) / (1 + 1e-8), rtol=2e-5, atol=1e-9
            )  # float32 Adam


def test_a_checkpoints_folder_without_a_step_still_checks_lora_init_from(
    tmp_path, write_random_data, write_config, tiny_config
):
    """Only a saved step makes a start a resume (whose adapters come from the checkpoint): a first save cut
    short leaves an Orbax temporary folder, and the next start is a fresh one that reads init_from."""
    from nextquill_jax.train.setup import set_up_run

    cfg = tiny_config(write_random_data(tmp_path / "data", train=16, val=8), tmp_path / "work")
    cfg["model"]["lora"] = {"init_from": str(tmp_path / "nowhere")}
    (tmp_path / "work" / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"^model\.lora\.init_from '.*/nowhere': .*/nowhere does not exist"):
        set_up_run(load_config(write_config(cfg, tmp_path / "cfg.yaml")), tmp_path / "work", echo=print)


def _with_token(data: Path, split: str, token: int) -> None:
    """Prepared `split` of `data` written again with the last prompt token of its first example set to
    `token` (the other examples unchanged)."""
    old = PreparedSplit(data, split)
    examples = [{k: np.array(v) for k, v in old[i].items()} for i in range(len(old))]
    examples[0]["prompt_with"][-1] = token
    write_split(data, split, (TokenizedExample(**e) for e in examples))


def _largest_id(data: Path, split: str) -> int:
    """The largest token id of the split, read from its .npy files directly."""
    return max(int(np.load(data / split / f"{f}.npy").max()) for f in TOKEN_FIELDS)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_token_id_outside_the_vocabulary_fails_set_up_before_compiling(
    tmp_path, compilations, split, write_random_data, write_config, tiny_config
):
    """An id >= vocab_size in the train or the eval split (a tokenizer larger than the model's) would index
    past the embedding and make the loss NaN; set-up names the split, the id, the vocab_size and its source,
    and the fix."""
    data = write_random_data(tmp_path / "data", train=16, val=8)
    vocab = tiny_config(data, tmp_path / "work")["model"]["overrides"]["vocab_size"]
    _with_token(data, split, vocab)
    cfg = load_config(write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml"))
    message = (
        rf"^prepared split {re.escape(str(data / split))} holds token id {vocab}, but the model's vocab_size "
        rf"is {vocab} \(from model.overrides.vocab_size\): .* Fix: set data.tokenizer to the model's own "
        rf"tokenizer .* \(vocab_size > {vocab}\)\.$"
    )
    with pytest.raises(ConfigError, match=message) as e:
        train(cfg, tmp_path / "work")
    assert "\n" not in str(e.value)
    assert compilations == [], "compiled before reporting the config error"


def test_a_token_id_outside_a_reference_models_vocabulary_fails_before_it_is_loaded(
    tmp_path, compilations, write_random_data, write_config, tiny_config, tiny_hf_config
):
    """A `dce: fixed` reference model reads the same ids: a path is checked from its config.json, before
    its weights are read (the directory holds none here)."""
    data = write_random_data(tmp_path / "data", train=16, val=0)
    largest = _largest_id(data, "train")
    reference = tmp_path / "reference"
    tiny_hf_config(vocab_size=largest, bos_token_id=0, eos_token_id=0).save_pretrained(reference)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    fixed = ["loss.variant=dce", "loss.dce=fixed", f"loss.reference_model={reference}"]
    message = (
        rf"holds token id {largest}, but the model's vocab_size is {largest} \(from the config.json or GGUF "
        rf"header of loss.reference_model '{re.escape(str(reference))}'\): .* Fix:"
    )
    with pytest.raises(ConfigError, match=message):
        train(load_config(path, fixed), tmp_path / "work")
    assert compilations == [], "compiled before reporting the config error"


def test_data_whose_largest_id_is_vocab_size_minus_1_is_accepted(
    tmp_path, write_random_data, write_config, tiny_config
):
    from nextquill_jax.train.setup import set_up_run

    data = write_random_data(tmp_path / "data", train=16, val=8)
    largest = max(_largest_id(data, s) for s in ("train", "val"))
    smallest = min(int(np.load(data / "train" / f"{f}.npy").min()) for f in TOKEN_FIELDS)
    assert PreparedSplit(data, "train").token_id_range == (smallest, _largest_id(data, "train"))
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    cfg = load_config(path, [f"model.overrides.vocab_size={largest + 1}"])
    run = set_up_run(cfg, tmp_path / "work", echo=lambda _: None)
    assert run.eval_data is not None  # both splits were checked
    with pytest.raises(
        ConfigError, match=rf"holds token id {largest}, but the model's vocab_size is {largest} "
    ):
        set_up_run(load_config(path, [f"model.overrides.vocab_size={largest}"]), tmp_path / "w2", echo=print)


def test_vocab_origin_names_the_key_the_vocab_size_comes_from():
    from nextquill_jax.config import ModelRunConfig

    assert model_setup.vocab_origin(ModelRunConfig(preset="qwen2.5-0.5b")) == "model.preset 'qwen2.5-0.5b'"
    overridden = ModelRunConfig(
        preset="qwen2.5-0.5b", overrides={"vocab_size": 1000, "bos_token_id": 0, "eos_token_ids": [0]}
    )
    assert model_setup.vocab_origin(overridden) == "model.overrides.vocab_size"
    assert (
        model_setup.vocab_origin(ModelRunConfig(path="/m"))
        == "the config.json or GGUF header of model.path '/m'"
    )
    # The reference model of a saved run: its key as the file spells it, then where that config was saved.
    saved = model_setup.vocab_origin(
        ModelRunConfig(preset="qwen2.5-0.5b"), key="loss.reference_model", saved_with="run/checkpoints/2"
    )
    assert saved == "loss.reference_model.preset 'qwen2.5-0.5b' in the config of run/checkpoints/2"


def test_an_empty_split_has_no_id_range_and_passes_the_check(tmp_path):
    write_split(tmp_path, "val", [])
    assert PreparedSplit(tmp_path, "val").token_id_range is None
    model_setup.check_token_ids(PreparedSplit(tmp_path, "val"), 1, "anything")


def test_a_negative_token_id_is_refused_whatever_the_vocab_size(tmp_path):
    """JAX's gather wraps a negative id around to the end of the embedding: such data is refused, naming
    the id, though every id is below vocab_size."""
    ids = lambda *v: np.array(v, np.int32)
    examples = [
        TokenizedExample(prompt_with=ids(4, 5), prompt_without=ids(5), target=ids(6, 0)),
        TokenizedExample(prompt_with=ids(7, 8), prompt_without=ids(8, -3), target=ids(9, 0)),
    ]
    write_split(tmp_path, "val", examples, tokenizer="tok")
    split = PreparedSplit(tmp_path, "val")
    assert split.token_id_range == (-3, 9)
    message = (
        rf"^prepared split {re.escape(str(tmp_path / 'val'))} \(prepared with tokenizer 'tok'\) holds token "
        rf"id -3: token ids are >= 0, .* Fix: prepare the data again with data.tokenizer set to the model's "
        rf"own tokenizer .*\)\.$"
    )
    with pytest.raises(ConfigError, match=message):
        model_setup.check_token_ids(split, 1000, "anything")
    write_split(tmp_path, "test", examples[:1])  # without the negative id: accepted
    assert PreparedSplit(tmp_path, "test").token_id_range == (0, 6)
    model_setup.check_token_ids(PreparedSplit(tmp_path, "test"), 7, "anything")


def test_token_id_minus_1_is_refused(tmp_path):
    """-1, a common "no token" marker, is the nearest negative id: JAX would read it as the last embedding."""
    ids = lambda *v: np.array(v, np.int32)
    write_split(
        tmp_path, "val", [TokenizedExample(prompt_with=ids(4, 5), prompt_without=ids(5), target=ids(-1))]
    )
    with pytest.raises(ConfigError, match=r" holds token id -1: token ids are >= 0"):
        model_setup.check_token_ids(PreparedSplit(tmp_path, "val"), 1000, "anything")


def test_cudnn_attention_in_float32_fails_before_compiling(
    tmp_path, compilations, write_random_data, write_config, tiny_config, as_on_a_gpu
):
    """On a GPU cuDNN's attention refuses a float32 compute dtype at set-up, not while the first step is
    traced."""
    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    cfg = load_config(path, ["model.attention_impl=cudnn", "model.compute_dtype=float32"])
    with pytest.raises(ConfigError, match=r"needs model.compute_dtype='bfloat16', got 'float32' .* Fix: set"):
        train(cfg, tmp_path / "work")
    assert compilations == [], "compiled before reporting the config error"


def test_packed_rows_with_more_examples_than_cudnn_max_segments_are_a_config_error(
    tmp_path, compilations, write_random_data, write_config, tiny_config, as_on_a_gpu
):
    from nextquill_jax.train.setup import check_packed_segments

    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    cfg = load_config(path, [*CUDNN, "model.cudnn_max_segments=1"])
    pipeline = BatchPipeline(PreparedSplit(data, "train"), cfg.data.batching)
    most = max(int(batch["with_segment_ids"].max()) for batch in pipeline)  # over both epochs' batches
    assert most > 1
    fix = rf"packs up to {most} examples into one train row .* set model.cudnn_max_segments to {most} or more"
    with pytest.raises(ConfigError, match=fix):
        train(cfg, tmp_path / "work")
    assert compilations == [], "compiled before reporting the config error"
    check_packed_segments(
        load_config(path, [*CUDNN, f"model.cudnn_max_segments={most}"]), {"train": pipeline}
    )


def _most_examples_yielded(pipeline: BatchPipeline, epochs: int = 1) -> int:
    """The most examples in one row of the batches `pipeline` yields in its first `epochs` epochs, counted
    from their segment ids (a row's examples are numbered 1, 2, ...)."""
    batches = itertools.islice(pipeline, sum(pipeline.num_batches(e) for e in range(epochs)))
    return max(int(batch["with_segment_ids"].max()) for batch in batches)


def test_an_endless_run_checks_cudnn_max_segments_against_every_epoch_not_the_first(
    tmp_path, compilations, write_random_data, write_config, tiny_config, as_on_a_gpu
):
    """With `num_epochs: null` a number that holds for the first epoch's rows but not for a later epoch's
    (counted from the batches the pipeline yields) is refused, naming the bound for every epoch, which
    passes."""
    from nextquill_jax.train.setup import check_packed_segments

    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    endless = [*CUDNN, "data.batching.num_epochs=null", "train.max_steps=4"]
    pipeline = BatchPipeline(PreparedSplit(data, "train"), load_config(path, endless).data.batching)
    first = _most_examples_yielded(pipeline, epochs=1)
    later = _most_examples_yielded(pipeline, epochs=4)
    assert later > first  # a later epoch packs a row with more examples than any of the first's
    cfg = load_config(path, [*endless, f"model.cudnn_max_segments={first}"])
    bound = pipeline.examples_per_row_bound()
    fix = (
        rf"num_epochs is null, so any epoch may pack up to {bound} examples into one train row .* more than "
        rf"model.cudnn_max_segments={first}: .* Fix: set model.cudnn_max_segments to {bound} or more, or auto"
    )
    with pytest.raises(ConfigError, match=fix):
        train(cfg, tmp_path / "work")
    assert compilations == [], "compiled before reporting the config error"
    assert bound >= later
    check_packed_segments(
        load_config(path, [*endless, f"model.cudnn_max_segments={bound}"]), {"train": pipeline}
    )


def test_auto_and_a_set_bound_cover_every_planned_epoch_and_the_split_whose_rows_hold_most(
    tmp_path, write_random_data, write_config, tiny_config
):
    """Four epochs, a later one packing more examples into a row than the first (counted from the batches
    the pipeline yields, epoch by epoch): `auto` is the most over all four, and a set bound of exactly that
    passes while one less is refused naming an epoch whose rows hold that many. Of two pipelines, the one
    whose rows hold more decides, here the second ("eval"), beside rows of one example each (random mode)."""
    from nextquill_jax.train.setup import check_packed_segments, resolve_packed_segments

    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    four = [*CUDNN, "data.batching.num_epochs=4"]
    cfg = load_config(path, [*four, "model.cudnn_max_segments=auto"])
    pipeline = BatchPipeline(PreparedSplit(data, "train"), cfg.data.batching)
    batches = iter(pipeline)
    per_epoch = [
        max(int(next(batches)["with_segment_ids"].max()) for _ in range(pipeline.num_batches(e)))
        for e in range(4)
    ]
    most = max(per_epoch)
    assert most > per_epoch[0]
    lines = []
    assert resolve_packed_segments(cfg, {"train": pipeline}, lines.append).model.cudnn_max_segments == most
    check_packed_segments(load_config(path, [*four, f"model.cudnn_max_segments={most}"]), {"train": pipeline})
    with pytest.raises(
        ConfigError, match=rf"^data\.batching packs up to {most} examples into one train row"
    ) as e:
        check_packed_segments(
            load_config(path, [*four, f"model.cudnn_max_segments={most - 1}"]), {"train": pipeline}
        )
    assert per_epoch[int(re.search(r"\(epoch (\d+)\)", str(e.value))[1])] == most
    one_each = load_config(path, [*four, "data.batching.mode=random"]).data.batching
    alone = BatchPipeline(PreparedSplit(data, "train"), one_each)
    assert _most_examples_yielded(alone, epochs=4) == 1
    lines.clear()
    both = resolve_packed_segments(cfg, {"train": alone, "eval": pipeline}, lines.append)
    assert both.model.cudnn_max_segments == most
    [line] = lines
    said = f"model.cudnn_max_segments: auto chose {most}: the most examples a planned eval row holds (epoch "
    assert line.startswith(said) and per_epoch[int(line[len(said) : -1])] == most, line


@pytest.mark.parametrize("num_epochs", [2, None])
def test_cudnn_max_segments_auto_covers_every_row_the_run_yields(
    tmp_path, write_random_data, write_config, tiny_config, num_epochs, as_on_a_gpu
):
    """Finite epochs: `auto` is exactly the most examples a train or eval row holds, counted from the batches
    the run's pipelines yield. Endless (`num_epochs: null`): at least that many over several epochs."""
    from nextquill_jax.train.setup import set_up_run

    data = write_random_data(tmp_path / "data", train=24, val=8)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    auto = [
        *CUDNN,
        "model.cudnn_max_segments=auto",
        f"data.batching.num_epochs={num_epochs or 'null'}",
        "train.max_steps=4",
    ]
    lines = []
    run = set_up_run(load_config(path, auto), tmp_path / "work", echo=lines.append)
    chosen = run.config.model.cudnn_max_segments
    train_most = _most_examples_yielded(run.train_data, epochs=num_epochs or 5)
    yielded = max(train_most, _most_examples_yielded(run.eval_data))
    assert train_most > 1  # rows really hold several examples
    if num_epochs is None:
        assert chosen >= yielded
        assert lines[-1].startswith(f"model.cudnn_max_segments: auto chose {chosen}: at most that many train")
    else:
        assert chosen == yielded
        assert lines[-1].startswith(f"model.cudnn_max_segments: auto chose {chosen}: the most examples a")


def test_a_cudnn_run_packs_by_default_records_its_choice_and_a_resume_compiles_the_same(
    tmp_path, monkeypatch, write_random_data, write_config, tiny_config
):
    """A cuDNN run that leaves `model.cudnn_max_segments` unset gets `auto`, the packed mode, and trains
    (cuDNN's private API emulated on CPU); its step is compiled for the chosen
    bound, config.yaml and the checkpoint record it; resuming the same config chooses and compiles the same
    bound, which the checkpoint's recorded value then matches (a resume with another would be refused)."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from nextquill_jax.models import attention
    from nextquill_jax.train.workdir import restore_params
    from tests.models.cudnn_emulation import emulated_packed_attention

    emulation = emulated_packed_attention(kv_offsets_use_kv_heads=True)
    traced_bounds = []  # M of q_seqlen [B, M] in every traced packed attention call

    @functools.wraps(emulation)  # the signature the packed path checks for
    def recording(*args, **kwargs):
        traced_bounds.append(kwargs["q_seqlen"].shape[1])
        return emulation(*args, **kwargs)

    monkeypatch.setattr(fused, "dot_product_attention", recording)
    monkeypatch.setattr(attention, "check_attention_backend", lambda impl, **_: None)
    data = write_random_data(tmp_path / "data", train=24, val=8)
    workdir = tmp_path / "work"
    path = write_config(tiny_config(data, workdir), tmp_path / "cfg.yaml")
    auto = CUDNN  # model.cudnn_max_segments unset: auto, the default
    # Both steps saved, so that dropping step 2's checkpoint leaves a run stopped at step 1 to resume.
    run_overrides = [*auto, "train.max_steps=2", "checkpoint.every_steps=1"]
    cfg = load_config(path, run_overrides)
    train_data = BatchPipeline(PreparedSplit(data, "train"), cfg.data.batching)
    eval_batching = dataclasses.replace(
        cfg.data.batching, shuffle=False, num_epochs=1, drop_remainder=False
    )  # as set-up batches the eval split
    most = max(
        _most_examples_yielded(train_data, epochs=2),
        _most_examples_yielded(BatchPipeline(PreparedSplit(data, "val"), eval_batching)),
    )
    assert most > 1  # so M is `most`, not the spare segment a bound of 1 is given

    lines = []
    assert train(cfg, workdir, echo=lines.append).status == "finished"
    saved = lambda: load_config(workdir / "config.yaml").model.cudnn_max_segments
    assert saved() == most and restore_params(workdir).config.model.cudnn_max_segments == most
    assert traced_bounds and set(traced_bounds) == {most}

    traced_bounds.clear()
    shutil.rmtree(workdir / "checkpoints" / "2")
    resumed = train(load_config(path, run_overrides), workdir, echo=lines.append)
    assert resumed.step == 2 and any(line.startswith("resuming from") for line in lines)
    assert saved() == most and restore_params(workdir).config.model.cudnn_max_segments == most
    assert traced_bounds and set(traced_bounds) == {most}
    assert sum(line.startswith(f"model.cudnn_max_segments: auto chose {most}:") for line in lines) == 2


@pytest.mark.parametrize(("variant", "noted"), [("nextquill", True), ("sft", False)])
def test_a_loss_of_the_historys_effects_without_history_is_noted(
    tmp_path, write_random_data, write_config, tiny_config, variant, noted
):
    """`data.max_history: 0` keeps every example with no history (as a pre-training asks); a loss built on
    the difference the history makes then measures nothing, which set-up now says."""
    from nextquill_jax.train.setup import set_up_run

    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    lines = []
    set_up_run(
        load_config(path, ["data.max_history=0", f"loss.variant={variant}"]), tmp_path / "work", lines.append
    )
    note = (
        f"note: data.max_history is 0, so no prompt holds any history: the with- and without-history passes "
        f"see the same context, and loss.variant {variant}'s effects of the history (DCE, the alignment "
        f"term) measure nothing"
    )
    assert (note in lines) == noted, lines


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (
            ["loss.variant=nextquill"],
            "the DCE that weights the targets is the trained model's own; loss.dce=fixed weights them by the "
            "reference's)",
        ),
        (["loss.variant=sft"], "loss.variant sft weights no target by DCE)"),
        (["loss.variant=nextquill", "loss.dce=fixed"], None),
    ],
)
def test_a_reference_model_that_a_dynamic_dce_leaves_unread_is_noted(
    tmp_path, write_random_data, write_config, tiny_config, overrides, why
):
    """`loss.reference_model` is read by `dce: fixed` alone; beside `dynamic` it was passed over without a
    word (not refused: a compare file's base may set it for its fixed-DCE variants only)."""
    from nextquill_jax.train.setup import set_up_run

    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    lines = []
    reference = tmp_path / "no_model"  # refused (it names nothing) only where it is read
    cfg = load_config(path, [*overrides, f"loss.reference_model={reference}"])
    if why is None:
        with pytest.raises(ConfigError, match=rf"^loss\.reference_model '{re.escape(str(reference))}' does"):
            set_up_run(cfg, tmp_path / "work", lines.append)
    else:
        set_up_run(cfg, tmp_path / "work", lines.append)
    notes = [line for line in lines if "loss.reference_model is" in line]
    expected = f"note: loss.reference_model is {str(reference)!r} but loss.dce is dynamic: the reference is "
    assert notes == ([] if why is None else [f"{expected}not loaded ({why}"]), lines


@pytest.mark.parametrize("best_metric", ["eval/loss", None])
def test_an_eval_split_the_data_lacks_is_noted_with_what_the_best_metric_loses_and_the_splits_held(
    tmp_path, write_random_data, write_config, tiny_config, best_metric
):
    """It said only 'no evaluation': a run with checkpoint.best_metric (the default) then keeps no best
    checkpoint, which a misspelt metric is refused for; the note now says so, and which splits there are."""
    from nextquill_jax.train.setup import set_up_run

    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    lines = []
    overrides = ["eval.split=test", f"checkpoint.best_metric={best_metric or 'null'}"]
    set_up_run(load_config(path, overrides), tmp_path / "work", lines.append)
    kept = "" if best_metric is None else ", so checkpoint.best_metric 'eval/loss' keeps no best checkpoint"
    assert (
        f"{data} has no 'test' split: no evaluation{kept} (eval.split names the split; the data holds train)"
    ) in lines, lines


@pytest.mark.parametrize(("warmup", "noted"), [(10, True), (2, False)])
def test_a_warmup_longer_than_the_run_is_noted_with_its_last_learning_rate(
    tmp_path, write_random_data, write_config, tiny_config, warmup, noted
):
    """optim.warmup_steps above the run's optimizer steps (2 here: one epoch of 16 examples) is kept (a smoke
    run may want it), and set-up says where the learning rate ends: linear from 0 over `warmup` steps, so the
    last update (step 1) is at 1 / warmup of the peak. A warm-up as long as the run is not noted."""
    from nextquill_jax.train.setup import set_up_run

    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    lines = []
    overrides = [f"optim.warmup_steps={warmup}", "optim.learning_rate=0.002"]
    run = set_up_run(load_config(path, overrides), tmp_path / "work", lines.append)
    assert run.total_steps == 2
    said = [line for line in lines if line.startswith("note: optim.warmup_steps")]
    expected = [
        "note: optim.warmup_steps is 10, more than the run's 2 optimizer steps: the learning rate ends "
        "part-way up its warm-up, at 0.0002 (10% of optim.learning_rate), and never decays"
    ]
    assert said == (expected if noted else []), lines


@pytest.mark.parametrize(("overrides", "noted"), [([], True), (["optim.warmup_steps=0"], False)])
def test_a_one_step_run_whose_step_is_warm_up_is_told_it_changes_no_weight(
    tmp_path, write_random_data, write_config, tiny_config, overrides, noted
):
    """The warm-up rises from 0, so a one-step run's only update (warmup_ratio 0.01: one step of warm-up)
    has learning rate 0: a one-step compare variant came out bit-identical to the untrained one, unsaid."""
    from nextquill_jax.train.optimizer import learning_rate_schedule
    from nextquill_jax.train.setup import set_up_run

    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    lines = []
    cfg = load_config(path, ["train.max_steps=1", *overrides])
    run = set_up_run(cfg, tmp_path / "work", lines.append)
    assert run.total_steps == 1 and (float(learning_rate_schedule(cfg.optim, 1)(0)) == 0) == noted
    said = [line for line in lines if "changes no weight" in line]
    expected = [
        "note: the run's one optimizer step is the first of its warm-up, whose learning rate is 0: it "
        "changes no weight. Fix: optim.warmup_steps=0, or more steps (train.max_steps, epochs)"
    ]
    assert said == (expected if noted else []), lines


def test_a_joint_forward_run_bounds_cudnn_max_segments_by_both_streams_of_a_row(
    tmp_path, monkeypatch, write_random_data, write_config, tiny_config
):
    """`train.joint_forward` joins a row's with- and without-history rows into one attention row, numbering
    the latter's examples after the former's: `auto` chose the examples per row, so the fullest rows went
    past the bound and their attention was NaN (the run stopped on a non-finite loss); a set N was checked
    against the examples per row alone. Now the bound is twice that (cuDNN's private API emulated on CPU)."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from nextquill_jax.eval.evaluate import split_losses
    from nextquill_jax.models import attention
    from nextquill_jax.train.setup import check_packed_segments
    from nextquill_jax.train.workdir import restore_model, single_device_mesh
    from tests.models.cudnn_emulation import emulated_packed_attention

    monkeypatch.setattr(
        fused, "dot_product_attention", emulated_packed_attention(kv_offsets_use_kv_heads=True)
    )
    monkeypatch.setattr(attention, "check_attention_backend", lambda impl, **_: None)
    data = write_random_data(tmp_path / "data", train=24, val=8)
    workdir = tmp_path / "work"
    path = write_config(tiny_config(data, workdir), tmp_path / "cfg.yaml")
    joint = [*CUDNN, "train.joint_forward=true", "train.max_steps=2"]
    cfg = load_config(path, [*joint, "model.cudnn_max_segments=auto"])
    train_data = BatchPipeline(PreparedSplit(data, "train"), cfg.data.batching)
    most = _most_examples_yielded(train_data, epochs=2)
    assert most > 1

    lines = []
    result = train(cfg, workdir, echo=lines.append)
    assert result.status == "finished"
    chosen = load_config(workdir / "config.yaml").model.cudnn_max_segments
    assert chosen >= 2 * most and chosen % 2 == 0
    assert any(
        line.startswith(f"model.cudnn_max_segments: auto chose {chosen}:") and "twice" in line
        for line in lines
    )
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]  # an evaluation's row has eval/loss only
    assert losses and np.isfinite(np.asarray(losses, float)).all()
    with pytest.raises(
        ConfigError,
        match=rf"\({2 * most} segments: train.joint_forward joins .* Fix: set model.cudnn_max_segments to "
        rf"{2 * most} or more",
    ):
        check_packed_segments(
            load_config(path, [*joint, f"model.cudnn_max_segments={most}"]), {"train": train_data}
        )
    check_packed_segments(
        load_config(path, [*CUDNN, f"model.cudnn_max_segments={most}"]), {"train": train_data}
    )

    # An sft run joins nothing (it needs one stream) and records M = the examples per row; `evaluate`'s terms
    # (the nextquill loss, both streams, one attention row under joint_forward) need twice that.
    sft_dir = tmp_path / "sft"
    sft = [*joint, "model.cudnn_max_segments=auto", "loss.variant=sft", "train.max_steps=1"]
    train(load_config(path, sft), sft_dir, echo=lambda _: None)
    assert load_config(sft_dir / "config.yaml").model.cudnn_max_segments < 2 * most
    val = PreparedSplit(data, "val")
    losses = split_losses(restore_model(sft_dir, None, single_device_mesh()), val, len(val))
    assert np.isfinite([losses["loss"], *losses["terms"].values()]).all(), losses


def test_a_workdir_reference_model_runs_with_a_cudnn_max_segments_that_holds_for_this_runs_rows(
    tmp_path, monkeypatch, write_random_data, write_config, tiny_config
):
    """A run trained on unpacked rows with cuDNN's packed attention records M=1 (the private API emulated on
    CPU). Serving as the frozen reference model of a run on packed rows (xla attention: its own M is null),
    it runs with M raised to the most examples those rows may hold: its DCE on a packed batch is finite and
    equals that of the same parameters under the `xla` attention."""
    from flax import nnx
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from nextquill_jax.models import attention
    from nextquill_jax.train.setup import examples_per_row, set_up_run
    from nextquill_jax.train.step import reference_dce
    from tests.models.cudnn_emulation import emulated_packed_attention

    monkeypatch.setattr(
        fused, "dot_product_attention", emulated_packed_attention(kv_offsets_use_kv_heads=True)
    )
    monkeypatch.setattr(attention, "check_attention_backend", lambda impl, **_: None)
    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "unused"), tmp_path / "cfg.yaml")
    unpacked = [*CUDNN, "model.cudnn_max_segments=1", "data.batching.mode=bucket", "train.max_steps=1"]
    reference_dir = tmp_path / "reference"
    assert train(load_config(path, unpacked), reference_dir, echo=lambda _: None).status == "finished"

    fixed = ["loss.variant=dce", "loss.dce=fixed", f"loss.reference_model={reference_dir}"]
    run = set_up_run(load_config(path, fixed), tmp_path / "work", echo=lambda _: None)
    graphdef, params = run.reference
    batch = next(iter(run.train_data))
    assert batch["with_segment_ids"].max() > 1  # the rows really are packed: M=1 would make them NaN
    dce = lambda g: np.asarray(jax.jit(lambda p, b: reference_dce(g, p, b, run.settings))(params, batch))
    used = nnx.merge(graphdef, params).cfg
    xla = model_setup.abstract_model(used.replace(attention_impl="xla", cudnn_max_segments=None))[0]
    packed, expected = dce(graphdef), dce(xla)
    assert np.isfinite(packed).all() and np.abs(expected).max() > 1e-4
    # bf16 attention inputs (cuDNN's) round differently in the two implementations: 2% of the largest DCE.
    np.testing.assert_allclose(packed, expected, rtol=0, atol=0.02 * np.abs(expected).max())
    assert load_config(reference_dir / "config.yaml").model.cudnn_max_segments == 1
    assert used.cudnn_max_segments == examples_per_row(run.train_data)[0]


def test_a_reference_models_bound_is_raised_to_the_pipeline_whose_rows_hold_most(
    tmp_path, write_random_data, write_config, tiny_config
):
    """A reference model recorded with M=1 beside a run's train rows of one example each (random mode) and
    eval rows packed with several: it runs with M the most examples the packed rows hold, counted from the
    batches they yield over the run's epochs (its parameters unchanged)."""
    from flax import nnx

    from nextquill_jax.train.setup import reference_for_rows

    data = write_random_data(tmp_path / "data", train=16, val=0)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    cfg = load_config(path, [*CUDNN, "model.cudnn_max_segments=1"])
    packed = BatchPipeline(PreparedSplit(data, "train"), cfg.data.batching)
    one_each = load_config(path, ["data.batching.mode=random"]).data.batching
    alone = BatchPipeline(PreparedSplit(data, "train"), one_each)
    epochs = cfg.data.batching.num_epochs
    most = _most_examples_yielded(packed, epochs=epochs)
    assert most > 1 and _most_examples_yielded(alone, epochs=epochs) == 1
    graphdef, params = model_setup.abstract_model(cfg.model.model_config())
    raised, same = reference_for_rows((graphdef, params), {"train": alone, "eval": packed})
    assert same is params and nnx.merge(raised, params).cfg.cudnn_max_segments == most


def test_eval_generation_max_new_tokens_0_means_no_generation_and_below_0_is_refused():
    """0 is `evaluate`'s "losses only" (tests/eval/test_evaluate.py); -1 is refused naming the key and what 0
    means."""
    config = REPO / "configs" / "tiny_synthetic.yaml"
    assert load_config(config, ["eval.generation.max_new_tokens=0"]).eval.generation.max_new_tokens == 0
    with pytest.raises(ConfigError) as e:
        load_config(config, ["eval.generation.max_new_tokens=-1"])
    assert str(e.value) == (
        "command line: invalid `eval.generation`: GenerationConfig.max_new_tokens must be an int >= 0 (0: no "
        "generation, the losses only), got -1. Fix the value under `eval.generation`. (overrides: "
        "eval.generation.max_new_tokens=-1)"
    )


def test_eval_generation_is_configurable_and_cli_flags_override_only_what_they_set():
    import argparse

    from nextquill_jax.eval.command import add_evaluate_arguments, generation_overrides

    cfg = load_config(REPO / "configs" / "tiny_synthetic.yaml", ["eval.generation.max_new_tokens=64"])
    assert cfg.eval.generation.max_new_tokens == 64
    assert cfg.eval.generation.repetition_penalty == 1.2 and not cfg.eval.generation.do_sample
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    assert generation_overrides(parser.parse_args(["--workdir", "w"])) == {}
    args = parser.parse_args(["--workdir", "w", "--repetition-penalty", "1.0", "--do-sample"])
    assert generation_overrides(args) == {"repetition_penalty": 1.0, "do_sample": True}
    assert generation_overrides(parser.parse_args(["--workdir", "w", "--no-do-sample"])) == {
        "do_sample": False
    }


def test_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from nextquill_jax.train import setup

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "tiny_synthetic.yaml")
    with pytest.raises(ConfigError, match="mount the bucket"):
        setup.resolve_workdir(cfg, "gs://bucket/runs/x")
    assert not any(tmp_path.iterdir())
    assert setup.resolve_workdir(cfg, "runs/x") == tmp_path / "runs" / "x"


def test_a_blank_or_missing_workdir_is_refused_naming_the_fix_and_a_home_relative_one_is_expanded(
    tmp_path, monkeypatch
):
    """--workdir of blanks would be a folder named " " in the current directory; no workdir at all is
    refused naming the key and the flag; "~/runs/x" is the user's home's, not a folder named "~"."""
    from nextquill_jax.train import setup

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(REPO / "configs" / "tiny_synthetic.yaml")
    with pytest.raises(ConfigError, match=r"^--workdir is empty .*Fix: name the run's directory"):
        setup.resolve_workdir(cfg, "  ")
    unset = load_config(REPO / "configs" / "tiny_synthetic.yaml", ["train.workdir=null"])
    with pytest.raises(ConfigError, match=r"set train\.workdir in the config or pass --workdir DIR"):
        setup.resolve_workdir(unset, None)
    assert setup.resolve_workdir(cfg, "~/runs/x") == tmp_path / "home" / "runs" / "x"


@pytest.mark.parametrize("override", ["loss.token_chunk=0", "loss.vocab_chunk=-3"])
def test_a_fused_head_tile_below_one_is_a_config_error(tmp_path, override, tiny_config, write_config):
    """It was a traceback from the loss while the first step was traced, after the workdir was written."""
    path = write_config(tiny_config(tmp_path / "data", tmp_path / "work"), tmp_path / "cfg.yaml")
    key, value = override.split("=")
    with pytest.raises(
        ConfigError, match=rf"invalid `loss`: {key.split('.')[1]} must be >= 1, got {value}\. Fix the value"
    ):
        load_config(path, [override])


def test_a_run_is_read_on_the_devices_at_hand_when_its_mesh_names_others(tmp_path, tiny_config, capsys):
    """evaluate and effects read a run trained on 8 devices (data=2, fsdp=2, tensor=2) on this 1-device
    process: parameters replicated along `data`, with a note; training itself keeps refusing such a mesh."""
    from nextquill_jax.train.workdir import reading_mesh

    raw = tiny_config(tmp_path / "data", tmp_path / "work", mesh={"data": 2, "fsdp": 2, "tensor": 2})
    cfg = load_config(None, base=raw)
    mesh = reading_mesh(cfg)
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert "note: the run's mesh (data=2, fsdp=2, tensor=2) needs other than the 1 device(s) here" in (
        capsys.readouterr().err
    )
    one = load_config(None, base=tiny_config(tmp_path / "data", tmp_path / "work"))
    assert dict(reading_mesh(one).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert capsys.readouterr().err == ""
    # Incomplete multi-host settings are an error, not read around.
    partial = tiny_config(tmp_path / "data", tmp_path / "work", mesh={"coordinator": "localhost:1234"})
    with pytest.raises(ConfigError, match=r"^mesh: multi-host settings incomplete"):
        reading_mesh(load_config(None, base=partial))


def test_libtpu_installed_where_no_tpu_pod_is_found_names_mesh_distributed_off(tmp_path):
    """`mesh.distributed: auto` takes an installed libtpu (the `tpu` extra) for a Cloud TPU VM; on another
    machine JAX finds no pod, whose error ("coordinator_address should be defined") did not say what to do.
    In a subprocess: a failed start leaves JAX's distributed state behind."""
    (tmp_path / "libtpu").mkdir()
    (tmp_path / "libtpu" / "__init__.py").write_text("")
    script = (
        "from nextquill_jax.parallel import initialize_distributed\n"
        "try:\n    initialize_distributed(mode='auto')\nexcept ValueError as e:\n    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "JAX_PLATFORMS": "cpu"}
    for name in ("NEXTQUILL_COORDINATOR", "NEXTQUILL_NUM_PROCESSES", "NEXTQUILL_PROCESS_ID"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.startswith(
        "mesh.distributed is auto and libtpu is installed, so this was taken for a Cloud TPU VM, but JAX "
        "found no TPU pod to join ("
    ), message
    assert message.endswith(
        "Fix: set mesh.distributed=off to run one process here, or set mesh.coordinator / num_processes / "
        "process_id for a multi-process run."
    ), message


def test_the_optim_docs_example_path_is_a_parameter_path(cfg_file):
    # The docs said `layers/attn/q_proj/kernel`; the parameters are plain arrays, so paths end at the module.
    from nextquill_jax.config import OptimConfig
    from nextquill_jax.train.optimizer import param_paths

    example = re.search(r"parameter paths \(e\.g\. `([^`]+)`\)", " ".join(OptimConfig.__doc__.split())).group(
        1
    )
    params = model_setup.abstract_model(load_config(cfg_file).model.model_config())[1]
    assert example in jax.tree.leaves(param_paths(params)), example


def _sections_with_choices() -> list[tuple[object, str]]:
    """(section, field) for every field typed by a `Literal` (alone or with None) of every
    config dataclass instance reachable from the tiny config, plus a LoRA section, a preset's model config,
    RoPE scaling, a compare file's `compare` section and a scaling sweep (absent from a training config)."""
    from nextquill_jax.eval.compare_file import CompareConfig

    roots = [
        load_config(REPO / "configs" / "tiny_synthetic.yaml"),
        LoraConfig(),
        model_preset("qwen2.5-0.5b"),
        RopeScaling(
            type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        CompareConfig(out="out", baseline="a"),
        load_scaling_config(REPO / "configs/scaling/tiny_cpu.yaml"),
    ]
    found, seen = [], set()
    while roots:
        section = roots.pop()
        if id(section) in seen:
            continue
        seen.add(id(section))
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                roots.append(value)
            tp = hints[f.name]
            union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            options = typing.get_args(tp) if union else (tp,)  # a union's members, else the hint alone
            literals = [o for o in options if typing.get_origin(o) is typing.Literal]
            if literals and all(typing.get_origin(o) is typing.Literal or o is type(None) for o in options):
                found.append((section, f.name))
    return found


def test_a_section_built_in_python_refuses_a_value_outside_its_choices_as_its_yaml_does():
    """`dataclasses.replace(cfg.optim, schedule="cosin")` (or a section built in Python) is refused naming the
    field, not run with the constant schedule the misspelling fell through to; so is every other field typed
    by a set of choices. A YAML file was always checked at load."""
    found = _sections_with_choices()
    names = {f"{type(s).__name__}.{name}" for s, name in found}
    assert {"OptimConfig.schedule", "TrainConfig.nonfinite", "ScalingConfig.loss_variant"} <= names
    assert len(names) >= 20, sorted(names)
    for section, name in found:
        with pytest.raises(ValueError, match=re.escape(repr("cosin"))) as refused:
            dataclasses.replace(section, **{name: "cosin"})
        assert name in str(refused.value), (type(section).__name__, str(refused.value))
