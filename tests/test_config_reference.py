"""Every key of a training config, a compare file and a scaling sweep is documented in its dataclass's
docstring, and configs/REFERENCE.md is what those docstrings generate (so it cannot fall behind the code)."""

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

from nextquill_jax.bench.sweep import ScalingConfig, SweepModel
from nextquill_jax.config import Config, ModelRunConfig
from nextquill_jax.config_reference import (
    MAPPINGS,
    PARTS,
    REGENERATE,
    anchor,
    cell,
    key_docs,
    main,
    render,
    tables,
    yaml_type,
)
from nextquill_jax.config_schema import ConfigError, key_paths
from nextquill_jax.eval.compare_file import CompareConfig, VariantConfig, load_comparison
from nextquill_jax.models.config import ModelConfig, RopeScaling
from nextquill_jax.models.presets import model_preset

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "configs" / "REFERENCE.md"
TRAINING, COMPARE, SWEEP = PARTS
TREE = [
    *((p.title, p.root) for p in PARTS),
    *((f"{p.title}: {t.path}", t.cls) for p in PARTS for t in tables(p) if t.path),
]
# Each part's keys as `config_schema.key_paths` walks them (it does not enter mappings or lists of sections,
# so those are walked by hand here), plus the keys of `model.overrides`.
OVERRIDES = {
    *(f"model.overrides.{k}" for k in MAPPINGS["model.overrides"][1]),
    *key_paths(RopeScaling, "model.overrides.rope_scaling"),
}
EXPECTED = {
    TRAINING.title: {*key_paths(Config), *OVERRIDES},
    COMPARE.title: {
        "compare",
        "variants",
        "base",
        *key_paths(CompareConfig, "compare"),
        *key_paths(VariantConfig, "variants.NAME"),
    },
    SWEEP.title: {*key_paths(ScalingConfig), *key_paths(SweepModel, "models[]")},
}


@pytest.mark.parametrize(("path", "cls"), TREE, ids=[p for p, _ in TREE])
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


@pytest.mark.parametrize("part", PARTS, ids=[p.title for p in PARTS])
def test_the_tables_cover_every_key_the_schema_knows_and_the_overrides(part):
    """`tables` against `config_schema.key_paths`, an independent walk of the same classes (`EXPECTED`)."""
    top = set(key_docs(part.root)) if not part.root_table else set()  # a file of sections: its sections
    documented = top | {f"{t.path}.{k}" if t.path else k for t in tables(part) for k in t.keys}
    assert documented == EXPECTED[part.title]


def test_the_compare_files_top_level_is_what_load_comparison_demands(tmp_path):
    (tmp_path / "c.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=r"exactly the sections ([\w, ]+); found") as e:
        load_comparison(tmp_path / "c.yaml")
    assert e.value.args[0].split("exactly the sections ")[1].split(";")[0].split(", ") == list(COMPARE.keys)
    assert tables(COMPARE)[0].keys == COMPARE.keys


def test_the_shipped_sweeps_and_compare_files_use_only_documented_keys():
    """Every key written in configs/scaling/ and configs/study/ has a row (a mapping's names as NAME)."""

    def written(value: Any, where: str) -> set[str]:
        if isinstance(value, list):
            return {k for item in value if isinstance(item, dict) for k in written(item, f"{where}[]")}
        if not isinstance(value, dict) or where in ("base", "mesh[]") or where.endswith(".overrides"):
            return set()
        keys = set()
        for key, item in value.items():
            path = f"{where}.{key}" if where else key
            path = "variants.NAME" if where == "variants" else path
            keys |= {path} | written(item, path)
        return keys - {"variants.NAME"}

    rows = _rows()
    for folder in ("scaling", "study"):
        files = sorted((REPO / "configs" / folder).glob("*.yaml"))
        assert files, folder
        for file in files:
            keys = written(yaml.safe_load(file.read_text()), "")
            assert keys and keys <= set(rows), (file.name, keys - set(rows))


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
        # A sweep model's overrides link to this table: the same fields are taken and refused.
        sweep = {"output_dir": "o", "seq_len": [8], "history": [0]}
        one = SweepModel("m", preset, {f.name: value})
        if listed:
            assert getattr(ScalingConfig(**sweep, models=[one]).model_config(one), f.name) == getattr(
                model, f.name
            )
        else:
            with pytest.raises(
                ValueError, match=rf"^`models\[0\]\.overrides\.{f.name}` .*\(`{f.name}` is a key of its own\)"
            ):
                ScalingConfig(**sweep, models=[one])
    assert rows["model.overrides.eos_token_ids"][0] == "list of ints"
    assert "default" not in rows["model.overrides.family"]  # a mapping's table has no default column
    assert rows["models[].overrides"][0] == "mapping ([model.overrides](#modeloverrides))"


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


def _rows(part: str | None = None) -> dict[str, list[str]]:
    """Key -> its row's cells (type, default, meaning; a mapping's: type, meaning), read back from the
    rendered Markdown: of the part titled `part`, or of all."""
    rows, title = {}, None
    for line in render().splitlines():
        if line.startswith("## "):
            title = line.removeprefix("## ")
        elif line.startswith("| `") and part in (None, title):
            cells = [c.strip() for c in line.strip("|").replace("\\|", "\0").split("|")]
            assert cells[0].strip("`") not in rows, f"two rows for {cells[0]}"
            rows[cells[0].strip("`")] = [c.replace("\0", "|") for c in cells[1:]]
    return rows


@pytest.mark.parametrize("part", PARTS, ids=[p.title for p in PARTS])
def test_every_key_has_one_row_whose_default_reads_back_as_the_default(part):
    rows = {k: v for k, v in _rows(part.title).items() if not k.startswith("model.overrides.")}
    expected = {k for k in EXPECTED[part.title] - OVERRIDES if "." in k or part.root_table}
    assert sorted(rows) == sorted(expected)
    for t in tables(part):
        if t.path.startswith("model.overrides"):  # no defaults: its values replace a preset's
            continue
        hints = typing.get_type_hints(t.cls)
        fields = {f.name: f for f in dataclasses.fields(t.cls)}
        for name in t.keys:
            f = fields[name]
            kind, default, meaning = rows[f"{t.path}.{name}" if t.path else name]
            assert meaning, f"{t.path}.{name}"
            if kind.startswith("section"):
                continue
            if default == "required":
                assert f.default is f.default_factory is dataclasses.MISSING, (t.path, name)
                continue
            value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            expected_value = list(value) if isinstance(value, tuple) else value
            assert yaml.safe_load(default.strip("`")) == expected_value, (t.path, name, default)
            assert kind.partition(" ([")[0] == yaml_type(hints[name])


def test_some_rows_read_as_written():
    rows = _rows()
    assert rows["logging.profile_steps"][:2] == ["list of ints or null", "`null`"]
    assert rows["model.lora.targets"][1] == "`[attn/(q|v)_proj]`"
    assert rows["model.overrides"][0] == "mapping ([model.overrides](#modeloverrides))"
    assert rows["variants"][:2] == ["mapping ([variants.NAME](#variantsname))", "required"]
    assert rows["base"][0] == "mapping ([Training config](#training-config))"
    assert rows["models"][0] == "list of sections ([models[]](#models))"
    assert rows["mesh"][:2] == ["list of mappings", "`[{data: 1, fsdp: -1, tensor: 1}]`"]
    assert rows["compare.split"][:2] == ["`train`, `val` or `test`", "`test`"]


def test_every_heading_has_its_own_anchor_and_every_link_reaches_one():
    text = render()
    headings = [anchor(line.lstrip("#").strip()) for line in text.splitlines() if line.startswith("#")]
    assert len(headings) == len(set(headings)), headings
    links = set(re.findall(r"\]\((#[^)]*)\)", text))
    assert links and links <= set(headings), links - set(headings)


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


@pytest.mark.parametrize("tp", [Path, list, list[Path]])
def test_a_field_type_without_a_yaml_spelling_is_a_named_error(tp):
    with pytest.raises(TypeError, match=r"config reference: no YAML spelling for the field type .*a Literal"):
        yaml_type(tp)
