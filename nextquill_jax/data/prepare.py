"""`data prepare`: records -> examples -> token arrays on disk, with a readable copy and a summary.

`DIR/<split>/` holds the token arrays (`prepared_split.write_split`), `DIR/<split>.jsonl` the rendered
examples in the same order (`examples.example_row`: the texts before any cut to max_prompt_tokens /
max_target_tokens, with the token counts the model sees), `DIR/summary.json` the counts (rows read per file,
0 for an empty one, invalid records by reason, records dropped by reason, `notes`: records kept but probably
not read as meant, by message, examples per split, history fitting), where the first invalid records of each
reason were skipped (`skipped`: file:line, field and message of the first `records.PLACES_KEPT`) and the first
records of each note are (`note_places`), and token-length statistics.

A fingerprint of the settings (`DataConfig.fingerprint_fields`: all but `batching`, `tokenize_batch_size` and
`max_errors_shown`, which do not change the prepared data), the template's text, the tokenizer (its full
serialisation, EOS and chat template) and the source files (path, size and BLAKE2b content hash, so a file
changed without a new modification time, or corrupted in storage, is noticed) is stored in the summary; a
later run with the same fingerprint reuses the directory instead of preparing again. A summary written while
`tokenize_batch_size` and `max_errors_shown` were fingerprinted holds a fingerprint of them too: it is
recomputed with the values that summary records, and reused when it matches. The settings that name files
(`config_paths.DATA_PATH_FIELDS`: sources, meta, template, tokenizer) are fingerprinted as spelled, and the
files they name by content (the inputs, the template's text, the tokenizer); so a summary that spells them
otherwise (relative, as earlier versions recorded them; `train` and `data prepare` now record them absolute)
has this data's fingerprint when the fingerprint with its spellings is its own. Source and metadata files
that moved count as the recorded ones (the same size and hash file by file in the same order, each file's and
its folder's name kept, as many of them sources), so data prepared from them is reused, not refused or
prepared again, wherever they now lie; the summary still names where they were (the fingerprint holds
those paths) and adds where they were last found (`inputs_found_at`), so a move is reported once.
Rechecking the hashes reads every source once (about 1 s per GB, far below the cost of preparing;
`benchmarks/RESULTS.md`, "Checksums"). The summary is written last, and removed first when a directory is
prepared again; readers refuse split files without it (`prepared_split.check_finished`), so an interrupted
run is never mistaken for a finished one. The token arrays carry their own checksums (`prepared_split`). A
`DIR` where these files would overwrite or delete a source or metadata file (by path, or by identity: a hard
link) is refused before anything is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nextquill_jax.atomic_file import write_text_atomic
from nextquill_jax.config_paths import DATA_PATH_FIELDS, absolute_value
from nextquill_jax.data import checksums
from nextquill_jax.data.config import RESULT_NEUTRAL_FIELDS, SPLITS, DataConfig
from nextquill_jax.data.examples import Example, FittingStats, build_examples, check_records, example_row
from nextquill_jax.data.prepared_split import SUMMARY_FILE, write_split
from nextquill_jax.data.sources.read import expand_paths, read_records
from nextquill_jax.data.sources.records import PLACES_KEPT, Issue, IssueLog
from nextquill_jax.data.templates import PromptTemplate, load_template
from nextquill_jax.json_object import nonfinite_to_null
from nextquill_jax.plural import counted

# The summary's record of where its input files (`inputs`, whose paths the fingerprint holds) were last
# found, after they moved: a later start says nothing more of a move already reported.
FOUND_AT = "inputs_found_at"
FORMAT_VERSION = 3  # bump when the prepared layout or the example building changes (2: stable tie order;
# 3: content-hashed sources and checksummed token arrays)


def prepare(
    cfg: DataConfig,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    force: bool = False,
    protected: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prepare `cfg`'s data into `out_dir` (or reuse it) and return the summary.

    `tokenizer`: a fast Hugging Face tokenizer; None loads `cfg.tokenizer` with `models.load_tokenizer`.
    The summary's `reused` is true when an identical earlier preparation was found. `protected`: None
    replaces data prepared with other settings (saying why); else why that data must be kept and the fix,
    which the ValueError raised instead ends with.

    Raises:
        DataError: invalid records with `cfg.on_error == "fail"` (all listed, nothing written).
        ValueError: configuration problems (missing files, unpaired metadata, template fields, tokenizer), no
            example left, a source or metadata file that preparing into `out_dir` would overwrite or delete
            (`_check_out_spares_inputs`), or (`protected`) `out_dir` holds data prepared with other settings,
            which are listed; nothing is written then.
    """
    out = Path(out_dir)
    paths = {key: expand_paths(getattr(cfg, key), key) for key in ("sources", "meta")}
    _check_out_spares_inputs(out, paths)  # before anything is read or written
    template = load_template(cfg.template)
    tokenizer = load_fast_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
    previous = read_summary(out)
    layout = _input_layout(paths)
    fingerprint, same, inputs = _fingerprint(
        cfg, template, tokenizer, [*paths["sources"], *paths["meta"]], layout, previous
    )
    if not force and same and _complete(out, previous):
        moved = _moved_files(previous, inputs, layout)
        echo(
            f"{out}: prepared data up to date (fingerprint {previous['fingerprint'][:12]}), reusing it"
            + (f"; its record files moved, the same content: {moved}" if moved else "")
        )
        if moved:
            # Said once per move: the fingerprint keeps the recorded paths; the summary adds where they are.
            # Data on a read-only file system is still reused; the note then repeats at each start.
            previous = {**previous, FOUND_AT: [file["path"] for file in inputs]}
            with contextlib.suppress(OSError):
                _write_summary(out, previous)
        return {**previous, "reused": True}
    replacing = None
    if previous is not None and not force:
        # Runs may share a data directory: say why its contents are about to change under them. Files that
        # moved acceptably are no change: what else differs is named (the tokenizer, say).
        recorded = _with_recorded_paths(inputs, previous, layout)
        files_moved = recorded is not inputs
        unmoved = cfg
        if files_moved:
            spelled = previous.get("config") or {}
            unmoved = dataclasses.replace(
                cfg, **{key: spelled[key] for key in ("sources", "meta") if key in spelled}
            )
        differences = _changes(previous, unmoved, recorded)
        if not files_moved and _same_content(inputs, previous):
            differences.append(
                "the same content at other paths counts as the same files only with each file's name, its "
                "folder's name and its setting (data.sources or data.meta) kept, which formats read"
                if "input_names" in previous
                else "the summary, of an earlier version, does not record the file names a move must keep: "
                "put the files back where it names them, or prepare again"
            )
        changes = "; ".join(differences)
        if same:
            why = f"{out}: some of its split files are missing"
        elif changes:
            why = f"{out} was prepared with other settings ({changes})"
        else:
            why = (
                f"{out}: its fingerprint {str(previous.get('fingerprint'))[:12]} differs from this config's "
                f"{fingerprint[:12]} (the template's text or the tokenizer changed)"
            )
        if protected is not None and not same:
            raise ValueError(f"{why}; it is not replaced: {protected}")
        replacing = f"{why}: preparing again, replacing its contents"

    log = IssueLog(on_error=cfg.on_error, max_shown=cfg.max_errors_shown)
    records = read_records(cfg, template, log)
    if log.failed:
        # Nothing will be built, but the records read are checked as building would check them (no
        # tokenising), so the error lists what building would refuse too (a target of special-token text
        # alone, say) rather than leaving it to the next run. A chat template that refuses the prompts is a
        # setting's error, which building raises next run: the records' errors go first.
        with contextlib.suppress(ValueError):
            check_records(records, template, tokenizer, cfg, log)
    log.raise_if_failed()
    stats = FittingStats()
    by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    read_errors = sum(log.errors.values())
    for example in build_examples(records, template, tokenizer, cfg, log, stats):
        by_split[example.record.split].append(example)
    log.raise_if_failed()
    # Records building skipped as invalid (a target of special-token text alone) are errors, not kept.
    kept = len(records) - (sum(log.errors.values()) - read_errors)
    splits = [s for s in SPLITS if by_split[s]]
    if not splits:
        raise ValueError(_nothing_left(log))

    if replacing is not None:
        # Said only now that every record is read and every example built: an error before this point
        # leaves the directory as it was.
        echo(replacing)
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        examples = by_split[split]
        write_split(
            out,
            split,
            (e.tokens for e in examples),
            fingerprint=fingerprint,
            template=template.name,
            tokenizer=cfg.tokenizer,
            eos_token_id=int(tokenizer.eos_token_id),
        )
        with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for i, example in enumerate(examples):
                row = nonfinite_to_null(example_row(i, example))  # a NaN the source's meta held
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    summary = {
        "fingerprint": fingerprint,
        "format_version": FORMAT_VERSION,
        "format": cfg.format,
        "template": template.name,
        "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": tokenizer_digest(tokenizer),
        "eos_token_id": int(tokenizer.eos_token_id),
        "inputs": inputs,
        **layout,
        "config": cfg.fingerprint_fields(),
        "read": dict(log.read),
        "records_kept": kept,
        "errors": dict(sorted(log.errors.items())),
        "dropped": dict(sorted(log.dropped.items())),
        "notes": dict(sorted(log.notes.items())),
        "skipped": {
            reason: [{"location": i.location, "field": i.field, "message": i.message} for i in issues]
            for reason, issues in sorted(log.skipped.items())
        },
        "note_places": dict(sorted(log.note_places.items())),
        "fitting": dataclasses.asdict(stats),
        "examples": {s: len(by_split[s]) for s in splits},
        "splits": splits,
        "tokens": {s: _token_stats(by_split[s]) for s in splits},
    }
    _write_summary(out, summary)
    echo(_describe(out, summary))
    return {**summary, "reused": False}


def tokenizer_digest(tokenizer: Any) -> str:
    """The SHA-256 of a fast tokenizer's whole serialisation (vocabulary, merges, normaliser, added tokens),
    hex: equal for the same tokenizer wherever it is read from. summary.json records it
    (`tokenizer_sha256`) beside the name `data.tokenizer` gave."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def other_tokenizer_than_recorded(summary: dict[str, Any], tokenizer: Any) -> bool | None:
    """Whether `tokenizer` is another than the one the data of `summary` (its summary.json) was prepared
    with, by content (`tokenizer_digest` against its `tokenizer_sha256`); None where the summary, of an
    earlier version, records no digest (the caller judges by what it has)."""
    recorded = summary.get("tokenizer_sha256")
    return None if recorded is None else recorded != tokenizer_digest(tokenizer)


def load_fast_tokenizer(name: str, key: str = "data.tokenizer") -> Any:
    """`models.load_tokenizer(name)` (always a fast tokenizer), checked to have an EOS token; `key` is the
    setting that named it, which the errors name (`--tokenizer` where a flag did).

    Raises:
        ValueError: an unknown name, a directory without tokenizer files or a damaged GGUF file (the
            tokenizer reader's message after `key`), or a tokenizer without EOS.
        TypeError: a directory holding a slow tokenizer.
    """
    from nextquill_jax.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(name)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{key} {name!r} has no EOS token; targets end with EOS")
    return tokenizer


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Replace `out`/summary.json by `summary`, whole (`write_text_atomic`; its OSError raised)."""
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")


def read_summary(out_dir: str | Path) -> dict[str, Any] | None:
    """The summary of a finished preparation in `out_dir`, or None."""
    path = Path(out_dir) / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _check_out_spares_inputs(out: Path, paths: dict[str, list[Path]]) -> None:
    """Preparing into `out` leaves every input file alone: none of `paths` (the files of each `data.<key>`)
    is, by resolved real path, a file `prepare` writes or deletes there (summary.json, `<split>.jsonl`) or
    lies in a split's token-array directory `<split>/` (replaced whole), nor is the same file (device and
    inode) as one of those in `out` under another name: a hard link, which paths do not show (a token array
    is written in place, through it).

    Raises:
        ValueError: naming the first such input file, its `data.<key>`, the file of `out` it would be lost
            to (or its other name there), and the fix.
    """
    real_out = out.resolve()
    written = {real_out / SUMMARY_FILE: "the summary"}
    for split in SPLITS:
        written[real_out / f"{split}.jsonl"] = f"the rendered {split} examples"
    for key, files in paths.items():
        for path in files:
            real = path.resolve()
            if real in written:
                lost = f"{out / real.name} ({written[real]})"
            else:
                split = next((s for s in SPLITS if real.is_relative_to(real_out / s)), None)
                if split is None:
                    continue
                lost = f"{out / split}/ (the {split} token arrays) whole"
            linked = f" (a link to {real})" if real != path.absolute() else ""
            raise ValueError(
                f"data.{key} file {path}{linked} would be lost: preparing into {out} replaces {lost}. Fix:"
                f" prepare into a directory that holds no source (such as {out / 'prepared'}), or move"
                f" {path} out of {out} and name its new path in data.{key}."
            )
    replaced = _replaced_files(out)
    for key, files in paths.items():
        for path in files:
            try:
                info = path.stat()
            except OSError:
                continue  # a missing input is reported where it is read
            other = replaced.get((info.st_dev, info.st_ino))
            if other is None:
                continue
            name, what = other
            kind = "a link" if name.is_symlink() else "a hard link"
            raise ValueError(
                f"data.{key} file {path} is also {name} ({kind} to it), which preparing into {out} replaces"
                f" ({what}). Fix: prepare into a directory that holds no source (such as {out / 'prepared'}),"
                f" or remove {name} (its contents stay in {path})."
            )


def _replaced_files(out: Path) -> dict[tuple[int, int], tuple[Path, str]]:
    """The existing files of `out` that `prepare` writes, replaces or deletes, by (st_dev, st_ino) of what
    they name: (the name in `out`, what it holds). Links are followed, as writing through them would."""
    # The summary's temporary file is a new name at each write (`write_text_atomic`): no link can hold it.
    names = [(out / SUMMARY_FILE, "the summary")]
    for split in SPLITS:
        names.append((out / f"{split}.jsonl", f"the rendered {split} examples"))
        for root, _, files in os.walk(out / split):
            names += [(Path(root) / f, f"the {split} token arrays") for f in sorted(files)]
    replaced: dict[tuple[int, int], tuple[Path, str]] = {}
    for name, what in names:
        try:
            info = name.stat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            replaced.setdefault((info.st_dev, info.st_ino), (name, what))
    return replaced


def _fingerprint(
    cfg: DataConfig,
    template: PromptTemplate,
    tokenizer: Any,
    paths: list[Path],
    layout: dict[str, Any],
    previous: dict[str, Any] | None,
) -> tuple[str, bool, list[dict]]:
    """(the fingerprint of preparing `cfg` from the input files `paths`, laid out as `layout`
    (`_input_layout`), whether the summary `previous` has it, those files' descriptions).

    A `previous` summary that records `RESULT_NEUTRAL_FIELDS` in its config was fingerprinted with them
    (earlier versions), and one may spell the `DATA_PATH_FIELDS` otherwise (relative where `cfg` is
    absolute, or naming files that moved): it has this data's fingerprint when the fingerprint of `cfg`
    with its recorded values for those, and its recorded input paths where the files moved
    (`_with_recorded_paths`), is its own, and the files' names are the recorded ones (`layout`; a summary
    of an earlier version records none). Neither a spelling nor a move alone makes the data differ: the
    fingerprint holds the content of the files these fields name (the template, the tokenizer, the inputs),
    which must still match."""
    inputs = []
    for path in paths:
        inputs.append({"path": str(path.resolve()), **checksums.describe_file(path)})
    tok = tokenizer_digest(tokenizer)

    def digest(config: dict[str, Any], files: list[dict]) -> str:
        key = {
            "format_version": FORMAT_VERSION,
            "config": config,
            "template": dataclasses.asdict(template),
            "tokenizer": [tok, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)],
            "inputs": files,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    fingerprint = digest(cfg.fingerprint_fields(), inputs)
    if previous is None:
        return fingerprint, False, inputs
    same = previous.get("fingerprint") == fingerprint
    recorded = previous.get("config") or {}
    if not same:
        spelled = {name: recorded[name] for name in DATA_PATH_FIELDS if name in recorded}
        neutral = (
            {name: recorded[name] for name in RESULT_NEUTRAL_FIELDS}
            if all(name in recorded for name in RESULT_NEUTRAL_FIELDS)
            else {}
        )
        config = {**cfg.fingerprint_fields(), **spelled, **neutral}
        files = _with_recorded_paths(inputs, previous, layout)
        named_alike = "input_names" not in previous or _layout_of(previous) == layout
        same = named_alike and previous.get("fingerprint") == digest(config, files)
    return fingerprint, same, inputs


def _same_content(inputs: list[dict], previous: dict[str, Any]) -> bool:
    """Whether the summary `previous` records input files of `inputs`' content (size and BLAKE2b), file by
    file in the same order."""
    recorded = previous.get("inputs")
    if not isinstance(recorded, list) or len(recorded) != len(inputs):
        return False
    content = lambda file: (file.get("size"), file.get("blake2b")) if isinstance(file, dict) else None
    return all(content(old) == content(new) for old, new in zip(recorded, inputs, strict=True))


def _input_layout(paths: dict[str, list[Path]]) -> dict[str, Any]:
    """What formats read from the input files' paths, as spelled (a link's own name, not its target's: the
    readers read the spelling): how many are data.sources' files (the rest data.meta's), and each file's
    folder and name (a split from a file name, a category from a folder, metadata paired by name)."""
    files = [*paths["sources"], *paths["meta"]]
    return {"source_files": len(paths["sources"]), "input_names": [[p.parent.name, p.name] for p in files]}


def _layout_of(summary: dict[str, Any]) -> dict[str, Any]:
    """The `_input_layout` a summary records (None for each part a summary of an earlier version lacks)."""
    return {"source_files": summary.get("source_files"), "input_names": summary.get("input_names")}


def _with_recorded_paths(inputs: list[dict], previous: dict[str, Any], layout: dict[str, Any]) -> list[dict]:
    """`inputs`, laid out as `layout`, with the paths the summary `previous` records for them where they are
    the same files, moved: the same content in the same order (`_same_content`) and the same layout (file
    and folder names, the count of sources). `inputs` itself otherwise, and for a summary that records no
    layout (earlier versions)."""
    if _layout_of(previous) != layout or not _same_content(inputs, previous):
        return inputs
    return [{**new, "path": old["path"]} for old, new in zip(previous["inputs"], inputs, strict=True)]


def _moved_files(previous: dict[str, Any], inputs: list[dict], layout: dict[str, Any]) -> str:
    """ "old -> new" for each input file the summary `previous` records at another path, the same file moved
    (`_with_recorded_paths`), joined by "; "; empty when none moved, or when they are where the summary's
    `FOUND_AT` last found them (a move already reported)."""
    last_found = previous.get(FOUND_AT)
    if isinstance(last_found, list) and len(last_found) == len(inputs):
        recorded = last_found
    else:
        recorded = [file["path"] for file in _with_recorded_paths(inputs, previous, layout)]
    moved = [
        f"{old} -> {new['path']}" for old, new in zip(recorded, inputs, strict=True) if old != new["path"]
    ]
    return "; ".join(moved)


def _changes(previous: dict[str, Any], cfg: DataConfig, inputs: list[dict]) -> list[str]:
    """What the summary `previous` records differently from `cfg` and its `inputs` (settings as
    "data.KEY: old -> new", sources added, gone or changed); empty when the difference is not recorded."""
    changes = []
    if previous.get("format_version") != FORMAT_VERSION:
        changes.append(f"prepared-data format {previous.get('format_version')} -> {FORMAT_VERSION}")
    # Paths compared as the files they name from here: a summary of an earlier version spells them relative.
    absolute = lambda config: {
        k: absolute_value(v, Path.cwd(), DATA_PATH_FIELDS[k]) if k in DATA_PATH_FIELDS else v
        for k, v in config.items()
    }
    # Summaries of earlier versions also record RESULT_NEUTRAL_FIELDS, which are no setting of the data.
    old_config = absolute(
        {k: v for k, v in (previous.get("config") or {}).items() if k not in RESULT_NEUTRAL_FIELDS}
    )
    # As the summary holds it: lists, not tuples.
    new_config = absolute(json.loads(json.dumps(cfg.fingerprint_fields())))
    for key in sorted(old_config.keys() | new_config.keys()):
        if old_config.get(key) != new_config.get(key):
            changes.append(f"data.{key}: {old_config.get(key)!r} -> {new_config.get(key)!r}")
    old_inputs = {i.get("path"): i for i in previous.get("inputs") or []}
    new_inputs = {i["path"]: i for i in inputs}
    for path in sorted(old_inputs.keys() | new_inputs.keys()):
        if path not in new_inputs:
            changes.append(f"{path} no longer read")
        elif path not in old_inputs:
            changes.append(f"{path} newly read")
        elif old_inputs[path] != new_inputs[path]:
            changes.append(
                f"{path} changed ({old_inputs[path].get('size')} -> {new_inputs[path]['size']} bytes)"
            )
    return changes


def _complete(out: Path, summary: dict[str, Any]) -> bool:
    return all(
        (out / s / "meta.json").exists() and (out / f"{s}.jsonl").exists() for s in summary.get("splits", [])
    )


def _clear(out: Path) -> None:
    # Only the names this command writes; anything else in the directory is left alone. The summary goes
    # first: a run killed after this leaves split files without one, which readers refuse (`check_finished`).
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        if (out / split / "meta.json").exists():
            shutil.rmtree(out / split)
        (out / f"{split}.jsonl").unlink(missing_ok=True)


def _token_stats(examples: list[Example]) -> dict[str, dict[str, float]]:
    lengths = {
        "prompt_with": [e.tokens.prompt_with.size for e in examples],
        "prompt_without": [e.tokens.prompt_without.size for e in examples],
        "target": [e.tokens.target.size for e in examples],
        "history_used": [e.history_used for e in examples],
    }
    out = {}
    for name, values in lengths.items():
        a = np.asarray(values, dtype=np.float64)
        out[name] = {
            "total": int(a.sum()),
            "min": int(a.min()),
            "mean": round(float(a.mean()), 2),
            "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)),
            "max": int(a.max()),
        }
    return out


def _empty_files(read: dict[str, int]) -> list[str]:
    """The files that held no record, from the rows read per file."""
    return [path for path, n in read.items() if n == 0]


def _nothing_left(log: IssueLog) -> str:
    """Why no example is left to prepare: every file read held no record (named), or else the counts of
    records dropped and skipped as invalid (`log`), each with the fix."""
    empty = _empty_files(log.read)
    if empty and len(empty) == len(log.read):
        files = f"{empty[0]} holds" if len(empty) == 1 else f"{', '.join(empty)} hold"
        return (
            f"no examples to prepare: {files} no records. Fix: point data.sources at files that hold records."
        )
    named = "".join(f"{path}: 0 records; " for path in empty)
    # Nothing is written, so the places of the skipped records are said here or nowhere.
    first = "".join(f"\n  first {reason}: {issues[0]}" for reason, issues in sorted(log.skipped.items()))
    fixes = []
    if log.errors:
        fixes.append("correct the sources (data.on_error: fail lists each invalid record)")
    if "missing_field" in log.errors:
        fixes.append("for fields a prompt template needs, choose another data.template (`plain` takes any)")
    fixes += [fix for reason, fix in _RECORD_DROPS.items() if reason in log.dropped]
    relaxable = [reason for reason in log.dropped if reason not in _RECORD_DROPS]
    if relaxable:
        fixes.append(
            f'relax the data.* settings behind {", ".join(relaxable)} (README\'s "Your own data" says what '
            "each drop means)"
        )
    return (
        f"no examples left to prepare: {named}errors {dict(log.errors)}, dropped {dict(log.dropped)}. Fix: "
        f"{'; or '.join(fixes)}.{first}"
    )


# Drops that no data.* setting relaxes (the records themselves decide), and what changes them.
_RECORD_DROPS = {
    "empty_history": "give the records histories (an example learns from what its user's history changes)",
    "duplicate": "remove the repeated records",
}


_PLACES_NAMED = 3  # places of a note's records named in its console warning; the summary keeps PLACES_KEPT


def _places(out: Path, summary: dict[str, Any], message: str, n: int) -> str:
    """Where the `n` records the note `message` counts are, for its warning: `: file:line, ...`, the first
    `_PLACES_NAMED` of those the summary keeps, and where the others are listed; empty when none is kept."""
    places = summary["note_places"].get(message, [])
    if not places:
        return ""
    text = ": " + ", ".join(places[:_PLACES_NAMED])
    if n > _PLACES_NAMED:
        more = f"the first {len(places)}" if n > len(places) else "all"
        text += f', ...; {more} in {out / SUMMARY_FILE} ("note_places")'
    return text


def _describe(out: Path, summary: dict[str, Any]) -> str:
    lines = [
        f"prepared {out}: "
        + ", ".join(f"{s} {counted(n, 'example')}" for s, n in summary["examples"].items())
    ]
    empty = _empty_files(summary["read"])
    if empty:
        lines.append(f"  warning: {', '.join(empty)}: 0 records")
    if summary["errors"]:
        lines.append(
            "  skipped invalid records: "
            + ", ".join(f"{k} {v}" for k, v in summary["errors"].items())
            + f" (the first of each below; the first {PLACES_KEPT} of each, file:line:field and why, in"
            f' {out / SUMMARY_FILE}, "skipped")'
        )
        lines += [
            f"    {reason}: {Issue(reason, **issues[0])}"
            for reason, issues in summary["skipped"].items()
            if issues
        ]
        if any(n > PLACES_KEPT for n in summary["errors"].values()):
            lines.append(
                "    (to list more: data.on_error: fail lists each invalid record, the first"
                " data.max_errors_shown, and prepares nothing)"
            )
    if summary["dropped"]:
        lines.append("  dropped: " + ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()))
    for message, n in summary["notes"].items():
        lines.append(f"  warning: {message} ({counted(n, 'record')}{_places(out, summary, message, n)})")
    cut = summary["fitting"]["prompts_cut"]
    if cut:
        lines.append(
            f"  warning: {cut} prompts longer than max_prompt_tokens even with one history entry were cut "
            "from the right (history_fit: public), losing their end, where the "
            f"{summary['template']} template puts what follows the history and the cue to answer"
        )
    cut = summary["fitting"]["targets_cut"]
    if cut:
        lines.append(
            f"  warning: {cut} targets longer than max_target_tokens were cut to that many tokens (the model "
            "learns only their start; `target_cut` marks them in <split>.jsonl)"
        )
    return "\n".join(lines)
