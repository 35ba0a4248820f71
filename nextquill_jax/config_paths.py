"""Which config fields name local files, and the config with those that are relative made absolute.

A path in a config is relative to the directory the command runs in. `train` records its config
(config.yaml, every checkpoint's) with each such path absolute, so that the record names the same files from
any directory: `train --config <workdir>/config.yaml` resumes the run, and `evaluate`, `effects` and `export`
read it, wherever they run. What was recorded relative (by an earlier version) meant the directory `train`
ran in, so a resume compares it joined to the current directory (`train.resume.normalised`).

    cfg = absolute_paths(load_config("configs/tiny_synthetic.yaml"), Path.cwd())

`PATH_FIELDS` declares each such field and how its value is read:
- `path`: always a local path (a URL such as gs://... is left as it is; `resolve_workdir` refuses one);
- `paths`: a list of local paths or glob patterns;
- `model`: a local model directory or .gguf file if one exists there, else a packaged model name;
- `tokenizer`: a local tokenizer directory or .gguf file if one exists there, else a packaged name
  (`models.load_tokenizer`'s order);
- `template`: the YAML file of a path with a suffix, else a built-in template name
  (`data.templates.load_template`);
- `reference`: `base` (the frozen LoRA base), else as `model` (a training workdir is a local directory).
A name (and a path that exists nowhere, or a `~user` of no user here, which its resolver refuses anyway) is
left as written, and so is an empty string.
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

PathKind = Literal["path", "paths", "model", "tokenizer", "template", "reference"]
# A config dataclass. This module serves every layer (`data prepare` reads it, below `config`), so it names
# the sections by their dotted keys, not by their classes.
Section = TypeVar("Section")

# Every config field that names local files, by dotted key. `mesh.coordinator` (host:port) is no path.
PATH_FIELDS: dict[str, PathKind] = {
    "model.path": "model",
    "model.lora.init_from": "path",
    "data.sources": "paths",
    "data.meta": "paths",
    "data.template": "template",
    "data.tokenizer": "tokenizer",
    "loss.reference_model": "reference",
    "train.workdir": "path",
    "train.data_dir": "path",
    "logging.tensorboard_dir": "path",
}
# Those of the `data` section, as `DataConfig` spells them.
DATA_PATH_FIELDS: dict[str, PathKind] = {
    key.removeprefix("data."): kind for key, kind in PATH_FIELDS.items() if key.startswith("data.")
}


def _expanded(value: str) -> Path | None:
    """`value` as a path with `~` expanded, or None for a `~user` that names no user here (`expanduser`
    raises RuntimeError): left as written, its resolver refuses it with its own message, naming the field."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        return None


def _joined(value: str, base: Path, pattern: bool = False) -> str:
    """`value` with `~` expanded, joined to `base` when relative; a URL, an absolute path, an unknown `~user`
    and the empty string as written, unchanged (`""` names no directory: the readers of `train.data_dir` and
    `logging.tensorboard_dir` take it as unset, their default in the workdir, not as `base`). A `pattern`
    (a glob, `paths`) is joined to `base` with its `[`, `*` and `?` escaped: they are the folder's name there,
    not a pattern (from `g[1]/`, `data/*.jsonl` matched `g1/data/*.jsonl`)."""
    expanded = _expanded(value)
    if not value or "://" in value or expanded is None or Path(value).is_absolute():
        return value
    return str(Path(glob.escape(str(base)) if pattern else base) / expanded)  # an expanded `~` is absolute


def _local(value: str, base: Path, kind: PathKind) -> bool:
    """Whether the resolver of a `kind` field reads `value` (relative to `base`) as a local path rather than
    as a name."""
    expanded = _expanded(value)
    if expanded is None:
        return False
    path = base / expanded
    if kind == "tokenizer":
        return path.is_dir() or (path.suffix == ".gguf" and path.is_file())
    if kind == "template":
        return bool(path.suffix) and path.exists()
    if kind == "reference" and value == "base":
        return False
    return path.exists()


def absolute_value(value: Any, base: Path, kind: PathKind) -> Any:
    """The value of a `kind` field (`PATH_FIELDS`) with a relative local path joined to `base` (`~` expanded),
    as the file it names from `base`; None, a name and an absolute path unchanged. A `paths` value is a list
    (each item joined)."""
    if value is None:
        return None
    if kind == "paths":
        return [_joined(item, base, pattern=True) for item in value]
    if kind == "path" or _local(value, base, kind):
        return _joined(value, base)
    return value


def _replace_at(obj: Any, keys: list[str], change: Callable[[Any], Any]) -> Any:
    """Frozen dataclass `obj` with the field at the path `keys` replaced by `change(value)`; itself when a
    section on the way is None (`model.lora` of a full fine-tuning)."""
    if obj is None:
        return None
    head, *rest = keys
    value = getattr(obj, head)
    new = _replace_at(value, rest, change) if rest else change(value)
    # `replace` runs the section's checks again: only where something changed.
    return obj if new == value else dataclasses.replace(obj, **{head: new})


def _absolute(obj: Any, fields: Mapping[str, PathKind], base: Path) -> Any:
    for key, kind in fields.items():
        obj = _replace_at(obj, key.split("."), lambda value, kind=kind: absolute_value(value, base, kind))
    return obj


def absolute_paths(cfg: Section, base: Path) -> Section:
    """`cfg` (a `config.Config`) with every relative local path of `PATH_FIELDS` joined to `base` (an
    absolute directory: the one the command runs in), `~` expanded; absolute paths, URLs, names that are no
    local path there, and None unchanged, as is every other field."""
    return _absolute(cfg, PATH_FIELDS, base)


def absolute_data_paths(data: Section, base: Path) -> Section:
    """`data` (a config's `data` section, a `data.config.DataConfig`) with its relative local paths joined
    to `base`, as `absolute_paths` does."""
    return _absolute(data, DATA_PATH_FIELDS, base)
