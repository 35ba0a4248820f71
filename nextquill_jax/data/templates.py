"""Prompt templates: data (YAML files), not code.

A template is six strings, filled with `str.format`:

    system      the system message
    frame       wraps the turns: must contain {system} and {user}; null: use the tokenizer's chat template
    user        the user message: the record's context fields, and {history} where the history block goes
    history     the history block when there is history: {entries} is the rendered entries
    no_history  the history block of the without-history prompt (the `None` placeholder)
    entry       one history entry: {index} (1 = most recent) and the entry's fields

`{context_fields}` (in `user`) and `{entry_fields}` (in `entry`) render every named field as `[name]: value`
lines, for templates that must work with any record. These placeholder names, `history`, `entries` and `index`
are reserved: a record field with one of these names cannot be referenced. Values are inserted with `str()`
semantics, so a float rating prints like Python prints it (`5.0`). A placeholder may carry a format spec or a
conversion (`{rating:.1f}`, `{title!r}`): one that fits no value (`{rating:zz}`) is refused when the template
is loaded; one that does not fit a record's value (`{rating:.1f}` given the string `five`) makes that record
invalid (`FieldFormatError`, reason `wrong_type`).

Built-in templates live in `nextquill_jax/data/templates/` and are chosen by name (`review`,
`lamp_topic_writing`, `lamp_abstract`, `plain`); any other YAML file with the same keys is chosen by path.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextquill_jax.config_schema import read_yaml
from nextquill_jax.data.sources.records import describe_value

TEMPLATE_DIR = Path(__file__).parent / "templates"
KEYS = ("system", "frame", "user", "history", "no_history", "entry")
RESERVED = frozenset({"history", "entries", "index", "context_fields", "entry_fields", "system", "user"})
# What str.format raises for a value its placeholder cannot format: a format spec or conversion that does not
# fit the value's type, an index past a string's end, an attribute the value lacks.
_FORMAT_ERRORS = (ValueError, TypeError, IndexError, AttributeError)
# Values of each kind a placeholder may format: record fields are str, int or float; `index` is an int; the
# other reserved placeholders are rendered text.
_SAMPLE_VALUES: dict[str, tuple[Any, ...]] = {"index": (0,), **{name: ("",) for name in RESERVED - {"index"}}}
_FIELD_SAMPLES: tuple[Any, ...] = ("", 0, 0.0)


class FieldFormatError(ValueError):
    """A record's value that its template placeholder cannot format (`{rating:.1f}` given a string).

    `field` is the record field; the message says where the value is, how the template formats it, why that
    fails, and the fix.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded template; see the module docstring for the meaning of each string."""

    name: str
    system: str
    frame: str | None
    user: str
    history: str
    no_history: str
    entry: str

    @property
    def context_fields(self) -> frozenset[str]:
        """Record context fields the `user` string needs."""
        return _placeholders(self.user) - RESERVED

    @property
    def entry_fields(self) -> frozenset[str]:
        """History entry fields the `entry` string needs."""
        return _placeholders(self.entry) - RESERVED


def builtin_templates() -> list[str]:
    """Names of the templates shipped with the package."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def load_template(name_or_path: str) -> PromptTemplate:
    """A built-in template by name, or a YAML file by path.

    Raises:
        ValueError: unknown name, missing or unknown keys, a non-string value, a malformed placeholder, a
            placeholder whose conversion or format spec fits no value it can be given, or a string lacking its
            required placeholder (`frame`: {system} and {user}; `user`: {history}; `history`: {entries}); the
            message names the file and key.
    """
    path = Path(name_or_path)
    choices = f"built-in: {', '.join(builtin_templates())}, or give the path of a YAML file"
    if not path.suffix:
        path = TEMPLATE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            close = difflib.get_close_matches(name_or_path, builtin_templates(), n=1, cutoff=0.6)
            nearest = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"data.template: unknown template {name_or_path!r}; {choices}. Fix: set data.template to one "
                f"of them{nearest}."
            )
    if not path.exists():
        relative = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ValueError(
            f"data.template: {path} does not exist{relative}; {choices}. Fix: correct the path, or name one "
            "of those"
        )
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a template is a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(set(raw) - set(KEYS))
    missing = sorted(set(KEYS) - set(raw) - {"frame"})
    if unknown or missing:
        raise ValueError(
            f"{path}: unknown keys {unknown}, missing keys {missing}; a template has {', '.join(KEYS)}"
        )
    for key in KEYS:
        value = raw.get(key)
        if not isinstance(value, str) and not (key == "frame" and value is None):
            raise ValueError(f"{path}: `{key}` must be a string{' or null' if key == 'frame' else ''}")
        if value is not None:
            try:
                _placeholders(value)
            except ValueError as e:
                raise ValueError(
                    f"{path}: `{key}` is not a valid format string ({e}); write literal braces as {{{{ }}}}"
                ) from e
            _check_format_specs(value, f"{path}: `{key}`")
    required = {"user": {"history"}, "history": {"entries"}}
    if raw.get("frame") is not None:
        required["frame"] = {"system", "user"}
    for key, names in required.items():
        lacking = names - _placeholders(raw[key])
        if lacking:
            raise ValueError(
                f"{path}: `{key}` must contain {', '.join('{' + n + '}' for n in sorted(lacking))}"
            )
    return PromptTemplate(name=path.stem, **{k: raw.get(k) for k in KEYS})


def render_messages(
    template: PromptTemplate,
    context: Mapping[str, Any],
    entries: Sequence[Mapping[str, Any]] | None,
) -> tuple[str, str]:
    """(system, user) message texts. `entries` newest first; None renders the `no_history` placeholder.

    Raises:
        KeyError: naming a field the template needs that the context or an entry lacks.
        FieldFormatError: a value of the context or an entry that its placeholder cannot format.
    """
    if entries is None:
        history = template.no_history
    else:
        body = "".join(
            _fill(
                template,
                "entry",
                _Fields(e, index=i + 1, entry_fields=fields_block(e)),
                f"history entry {i + 1} (1 = the most recent)",
            )
            for i, e in enumerate(entries)
        )
        history = _fill(template, "history", {"entries": body}, "the history block")
    fields = _Fields(context, history=history, context_fields=fields_block(context))
    user = _fill(template, "user", fields, "the context")
    return template.system, user


def render_prompt(
    template: PromptTemplate,
    context: Mapping[str, Any],
    entries: Sequence[Mapping[str, Any]] | None,
    *,
    chat_tokenizer: Any = None,
) -> str:
    """The full prompt text: the template's frame, or `chat_tokenizer.apply_chat_template` when given.

    Raises:
        KeyError: a field the template needs is missing (see `render_messages`).
        FieldFormatError: a value its placeholder cannot format (see `render_messages`).
        ValueError: the template has no frame and no tokenizer chat template was given.
    """
    system, user = render_messages(template, context, entries)
    if chat_tokenizer is not None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template.frame is None:
        raise ValueError(
            f"template {template.name!r} has no frame: set `data.chat_template: true` to use the"
            " tokenizer's own"
        )
    return _fill(template, "frame", {"system": system, "user": user}, "the messages")


def inserted_values(
    template: PromptTemplate, context: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]
) -> list[Any]:
    """The values of `context` and `entries` that `render_messages` inserts into the prompt: the fields the
    `user` string names (all with {context_fields}), and those the `entry` string names of each entry (all
    with {entry_fields})."""
    values = []
    for fmt, reserved, items in (
        (template.user, "context_fields", [context]),
        (template.entry, "entry_fields", entries),
    ):
        names = _placeholders(fmt)
        for fields in items:
            if reserved in names:
                values += fields.values()
            else:
                values += [fields[name] for name in names - RESERVED]
    return values


def fields_block(fields: Mapping[str, Any]) -> str:
    """Every field as a `[name]: value` line."""
    return "".join(f"[{k}]: {v}\n" for k, v in fields.items())


class _Fields(dict):
    """Record fields plus the reserved placeholders; the reserved ones win."""

    def __init__(self, fields: Mapping[str, Any], **reserved: Any) -> None:
        super().__init__(fields)
        self.update(reserved)


def _fill(template: PromptTemplate, key: str, fields: Mapping[str, Any], where: str) -> str:
    """`template`'s string `key` filled from `fields`, which are those of `where` (for messages).

    Raises:
        KeyError: a placeholder's field is not in `fields`.
        FieldFormatError: a value its placeholder cannot format.
    """
    fmt = getattr(template, key)
    try:
        return fmt.format_map(fields)
    except _FORMAT_ERRORS as e:
        error = e
    # str.format's message names neither the placeholder nor the value: format each placeholder alone to
    # find the one that fails.
    formatter = string.Formatter()
    for _, name, spec, conversion in formatter.parse(fmt):
        if name is None:
            continue
        try:
            value = formatter.get_field(name, (), fields)[0]
            formatter.format_field(formatter.convert_field(value, conversion), spec)
        except _FORMAT_ERRORS as e:
            field, written = _root(name), _written(name, spec, conversion)
            raise FieldFormatError(
                field,
                f"the template {template.name!r} formats `{field}` of {where} as `{written}` (its `{key}`"
                f" string), which fails for {describe_value(fields[field])}: {e}. Fix: give `{field}` a value"
                " that format fits, or change the placeholder in the template",
            ) from e
    raise error


def _check_format_specs(fmt: str, where: str) -> None:
    """Refuse a placeholder of `fmt` whose conversion or format spec fits no value it can be given (a mistake
    in the template, which would make every record invalid); one that fits some types is checked per record.

    Raises:
        ValueError: naming `where`, the placeholder and the fix.
    """
    for _, name, spec, conversion in string.Formatter().parse(fmt):
        if name is None or (not spec and conversion is None):
            continue
        written = _written(name, spec, conversion)
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(
                f"{where}: `{written}` has the unknown conversion `!{conversion}`; use !r, !s or !a"
            )
        if "{" in spec:
            raise ValueError(f"{where}: `{written}`: a format spec may not hold a placeholder; write it out")
        samples = ("",) if conversion else _SAMPLE_VALUES.get(_root(name), _FIELD_SAMPLES)
        errors = []
        for sample in samples:
            try:
                format(sample, spec)
            except ValueError as e:
                errors.append(f"{type(sample).__name__}: {e}")
        if len(errors) == len(samples):
            raise ValueError(
                f"{where}: the format spec of `{written}` fits no value ({'; '.join(errors)}); correct it, or"
                f" remove it to print the value as str() does"
            )


def _written(name: str, spec: str, conversion: str | None) -> str:
    """A placeholder as the template writes it."""
    return "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"


def _root(name: str) -> str:
    """The field a placeholder names (`text` of `text[0]` or `text.upper`)."""
    return name.split(".")[0].split("[")[0]


def _placeholders(fmt: str) -> frozenset[str]:
    names = set()
    for _, name, _, _ in string.Formatter().parse(fmt):
        if name is not None:
            if not name or name.isdigit():
                raise ValueError("positional placeholders `{}` are not allowed; name every field")
            names.add(_root(name))
    return frozenset(names)
