"""Every config key is documented in its section's docstring, and configs/REFERENCE.md is what those
docstrings generate (so it cannot fall behind the code)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from nextquill_jax.config import Config, ModelRunConfig
from nextquill_jax.config_reference import (
    MAPPINGS,
    REGENERATE,
    anchor,
    cell,
    key_docs,
    main,
    render,
    tables,
    yaml_type,
)
from nextquill_jax.config_schema import key_paths
from nextquill_jax.models.config import ModelConfig, RopeScaling
from nextquill_jax.models.presets import model_preset

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "REFERENCE.md"
TREE = [("", Config), *((t.path, t.cls) for t in tables())]


@pytest.mark.parametrize(("path", "cls"), TREE, ids=[p or "Config" for p, _ in TREE])
def test_every_key_is_named_in_backticks_in_its_docstring_and_has_an_entry(path, cls):
    names = [f.name for f in dataclasses.fields(cls)]
    docstrings = "".join(inspect.getdoc(k) or "" for k in cls.__mro__ if dataclasses.is_dataclass(k))
    assert [n for n in names if f"`{n}`" not in docstrings] == [], f"{cls.__name__}: undocumented keys"
    docs = key_docs(cls)
    assert [n for n in names if n not in docs] == [], (
        f"{cls.__name__}: keys without a `Fields:` entry (`key`: text); add one to its docstring"
    )
    assert [k for k in docs if k not in names] == [], f"{cls.__name__}: entries naming no key; remove them"
    assert all(docs[n].strip() for n in names)


def test_the_tables_cover_every_key_the_schema_knows_and_the_overrides():
    """`tables` against `config_schema.key_paths`, an independent walk of the same tree, plus the keys of
    `model.overrides` (its nested `rope_scaling` walked by `key_paths` too)."""
    overrides = [f"model.overrides.{k}" for k in MAPPINGS["model.overrides"][1]]
    expected = {*key_paths(Config), *overrides, *key_paths(RopeScaling, "model.overrides.rope_scaling")}
    documented = {*key_docs(Config)} | {f"{t.path}.{k}" for t in tables() for k in t.keys}
    assert documented == expected


def _yaml_value(value: Any) -> Any:
    """A `ModelConfig` field's value as a config file writes it: a tuple as a list, a dataclass as a
    mapping."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "llama3.2-1b"])
def test_the_overrides_table_lists_exactly_the_fields_model_overrides_accepts(preset):
    """Each `ModelConfig` field, set in `model.overrides` to the preset's own value (so only the key can be
    refused), is accepted exactly when the table lists it, for a preset and a `path` model alike."""
    rows = _rows()
    model = model_preset(preset)
    for f in dataclasses.fields(ModelConfig):
        listed = f"model.overrides.{f.name}" in rows
        value = _yaml_value(getattr(model, f.name))
        for source in ({"preset": preset}, {"path": "some/dir"}):
            if listed:
                section = ModelRunConfig(**source, overrides={f.name: value})
                assert section.architecture_overrides() == {f.name: getattr(model, f.name)}
            else:
                with pytest.raises(ValueError, match=rf"`model.overrides.{f.name}` .*`model.{f.name}`"):
                    ModelRunConfig(**source, overrides={f.name: value})
    assert rows["model.overrides.eos_token_ids"][0] == "list of ints"
    assert "default" not in rows["model.overrides.family"]  # a mapping's table has no default column


def test_each_architecture_entry_names_config_json_keys_that_an_export_writes():
    """Every `config.json `KEY`` an entry cites is a key `to_hf_config` writes (for `RopeScaling`, a key of
    its `rope_scaling` object), and every architecture field cites at least one."""
    llama = model_preset("llama3.2-1b").to_hf_config()  # has attention_bias and rope scaling
    written = {ModelConfig: set(llama), RopeScaling: set(llama["rope_scaling"])}
    for cls, keys in written.items():
        for name, entry in key_docs(cls).items():
            cited = re.findall(r"config\.json `(\w+)`", entry)
            if name in MAPPINGS["model.overrides"][1] or cls is RopeScaling:
                assert cited, f"{cls.__name__}.{name}: its entry names no config.json key"
            assert set(cited) <= keys, (cls.__name__, name, set(cited) - keys)


def test_a_missing_a_stale_or_a_malformed_entry_is_seen():
    @dataclass
    class Base:
        """A base.

        Fields:
            `a`: the first key,
                continued.
            `gone`: a key that no longer exists.
        """

        a: int = 1

    @dataclass
    class Child(Base):
        """A child; `c` is named here but has no entry.

        Fields:
            `a`: the child's own words.
            `b`: the second key.

        Raises:
            ValueError: never.
        """

        b: int = 2
        c: int = 3

    assert key_docs(Base) == {"a": "the first key, continued.", "gone": "a key that no longer exists."}
    assert key_docs(Child) == {
        "a": "the child's own words.",
        "gone": "a key that no longer exists.",
        "b": ("the second key."),
    }
    check = test_every_key_is_named_in_backticks_in_its_docstring_and_has_an_entry
    with pytest.raises(AssertionError, match="without a `Fields:` entry"):
        check("x", Child)
    with pytest.raises(AssertionError, match="entries naming no key"):
        check("x", Base)

    @dataclass
    class Bare:
        """No key named."""

        x: int = 0

    with pytest.raises(AssertionError, match="Bare: undocumented keys"):
        check("x", Bare)

    @dataclass
    class Malformed:
        """A key without backticks.

        Fields:
            a: the key.
        """

        a: int = 1

    with pytest.raises(ValueError, match=r"Malformed docstring.*'a: the key\.'"):
        key_docs(Malformed)


def test_the_committed_reference_is_the_generated_one():
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        f"configs/REFERENCE.md is out of date with the config docstrings. Regenerate it: {REGENERATE}"
    )


def test_main_writes_the_reference(tmp_path):
    assert main([str(tmp_path / "ref.md")]) == 0
    assert (tmp_path / "ref.md").read_text(encoding="utf-8") == render()


def _rows() -> dict[str, list[str]]:
    """Key -> its row's cells (type, default, meaning; a mapping's: type, meaning), read back from the
    rendered Markdown."""
    rows = {}
    for line in render().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").replace("\\|", "\0").split("|")]
            rows[cells[0].strip("`")] = [c.replace("\0", "|") for c in cells[1:]]
    return rows


def test_every_key_has_one_row_whose_default_reads_back_as_the_default():
    rows = {k: v for k, v in _rows().items() if not k.startswith("model.overrides.")}
    assert sorted(rows) == sorted(k for k in key_paths(Config) if "." in k)
    for t in tables():
        if t.path.startswith("model.overrides"):
            continue
        hints = typing.get_type_hints(t.cls)
        for f in dataclasses.fields(t.cls):
            kind, default, meaning = rows[f"{t.path}.{f.name}"]
            assert meaning, f"{t.path}.{f.name}"
            if kind.startswith("section"):
                continue
            value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            expected = list(value) if isinstance(value, tuple) else value
            assert yaml.safe_load(default.strip("`")) == expected, (t.path, f.name, default)
            assert kind.partition(" ([")[0] == yaml_type(hints[f.name])
    assert rows["logging.profile_steps"][:2] == ["list of ints or null", "`null`"]
    assert rows["model.lora.targets"][1] == "`[attn/(q|v)_proj]`"
    assert rows["model.overrides"][0] == "mapping ([model.overrides](#modeloverrides))"


@pytest.mark.parametrize(
    ("hint", "written"),
    [
        (int, "int"),
        (str | None, "string or null"),
        (int | Literal["auto"] | None, "int, `auto` or null"),
        (Literal["stop", "skip"], "`stop` or `skip`"),
        (list[str], "list of strings"),
        (tuple[int, ...], "list of ints"),
        (dict[str, Any], "mapping"),
    ],
)
def test_types_are_written_as_yaml_spells_them(hint, written):
    assert yaml_type(hint) == written


def test_cells_escape_pipes_and_html_but_not_code():
    assert cell("a|b `x|y` <w> `<z>`") == "a\\|b `x\\|y` &lt;w> `<z>`"
    assert anchor("data.batching") == "#databatching"
    assert anchor("eval.generation") == "#evalgeneration"
