"""`nextquill-jax data`: prepare, inspect or synthesise data.

    nextquill-jax data prepare --config FILE --out DIR [--force] [data.key=value ...]
    nextquill-jax data show DIR --index I [--split train|val|test]
    nextquill-jax data synth --out DIR --users N [--seed S] [--items N] [--reviews-per-user N]
                             [--targets-per-user N] [--signature-words N]

`prepare` reads the `data:` section of FILE (or the whole file when it has no `data:` key but keys of one),
with `data.*` overrides applied as `train` applies its own, and its relative paths joined to the current
directory as `train` joins them (`config_paths.absolute_data_paths`), so that summary.json records them
absolute.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from nextquill_jax import third_party_logs
from nextquill_jax.data.config import SPLITS, DataConfig
from nextquill_jax.plural import counted
from nextquill_jax.subcommand import (
    OVERRIDES,
    Subcommand,
    add_action,
    directory,
    error_line,
    non_negative_int,
    positive_int,
)


@dataclass(frozen=True)
class _DataFile:
    """What `data prepare`'s overrides are checked against: a file holding only the data section."""

    data: DataConfig


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """`data`'s actions (`prepare`, `show`, `synth`) and their flags."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = add_action(
        sub, "prepare", "tokenise the configured sources into DIR (reused when up to date)",
        "nextquill-jax data prepare --config configs/tiny_synthetic.yaml --out data/prepared/tiny",
    )  # fmt: skip
    p.add_argument("--config", required=True, type=Path, help="YAML file with a `data:` section")
    p.add_argument("--out", required=True, type=directory, metavar="DIR", help="output directory")
    p.add_argument("--force", action="store_true", help="prepare again even when DIR is up to date")
    p.add_argument(
        OVERRIDES, nargs="*", metavar="data.key=value",
        help="overrides of the data section, e.g. 'data.sources=[mine.jsonl]' data.template=plain",
    )  # fmt: skip
    s = add_action(
        sub, "show", "print one prepared example: both prompts, the target, token counts",
        "nextquill-jax data show data/prepared/tiny --index 0 --split val",
    )  # fmt: skip
    s.add_argument("dir", type=Path, help="a directory written by `data prepare`")
    s.add_argument(
        "--index", required=True, type=non_negative_int, help="example index within the split (from 0)"
    )
    s.add_argument("--split", default="train", choices=SPLITS)
    g = add_action(
        sub, "synth", "write the synthetic benchmark (generic JSONL with ground-truth roles)",
        "nextquill-jax data synth --out data/synthetic --users 40 --seed 0",
    )  # fmt: skip
    g.add_argument("--out", required=True, type=directory, help="output directory")
    g.add_argument("--users", required=True, type=positive_int, help="synthetic users to generate")
    g.add_argument(
        "--seed", type=non_negative_int, default=0, help="random seed (the same seed writes the same records)"
    )
    g.add_argument(
        "--items", type=positive_int, default=None, help="catalogue size (default: from the other sizes)"
    )
    g.add_argument(
        "--reviews-per-user", type=positive_int, default=12, help="reviews of each user, oldest first"
    )
    g.add_argument(
        "--targets-per-user",
        type=positive_int,
        default=6,
        help="each user's last reviews that become examples (all but the last two train, then one val, one "
        "test; >= 3)",
    )
    g.add_argument(
        "--signature-words", type=positive_int, default=3, help="words each user's reviews habitually use"
    )


def run_data(args: argparse.Namespace) -> int:
    """Run `data`'s action; a bad config or record is one `error:` line and status 1."""
    try:
        if args.data_command == "prepare":
            return _prepare(args)
        if args.data_command == "show":
            return _show(args)
        return _synth(args)
    except (ValueError, TypeError, IndexError) as e:
        print(error_line(e), file=sys.stderr)
        return 1


def _prepare(args: argparse.Namespace) -> int:
    from nextquill_jax.config_paths import absolute_data_paths
    from nextquill_jax.config_schema import (
        ConfigError,
        build_with_overrides,
        check_not_command_file,
        read_yaml,
        with_line,
    )
    from nextquill_jax.data.prepare import prepare

    third_party_logs.log_to(args.out, named="--out")
    raw = read_yaml(args.config)
    check_not_command_file(raw, str(args.config), "a file with a `data:` section")
    if isinstance(raw, dict):
        _check_has_data(raw, args.config)
        _check_no_dotted_data_keys(raw, args.config)
    section = raw.get("data", raw) if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{args.config}: expected a mapping with a `data:` section")
    try:
        cfg = build_with_overrides(_DataFile, {"data": section}, str(args.config), args.overrides).data
    except ConfigError as e:
        raise with_line(e, args.config, under="" if section is raw.get("data") else "data") from None
    prepare(absolute_data_paths(cfg, Path.cwd()), args.out, force=args.force)
    return 0


def _check_has_data(raw: dict, path: Path) -> None:
    """Refuse a file with no `data` key that is no bare data section either (none of its keys is a data key):
    its keys would be reported as unknown keys `data.KEY`, not as the missing section.

    Raises:
        ConfigError: naming a key that is near `data` (`Data:`), else the file's keys.
    """
    from nextquill_jax.config_schema import ConfigError

    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    if "data" in raw or data_keys & set(raw):
        return
    for key in raw:
        if difflib.get_close_matches(str(key).lower(), ["data"], n=1, cutoff=0.75):
            raise ConfigError(
                f"{path}: unknown top-level section `{key}`. Did you mean `data`? Fix: rename it `data`."
            )
    found = f"its top-level keys: {', '.join(map(str, raw))}" if raw else "it is empty"
    raise ConfigError(
        f"{path} has no `data` section ({found}). Fix: add one (its keys: configs/REFERENCE.md), or pass a "
        "config that has one."
    )


def _check_no_dotted_data_keys(raw: dict, path: Path) -> None:
    """Refuse a top-level key `data.KEY` (a command-line override's spelling written into the file): YAML
    reads it as one key, not as `KEY` under `data:`, and this command reads only the `data` section of a
    training config, so it would be ignored without a word (`train` refuses it as an unknown key).

    Raises:
        ConfigError: naming the file, the key's line and the nesting that means it.
    """
    from nextquill_jax.config_schema import ConfigError, key_lines

    for key in raw:
        if str(key).startswith("data."):
            line = key_lines(path).get(str(key))
            where = f"{path}, line {line}" if line else str(path)
            inner = str(key).removeprefix("data.")
            raise ConfigError(
                f"{where}: top-level key `{key}` is one YAML key, not `{inner}` in the data section, so it "
                f"would be ignored. Fix: write it under `data:` as `{inner}: {raw[key]}`."
            )


def _show(args: argparse.Namespace) -> int:
    from nextquill_jax.data.prepared_split import PreparedSplit, check_finished

    check_finished(args.dir)
    split = PreparedSplit(args.dir, args.split)
    if args.index >= len(split):
        raise IndexError(
            f"--index {args.index}: {args.dir} holds {len(split)} {args.split} example(s). Fix: pass an "
            f"index from 0 to {len(split) - 1}."
        )
    tokens = split[args.index]
    row = _jsonl_row(args.dir / f"{args.split}.jsonl", args.index)
    lines = [
        f"example {args.index} of {args.split} ({counted(len(split), 'example')}) | user {row['user_id']}"
        f" | category {row['category'] or '-'} | id {row['id'] or '-'}",
        f"source: {row['source']}",
        f"history: {row['history_used']} of {row['history_available']} entries used"
        f" ({row['history_dropped_for_length']} dropped to fit the prompt limit)",
        f"tokens: prompt with history {tokens['prompt_with'].size}, prompt without history"
        f" {tokens['prompt_without'].size}, target {tokens['target'].size} (with EOS"
        f"{', cut' if row['target_cut'] else ''})",
    ]
    for title, text in (
        ("prompt with history", row["prompt_with_history"]),
        ("prompt without history", row["prompt_without_history"]),
        ("target", row["target"]),
    ):
        lines += [f"----- {title} -----", text.rstrip("\n")]
    if row.get("meta"):
        lines += ["----- meta -----", json.dumps(row["meta"], ensure_ascii=False)]
    print("\n".join(lines))
    return 0


def _jsonl_row(path: Path, index: int) -> dict:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i == index:
                return json.loads(line)
    raise IndexError(f"{path} has no example {index}")


def _synth(args: argparse.Namespace) -> int:
    from nextquill_jax.data.sources.synth import generate_synthetic
    from nextquill_jax.output_dir import check_output_dir

    check_output_dir(args.out, "--out")
    manifest = generate_synthetic(
        args.out,
        users=args.users,
        seed=args.seed,
        items=args.items,
        reviews_per_user=args.reviews_per_user,
        targets_per_user=args.targets_per_user,
        signature_words=args.signature_words,
    )
    counts = ", ".join(f"{s} {n}" for s, n in manifest["records"].items())
    print(f"wrote {args.out / 'synthetic.jsonl'}: {counts} records ({counted(manifest['users'], 'user')})")
    return 0


COMMANDS = {
    "data": Subcommand(
        "prepare, inspect or synthesise data",
        add_data_arguments,
        run_data,
        "nextquill-jax data prepare --config configs/tiny_synthetic.yaml --out data/prepared/tiny",
    )
}
