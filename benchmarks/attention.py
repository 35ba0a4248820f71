"""Blockwise attention (`attention_impl: xla`) against the dense mask path (`xla_dense`): value and gradient.

Both compute causal grouped-query attention within segments; the benchmark differentiates the sum of squares
of the output at real tokens with respect to q, k and v. Rows hold `--examples` packed examples of equal
length, the last 1/16 of each row padding (one example = a padded row). Memory is the compiled function's
temporary buffers (`memory_analysis()`); time is the best of `--repeats` alternating runs after a warm-up.
The outputs of both paths are compared before timing.

    python benchmarks/attention.py                                    # B 4, T 2,048, 14 heads (2 kv), Hd 64
    python benchmarks/attention.py --seq-len 512 --blocks 64 128 --examples 1
    python benchmarks/attention.py --append-results benchmarks/RESULTS.md

Exits 1 if a blockwise output differs from the dense one by more than 1e-4 (relative to the largest entry).
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
from nextquill_jax.models.attention import attention_mask, xla_attention
from nextquill_jax.models.blockwise_attention import blockwise_attention
from nextquill_jax.subcommand import positive_int

MIB = 2**20


def segment_ids(batch: int, seq_len: int, examples: int) -> np.ndarray:
    """[B, T] int32: `examples` equal segments 1..n over the first 15/16 of each row, then padding (0)."""
    real = seq_len - seq_len // 16
    ids = np.zeros((batch, seq_len), np.int32)
    ids[:, :real] = 1 + np.arange(real) * examples // real
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--seq-len", type=positive_int, default=2048)
    parser.add_argument("--heads", type=positive_int, default=14)
    parser.add_argument("--kv-heads", type=positive_int, default=2)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--examples", type=positive_int, default=2, help="packed examples per row")
    parser.add_argument("--blocks", type=positive_int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--append-results", type=results_file, help="append a markdown section to this file")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")

    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq_len
    q = jnp.asarray(rng.standard_normal((b, t, args.heads, args.head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, args.kv_heads, args.head_dim)), jnp.float32) for _ in "kv")
    seg = jnp.asarray(segment_ids(b, t, args.examples))
    real = (seg > 0)[:, :, None, None]
    slots = jnp.arange(t)

    def dense(q, k, v):
        return xla_attention(q, k, v, attention_mask(seg, seg, slots, slots))

    paths = {"dense (xla_dense)": dense}
    for block in args.blocks:
        blockwise = functools.partial(blockwise_attention, segment_ids=seg, block=block)
        paths[f"blockwise, block {block}"] = blockwise

    compiled, outputs = {}, {}
    for name, attend in paths.items():
        loss = lambda q, k, v, attend=attend: jnp.sum(jnp.where(real, attend(q, k, v), 0.0) ** 2)
        compiled[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        outputs[name] = np.where(np.asarray(real), np.asarray(jax.jit(attend)(q, k, v)), 0.0)
    reference = outputs["dense (xla_dense)"]
    errors = {n: float(np.abs(o - reference).max() / np.abs(reference).max()) for n, o in outputs.items()}

    calls = {name: functools.partial(f, q, k, v) for name, f in compiled.items()}
    best = alternating_best_seconds(calls, rounds=args.repeats)

    dense_name = "dense (xla_dense)"
    lines = [
        f"## Attention: blockwise vs dense, value and gradient ({datetime.date.today().isoformat()})",
        "",
        f"- command: `python {shlex.join(['benchmarks/attention.py', *sys.argv[1:]])}`",
        f"- machine: {platform.node()} ({platform.machine()}), backend {jax.default_backend()}, device "
        f"{jax.devices()[0].device_kind}; jax {jax.__version__}, python {platform.python_version()}",
        f"- B {b}, T {t:,}, {args.heads} heads ({args.kv_heads} kv), head dim {args.head_dim}, float32; "
        f"{args.examples} packed example(s) per row, last {t // 16} slots padding; best of {args.repeats} "
        "alternating runs after a warm-up; temp = compiled temporary buffers",
        "",
        "| path | temp MiB | temp / dense | best s | time / dense | max rel. diff vs dense |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    dense_temp = compiled[dense_name].memory_analysis().temp_size_in_bytes
    for name, f in compiled.items():
        temp = f.memory_analysis().temp_size_in_bytes
        lines.append(
            f"| {name} | {temp / MIB:,.1f} | {temp / dense_temp:.3f} | {best[name]:.3f} | "
            f"{best[name] / best[dense_name]:.3f} | {errors[name]:.1e} |"
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.append_results:
        with open(args.append_results, "a", encoding="utf-8") as out:
            out.write("\n" + text + "\n")
    return 1 if max(errors.values()) > 1e-4 else 0


if __name__ == "__main__":
    raise SystemExit(main())
