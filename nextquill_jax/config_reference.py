"""`configs/REFERENCE.md`, generated: every key of a training config with its type, default and meaning.

The meanings are the section dataclasses' own docstrings. Each documents its keys in a `Fields:` block, one
entry per key, continuation lines indented further:

    Fields:
        `key`: what it does, in which units, which values it takes.
            More of the same entry.

A class inherits its bases' entries (`LossRunConfig` those of `LossConfig`). A free-form mapping key whose
keys are fields of another dataclass (`model.overrides`: `ModelConfig`'s architecture fields) has a table
of its own, listed in `MAPPINGS`. After changing a section, regenerate the file with
`python -m nextquill_jax.config_reference configs/REFERENCE.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from nextquill_jax.config import Config
from nextquill_jax.config_schema import dataclass_of
from nextquill_jax.models.config import ARCHITECTURE_FIELDS, ModelConfig

REGENERATE = "python -m nextquill_jax.config_reference configs/REFERENCE.md"
FIELDS_HEADER = "Fields:"
_ENTRY = re.compile(r"`(\w+)`: (.+)")
# Mapping keys (typed `dict` in their section) that take fields of a dataclass: key -> (the dataclass, the
# fields it takes). Their values are set on top of another source's (a preset, a config.json), so their
# tables have no defaults.
MAPPINGS: dict[str, tuple[type, tuple[str, ...]]] = {"model.overrides": (ModelConfig, ARCHITECTURE_FIELDS)}


@dataclasses.dataclass(frozen=True)
class Table:
    """One table of the reference: the keys `path.NAME` for NAME in `keys`, fields of `cls`; `mapping`: the
    table of a `MAPPINGS` key (no default column)."""

    path: str
    cls: type
    keys: tuple[str, ...]
    mapping: bool = False


def tables(cls: type = Config, where: str = "", mapping: bool = False) -> list[Table]:
    """The tables of the reference below `cls` (`where` its dotted path, "" for `Config`, which has none),
    depth first in field order: a section's table is followed by those of its sections and `MAPPINGS` keys,
    e.g. model, model.overrides, model.overrides.rope_scaling, model.lora, data, ..."""
    keys = MAPPINGS[where][1] if mapping else tuple(f.name for f in dataclasses.fields(cls))
    found = [Table(where, cls, keys, mapping)] if where else []
    hints = typing.get_type_hints(cls)
    for name in keys:
        path = f"{where}.{name}" if where else name
        section = dataclass_of(hints[name])
        if section is not None:
            found += tables(section, path)
        elif path in MAPPINGS:
            found += tables(MAPPINGS[path][0], path, mapping=True)
    return found


def key_docs(cls: type) -> dict[str, str]:
    """Key -> its entry in the `Fields:` block of `cls`'s docstring or a base class's (the class's own entry
    wins), the entry's lines joined with single spaces.

    Raises:
        ValueError: a line of a `Fields:` block that neither starts an entry (`` `key`: text``, indented one
            level) nor continues one (indented deeper), naming the class and the line.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and "__doc__" in vars(klass):
            docs.update(_parse_fields(klass))
    return docs


def _parse_fields(cls: type) -> dict[str, str]:
    """The entries of `cls`'s own `Fields:` block (the block ends at the next unindented line)."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if FIELDS_HEADER not in lines:
        return {}
    entries: dict[str, list[str]] = {}
    key = None
    for line in lines[lines.index(FIELDS_HEADER) + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break
        match = _ENTRY.fullmatch(line.strip())
        if indent == 4 and match:
            key = match[1]
            entries[key] = [match[2]]
        elif indent > 4 and key is not None:
            entries[key].append(line.strip())
        else:
            raise ValueError(
                f"{cls.__qualname__} docstring, `Fields:` block: {line.strip()!r} is neither an entry "
                f"(`key`: text, indented 4 spaces) nor its continuation (indented deeper). Fix the docstring."
            )
    return {k: " ".join(v) for k, v in entries.items()}


def summary(cls: type) -> str:
    """The docstring of `cls` before its `Fields:` block: paragraphs separated by blank lines, each one's
    lines joined into one."""
    text = inspect.cleandoc(cls.__doc__ or "").partition(f"\n{FIELDS_HEADER}\n")[0]
    return "\n\n".join(" ".join(p.split("\n")) for p in text.strip().split("\n\n"))


def yaml_type(tp: Any) -> str:
    """A type hint as a config file writes it: `int`, `float`, `bool`, `string`, `null`, a literal value in
    backticks, `list of Ts` (lists hold plain scalars here), `mapping`, `section`; a union's options joined
    ("int, `auto` or null")."""
    options = _options(tp)
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def _options(tp: Any) -> list[str]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return [o for a in args for o in _options(a)]
    if origin is Literal:
        return [f"`{a}`" for a in args]
    if origin in (list, tuple):
        return [f"list of {yaml_type(args[0])}s"]
    if origin is dict:
        return ["mapping"]
    if dataclasses.is_dataclass(tp):
        return ["section"]
    names = {int: "int", float: "float", bool: "bool", str: "string", type(None): "null"}
    return [names[tp]]


def yaml_default(f: dataclasses.Field) -> str:
    """The field's default as YAML in backticks (`null`, `true`, `5.0e-06`, `[norm, bias]`); `required` when
    it has none, `its keys' defaults` for a section."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "its keys' defaults"
    # A lone scalar is dumped as a document with an end marker, `...`.
    text = yaml.safe_dump(value, default_flow_style=True, width=sys.maxsize).removesuffix("...\n").strip()
    return f"`{text}`"


def anchor(path: str) -> str:
    """The link target GitHub gives the heading `path` (lower case, punctuation other than `-` dropped)."""
    return "#" + re.sub(r"[^\w\- ]", "", path.lower()).replace(" ", "-")


def markdown(text: str) -> str:
    """`text` with `<` outside code spans written as `&lt;`, so that `<workdir>` is not read as HTML."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def cell(text: str) -> str:
    """`text` safe in a Markdown table cell: as `markdown`, and `|` escaped (in code spans too, as GitHub's
    tables require)."""
    return markdown(text).replace("|", "\\|")


def render() -> str:
    """The whole of `configs/REFERENCE.md`."""
    all_tables = tables()
    cls_of = {"": Config} | {t.path: t.cls for t in all_tables}
    lines = [
        "# Config reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from the docstrings of the section dataclasses; edit those, "
        "not this file (tests/test_config_reference.py checks that it is current). -->",
        "",
        "Every key of a `nextquill-jax train` config. A key `a.b.c` is written in the YAML file as `c` under "
        "`b` under section `a`, or on the command line as `a.b.c=VALUE` (the value read as YAML). Types are "
        "YAML's (`null` is YAML's null); a word in backticks is a literal value.",
        "",
        "Sections:",
        "",
    ]
    for t in all_tables:
        parent, _, name = t.path.rpartition(".")
        lines.append(
            f"- [{t.path}]({anchor(t.path)}) (`{t.cls.__name__}`): {cell(key_docs(cls_of[parent])[name])}"
        )
    for t in all_tables:
        lines += ["", f"## {t.path}", "", *_table(t, cls_of)]
    return "\n".join(lines) + "\n"


def _table(t: Table, cls_of: dict[str, type]) -> list[str]:
    """The introduction and the rows of one table; a key with a table of its own links to it."""
    intro = markdown(summary(t.cls))
    if t.mapping:
        parent, _, name = t.path.rpartition(".")
        intro = f"`{t.path}`: {markdown(key_docs(cls_of[parent])[name])}\n\n{intro}"
    header = ["key", "type", "meaning"] if t.mapping else ["key", "type", "default", "meaning"]
    lines = [intro, "", f"| {' | '.join(header)} |", "|" + " --- |" * len(header)]
    hints, entries = typing.get_type_hints(t.cls), key_docs(t.cls)
    fields = {f.name: f for f in dataclasses.fields(t.cls)}
    for name in t.keys:
        path = f"{t.path}.{name}"
        kind = yaml_type(hints[name])
        if path in cls_of:
            kind += f" ([{path}]({anchor(path)}))"
        default = [] if t.mapping else [yaml_default(fields[name])]
        row = [f"`{path}`", kind, *default, entries.get(name, "")]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Write the reference to the path given, or to stdout (UTF-8) without one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", help="the file to write (configs/REFERENCE.md); default: stdout")
    args = parser.parse_args(argv)
    text = render()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.buffer.write(text.encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
