"""Prefill memory and time: the prompt through the configured attention (`CausalLM.prefill`) against the dense
prefill over the whole KV cache (`CausalLM.extend`, generation's only path before `prefill`).

For each model and prompt length P: `--batch` left-padded rows of random token ids (real lengths spread evenly
from P down to P/2; one row: P), positions from 0 at each row's first token, a cache of P + `--new-tokens`
slots, random weights (float32 parameters, `--compute-dtype` activations and cache). Both paths are jitted as
generation calls them (the cache made inside, last-token logits only). temp = XLA's compiled temporary
buffers (`memory_analysis()`), i.e. without the parameters and the output cache; time = best of `--repeats`
runs of the two paths in turn after a warm-up, compilation excluded. The two paths' last-token logits are
compared first.

    python benchmarks/prefill.py                  # CPU: Qwen2.5-0.5B shape with 2 layers, float32, B 1, xla
    PYTHONPATH=. python3 benchmarks/prefill.py --attention cudnn    # GPU: Qwen2.5-0.5B and 1.5B, bf16, B 8
    python benchmarks/prefill.py --append-results benchmarks/RESULTS.md

Defaults follow the backend: on a GPU or TPU, the full Qwen2.5-0.5B and 1.5B presets in bfloat16 with B 8 and
the backend's kernel (cudnn / splash); on CPU the 0.5B shape cut to 2 layers in float32 with B 1 and `xla`.
Exits 1 if the paths' last-token logits differ by more than `--tolerance` relative to the largest logit.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.record import results_file
from nextquill_jax.subcommand import non_negative_int, positive_int

MIB = 2**20
COLUMNS = (
    "| model | layers | compute | B × P (cache S) | path | temp MiB | temp / dense | best s | time / dense "
    "| max rel. Δ logits |"
)


def prompt_batch(batch: int, length: int, vocab: int, seed: int = 0):
    """ids, mask, positions [batch, length] int32: left-padded rows of random ids, real lengths from `length`
    down to length/2, positions from 0 at each row's first token (as generation builds them)."""
    import numpy as np

    from nextquill_jax.models.generate import left_pad

    rng = np.random.default_rng(seed)
    lengths = np.linspace(length, length // 2, batch).astype(int) if batch > 1 else [length]
    ids, mask = left_pad([rng.integers(1, vocab, n).tolist() for n in lengths], length, pad_token_id=0)
    return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def compile_path(graphdef, state, method: str, max_len: int, ids, positions, mask):
    """`CausalLM.<method>` ("prefill" or "extend") of the prompt batch, compiled as generation runs it: a
    cache of `max_len` slots made inside, last-token logits. Called as f(state, ids, positions, mask)."""
    import jax
    from flax import nnx

    def run(s, ids, positions, mask):
        model = nnx.merge(graphdef, s)
        cache = model.init_cache(len(ids), max_len)
        return getattr(model, method)(ids, cache, positions, mask, last_only=True)

    return jax.jit(run).lower(state, ids, positions, mask).compile()


def main(argv: list[str] | None = None) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from nextquill_jax.bench.harness import alternating_best_seconds
    from nextquill_jax.bench.record import append_results, invoked_command, results_header
    from nextquill_jax.models import CausalLM, model_preset
    from nextquill_jax.models.presets import PRESETS

    backend = jax.default_backend()
    accel = backend in ("gpu", "cuda", "rocm", "tpu")
    default_attention = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(backend, "xla")
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="presets (default: qwen2.5-0.5b qwen2.5-1.5b; CPU: 0.5b)")
    parser.add_argument(
        "--layers", type=positive_int, help="cut each preset to this many layers (CPU default: 2)"
    )
    parser.add_argument(
        "--lengths", type=positive_int, nargs="+", default=[2048, 4096], help="prompt slots P"
    )
    parser.add_argument("--batch", type=positive_int, default=8 if accel else 1)
    parser.add_argument(
        "--new-tokens", type=non_negative_int, default=512, help="cache slots after the prompt"
    )
    parser.add_argument("--compute-dtype", default="bfloat16" if accel else "float32")
    parser.add_argument("--attention", default=default_attention, help="ModelConfig.attention_impl")
    parser.add_argument("--repeats", type=positive_int, default=3 if accel else 2)
    parser.add_argument("--tolerance", type=float, help="default: 1e-4 in float32, 1e-1 in 16-bit")
    parser.add_argument("--append-results", type=results_file, help="append a Markdown section to this file")
    args = parser.parse_args(argv)
    models = args.models or (["qwen2.5-0.5b", "qwen2.5-1.5b"] if accel else ["qwen2.5-0.5b"])
    if unknown := [m for m in models if m.lower() not in PRESETS]:
        parser.error(f"--models: no preset {', '.join(unknown)}; known: {', '.join(sorted(PRESETS))}")
    layers = args.layers or (None if accel else 2)
    tolerance = (
        args.tolerance if args.tolerance is not None else (1e-4 if args.compute_dtype == "float32" else 1e-1)
    )

    separator = "|" + " --- |" * (COLUMNS.count("|") - 1)
    print(COLUMNS)
    print(separator, flush=True)
    rows, shapes, worst = [], [], 0.0
    for name in models:
        overrides = dict(compute_dtype=args.compute_dtype, attention_impl=args.attention)
        cfg = model_preset(name, **overrides, **({"num_layers": layers} if layers else {}))
        shapes.append(
            f"{name}: hidden {cfg.hidden_size}, {cfg.num_heads} heads ({cfg.num_kv_heads} kv) of "
            f"{cfg.head_dim}, mlp {cfg.intermediate_size}, vocab {cfg.vocab_size:,}, {cfg.num_layers} layers "
            f"(the preset has {model_preset(name).num_layers})"
        )
        graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
        new, dense = f"prefill ({args.attention})", "dense extend"
        paths = {new: "prefill", dense: "extend"}
        for length in args.lengths:
            # On the device before timing: the timed calls then move no input from the host.
            ids, mask, positions = map(jax.device_put, prompt_batch(args.batch, length, cfg.vocab_size))
            max_len = length + args.new_tokens
            compiled, logits, temp = {}, {}, {}
            for label, method in paths.items():
                compiled[label] = compile_path(graphdef, state, method, max_len, ids, positions, mask)
                temp[label] = compiled[label].memory_analysis().temp_size_in_bytes
                logits[label] = np.asarray(compiled[label](state, ids, positions, mask)[0], np.float32)
            inputs = (state, ids, positions, mask)
            calls = {label: functools.partial(f, *inputs) for label, f in compiled.items()}
            best = alternating_best_seconds(calls, rounds=args.repeats)
            diff = float(np.abs(logits[new] - logits[dense]).max() / np.abs(logits[dense]).max())
            worst = max(worst, diff)
            for label in paths:
                row = (
                    f"| {name} | {cfg.num_layers} | {args.compute_dtype} | {args.batch} × {length:,} "
                    f"({max_len:,}) | {label} | {temp[label] / MIB:,.1f} | {temp[label] / temp[dense]:.3f} "
                    f"| {best[label]:.3f} | {best[label] / best[dense]:.3f} | {diff:.1e} |"
                )
                print(row, flush=True)
                rows.append(row)
            del compiled
    if args.append_results:
        command = invoked_command(["python", "benchmarks/prefill.py"], argv)
        lines = results_header(
            "Prefill through the configured attention vs dense prefill over the cache",
            command,
            [
                f"random weights (float32 parameters); rows left-padded, real lengths from P down to P/2; "
                f"cache S = P + {args.new_tokens}; last-token logits only; best of {args.repeats} "
                "alternating runs after a warm-up",
                *shapes,
                "temp: XLA's compiled temporary buffers (memory_analysis), parameters and output cache "
                "excluded; max rel. Δ logits: prefill vs dense last-token logits, relative to the largest",
                f"1-minute load average when done: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
                "(times on a shared machine are as noisy as this says)",
            ],
        )
        append_results(args.append_results, [*lines, COLUMNS, separator, *rows])
    if worst > tolerance:
        print(f"prefill and dense logits differ by {worst:.1e} > tolerance {tolerance:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
