"""Memory (and optionally time) of the NextQuill loss with its gradient: fused LM head vs naive logits.

The naive path builds logits = hidden @ Wᵀ for both streams and calls `loss_from_logits`; the fused path calls
`loss_from_hidden`. Both are differentiated with respect to both hidden streams and W. Memory comes from XLA's
compiled memory analysis (`jax.jit(f).lower(...).compile().memory_analysis()`): nothing is allocated, so the
full Qwen vocabulary compiles on any machine. Timing (`--timing`) runs the compiled functions and excludes
compilation.

    python benchmarks/loss_memory.py                                   # V=151,936, D=1,024, 4,096 tokens
    python benchmarks/loss_memory.py --tokens 512 2048 8192            # other token counts
    python benchmarks/loss_memory.py --timing --vocab 32768 --hidden 512 --tokens 1024
    python benchmarks/loss_memory.py --append-results benchmarks/RESULTS.md
    python benchmarks/loss_memory.py --timing --dtype bfloat16 --operand-dtype bfloat16  # bf16 operands

Exits with status 1 if a fused/naive temporary-memory ratio exceeds `--max-ratio` (default 1/8) or, with
`--timing`, a fused/naive time ratio exceeds `--max-time-ratio` (default 1.5). Timing alternates the two
paths and keeps each one's best run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.harness import alternating_best_seconds
from nextquill_jax.bench.record import results_file
from nextquill_jax.loss import LossConfig, loss_from_hidden, loss_from_logits
from nextquill_jax.loss.config import VARIANTS
from nextquill_jax.loss.fused_head import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK, OPERAND_DTYPES
from nextquill_jax.subcommand import positive_int

MIB = 2**20


def build(path: str, cfg: LossConfig, layout: str, token_chunk: int, vocab_chunk: int, operand_dtype: str):
    """value_and_grad over (hidden_with, hidden_without, lm_head) of the naive or the fused loss."""

    def naive(hw, ho, w, labels):
        w_vd = w if layout == "vd" else w.T
        return loss_from_logits(hw @ w_vd.T, ho @ w_vd.T, labels, cfg)[0]

    def fused(hw, ho, w, labels):
        return loss_from_hidden(
            hw, ho, w, labels, cfg, head_layout=layout, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
            operand_dtype=operand_dtype,
        )[0]  # fmt: skip

    return jax.jit(jax.value_and_grad(naive if path == "naive" else fused, argnums=(0, 1, 2)))


def build_from_args(path: str, cfg: LossConfig, args: argparse.Namespace):
    """`build` with the command line's layout, tiling and operand dtype."""
    return build(path, cfg, args.layout, args.token_chunk, args.vocab_chunk, args.operand_dtype)


def shapes(tokens: int, vocab: int, hidden: int, layout: str, dtype: str):
    act = jax.ShapeDtypeStruct((1, tokens, hidden), jnp.dtype(dtype))
    head = jax.ShapeDtypeStruct((vocab, hidden) if layout == "vd" else (hidden, vocab), jnp.dtype(dtype))
    return act, act, head, jax.ShapeDtypeStruct((1, tokens), jnp.int32)


def memory_row(tokens: int, args, cfg: LossConfig) -> dict[str, float]:
    row: dict[str, float] = {"tokens": tokens}
    for path in ("naive", "fused"):
        specs = shapes(tokens, args.vocab, args.hidden, args.layout, args.dtype)
        compiled = build_from_args(path, cfg, args).lower(*specs).compile()
        analysis = compiled.memory_analysis()
        row[f"{path}_temp"] = analysis.temp_size_in_bytes / MIB
        row[f"{path}_args"] = analysis.argument_size_in_bytes / MIB
        row[f"{path}_out"] = analysis.output_size_in_bytes / MIB
    row["ratio"] = row["fused_temp"] / row["naive_temp"]
    return row


def timing_row(tokens: int, args, cfg: LossConfig) -> dict[str, float]:
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    hw = jnp.asarray(rng.normal(size=(1, tokens, args.hidden)), dtype)
    ho = hw + jnp.asarray(0.3 * rng.normal(size=hw.shape), dtype)
    w_shape = (args.vocab, args.hidden) if args.layout == "vd" else (args.hidden, args.vocab)
    w = jnp.asarray(rng.normal(size=w_shape) / np.sqrt(args.hidden), dtype)
    labels = jnp.asarray(rng.integers(0, args.vocab, size=(1, tokens)), jnp.int32)
    row: dict[str, float] = {"tokens": tokens}
    paths = {p: build_from_args(p, cfg, args) for p in ("naive", "fused")}
    calls = {path: functools.partial(f, hw, ho, w, labels) for path, f in paths.items()}
    best = alternating_best_seconds(calls, rounds=args.repeats)
    row.update({f"{path}_ms": 1e3 * t for path, t in best.items()})
    row["time_ratio"] = best["fused"] / best["naive"]
    return row


def _verdict(failing: list[str], bound: str) -> str:
    """'within BOUND at every size' or 'exceeds BOUND at N, M tokens'."""
    return f"exceeds {bound} at {', '.join(failing)} tokens" if failing else f"within {bound} at every size"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokens", type=positive_int, nargs="+", default=[4096], help="target tokens per batch"
    )
    parser.add_argument("--vocab", type=positive_int, default=151_936)
    parser.add_argument("--hidden", type=positive_int, default=1024)
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="nextquill")
    parser.add_argument("--layout", choices=("vd", "dv"), default="vd")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="of the hidden states and the head",
    )
    parser.add_argument("--token-chunk", type=positive_int, default=DEFAULT_TOKEN_CHUNK)
    parser.add_argument("--vocab-chunk", type=positive_int, default=DEFAULT_VOCAB_CHUNK)
    parser.add_argument(
        "--operand-dtype", choices=OPERAND_DTYPES, default="float32",
        help="operands of the fused path's with/without logits products (loss.operand_dtype)",
    )  # fmt: skip
    parser.add_argument(
        "--timing", action="store_true", help="also run and time both paths (no compile time)"
    )
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--max-ratio", type=float, default=1 / 8)
    parser.add_argument("--max-time-ratio", type=float, default=1.5, help="with --timing: fused/naive bound")
    parser.add_argument("--append-results", type=results_file, help="append a markdown section to this file")
    args = parser.parse_args(argv)
    cfg = LossConfig(variant=args.variant)

    lines = [
        f"## Fused LM-head loss: memory and time ({datetime.date.today().isoformat()})",
        "",
        f"- command: `python {shlex.join(['benchmarks/loss_memory.py', *sys.argv[1:]])}`",
        f"- machine: {platform.node()} ({platform.machine()}), backend {jax.default_backend()}, device "
        f"{jax.devices()[0].device_kind}; jax {jax.__version__}, python {platform.python_version()}",
        f"- variant {args.variant}, V={args.vocab:,}, D={args.hidden:,}, layout {args.layout}, {args.dtype}, "
        f"token_chunk={args.token_chunk}, vocab_chunk={args.vocab_chunk}, "
        f"fused operands {args.operand_dtype}; value and grad wrt both hidden streams and W; "
        "`memory_analysis()` of the compiled function, MiB",
        "",
        "| tokens | naive temp | fused temp | fused/naive | fused args | fused out |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    over = []
    for tokens in args.tokens:
        row = memory_row(tokens, args, cfg)
        if row["ratio"] > args.max_ratio:
            over.append(f"{tokens:,}")
        lines.append(
            f"| {tokens:,} | {row['naive_temp']:,.1f} | {row['fused_temp']:,.1f} | {row['ratio']:.4f} | "
            f"{row['fused_args']:,.1f} | {row['fused_out']:,.1f} |"
        )
        print(lines[-1], flush=True)
    slow = []
    if args.timing:
        lines += [
            "",
            f"Timing, best of {args.repeats} alternating runs after a warm-up (compile excluded):",
            "",
            "| tokens | naive ms | fused ms | fused/naive |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for tokens in args.tokens:
            row = timing_row(tokens, args, cfg)
            if row["time_ratio"] > args.max_time_ratio:
                slow.append(f"{tokens:,}")
            lines.append(
                f"| {tokens:,} | {row['naive_ms']:,.1f} | {row['fused_ms']:,.1f} | {row['time_ratio']:.2f} |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"Fused temporary memory: {_verdict(over, f'{args.max_ratio:.4g} of naive')}."]
    if args.timing:
        lines.append(f"Fused time: {_verdict(slow, f'{args.max_time_ratio:.4g}x naive')}.")
    lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.append_results:
        with args.append_results.open("a") as f:
            f.write("\n" + report)
    return 1 if over or slow else 0


if __name__ == "__main__":
    raise SystemExit(main())
