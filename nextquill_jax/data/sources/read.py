"""Choose the reader of `DataConfig.format`, expand the source patterns and read every record."""

from __future__ import annotations

import dataclasses
import glob
import re
import tempfile
from collections import Counter
from pathlib import Path

from nextquill_jax.data.config import SPLIT_WORDS, DataConfig
from nextquill_jax.data.sources import amazon2023, dpl
from nextquill_jax.data.sources.generic import read_generic
from nextquill_jax.data.sources.lamp import read_lamp, read_lamp_outputs
from nextquill_jax.data.sources.records import IssueLog, Record
from nextquill_jax.data.sources.rows import file_kind
from nextquill_jax.data.sources.synth import generate_synthetic
from nextquill_jax.data.templates import PromptTemplate

# What `glob.escape` makes of `*`, `?` and `[`: `[*]`, `[?]` and `[[]`.
_GLOB_ESCAPE = re.compile(r"\[([*?[])\]")


def expand_paths(patterns: list[str], key: str) -> list[Path]:
    """Files matching each pattern, sorted within a pattern, each file once.

    `**` in a pattern matches any number of directories (none included); a pattern that names an existing
    file is that file, glob characters in its name included (`data[1].jsonl`). A file matched again, by
    another pattern or under another spelling of its path (relative or absolute, through a symlink), is the
    same file: it is kept once, under the spelling that matched it first, so its records are not read twice.

    Raises:
        ValueError: a pattern that matches no file (saying so when it names directories, with a glob for their
            files), or a file of an unsupported type, naming `data.<key>`.
    """
    paths: list[Path] = []
    resolved: set[Path] = set()
    for pattern in patterns:
        # A file whose name holds a glob character (`data[1].jsonl`) is that file, not a pattern, under a
        # folder whose glob characters `config_paths` escaped (`g[[]1]/data[1].jsonl`) too.
        named = _GLOB_ESCAPE.sub(r"\1", pattern)
        literal = not glob.has_magic(pattern) or Path(named).is_file()
        found = [named] if literal else sorted(glob.glob(pattern, recursive=True))
        matches = [m for m in found if Path(m).is_file()]
        directories = [m for m in found if Path(m).is_dir()]
        if not matches and directories:
            what = (
                "is a directory, not a file"
                if directories == [pattern]
                else f"matches only directories ({', '.join(directories[:3])}"
                f"{', ...' if len(directories) > 3 else ''}), no files"
            )
            raise ValueError(
                f"data.{key}: {pattern!r} {what}. Fix: name the files with a glob pattern, e.g. "
                f"{_files_glob(directories[0])!r}."
            )
        if not matches:
            raise ValueError(
                f"data.{key}: no file matches {pattern!r} (paths are relative to {Path.cwd()}). Fix: correct "
                f"the path or pattern in data.{key}."
            )
        for m in matches:
            try:
                file_kind(m)
            except ValueError as e:
                raise ValueError(f"data.{key}: {e}") from e
            if Path(m).resolve() not in resolved:
                resolved.add(Path(m).resolve())
                paths.append(Path(m))
    return paths


def _files_glob(directory: str) -> str:
    """A glob for the data files in `directory`: by the suffix most of them have, `*.jsonl` when none."""
    kinds = Counter(
        kind for p in Path(directory).iterdir() if p.is_file() and (kind := _data_suffix(p)) is not None
    )
    suffix = kinds.most_common(1)[0][0] if kinds else ".jsonl"
    return str(Path(directory) / f"*{suffix}")


def _data_suffix(path: Path) -> str | None:
    try:
        return file_kind(path)
    except ValueError:
        return None


def split_from_name(path: Path) -> str:
    """The split a file holds, from the words of its name (`dev_questions.json` -> `val`).

    Raises:
        ValueError: when no word of the name is train / val / valid / validation / dev / test.
    """
    for word in re.split(r"[^a-zA-Z]+", path.name.lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    raise ValueError(
        f"{path}: cannot tell its split from the file name; name it with train, val (or dev) or test,"
        " e.g. train.jsonl or dev_questions.json"
    )


def read_records(cfg: DataConfig, template: PromptTemplate, log: IssueLog) -> list[Record]:
    """Every kept record of the configured sources; invalid ones go to `log`.

    Raises:
        ValueError: missing files, unpaired metadata / outputs files, or a template that needs fields the
            format does not provide (naming them).
    """
    if cfg.format == "synthetic":
        return _read_synthetic(cfg, template, log)
    if not cfg.sources:
        raise ValueError("data.sources is empty: list the input files (paths or glob patterns)")
    sources = expand_paths(cfg.sources, "sources")
    meta = expand_paths(cfg.meta, "meta")
    if cfg.format in ("amazon2023", "dpl"):
        _check_template(
            template, frozenset(amazon2023.CONTEXT_FIELDS), frozenset(amazon2023.ENTRY_FIELDS), cfg.format
        )
    if cfg.format == "amazon2023":
        return amazon2023.read_amazon2023(sources, meta, cfg, log)
    if cfg.format == "dpl":
        if not meta:
            raise ValueError(
                "data.meta: the dpl format needs the item metadata files (asin, title, description)"
            )
        items = dpl.read_dpl_items(meta, log)
        return dpl.read_dpl([(path, split_from_name(path)) for path in sources], items, log)
    if cfg.format == "lamp":
        outputs = read_lamp_outputs([(path, split_from_name(path)) for path in meta], log)
        return read_lamp([(path, split_from_name(path)) for path in sources], outputs, template, log)
    if meta:
        raise ValueError("data.meta: the generic format takes no metadata files; remove data.meta")
    return read_generic(sources, cfg.default_split, template, log)


def _read_synthetic(cfg: DataConfig, template: PromptTemplate, log: IssueLog) -> list[Record]:
    """Generate the synthetic benchmark (deterministic in users and seed) and read it as generic records.

    The file is temporary, so each record's `source` names the generator, its seed and size, the user and the
    line instead: `nextquill-jax data synth --users N --seed S` writes that same line again. The rows read
    (`log.read`) are counted under the generator likewise.
    """
    generator = f"synthetic(users={cfg.synthetic_users}, seed={cfg.synthetic_seed})"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        generate_synthetic(tmp, users=cfg.synthetic_users, seed=cfg.synthetic_seed)
        records = read_generic([path], cfg.default_split, template, log)
    log.read[generator] = log.read.pop(str(path))
    return [dataclasses.replace(r, source=f"{generator}:{_line(r.source)} user {r.user_id}") for r in records]


def _line(location: str) -> str:
    """The line number of a `file:line` location."""
    return location.rpartition(":")[2]


def _check_template(
    template: PromptTemplate, context_fields: frozenset[str], entry_fields: frozenset[str], fmt: str
) -> None:
    for kind, needed, given in (
        ("context", template.context_fields, context_fields),
        ("entry", template.entry_fields, entry_fields),
    ):
        if not needed <= given:
            raise ValueError(
                f"data.template {template.name!r} needs {kind} fields {sorted(needed - given)} that the {fmt}"
                f" format does not provide (it provides {sorted(given)}); use the `review` template or one"
                " with these fields"
            )
