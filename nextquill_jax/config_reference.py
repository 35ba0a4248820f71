"""`configs/REFERENCE.md`, generated: every key of the YAML files the commands read (a training config, a
compare file, a scaling sweep), with its type, default and meaning.

The meanings are the dataclasses' own docstrings. Each documents its keys in a `Fields:` block, one entry per
key, continuation lines indented further:

    Fields:
        `key`: what it does, in which units, which values it takes.
            More of the same entry.

A class inherits its bases' entries (`LossRunConfig` those of `LossConfig`). A free-form mapping key whose
keys are fields of another dataclass (`model.overrides`: `ModelConfig`'s architecture fields) has a table
of its own, listed in `MAPPINGS`; a key that takes what another table documents links to it (a `Part`'s
`links`). After changing a documented class, regenerate the file with
`python -m nextquill_jax.config_reference configs/REFERENCE.md`.

It documents the schemas of `eval` (compare files) and `bench` (sweeps), so it sits above both layers.
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

from nextquill_jax.bench.sweep import ScalingConfig
from nextquill_jax.config import Config
from nextquill_jax.config_schema import dataclass_of
from nextquill_jax.eval.compare_file import Comparison
from nextquill_jax.models.config import ARCHITECTURE_FIELDS, ModelConfig

REGENERATE = "python -m nextquill_jax.config_reference configs/REFERENCE.md"
FIELDS_HEADER = "Fields:"
_ENTRY = re.compile(r"`(\w+)`: (.+)")
# Mapping keys (typed `dict` in their section) that take fields of a dataclass: key -> (the dataclass, the
# fields it takes). Their values are set on top of another source's (a preset, a config.json), so their
# tables have no defaults.
MAPPINGS: dict[str, tuple[type, tuple[str, ...]]] = {"model.overrides": (ModelConfig, ARCHITECTURE_FIELDS)}


@dataclasses.dataclass(frozen=True)
class Part:
    """One kind of YAML file: its heading `title`, `intro` (Markdown), the dataclass `root` its top level is
    built as, the root's fields that are keys of the file (`keys`; None: all), whether those keys get a
    table (`root_table`; a file of sections lists its sections instead), and `links`: key -> the heading of
    the table or part that documents what the key takes."""

    title: str
    intro: str
    root: type
    keys: tuple[str, ...] | None = None
    root_table: bool = True
    links: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Table:
    """One table of the reference: the keys `path.NAME` for NAME in `keys`, fields of `cls`; `path` is ""
    for a part's top level, `a.NAME` for the sections of a mapping `a` (any name), `a[]` for the items of
    a list `a`. `parent`: the class whose field `field` takes what the table documents (None at the top
    level); `mapping`: the table of a `MAPPINGS` key (no default column)."""

    path: str
    cls: type
    keys: tuple[str, ...]
    mapping: bool = False
    parent: type | None = None
    field: str = ""


TRAINING = Part(
    "Training config",
    "A `nextquill-jax train --config FILE` config; a run's workdir keeps it as `config.yaml`, which "
    "`evaluate` and `effects` read. A key can also be set on the command line as `a.b.c=VALUE` (the value "
    "read as YAML, but a key that takes text gets the text as typed: `data.template=no` is the template "
    "`no`; `a.b.c=` with no value is refused, write `null` for null).",
    Config,
    root_table=False,
)
PARTS = (
    TRAINING,
    Part(
        "Compare file",
        "A `nextquill-jax compare --config FILE` file (`nextquill_jax/eval/compare_file.py`; examples in "
        "`configs/study/`).",
        Comparison,
        keys=("compare", "variants", "base"),
        links={"base": TRAINING.title},
    ),
    Part(
        "Scaling sweep",
        "A `nextquill-jax bench scale --config FILE` sweep (`nextquill_jax/bench/sweep.py`; examples in "
        "`configs/scaling/`).",
        ScalingConfig,
        links={"models[].overrides": "model.overrides"},
    ),
)


def tables(part: Part = TRAINING) -> list[Table]:
    """The tables of `part`, depth first in field order: its top level's (unless `root_table` is false),
    then a section's table followed by those of its sections and `MAPPINGS` keys, e.g. model,
    model.overrides, model.overrides.rope_scaling, model.lora, data, ..."""
    keys = part.keys or _fields(part.root)
    found = _tables(part.root, "", keys)
    return found if part.root_table else found[1:]


def _tables(
    cls: type, where: str, keys: tuple[str, ...], mapping: bool = False, parent: type | None = None
) -> list[Table]:
    found = [Table(where, cls, keys, mapping, parent, _field_of(where))]
    hints = typing.get_type_hints(cls)
    for name in keys:
        path = f"{where}.{name}" if where else name
        nested = _nested(hints[name])
        if nested is not None:
            section, suffix = nested
            found += _tables(section, path + suffix, _fields(section), parent=cls)
        elif path in MAPPINGS:
            found += _tables(MAPPINGS[path][0], path, MAPPINGS[path][1], mapping=True, parent=cls)
    return found


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _field_of(path: str) -> str:
    """The field a table's `path` documents: `b` for `a.b`, `a.b.NAME` and `a.b[]`."""
    return path.removesuffix(".NAME").removesuffix("[]").rpartition(".")[2]


def _nested(tp: Any) -> tuple[type, str] | None:
    """The dataclass a field of type `tp` holds and how a table of it is named after the field's path: ""
    for a section (optional or not), ".NAME" for a mapping of names to sections, "[]" for a list of them;
    None for anything else."""
    section = dataclass_of(tp)
    if section is not None:
        return section, ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1], ".NAME"
    if origin is list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    return None


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
    """The YAML spellings of `tp`'s options (see `yaml_type`).

    Raises:
        TypeError: a type the config schema does not convert either (`config_schema.convert`), such as a
            `Path` or a bare `list`: a new config field must use a type both know.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return [o for a in args for o in _options(a)]
    if origin is Literal:
        return [f"`{a}`" for a in args]
    if origin in (list, tuple) and args:
        return [f"list of {yaml_type(args[0])}s"]
    if origin is dict:
        return ["mapping"]
    if dataclasses.is_dataclass(tp):
        return ["section"]
    names = {int: "int", float: "float", bool: "bool", str: "string", type(None): "null"}
    if tp not in names:
        raise TypeError(
            f"config reference: no YAML spelling for the field type {tp!r}; a config field is an int, "
            "float, bool or str, a Literal, a list, tuple or dict with its item types, a section, or a union "
            "of those"
        )
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
    parts = ", ".join(f"[{p.title}]({anchor(p.title)})" for p in PARTS)
    lines = [
        "# Config reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from the docstrings of the config dataclasses; edit those, "
        "not this file (tests/test_config_reference.py checks that it is current). -->",
        "",
        f"Every key of the YAML files the commands read: {parts}. A key `a.b.c` is written in the YAML file "
        "as `c` under `b` under `a`; `a.NAME.c` as `c` under a name of your choosing under `a`; `a[].c` as "
        "`c` in each item of the list `a`. Types are YAML's (`null` is YAML's null); a float is a finite "
        "number (NaN and infinity, `.nan` and `.inf`, are refused); a word in backticks is a literal value. "
        "The demo's files (`configs/demo.yaml`, `configs/demo_quick.yaml`, read by "
        "`nextquill-jax demo --config FILE`) are not listed: they hold a `demo` section (`DemoPlan` in "
        "`nextquill_jax/demo/run.py`, whose docstring names each key) and two training configs, `pretrain` "
        "and `finetune`.",
    ]
    for part in PARTS:
        lines += ["", *_part(part)]
    return "\n".join(lines) + "\n"


def _part(part: Part) -> list[str]:
    """A part's heading, introduction and tables; without a top-level table, a list of its sections."""
    found = tables(part)
    lines = [f"## {part.title}", "", markdown(part.intro)]
    if not part.root_table:
        lines += ["", "Sections:", ""]
        for t in found:
            meaning = cell(key_docs(t.parent)[t.field])
            lines.append(f"- [{t.path}]({anchor(t.path)}) (`{t.cls.__name__}`): {meaning}")
    for t in found:
        lines += ["", f"### {t.path}", ""] if t.path else [""]
        lines += _table(t, found, part.links)
    return lines


def _table(t: Table, found: list[Table], links: dict[str, str]) -> list[str]:
    """The introduction and the rows of one table; a key with a table of its own, or one in `links`, links
    to it."""
    intro = markdown(summary(t.cls))
    if t.mapping:
        intro = f"`{t.path}`: {markdown(key_docs(t.parent)[t.field])}\n\n{intro}"
    header = ["key", "type", "meaning"] if t.mapping else ["key", "type", "default", "meaning"]
    lines = [intro, "", f"| {' | '.join(header)} |", "|" + " --- |" * len(header)]
    hints, entries = typing.get_type_hints(t.cls), key_docs(t.cls)
    fields = {f.name: f for f in dataclasses.fields(t.cls)}
    targets = {u.path.removesuffix(".NAME").removesuffix("[]"): u.path for u in found if u.path}
    for name in t.keys:
        path = f"{t.path}.{name}" if t.path else name
        kind = yaml_type(hints[name])
        target = targets.get(path, links.get(path))
        if target is not None:
            kind += f" ([{target}]({anchor(target)}))"
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
