"""Typed YAML: dataclasses built from nested mappings, with `a.b=value` overrides and nearest-key hints.

Generic: it knows dataclasses and type hints, nothing of this project's config. Values are converted to their
field's type (an int where a float is expected is fine; YAML's `5e-6`, which PyYAML reads as a string, is read
as a float); anything else is a `ConfigError` with one paragraph naming the key, what it expected and the fix.
A float is finite: NaN and infinity (`.nan`, `.inf`, `nan`, `inf`) are refused, since no key gives them a
meaning (a "no limit" is written as null). Unknown keys are errors that suggest the nearest valid key.
`with_line` adds the line of the file that holds the key an error names.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key, the source and the fix."""


class _DuplicateKeyError(Exception):
    """A key written twice in one YAML mapping (lines 1-based)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(key, line, first_line)
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error: PyYAML keeps the last value,
    so a config with a repeated key would lose the first one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader reports an unhashable key itself
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise _DuplicateKeyError(key, line, first_lines[key])
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The YAML file at `path`, parsed (an empty file: {}).

    Raises:
        ConfigError: `path` does not exist, is a directory, cannot be read, is not UTF-8 text, is not valid
            YAML, or writes a key twice in one mapping (naming the file, the line and the fix).
    """
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist (relative paths start at {Path.cwd()}). Fix: pass the path "
            "of an existing YAML file, e.g. one under configs/."
        ) from None
    except IsADirectoryError:
        inside = sorted(p.name for p in Path(path).glob("*.y*ml"))
        fix = (
            f"one of the YAML files in it ({', '.join(inside[:3])}{', ...' * (len(inside) > 3)})"
            if inside
            else "a YAML file"
        )
        raise ConfigError(f"config file {path} is a directory, not a YAML file. Fix: pass {fix}.") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason}). Fix: save "
            "the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 OLD > NEW` for a Latin-1 file."
        ) from None
    except OSError as e:  # a permission denied, an unreadable mount: the system's own reason says which
        raise ConfigError(
            f"config file {path} cannot be read: {e.strerror or e}. Fix: make it readable, or pass another."
        ) from None
    except _DuplicateKeyError as e:
        raise ConfigError(
            f"{path}, line {e.line}: key `{e.key}` is written a second time in the same mapping (first at "
            f"line {e.first_line}); YAML would keep only the last value. Fix: delete one of the two."
        ) from None
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_syntax_error(path, e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}. Fix the YAML syntax at the line it names.") from None


def _syntax_error(path: str | Path, e: yaml.MarkedYAMLError) -> str:
    """PyYAML's syntax error as one paragraph naming `path`, the line and column (1-based) where the parser
    stopped, and where the construct it was reading began: PyYAML's own text names the file
    `"<unicode string>"` and ends in a caret drawing."""
    mark = e.problem_mark or e.context_mark
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    began = ""
    if e.context:
        at = e.context_mark
        began = f" ({e.context}{f' at line {at.line + 1}, column {at.column + 1}' if at else ''})"
    fix = (
        "Fix: indent with spaces; YAML allows no tab there."
        if "'\\t'" in (e.problem or "")
        else "Fix the YAML syntax there (an unclosed bracket or quote shows only where the parser gave up)."
    )
    return f"{path}{where}: not valid YAML: {e.problem}{began}. {fix}"


def with_line(error: ConfigError, path: str | Path, under: str = "") -> ConfigError:
    """`error` with the line of the file `path` that holds the key it names: `{path}, line N: ...`.

    Only an error blamed on the file (its message starts with `{path}: `) is changed; one blamed on the
    command line, or naming no key the file writes, is returned as it is. The key is the first one in
    backticks that the file writes; for a section's own check ("invalid `optim`: learning_rate must be
    ..."), the key the check names if the file writes it, else the section. `under` is the key path that the
    file's top level is read as (`data` for a file that is a bare data section); a file that cannot be read
    again leaves `error` as it is.
    """
    head = f"{path}: "
    message = str(error)
    if not message.startswith(head):
        return error
    lines = key_lines(path, under)
    body = message.removeprefix(head)
    for key in re.findall(r"`([^`\s]+)`", body):
        named = re.search(rf"`{re.escape(key)}`: ([A-Za-z_]\w*)", body)
        for candidate in ([_join(key, named[1])] if named else []) + [key]:
            if candidate in lines:
                return ConfigError(f"{path}, line {lines[candidate]}: {body}")
    return error


def key_lines(path: str | Path, under: str = "") -> dict[str, int]:
    """{key path: its 1-based line} of every key the YAML file `path` writes (`optim.learning_rate`, a list
    item as `optim.no_decay[0]`, as `convert` names them), the file's top level read as `under` (`with_line`);
    empty where the file cannot be read or parsed again."""
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    lines: dict[str, int] = {}
    _key_lines(root, under, lines)
    return lines


def _key_lines(node: yaml.Node | None, where: str, lines: dict[str, int]) -> None:
    """Fill `lines` with the 1-based line of every key under `node` by its path (`optim.learning_rate`, a
    list item as `optim.no_decay[0]`, as `convert` names them)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = _join(where, key_node.value)
                if "." in str(key_node.value):
                    # A dotted key written as one (`optim.learning_rate: ...` at the top) is what an "unknown
                    # key" error names, and it is raised before the nested key of that path is read.
                    lines[key] = key_node.start_mark.line + 1
                else:
                    lines.setdefault(key, key_node.start_mark.line + 1)
                _key_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.setdefault(f"{where}[{i}]", item.start_mark.line + 1)
            _key_lines(item, f"{where}[{i}]", lines)


def check_not_command_file(raw: Any, source: str, wanted: str = "a training config") -> None:
    """Refuse a demo, compare or sweep file (known by its `demo` / `compare` section, or a sweep's `models`
    and `output_dir`) where `wanted` was expected: its sections would be reported as unknown keys, which does
    not say which command reads it.

    Raises:
        ConfigError: naming the kind of file and the command that reads it.
    """
    if not isinstance(raw, dict):
        return
    kinds = (  # (what the file is, the command that reads it, whether `raw` is one)
        ("demo", "demo", "demo" in raw),
        ("compare", "compare", "compare" in raw),
        ("sweep", "bench scale", {"models", "output_dir"} <= set(raw)),
    )
    for kind, command, found in kinds:
        if found:
            raise ConfigError(
                f"{source} is a {kind} file (sections {', '.join(map(str, raw))}), not {wanted}. Fix: run"
                f" `nextquill-jax {command} --config {source}`, or pass {wanted}."
            )


def apply_override(raw: dict, item: str, value: Any, cls: type | None = None) -> None:
    """Set `raw[section][...][key] = value` for the key of one `section.key=value` item (`value`: its text as
    `check_override` reads it). With the dataclass `cls` that `raw` is read as, a mapping given to a section
    (`data.batching={mode: bucket}`) sets the keys it names and keeps the file's others; a free-form mapping
    (`model.overrides`) is a value and replaced whole. A section the file sets to null (an optional one,
    `lora: null`) is started empty by an override of one of its keys.

    Raises:
        ConfigError: the item is not of that form, or a key on its path holds a value, not a section.
    """
    parts, _ = _override_parts(item)
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    section = None if cls is None else dataclass_of(_override_type(cls, parts, item, "override"))
    old = node.get(parts[-1])
    if section is not None and isinstance(value, dict) and isinstance(old, dict):
        value = {**old, **value}
    node[parts[-1]] = value


def build_with_overrides(
    cls: type, raw: dict, source: str, overrides: Sequence[str], overrides_source: str = "command line"
) -> Any:
    """Build dataclass `cls` from the mapping `raw` read from `source`, with `section.key=value` overrides
    applied (each checked against `cls` first; `raw` is left as it was).

    Raises:
        ConfigError: an override that `check_override` refuses (blamed on `overrides_source`), or a value
            `cls` rejects. A section's own check sees the file and the overrides together: when the file
            alone passes it, the overrides are what to fix and the message starts with `overrides_source`;
            otherwise it starts with `source` and lists the overrides.
    """
    merged = copy.deepcopy(raw)
    for item in overrides:
        apply_override(merged, item, check_override(cls, item, overrides_source), cls)
    try:
        return build(cls, merged, "", source)
    except ConfigError as e:
        if not overrides:
            raise
        applied = " ".join(overrides)
        try:
            build(cls, raw, "", source)
        except ConfigError:
            raise ConfigError(f"{e} ({overrides_source} overrides applied: {applied})") from None
        message = str(e).removeprefix(f"{source}: ")
        raise ConfigError(f"{overrides_source}: {message} (overrides: {applied})") from None


def check_override(cls: type, item: str, source: str) -> Any:
    """Check one `section.key=value` item against dataclass `cls` and return its value: the text read as
    YAML, or the text itself where the key takes text but YAML reads another type (`data.template=no`, a
    bool; `train.workdir=2024-01-01`, a date): what was typed.

    Keys beneath a free-form mapping field (`dict` or `Any`) are not checked; their value is the text read as
    YAML. `source` says where the item came from (e.g. "command line") so errors are not blamed on the file
    it overrides.

    Raises:
        ConfigError: an item not of the form `section.key=value`; an unknown key, with the nearest keys of
            its own section and of other sections (`train.lerning_rate` -> `optim.learning_rate`); a key on
            the path that holds a value, not a section; no value (`key=`, as an unset shell variable leaves
            it); null for a section that cannot be null (it would drop the file's keys of it); or a value
            that is not of the key's type (for text that is not valid YAML, saying why and how to quote it).
    """
    parts, text = _override_parts(item)
    key, text = ".".join(parts), text.strip()
    tp = _override_type(cls, parts, item, source)
    null = type(None) in _options(tp)
    if not text:
        or_null = f", or `{key}=null` for null" if null else ""
        raise ConfigError(
            f"{source}: `{item}` gives `{key}` no value (an unset shell variable?). Fix: write its value "
            f"after `=`{or_null}."
        )
    try:
        value, problem = yaml.safe_load(text), None
    except yaml.YAMLError as e:
        value, problem = text, e
    if value is None and dataclass_of(tp) is not None and not null:
        raise ConfigError(
            f"{source}: `{item}`: `{key}` is a section, which cannot be null (null would reset each of its "
            f"keys to its default, dropping the file's). Fix: set its keys, `{key}.KEY=VALUE`."
        )
    try:
        convert(value, tp, key, source)
        return value
    except ConfigError as e:
        error = e
    if not isinstance(value, (str, list, dict, type(None))):  # YAML typed the text: a bool, number or date
        try:
            convert(text, tp, key, source)
            return text
        except ConfigError:
            pass
    if problem is not None and any(typing.get_origin(option) in (list, tuple) for option in _options(tp)):
        raise _unquoted_list_items(item, key, text, problem, source) from None
    raise error


def _override_parts(item: str) -> tuple[list[str], str]:
    """The key of one `section.key=value` item, split at its dots, and its value's text.

    Raises:
        ConfigError: the item is not of that form.
    """
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"override {item!r} is not of the form section.key=value (e.g. optim.learning_rate=1e-4)"
        )
    return parts, text


def _override_type(cls: type, parts: list[str], item: str, source: str) -> Any:
    """The type hint of the key `parts` of dataclass `cls`; `Any` beneath a free-form mapping field.

    Raises:
        ConfigError: an unknown key (with the nearest keys), or a key on the path that holds a value.
    """
    tp: Any = cls
    for i, part in enumerate(parts):
        section = dataclass_of(tp)
        if section is None:
            if typing.get_origin(tp) is dict or tp is Any:
                return Any
            raise ConfigError(
                f"{source}: `{item}`: `{'.'.join(parts[:i])}` is a value, not a section. Fix: set "
                f"`{'.'.join(parts[:i])}=VALUE`."
            )
        names = [f.name for f in dataclasses.fields(section) if f.init]
        if part not in names:
            near = _nearest_keys(cls, parts, i, names)
            hint = (
                f"Did you mean {' or '.join(f'`{k}`' for k in near)}?"
                if near
                else f"Valid keys here: {', '.join(names)}."
            )
            raise ConfigError(
                f"{source}: unknown key `{'.'.join(parts)}` (in `{item}`). {hint} Fix: correct the key."
            )
        tp = typing.get_type_hints(section)[part]
    return tp


def _unquoted_list_items(item: str, key: str, text: str, problem: yaml.YAMLError, source: str) -> ConfigError:
    """The error for an override of a list key whose text is not valid YAML (`[*.jsonl]`: YAML reads `*` as
    an alias): why YAML refused it, how to quote, and for a `[...]` text the value with each item quoted (a
    JSON array, which YAML reads as a list of those strings)."""
    why = ": ".join(filter(None, (getattr(problem, "context", None), getattr(problem, "problem", None))))
    example = ""
    if text.startswith("[") and text.endswith("]"):
        example = f", e.g. '{key}=[{', '.join(json.dumps(i.strip()) for i in text[1:-1].split(','))}]'"
    return ConfigError(
        f"{source}: `{item}`: `{key}` takes a list, and the value is not valid YAML ({why or problem}). Fix: "
        "put in double quotes each item that starts with a character YAML reserves (*, &, !, %, @, `) or "
        f"holds ': ' or ' #'{example}."
    )


def dataclass_of(tp: Any) -> type | None:
    """`tp` when it is a dataclass, the dataclass of an optional one (`LoraConfig | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    options = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    return options[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and options else None


def key_paths(cls: type, where: str = "") -> list[str]:
    """Every dotted key of dataclass `cls`, nested sections included (`optim.learning_rate`, ...)."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            path = _join(where, f.name)
            paths.append(path)
            section = dataclass_of(hints[f.name])
            if section is not None:
                paths += key_paths(section, path)
    return paths


def _nearest_keys(cls: type, parts: list[str], i: int, names: list[str]) -> list[str]:
    """Up to three keys for the unknown `parts[i]`: the nearest in its own section, then keys anywhere in
    `cls` whose last part is nearest to the last part of `parts` (a key put in the wrong section)."""
    close = difflib.get_close_matches(parts[i], names, n=2, cutoff=0.5)
    here = [".".join([*parts[:i], n, *parts[i + 1 :]]) for n in close]
    by_last: dict[str, list[str]] = {}
    for path in key_paths(cls):
        by_last.setdefault(path.rpartition(".")[2], []).append(path)
    elsewhere = [
        path
        for last in difflib.get_close_matches(parts[-1], list(by_last), n=3, cutoff=0.75)
        for path in by_last[last]
    ]
    return list(dict.fromkeys([*here, *elsewhere]))[:3]


def build(cls: type, raw: Any, where: str, source: str) -> Any:
    """Build dataclass `cls` from the mapping `raw` found at key prefix `where` of `source`.

    Raises:
        ConfigError: as `load_config`.
    """
    label = where or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: `{label}` must be a mapping of keys to values, got {raw!r}. Fix: write it as a YAML "
            f"section with keys {[f.name for f in dataclasses.fields(cls)]}."
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in raw:
        if key not in names:
            head, dot, rest = str(key).partition(".")
            if dot and head in names:  # an override's spelling written as a YAML key
                raise ConfigError(
                    f"{source}: unknown key `{_join(where, str(key))}`: a dotted key is one YAML key, not "
                    f"`{rest}` under `{_join(where, head)}`. Fix: write it nested, as `{rest}: ...` under "
                    f"`{head}:`."
                )
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = (
                f"Did you mean `{_join(where, close[0])}`?" if close else f"Valid keys: {', '.join(names)}."
            )
            raise ConfigError(f"{source}: unknown key `{_join(where, str(key))}`. {hint}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = convert(raw[name], hints[name], _join(where, name), source)
        elif dataclasses.is_dataclass(hints[name]) and _required(cls, name):
            values[name] = build(hints[name], {}, _join(where, name), source)
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise _section_error(str(e), where, source) from None


def _section_error(message: str, where: str, source: str) -> ConfigError:
    """A section's own check (`message`, from its `__post_init__`) as a `ConfigError` that says each thing
    once: `source`; the section `where`, unless the message starts with one of its keys; the message; and a
    fix, unless the message gives one."""
    named = not where or re.match(rf"`?{re.escape(where)}\.", message)
    head = "" if named else f"invalid `{where}`: "
    end = "" if message.endswith((".", "?", "!")) else "."
    fix = "" if "Fix" in message else f" Fix the value under `{where}`." if where else " Fix the value."
    return ConfigError(f"{source}: {head}{message}{end}{fix}")


def _required(cls: type, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` as type `tp` (a type hint: scalar, Literal, list, tuple, dict, Optional/union or dataclass).

    `source` begins each message; "" for none (a section's own check, whose message `build` prefixes).

    Raises:
        ConfigError: a value that is not of that type, or NaN or infinity for a float, naming `key`, `source`
            and the fix.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    options = _options(tp)
    if float in options and (number := _non_finite(value)) is not None:
        # Checked before a union's options are tried, so `loss.alpha: .nan` says this, not "expects a float".
        null = ", or null" if type(None) in options else ""
        raise ConfigError(
            f"{_prefix(source)}`{key}` is {number}, not a finite number. Fix: write a finite number for "
            f"`{key}`{null}."
        )
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return convert(value, option, key, source)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise _type_error(value, " or ".join(_type_name(a) for a in args), key, source)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, source)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        quote = _QUOTE if isinstance(value, bool) and any(isinstance(a, str) for a in args) else ""
        raise ConfigError(
            f"{_prefix(source)}`{key}` is {_written(value)}, not one of {list(args)}.{hint} "
            f"Fix: set `{key}` to one of them{quote}."
        )
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, _type_name(tp), key, source)
        items = [convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, "mapping", key, source)
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float, datetime.date)):
            raise _type_error(value, "str", key, source, _QUOTE)
    else:
        raise TypeError(f"config schema: unsupported type {tp!r} for {key}")
    raise _type_error(value, _type_name(tp), key, source)


def check_choices(instance: Any) -> None:
    """Refuse a value outside its choices in each field of the dataclass `instance` typed by a `Literal` (or
    a `Literal` or None), as loading a config file does: a section built in Python, or changed with
    `dataclasses.replace`, is checked as its YAML is (a misspelt `schedule: cosin` would otherwise run on).
    Called from a section's `__post_init__`.

    Raises:
        ValueError: naming the class, the field, the value and the choices.
    """
    for name, choices in _choice_fields(type(instance)):
        value = getattr(instance, name)
        if value not in choices:
            raise ValueError(
                f"{type(instance).__name__}.{name} must be one of {', '.join(map(repr, choices))}, got "
                f"{value!r}"
            )


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """(name, allowed values) of each field of `cls` typed by a `Literal`, alone or with None."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        options = _options(hints[f.name])
        literals = [o for o in options if typing.get_origin(o) is Literal]
        if literals and all(typing.get_origin(o) is Literal or o is type(None) for o in options):
            choices = tuple(v for o in literals for v in typing.get_args(o))
            fields.append((f.name, choices + ((None,) if type(None) in options else ())))
    return tuple(fields)


def _options(tp: Any) -> tuple[Any, ...]:
    """The types a union type hint allows (`float | None` -> float, NoneType); any other hint alone."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _non_finite(value: Any) -> float | None:
    """`value` as the NaN or infinity it writes (YAML's `.nan`, `.inf`; the text `nan`, `inf`), else None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return value if isinstance(value, float) and not math.isfinite(value) else None


def _type_name(tp: Any) -> str:
    # As a config is written: a Literal's values, YAML's null, a list (for a tuple too) and a mapping (not
    # `Literal`, `NoneType`, `tuple`, `dict`).
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# Where YAML typed text that a key takes as text (`template: no`, `distributed: off`, `workdir: 2024-01-01`).
_QUOTE = (
    "; YAML reads unquoted yes, no, on, off, true and false as bools, and numbers and dates as such: put the "
    "value in quotes"
)


def _type_error(value: Any, expected: str, key: str, source: str, hint: str = "") -> ConfigError:
    article = "an" if expected[:1] in "aeiou" else "a"
    got = "null" if value is None else f"{value!r} ({type(value).__name__})"  # as YAML writes it
    return ConfigError(
        f"{_prefix(source)}`{key}` expects {article} {expected}, got {got}. "
        f"Fix: write {article} {expected} value for `{key}`{hint}."
    )


def _written(value: Any) -> str:
    """`value` in a message: YAML's `null` for None (as the config wrote it, not Python's `None`), else its
    repr."""
    return "null" if value is None else repr(value)


def _prefix(source: str) -> str:
    return f"{source}: " if source else ""
