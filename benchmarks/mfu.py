"""Tokens/s and MFU of the full NextQuill training step for Qwen2.5-0.5B and 1.5B shapes (random weights).

The step is the project's real one (`train.step.make_train_step` via `bench.harness.TrainingHarness`):
with- and without-history forward passes, fused NextQuill loss (dynamic DCE), backward through both
passes, clipped AdamW. The batch: `--rows` rows of synthetic examples (random ids; prompt, history and
target lengths below), packed by the pipeline's first-fit packer into rows of `--seq-len` with-stream tokens.

Useful FLOPs per step (both forward passes and the backward pass, backward = 2 × forward):

    FLOPs = 6 · P · (N_w + N_o) + 12 · L · H · Hd · (A_w + A_o) + 6 · D · V · 2 · N_y

P: parameters other than the embedding and LM head; N_w, N_o: real tokens of the with- / without-history
streams; L layers, H query heads of size Hd; A = Σ_examples n(n+1)/2 causal query-key pairs within each
example (padding and cross-example pairs excluded); D hidden size, V vocabulary; N_y target tokens (the LM
head is needed only there, in both streams). Rematerialisation is not counted (it is not useful work).
MFU = FLOPs / best step time / (devices × the chip's dense bf16 peak), peak from
`bench.flops.PEAK_TFLOPS_BF16` or `--peak-tflops`.

    python benchmarks/mfu.py --steps 5                     # accelerator: qwen2.5-0.5b and qwen2.5-1.5b
    python benchmarks/mfu.py --models qwen2.5-1.5b --rows 2 --remat full
    python benchmarks/mfu.py                               # CPU: a tiny shape; FLOPs and tokens/s only

Prints one Markdown table row per model (and appends a section with `--append-results FILE`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TINY = {  # the CPU shape: Qwen2.5 layout, tiny sizes
    "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 192, "num_layers": 2, "num_heads": 4,
    "num_kv_heads": 2, "head_dim": 16,
}  # fmt: skip
COLUMNS = (
    "| device | model | compute | remat | attention | rows × (T_w, T_o, R) | tokens/step | step s | tokens/s "
    "| TFLOP/step | TFLOP/s | MFU | peak MiB | compile s |"
)


def main(argv: list[str] | None = None) -> int:
    import jax

    from nextquill_jax.bench.flops import param_counts, peak_tflops, step_flops
    from nextquill_jax.bench.harness import TrainingHarness, step_breakdown, synthetic_batch
    from nextquill_jax.bench.record import append_results, results_header
    from nextquill_jax.loss import LossConfig
    from nextquill_jax.loss.fused_head import OPERAND_DTYPES
    from nextquill_jax.models import model_preset
    from nextquill_jax.parallel import make_mesh

    accel = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
    default_attention = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "xla")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", help="presets (default: qwen2.5-0.5b qwen2.5-1.5b; CPU: tiny)")
    parser.add_argument("--rows", type=int, default=4 if accel else 2)
    parser.add_argument("--seq-len", type=int, default=4096 if accel else 512)
    parser.add_argument("--history", type=int, default=8 if accel else 2)
    parser.add_argument("--context-tokens", type=int, default=256 if accel else 64)
    parser.add_argument("--entry-tokens", type=int, default=192 if accel else 64)
    parser.add_argument("--target-tokens", type=int, default=160 if accel else 48)
    parser.add_argument("--compute-dtype", default="bfloat16" if accel else "float32")
    parser.add_argument("--remat", default="full" if accel else "none", help="ModelConfig.remat_policy")
    parser.add_argument("--attention", default=default_attention, help="ModelConfig.attention_impl")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument(
        "--operand-dtype", choices=OPERAND_DTYPES, default="float32",
        help="fused loss: operands of the with/without logits products (loss.operand_dtype)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="per-chip peak (default: by device kind)")
    parser.add_argument("--breakdown", action="store_true", help="also time the step's parts alone")
    parser.add_argument("--append-results", type=Path, help="append a Markdown section to this file")
    args = parser.parse_args(argv)
    models = args.models or (["qwen2.5-0.5b", "qwen2.5-1.5b"] if accel else ["tiny"])

    device_kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or peak_tflops(device_kind)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rows, breakdowns = [], []
    separator = "|" + " --- |" * (COLUMNS.count("|") - 1)
    print(COLUMNS)
    print(separator)
    for name in models:
        runtime = dict(
            param_dtype="float32", compute_dtype=args.compute_dtype, remat_policy=args.remat,
            attention_impl=args.attention,
        )  # fmt: skip
        if name == "tiny":
            cfg = model_preset("qwen2.5-0.5b", **TINY, **runtime)
        else:
            cfg = model_preset(name, **runtime)
        batch, shape = synthetic_batch(
            args.rows, args.seq_len, args.history, context_tokens=args.context_tokens,
            entry_tokens=args.entry_tokens, target_tokens=args.target_tokens, vocab=cfg.vocab_size,
            length_multiple=128 if accel else 32,
        )  # fmt: skip
        harness = TrainingHarness(
            cfg, mesh, loss=LossConfig(variant="nextquill"), micro_batches=args.micro_batches,
            operand_dtype=args.operand_dtype,
        )  # fmt: skip
        timing = harness.time(batch, warmup=args.warmup, steps=args.steps)
        if args.breakdown:
            parts = step_breakdown(harness, batch, steps=args.steps)
            breakdowns.append(f"- {name}: " + ", ".join(f"{k} {v * 1e3:,.1f} ms" for k, v in parts.items()))
            print(breakdowns[-1], flush=True)
        del harness
        flops = step_flops(cfg, batch, param_counts(cfg)[1]).total
        tokens = int((batch["with_segment_ids"] > 0).sum() + (batch["without_segment_ids"] > 0).sum())
        step_s = timing.best_step_s
        tflops = flops / step_s / 1e12
        mfu = f"{tflops / (peak * mesh.size):.1%}" if peak else "-"
        memory = timing.device_peak_mib if timing.device_peak_mib is not None else timing.compiled_total_mib
        compute = args.compute_dtype + ("" if args.operand_dtype == "float32" else ", head operands bf16")
        row = (
            f"| {mesh.size} × {device_kind} | {name} | {compute} | {args.remat} "
            f"| {args.attention} | "
            f"{args.rows} × {shape.as_tuple()} | {tokens:,} | {step_s:.4f} | {tokens / step_s:,.0f} | "
            f"{flops / 1e12:.4g} | {tflops:.4g} | {mfu} | {memory:,.0f} | {timing.compile_s:.1f} |"
        )
        print(row, flush=True)
        rows.append(row)
    if args.append_results:
        command = ["python", "benchmarks/mfu.py", *(argv if argv is not None else sys.argv[1:])]
        lines = results_header(
            "Training-step throughput and MFU",
            command,
            [
                "FLOPs = 6·P·(N_w + N_o) + 12·L·H·Hd·(A_w + A_o) + 6·D·V·2·N_y (both forward passes "
                "+ backward; "
                "see benchmarks/mfu.py); "
                + (
                    f"MFU against the dense bf16 peak, {peak} TFLOP/s per chip"
                    if peak
                    else "no MFU (peak unknown)"
                ),
                "peak MiB: the device allocator's peak where it keeps one (GPU/TPU), else XLA's estimate",
                f"examples: context {args.context_tokens}, history {args.history} × {args.entry_tokens}, "
                f"target {args.target_tokens} tokens; random weights; best of {args.steps} steps after "
                f"{args.warmup} warm-up",
            ],
        )
        parts = [
            "",
            "Parts of the step, each compiled and timed alone (bench.harness.step_breakdown):",
            "",
            *breakdowns,
        ]
        append_results(
            args.append_results, [*lines, COLUMNS, separator, *rows, *(parts if breakdowns else [])]
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
