"""Padding efficiency (real tokens / token slots) of the batch pipeline on the synthetic benchmark, against
the public code's fixed padding of every sequence to 4,097 tokens.

The synthetic data is generated (`data.sources.synth`), prepared with the built-in `review` template (the
public code's prompt layout) and a real tokenizer (`data.prepare`), then planned by `BatchPipeline` in pack,
bucket and random mode (random: the public code's uniform batches, each padded to its longest example; the
`shapes` column counts the distinct batch shapes, the programs a run compiles). Efficiency counts both
streams (with and without history); the per-stream values and the use of the response slots are printed
too. The public code pads each of the two sequences of an example to 4,097
tokens, so its efficiency is sum(L_with + L_without) / (2 * 4,097 * examples). Also timed: building one epoch
of batches.

    python benchmarks/padding.py                                   # 800 users (3,200 training examples)
    python benchmarks/padding.py --seq-len 2048 4096 --rows-per-batch 8 --tokenizer qwen2.5
    python benchmarks/padding.py --max-history 4 --seq-len 1024 2048 --check-seq-len 1024
    python benchmarks/padding.py --append-results benchmarks/RESULTS.md

Exits with status 1 if packing at `--check-seq-len` (default: the smallest `--seq-len`) stays below
`--min-efficiency` (default 0.90); with status 2 (argparse's) if a `--seq-len` is below the data's longest
example, which fits no row.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import grain
import numpy as np

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.harness import synthetic_train_split
from nextquill_jax.bench.record import results_file
from nextquill_jax.data.config import BatchingConfig
from nextquill_jax.data.pipeline import BatchPipeline
from nextquill_jax.data.prepared_split import PreparedSplit
from nextquill_jax.subcommand import non_negative_int, positive_int

PUBLIC_PAD = 4097


def public_efficiency(split: PreparedSplit) -> float:
    """Both sequences of every example left-padded to 4,097 tokens (the public code)."""
    target = split.lengths("target")
    real = (split.lengths("prompt_with") + target + split.lengths("prompt_without") + target).sum()
    return float(real) / (2 * PUBLIC_PAD * len(split))


def pipeline_row(split: PreparedSplit, cfg: BatchingConfig) -> dict:
    start = time.perf_counter()
    pipe = BatchPipeline(split, cfg, process_index=0, process_count=1)
    stats = pipe.epoch_stats(0)
    plan_s = time.perf_counter() - start
    start = time.perf_counter()
    batches = sum(1 for _ in pipe)
    epoch_s = time.perf_counter() - start
    assert batches == stats.batches
    return {"shape": pipe.shapes[-1].as_tuple(), "stats": stats, "plan_s": plan_s, "epoch_s": epoch_s}


def too_short(split: PreparedSplit, seq_lens: list[int], length_multiple: int) -> str | None:
    """Why `split`'s longest example (prompt_with + target: the pipeline refuses an example whose target is
    not whole, `too_long: error`) fits no row of the smallest of `seq_lens`, naming a value that fits (the
    longest rounded up to `length_multiple`); None when it fits every one."""
    longest = int((split.lengths("prompt_with") + split.lengths("target")).max())
    if min(seq_lens) >= longest:
        return None
    fits = -(-longest // length_multiple) * length_multiple
    return (
        f"--seq-len {min(seq_lens)} is below the longest example of this data ({longest} with-stream tokens: "
        f"prompt_with + target), which would fit no row. Fix: pass --seq-len values of at least {longest}, "
        f"e.g. --seq-len {fits}, or lower --max-history."
    )


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=positive_int, default=800)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--tokenizer", default="qwen2.5")
    parser.add_argument(
        "--max-history", type=non_negative_int, default=8, help="data.max_history (history entries kept)"
    )
    parser.add_argument("--seq-len", type=positive_int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rows-per-batch", type=positive_int, default=8)
    parser.add_argument("--length-multiple", type=positive_int, default=128)
    parser.add_argument("--work-dir", type=Path, help="keep the generated and prepared data here")
    parser.add_argument("--check-seq-len", type=positive_int, help="one of --seq-len (default: the smallest)")
    parser.add_argument("--min-efficiency", type=float, default=0.90)
    parser.add_argument("--append-results", type=results_file, help="append a markdown section to this file")
    args = parser.parse_args(argv)
    if args.check_seq_len is None:
        args.check_seq_len = min(args.seq_len)
    elif args.check_seq_len not in args.seq_len:
        # Packing is measured only at --seq-len: the check would pass without checking anything.
        parser.error(
            f"--check-seq-len {args.check_seq_len} is not one of --seq-len {args.seq_len}, so nothing would "
            f"be checked. Fix: add {args.check_seq_len} to --seq-len, or pass one of them as --check-seq-len."
        )

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="padding_bench_"))
    split = synthetic_train_split(
        work / "prepared",
        users=args.users,
        seed=args.seed,
        tokenizer=args.tokenizer,
        max_history=args.max_history,
    )
    problem = too_short(split, args.seq_len, args.length_multiple)
    if problem:
        parser.error(problem)
    lengths = {f: split.lengths(f) for f in ("prompt_with", "prompt_without", "target")}

    def cfg(mode: str, seq_len: int) -> BatchingConfig:
        return BatchingConfig(
            mode=mode,
            seq_len_with=seq_len,
            rows_per_batch=args.rows_per_batch,
            length_multiple=args.length_multiple,
            num_epochs=1,
        )

    rows = [("pack", s, pipeline_row(split, cfg("pack", s))) for s in args.seq_len]
    rows.append(("bucket", max(args.seq_len), pipeline_row(split, cfg("bucket", max(args.seq_len)))))
    rows.append(("random", max(args.seq_len), pipeline_row(split, cfg("random", max(args.seq_len)))))
    public = public_efficiency(split)

    command = shlex.join(["benchmarks/padding.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"\n## Padding efficiency of the batch pipeline ({datetime.date.today().isoformat()})\n",
        f"- command: `python {command}`",
        f"- machine: {platform.node()} ({platform.machine()}), CPU only (no accelerator involved); python "
        f"{platform.python_version()}, numpy {np.__version__}, grain {grain.__version__}",
        f"- data: synthetic benchmark, {args.users} users, seed {args.seed}, `review` template, tokenizer "
        f"`{args.tokenizer}`, max_history {args.max_history}; {len(split):,} training examples; tokens per "
        "example (min / mean / max): "
        + "; ".join(f"{k} {v.min()} / {v.mean():.0f} / {v.max()}" for k, v in lengths.items()),
        f"- rows_per_batch {args.rows_per_batch} (one process), length_multiple {args.length_multiple}; "
        "efficiency = real tokens / token slots over both streams, one epoch\n",
        "| batching | row (T_w, T_o, R) | efficiency | with stream | without stream | response slots used "
        "| batches | shapes | plan s | epoch build s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, seq_len, row in rows:
        s = row["stats"]
        lines.append(
            f"| {mode} {seq_len} | {row['shape']} | {s.efficiency:.1%} | {s.efficiency_with:.1%} "
            f"| {s.efficiency_without:.1%} | {s.response_slot_use:.1%} | {s.batches} | {s.shapes} "
            f"| {row['plan_s']:.2f} "
            f"| {row['epoch_s']:.2f} |"
        )
    lines.append(
        f"| public code: every sequence padded to {PUBLIC_PAD:,} | ({PUBLIC_PAD}, {PUBLIC_PAD}, -) "
        f"| {public:.1%} | | | | {len(split)} | 1 | | |"
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append_results:
        with args.append_results.open("a") as f:
            f.write(text)
    checked = [r["stats"].efficiency for m, s, r in rows if m == "pack" and s == args.check_seq_len]
    if checked and checked[0] < args.min_efficiency:
        print(
            f"error: packing efficiency {checked[0]:.1%} < {args.min_efficiency:.0%} (--min-efficiency) at "
            f"seq_len {args.check_seq_len}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
