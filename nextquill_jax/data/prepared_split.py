"""Tokenised examples on disk, readable at random by index (what Grain's samplers need).

Layout of one split, `DIR/<split>/`:

    <field>.npy          every example's tokens of that field, concatenated           [total] int32
    <field>_offsets.npy  example i owns <field>[offsets[i]:offsets[i+1]]              [N + 1] int64
    reference_dce.npy    optional, float32, aligned with `target` (fixed data-side effects)
    meta.json            {"num_examples": N, "fields": [...], "checksums": {file: {size, blake2b}}, ...}

Beside it, `DIR/<split>.jsonl` holds the same examples rendered as text, line i for example i (before any
cut to the token limits; read back by `rendered_rows`).

Fields: `prompt_with`, `prompt_without`, `target` (target tokens including EOS), plus optional
`reference_dce`. Flat `.npy` arrays opened with `mmap_mode="r"` give O(1) random access with no extra
dependency and no per-record decoding; ArrayRecord would add a compressed-record layer that variable-length
int32 token arrays do not need.

`PreparedSplit` checks every array file against the checksums in meta.json when it opens the split (about
1 s per GB, once per open; `benchmarks/RESULTS.md`, "Checksums"), so a corrupted file stops the run with its
name instead of training on changed tokens. It then checks that the files agree with each other (the layout
above: shapes, dtypes, offsets against `num_examples` and their arrays), since files changed together with
their checksums (or meta.json itself, which no checksum covers) would otherwise train on misaligned or
missing examples, or fail later with an error that names no file.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nextquill_jax.data import checksums
from nextquill_jax.data.config import SPLITS
from nextquill_jax.plural import counted

TOKEN_FIELDS = ("prompt_with", "prompt_without", "target")
SUMMARY_FILE = "summary.json"  # `data prepare`'s counts, written last: the mark of a finished preparation


@dataclass(frozen=True)
class TokenizedExample:
    """One example as token ids. `reference_dce`, when given, has one value per target token."""

    prompt_with: np.ndarray  # [P_w] int32
    prompt_without: np.ndarray  # [P_o] int32
    target: np.ndarray  # [L] int32, ends with EOS unless cut
    reference_dce: np.ndarray | None = None  # [L] float32


def write_split(out_dir: str | Path, split: str, examples: Iterable[TokenizedExample], **meta) -> int:
    """Write `examples` as split `split` under `out_dir`; returns the number written.

    Raises:
        ValueError: if some examples carry `reference_dce` and others do not, or its length differs from
            the target's.
    """
    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    chunks: dict[str, list[np.ndarray]] = {f: [] for f in (*TOKEN_FIELDS, "reference_dce")}
    has_dce: bool | None = None
    count = 0
    for i, ex in enumerate(examples):
        ex_has_dce = ex.reference_dce is not None
        if has_dce is None:
            has_dce = ex_has_dce
        if ex_has_dce != has_dce:
            raise ValueError(
                f"{split}: example {i} {'has' if ex_has_dce else 'lacks'} reference_dce, unlike example 0"
            )
        for field in TOKEN_FIELDS:
            chunks[field].append(np.asarray(getattr(ex, field), dtype=np.int32))
        if ex_has_dce:
            dce = np.asarray(ex.reference_dce, dtype=np.float32)
            if dce.shape != ex.target.shape:
                raise ValueError(
                    f"{split}: example {i} reference_dce {dce.shape} != target {ex.target.shape}"
                )
            chunks["reference_dce"].append(dce)
        count += 1
    fields = list(TOKEN_FIELDS) + (["reference_dce"] if has_dce else [])
    for field in fields:
        parts = chunks[field]
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        dtype = np.float32 if field == "reference_dce" else np.int32
        flat = np.concatenate(parts).astype(dtype) if parts else np.zeros((0,), dtype)
        np.save(split_dir / f"{field}.npy", flat)
        np.save(split_dir / f"{field}_offsets.npy", offsets)
    files = checksums.manifest(split_dir, [f"{f}{suffix}.npy" for f in fields for suffix in ("", "_offsets")])
    (split_dir / "meta.json").write_text(
        json.dumps({"num_examples": count, "fields": fields, **meta, "checksums": files}, indent=1)
    )
    return count


def prepared_splits(data_dir: str | Path) -> list[str]:
    """The splits `data_dir` holds (those with a meta.json), in `SPLITS` order."""
    return [s for s in SPLITS if (Path(data_dir) / s / "meta.json").is_file()]


def check_finished(data_dir: str | Path, named: str = "") -> None:
    """`data_dir` is not a `data prepare` that stopped part way: when it holds a split readers would take
    (`prepared_splits`), it holds summary.json, which `data prepare` writes last and removes first. `named`
    (such as `--data`) says where `data_dir` came from. A directory holding no split is left to
    `check_split`, which names the command that prepares it.

    Raises:
        FileNotFoundError: prepared splits without summary.json, naming the splits and the fix (prepare it
            again).
    """
    data_dir = Path(data_dir)
    held = prepared_splits(data_dir)
    if held and not (data_dir / SUMMARY_FILE).is_file():
        raise FileNotFoundError(
            f"{f'{named} ' if named else ''}{data_dir} was not finished (no {SUMMARY_FILE}; it holds the "
            f"{', '.join(held)} token arrays): an interrupted `data prepare`? Its data may be partial or "
            f"missing. Fix: run `nextquill-jax data prepare --config FILE --out {data_dir}` again."
        )


def check_split(data_dir: str | Path, split: str, named: str = "", *, other_split: bool = True) -> None:
    """`data_dir` holds prepared split `split`. `named` (such as `--data`) says where `data_dir` came from;
    `other_split`: the command has a --split option, which the fix then offers.

    Raises:
        FileNotFoundError: the split's meta.json is missing: when `data_dir` was prepared (it holds
            summary.json or other splits), its preparation had no example of that split (naming the splits
            it holds, and the fix: another --split, or records of that split in the sources); otherwise the
            command that prepares it.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / split / "meta.json"
    if meta_path.is_file():
        return
    held = prepared_splits(data_dir)
    if not held and not (data_dir / SUMMARY_FILE).is_file():
        raise FileNotFoundError(
            f"{f'{named} {data_dir}: ' if named else ''}{meta_path} not found: run "
            f"`nextquill-jax data prepare --config FILE --out {data_dir}` first"
        )
    if recorded := _recorded_examples(data_dir, split):  # prepared, then deleted or moved by hand
        raise FileNotFoundError(
            f"{f'{named} ' if named else ''}{data_dir} lacks its prepared {split!r} split: its "
            f"{SUMMARY_FILE} records {counted(recorded, f'{split} example')}, but {meta_path} is missing "
            f"(deleted or moved?). Fix: run `nextquill-jax data prepare --config FILE --out {data_dir}` "
            f"again."
        )
    # `prepare` writes no split without examples: preparing again from the same records would not help.
    fixes = [f"pass --split {' or '.join(held)}"] if other_split and held else []
    fixes.append(f"add records of the {split!r} split to data.sources and prepare again")
    raise FileNotFoundError(
        f"{f'{named} ' if named else ''}{data_dir} holds no prepared {split!r} split: no {split!r} example"
        f" was prepared there ({meta_path} not found; it holds {', '.join(held) or 'none'}). Fix:"
        f" {', or '.join(fixes)}."
    )


def check_prepared(data_dir: str | Path, split: str, named: str) -> None:
    """Before a model is loaded (`evaluate`, `effects`): `data_dir` holds prepared split `split` of a finished
    preparation. `named` says where `data_dir` came from: "--data", or a run's own data (such as
    "runs/x's data"), whose fix is --data with the data prepared again.

    Raises:
        FileNotFoundError: `data_dir` is missing, not a directory, an interrupted preparation
            (`check_finished`), or lacks the split (`check_split`), with the fix.
    """
    data_dir = Path(data_dir)
    prepare = (
        "Fix: pass --data with a directory that `nextquill-jax data prepare --config FILE --out DIR` wrote"
    )
    if named != "--data":  # the run's own data, moved or deleted: --data replaces it
        prepare += " (the run's data prepared again, e.g. with its config.yaml)"
    if not data_dir.is_dir():
        state = "is not a directory" if data_dir.exists() else "does not exist"
        raise FileNotFoundError(f"{named} {data_dir} {state}. {prepare}.")
    check_finished(data_dir, named)
    check_split(data_dir, split, named)


def _recorded_examples(data_dir: Path, split: str) -> int:
    """The examples of `split` that the summary.json in `data_dir` says were prepared (0 where it cannot be
    read or records none)."""
    try:
        count = json.loads((data_dir / SUMMARY_FILE).read_text(encoding="utf-8"))["examples"][split]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


class PreparedSplit:
    """Random-access reader of one split written by `write_split`; `split[i]` is a dict of arrays.

    Every array file is checked against the checksums meta.json holds before it is read, then the files
    against each other (`_layout_problems`: the offsets and the arrays' headers, no token).

    Raises:
        FileNotFoundError: the split is missing, with the fix (`check_split`).
        checksums.IntegrityError: a meta.json that cannot be read as JSON or lacks its keys
            (`num_examples`, `fields`, `checksums` listing every array file), or without checksums at all
            (written before they existed); an array file that is missing, has another size or checksum than
            meta.json says, cannot be read as .npy, or disagrees with the layout of the module docstring
            (naming the files); the fix is to prepare the data again.
    """

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.dir = Path(data_dir) / split
        meta_path = self.dir / "meta.json"
        check_split(data_dir, split)
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: json.JSONDecodeError, UnicodeDecodeError
            raise self._damaged([f"{meta_path} cannot be read ({e})"]) from None
        if isinstance(self.meta, dict) and "checksums" not in self.meta:
            raise checksums.IntegrityError(
                f"{meta_path} lists no checksums (prepared by an older version). {self.prepare_again}"
            )
        if found := _meta_problems(self.meta, meta_path):
            raise self._damaged(found)
        if found := checksums.problems(self.dir, self.meta["checksums"]):
            raise self._damaged(found)
        self.fields: list[str] = self.meta["fields"]
        self._flat = {f: self._load(f"{f}.npy", mmap=True) for f in self.fields}
        self._offsets = {f: self._load(f"{f}_offsets.npy") for f in self.fields}
        if found := _layout_problems(self.dir, len(self), self._flat, self._offsets):
            raise self._damaged(found)

    @property
    def prepare_again(self) -> str:
        """The fix for a split its writer would never have written: prepare its data directory again."""
        command = f"nextquill-jax data prepare --config FILE --out {self.dir.parent} --force"
        return f"Fix: prepare it again (`{command}`)."

    def _damaged(self, problems: list[str]) -> checksums.IntegrityError:
        """The error for `problems` of this split (each naming its file), with the fix."""
        return checksums.IntegrityError(
            f"prepared split {self.dir} is damaged: {'; '.join(problems)}. {self.prepare_again}"
        )

    def _load(self, name: str, *, mmap: bool = False) -> np.ndarray:
        """Array file `name` of the split (memory-mapped with `mmap`).

        Raises:
            checksums.IntegrityError: numpy cannot read it (not an .npy, pickled objects, shorter than its
                header says), naming the file, which numpy's own message does not.
        """
        path = self.dir / name
        try:
            return np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as e:
            raise self._damaged([f"{path} cannot be read as a .npy array ({e})"]) from None

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside {self.dir} with {len(self)} examples")
        out = {}
        for f in self.fields:
            start, stop = self._offsets[f][index], self._offsets[f][index + 1]
            out[f] = np.asarray(self._flat[f][start:stop])
        return out

    @property
    def content_digest(self) -> str:
        """SHA-256 (hex) of the split's checksum manifest: two splits share it exactly when their array files
        have the same names, sizes and BLAKE2b hashes, wherever they lie (the manifest was checked against
        the files when the split was opened)."""
        return hashlib.sha256(json.dumps(self.meta["checksums"], sort_keys=True).encode()).hexdigest()

    @functools.cached_property
    def token_id_range(self) -> tuple[int, int] | None:
        """(smallest, largest) token id in the split's token fields (prompts and targets), None when it holds
        none.

        Vectorised passes over each memory-mapped array, computed on first use (the checksums read every
        file already when the split was opened), so data prepared before anything recorded it is covered.
        """
        held = [self._flat[f] for f in TOKEN_FIELDS if self._flat[f].size]
        if not held:
            return None
        return min(int(a.min()) for a in held), max(int(a.max()) for a in held)

    def lengths(self, field: str) -> np.ndarray:
        """Token count of `field` for every example, [N] int64."""
        return np.diff(self._offsets[field])


def _meta_problems(meta: object, meta_path: Path) -> list[str]:
    """What `meta` (a split's meta.json, read) lacks of what `write_split` writes; [] when nothing."""
    if not isinstance(meta, dict):
        return [f"{meta_path} holds {type(meta).__name__}, not an object"]
    found = []
    count = meta.get("num_examples")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        found.append(f"{meta_path}: num_examples is {count!r}, not an integer >= 0")
    fields = meta.get("fields")
    allowed = [[*TOKEN_FIELDS], [*TOKEN_FIELDS, "reference_dce"]]
    if fields not in allowed:
        found.append(f"{meta_path}: fields is {fields!r}, not {allowed[0]} with or without 'reference_dce'")
    listed = meta["checksums"]
    valid = isinstance(listed, dict) and all(
        isinstance(entry, dict) and {"size", "blake2b"} <= entry.keys() for entry in listed.values()
    )
    if not valid:
        found.append(f"{meta_path}: checksums is not a map of file names to their size and blake2b")
    elif fields in allowed:
        # checksums.problems checks only the files listed: one left out would be read unchecked.
        unlisted = [n for f in fields for n in (f"{f}.npy", f"{f}_offsets.npy") if n not in listed]
        if unlisted:
            found.append(f"{meta_path}: checksums lists no {', '.join(unlisted)}")
    return found


def _layout_problems(
    split_dir: Path, count: int, flat: dict[str, np.ndarray], offsets: dict[str, np.ndarray]
) -> list[str]:
    """How the arrays of a split of `count` examples (meta.json's `num_examples`) differ from the layout
    `write_split` writes (module docstring); [] when they agree. Reads the offsets (N + 1 numbers each) and
    the other arrays' headers only."""
    lengths = {len(o) for o in offsets.values() if o.ndim == 1}
    # Offsets files that agree with each other on another count than meta.json's: meta.json is the one named.
    other_count = len(lengths) == 1 and lengths != {count + 1}
    found = []
    if other_count:
        found.append(
            f"{split_dir / 'meta.json'}: num_examples is {count}, but the offsets files hold "
            f"{counted(lengths.pop() - 1, 'example')}"
        )
    for field, array in flat.items():
        path, offsets_path = split_dir / f"{field}.npy", split_dir / f"{field}_offsets.npy"
        dtype = np.float32 if field == "reference_dce" else np.int32
        if array.ndim != 1 or array.dtype != dtype:
            found.append(f"{path} is {array.ndim}-D {array.dtype}, not 1-D {np.dtype(dtype)}")
            continue
        bounds = offsets[field]
        if bounds.ndim != 1 or not np.issubdtype(bounds.dtype, np.integer):
            found.append(f"{offsets_path} is {bounds.ndim}-D {bounds.dtype}, not 1-D integers")
            continue
        if len(bounds) != count + 1:
            if not other_count:
                found.append(
                    f"{offsets_path} holds {len(bounds)} offsets, not num_examples + 1 = {count + 1}"
                )
            continue
        wrong = [f"starts at {bounds[0]}, not 0"] if bounds[0] != 0 else []
        if bounds[-1] != len(array):
            wrong.append(f"ends at {bounds[-1]}, not {len(array)} (the length of {path.name})")
        if falls := int((np.diff(bounds) < 0).sum()):
            wrong.append(f"falls {counted(falls, 'time')}, where it must not")
        if wrong:
            found.append(f"{offsets_path} {', '.join(wrong)}")
    # Compared only when every file is right on its own (else those problems are what to name).
    if (
        "reference_dce" in offsets
        and not found
        and not np.array_equal(offsets["reference_dce"], offsets["target"])
    ):
        found.append(f"{split_dir / 'reference_dce_offsets.npy'} differs from target_offsets.npy")
    return found


def rendered_rows(data_dir: str | Path, split: str, indices: Sequence[int] | None = None) -> list[dict]:
    """Lines `indices` (None: all) of `<data_dir>/<split>.jsonl`, the rendered examples, in that order.

    Raises:
        FileNotFoundError: the file is missing (naming the command that writes it).
        ValueError: a line's `index` is not its position, or an index beyond the file's last line.
    """
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: prepare the data with `nextquill-jax data prepare`")
    wanted = None if indices is None else set(indices)
    rows: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if (wanted is None or line_no in wanted) and line.strip():
                row = json.loads(line)
                if row.get("index") != line_no:
                    raise ValueError(f"{path}:{line_no + 1}: index {row.get('index')!r}, expected {line_no}")
                rows[line_no] = row
    if indices is None:
        return list(rows.values())
    missing = sorted(set(indices) - set(rows))
    if missing:
        raise ValueError(f"{path} has no example {missing[0]} (it holds {len(rows)} of those asked for)")
    return [rows[i] for i in indices]
