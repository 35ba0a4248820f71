"""Every config key is documented in its section's docstring, and configs/REFERENCE.md is what those
docstrings generate (so it cannot fall behind the code)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from nextquill_jax.config import Config
from nextquill_jax.config_reference import (
    REGENERATE,
    anchor,
    cell,
    key_docs,
    main,
    render,
    sections,
    yaml_type,
)
from nextquill_jax.config_schema import key_paths

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "REFERENCE.md"
TREE = [("", Config), *sections()]


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


def test_the_section_walk_covers_every_key_the_schema_knows():
    """`sections` against `config_schema.key_paths`, an independent walk of the same tree."""
    documented = {k for k in key_docs(Config)} | {f"{p}.{k}" for p, cls in sections() for k in key_docs(cls)}
    assert documented == set(key_paths(Config))


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
    """Key -> its row's cells (type, default, meaning), read back from the rendered Markdown."""
    rows = {}
    for line in render().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").replace("\\|", "\0").split("|")]
            rows[cells[0].strip("`")] = [c.replace("\0", "|") for c in cells[1:]]
    return rows


def test_every_key_has_one_row_whose_default_reads_back_as_the_default():
    rows = _rows()
    assert sorted(rows) == sorted(k for k in key_paths(Config) if "." in k)
    for path, cls in sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, default, meaning = rows[f"{path}.{f.name}"]
            assert meaning, f"{path}.{f.name}"
            if kind.startswith("section"):
                continue
            value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            expected = list(value) if isinstance(value, tuple) else value
            assert yaml.safe_load(default.strip("`")) == expected, (path, f.name, default)
            assert kind == yaml_type(hints[f.name])
    assert rows["logging.profile_steps"][:2] == ["list of ints or null", "`null`"]
    assert rows["model.lora.targets"][1] == "`[attn/(q|v)_proj]`"


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
