r"""Tokens/s and MFU of the full NextQuill training step for Qwen2.5-0.5B and 1.5B shapes (random weights).

The step is the project's real one (`train.step.make_train_step` via `bench.harness.TrainingHarness`):
with- and without-history forward passes, fused NextQuill loss (dynamic DCE), backward through both
passes, clipped AdamW, every parameter trained (full fine-tuning; the FLOPs below count weight gradients,
which a LoRA run's frozen base does not compute). The batch: `--rows` rows of synthetic examples (random
ids; prompt, history and target lengths below), packed by the pipeline's first-fit packer into rows of
`--seq-len` with-stream tokens.

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
    python benchmarks/mfu.py --models qwen2.5-1.5b --remat dots_with_no_batch_dims_saveable --breakdown \
        --operand-dtype bfloat16 --joint-forward           # the step's parts; bf16 head operands, one call
    python benchmarks/mfu.py --cost-analysis               # any backend, compile only: executed vs useful
    python benchmarks/mfu.py --models qwen2.5-1.5b --scan-unroll 1 2   # 1 and 2 layers per scan iteration
    python benchmarks/mfu.py --models qwen2.5-1.5b --steps 3 --profile traces   # + a jax.profiler trace
    python benchmarks/mfu.py --models qwen2.5-1.5b --attention cudnn --cudnn-max-segments auto --grouped-kv

`--grouped-kv` is an experiment that training does not offer: cuDNN's packed mode given grouped k / v as
they are instead of repeated to the query heads (`cudnn_packed_attention(repeat_kv=False)`), only on a jax
whose packed-mode kv offsets count the key's heads (jax PR #39521); benchmarks/cudnn_mask.py checks that
form against blockwise attention first.

`--remat` takes several policies (a row each), and `--scan-unroll` several values (ModelConfig.scan_unroll:
N decoder layers per iteration of the scan over them; a row each, the remat column says `, unroll N`
where N is not 1). `--cost-analysis`
compiles the step (nothing allocated) for the accelerator shape (Qwen2.5-1.5B, 4 × 4,096 tokens) at remat
none and full, and the fused loss alone, and prints the matmul FLOPs the compiled programs execute
(`bench.hlo_flops`: loops counted by their trip counts, which `compiled.cost_analysis()` does not do)
against the useful count, whole and for layers, attention and LM head, XLA's temporary buffers of the
compiled program (`memory_analysis()`: what a remat policy trades against the recomputed FLOPs; parameters,
optimizer state and batch excluded), and the compile time. A dot that XLA left without a source location
(with `--rows 1` its batch-dot simplification drops it) can only be counted in `layers`: a `note:` gives its
share. It uses `xla_dense` attention by default: the blockwise `xla` path's loops have data-dependent trip
counts.

Prints one Markdown table row per model, remat policy and unroll (and appends a section with
`--append-results FILE`).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.record import results_file
from nextquill_jax.subcommand import non_negative_int, positive_int

if TYPE_CHECKING:  # the package is imported lazily, so that --help stays fast
    import numpy as np

    from nextquill_jax.data.assemble import RowShape
    from nextquill_jax.models.config import ModelConfig

TINY = {  # the CPU shape: Qwen2.5 layout, tiny sizes
    "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 192, "num_layers": 2, "num_heads": 4,
    "num_kv_heads": 2, "head_dim": 16, "bos_token_id": 0, "eos_token_ids": (0,),  # Qwen's ids lie beyond 4096
}  # fmt: skip
COLUMNS = (
    "| device | model | compute | remat | attention | rows × (T_w, T_o, R) | tokens/step | step s | tokens/s "
    "| TFLOP/step | TFLOP/s | MFU | peak MiB | compile s |"
)


ACCEL_SHAPE = {  # the accelerator measurement's batch (and the cost analysis's, which sizes that run)
    "rows": 4, "seq_len": 4096, "history": 8, "context_tokens": 256, "entry_tokens": 192,
    "target_tokens": 160,
}  # fmt: skip
CPU_SHAPE = {
    "rows": 2, "seq_len": 512, "history": 2, "context_tokens": 64, "entry_tokens": 64, "target_tokens": 48,
}  # fmt: skip
COST_COLUMNS = (
    "| model | compute | remat | attention | rows × (T_w, T_o, R) | useful TFLOP | executed TFLOP "
    "| executed / useful | layers: executed / useful | attention: executed / useful "
    "| LM head: executed / useful | cost_analysis() TFLOP | temp GiB | compile s |"
)
GIB = 2**30


def resolve_defaults(args: argparse.Namespace, accel: bool, backend: str) -> None:
    """Fill the options left unset: the accelerator shape on an accelerator or for `--cost-analysis` (it
    analyses the accelerator run), else the CPU one; the backend's attention, or `xla_dense` for the cost
    analysis (the blockwise `xla` loops have data-dependent trip counts, which cannot be counted)."""
    big = accel or args.cost_analysis
    for key, value in (ACCEL_SHAPE if big else CPU_SHAPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models is None:
        args.models = ["qwen2.5-1.5b"] if args.cost_analysis else (
            ["qwen2.5-0.5b", "qwen2.5-1.5b"] if accel else ["tiny"]
        )  # fmt: skip
    args.compute_dtype = args.compute_dtype or ("bfloat16" if big else "float32")
    args.remat = args.remat or (["none", "full"] if args.cost_analysis else ["full" if accel else "none"])
    if args.attention is None:
        backend_attention = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(backend, "xla")
        args.attention = "xla_dense" if args.cost_analysis else backend_attention


def model_config(name: str, args: argparse.Namespace, remat: str, unroll: int) -> ModelConfig:
    """The ModelConfig of preset `name` (or the tiny CPU shape), float32 parameters, the run's runtime with
    remat policy `remat` and scan unroll `unroll`, but `cudnn_max_segments`, which `model_batch` sets from
    the batch (`auto` is what its rows hold)."""
    from nextquill_jax.models import model_preset

    runtime = dict(
        param_dtype="float32", compute_dtype=args.compute_dtype, remat_policy=remat,
        scan_unroll=unroll, attention_impl=args.attention,
    )  # fmt: skip
    if name == "tiny":
        return model_preset("qwen2.5-0.5b", **TINY, **runtime)
    return model_preset(name, **runtime)


def model_batch(
    cfg: ModelConfig, args: argparse.Namespace, accel: bool
) -> tuple[ModelConfig, dict[str, np.ndarray], RowShape]:
    """(`cfg` with `--cudnn-max-segments` resolved for the batch, batch, RowShape): synthetic packed examples
    for `cfg`'s vocabulary.

    Raises:
        ValueError: an example longer than `--seq-len`, or a row holding more examples than
            `--cudnn-max-segments` (`bench.sweep.packed_bound`); the message starts with the flag to change.
    """
    from nextquill_jax.bench.harness import synthetic_batch
    from nextquill_jax.bench.sweep import packed_bound

    try:
        batch, shape = synthetic_batch(
            args.rows, args.seq_len, args.history, context_tokens=args.context_tokens,
            entry_tokens=args.entry_tokens, target_tokens=args.target_tokens, vocab=cfg.vocab_size,
            length_multiple=128 if accel or args.cost_analysis else 32,
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(
            f"--seq-len: {e}. Fix: a larger --seq-len, or shorter examples (--history, --entry-tokens, "
            "--context-tokens, --target-tokens)"
        ) from None
    try:  # the step's loss, nextquill, runs both streams: --joint-forward joins them
        bound = packed_bound(args.cudnn_max_segments, batch, joined=args.joint_forward)
    except ValueError as e:
        raise ValueError(f"--cudnn-max-segments: {e}") from None
    return (cfg if bound is None else cfg.replace(cudnn_max_segments=bound)), batch, shape


def attention_label(args: argparse.Namespace, cfg: ModelConfig) -> str:
    """The attention column: the implementation, and cuDNN's packed mode's bound when set (and whether
    `auto` chose it, and whether k / v went unrepeated)."""
    m = cfg.cudnn_max_segments
    chosen = ", auto" if args.cudnn_max_segments == "auto" else ""
    grouped = ", grouped k/v" if args.grouped_kv else ""
    return args.attention + ("" if m is None else f", segment offsets (M = {m}{chosen}){grouped}")


def use_grouped_kv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--grouped-kv: the packed mode of every attention call gets `repeat_kv=False`, where this jax allows
    it (else a usage error, exit 2)."""
    import functools

    from nextquill_jax.models import attention, cudnn_packed

    if args.attention != "cudnn" or args.cudnn_max_segments is None:
        parser.error(
            "--grouped-kv is an option of cuDNN's packed mode: add --attention cudnn "
            "--cudnn-max-segments auto"
        )
    if not cudnn_packed.kv_offsets_follow_key_heads():
        parser.error(
            "--grouped-kv: this jax scales the packed mode's kv offsets by the query's heads (jax PR #39521 "
            "fixes it), so grouped k / v would be read from the wrong tokens"
        )
    # An experiment training does not offer: patched here, for this process, rather than configured.
    attention.cudnn_packed_attention = functools.partial(cudnn_packed.cudnn_packed_attention, repeat_kv=False)


def checked_model_batch(
    parser: argparse.ArgumentParser,
    name: str,
    args: argparse.Namespace,
    remat: str,
    unroll: int,
    accel: bool,
) -> tuple[ModelConfig, dict[str, np.ndarray], RowShape]:
    """`model_batch` for model `name`; an example longer than `--seq-len`, or a `--cudnn-max-segments` below
    what the batch's rows hold (under jit such a row would only be NaN), is a usage error naming its flag
    (`parser.error`, exit 2)."""
    try:
        return model_batch(model_config(name, args, remat, unroll), args, accel)
    except ValueError as e:
        parser.error(str(e))


def remat_label(remat: str, unroll: int) -> str:
    """The remat column: the policy, and the scan's unroll when not 1 (both choose how the layers run)."""
    return remat + ("" if unroll == 1 else f", unroll {unroll}")


def compute_label(args: argparse.Namespace) -> str:
    """The compute column: the compute dtype, the fused head's operands when not float32, joint forward."""
    head = "" if args.operand_dtype == "float32" else ", head operands bf16"
    return args.compute_dtype + head + (", joint forward" if args.joint_forward else "")


def cost_analysis(args: argparse.Namespace, argv: list[str] | None, parser: argparse.ArgumentParser) -> int:
    """Compile the step (abstract state: nothing allocated) per model and remat policy, and the fused loss
    alone; print executed matmul FLOPs (`bench.hlo_flops`, loops counted by trip count) against the useful
    count (`bench.flops.step_flops`), whole and per part, and the compiled temporary memory. Returns 0."""
    import time

    import jax
    import jax.numpy as jnp

    from nextquill_jax.bench.flops import executed_flops, param_counts, step_flops, unattributed_flops
    from nextquill_jax.bench.harness import TrainingHarness
    from nextquill_jax.bench.hlo_flops import dot_costs
    from nextquill_jax.bench.record import append_results, invoked_command, results_header
    from nextquill_jax.loss import LossConfig
    from nextquill_jax.parallel import make_mesh

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    separator = "|" + " --- |" * (COST_COLUMNS.count("|") - 1)
    rows = [COST_COLUMNS, separator]
    notes: list[str] = []
    print(*rows, sep="\n", flush=True)

    def row(name, cfg, remat, shape, useful, executed, compiled, compile_s) -> str:
        ratios = [
            f"{e / u:.3f}" if u else "-"
            for e, u in zip(
                (executed.total, executed.layers, executed.attention, executed.head),
                (useful.total, useful.layers, useful.attention, useful.head),
                strict=True,
            )
        ]
        return (
            f"| {name} | {compute_label(args)} | {remat} | {attention_label(args, cfg)} "
            f"| {args.rows} × {shape.as_tuple()} | {useful.total / 1e12:.4g} | {executed.total / 1e12:.4g} "
            f"| {' | '.join(ratios)} | {compiled.cost_analysis()['flops'] / 1e12:.4g} "
            f"| {compiled.memory_analysis().temp_size_in_bytes / GIB:.2f} | {compile_s:.1f} |"
        )

    def note_unattributed(label, costs, total) -> None:
        if unattributed := unattributed_flops(costs):
            notes.append(
                f"{label}: {unattributed / total:.1%} of the executed FLOPs are dots XLA left "
                "without a source location (its batch-dot simplification drops it with a batch dimension of "
                "size 1, e.g. --rows 1): the layers column counts them, so its ratio is too high and the "
                "attention or LM-head ratio too low"
            )
            print(f"note: {notes[-1]}", flush=True)

    for name, remat, unroll in itertools.product(args.models, args.remat, args.scan_unroll):
        cfg, batch, shape = checked_model_batch(parser, name, args, remat, unroll, accel=False)
        harness = TrainingHarness(
            cfg, mesh, loss=LossConfig(variant="nextquill"), micro_batches=args.micro_batches,
            operand_dtype=args.operand_dtype, joint_forward=args.joint_forward, abstract=True,
        )  # fmt: skip
        useful = step_flops(cfg, batch, param_counts(cfg)[1])
        start = time.perf_counter()
        compiled = harness.compile(batch)
        compile_s = time.perf_counter() - start
        costs = dot_costs(compiled.as_text())
        executed = executed_flops(costs)
        layers = remat_label(remat, unroll)
        rows.append(row(name, cfg, layers, shape, useful, executed, compiled, compile_s))
        print(rows[-1], flush=True)
        note_unattributed(f"{name}, remat {layers}", costs, executed.total)
        # The fused loss alone (value and gradient, the step's shapes), once per model.
        if (remat, unroll) == (args.remat[0], args.scan_unroll[0]):
            hidden = jax.ShapeDtypeStruct((*batch["labels"].shape, cfg.hidden_size), cfg.compute_jnp_dtype)
            head = harness.head_weight(harness.state.params)
            head = jax.ShapeDtypeStruct(head.shape, head.dtype)
            labels = jax.ShapeDtypeStruct(batch["labels"].shape, jnp.int32)
            start = time.perf_counter()
            with jax.set_mesh(mesh):
                loss = harness.loss_value_and_grad().lower(hidden, hidden, head, labels).compile()
            compile_s = time.perf_counter() - start
            loss_useful = type(useful)(layers=0.0, attention=0.0, head=useful.head)
            costs = dot_costs(loss.as_text())
            executed = executed_flops(costs)
            rows.append(
                row(f"{name}: fused loss alone", cfg, "-", shape, loss_useful, executed, loss, compile_s)
            )
            print(rows[-1], flush=True)
            note_unattributed(f"{name}: fused loss alone", costs, executed.total)
    if args.append_results:
        command = invoked_command(["python", "benchmarks/mfu.py"], argv)
        header = results_header(
            "Executed vs useful FLOPs of the training step (XLA cost analysis)",
            command,
            [
                "compile only, abstract state (nothing allocated or run); useful FLOPs: "
                "bench.flops.step_flops (the MFU numerator; the fused loss alone: its LM-head term "
                "6·D·V·2·N_y)",
                "executed: every dot of the optimised HLO (`compiled.as_text()`), 2 × output × contracted "
                "elements, times the known trip counts of the loops around it (bench.hlo_flops); attributed "
                "to a part by the source files of its call stack (bench.flops.executed_flops); elementwise "
                "work not counted",
                "cost_analysis() TFLOP: XLA's own `compiled.cost_analysis()['flops']`, which counts every "
                "loop body once (so far below the executed count for scanned layers and the tiled loss)",
                "temp GiB: `compiled.memory_analysis().temp_size_in_bytes`, XLA's temporary buffers of the "
                "compiled program on this backend (activations kept for the backward pass among them; "
                "parameters, optimizer state and the batch are arguments, not counted)",
                "compile s: wall time of lowering and compiling that program (a step row: the whole step; "
                "on a shared machine it varies with the load)",
                f"examples: context {args.context_tokens}, history {args.history} × {args.entry_tokens}, "
                f"target {args.target_tokens} tokens",
            ],
        )
        notes_block = ["", *(f"- note: {n}" for n in notes)] if notes else []
        append_results(args.append_results, [*header, *rows, *notes_block])
    return 0


BREAKDOWN_TITLE = (
    "Parts of the step, each compiled and timed alone, the best of --steps runs "
    "(bench.harness.step_breakdown): forward = both streams' forward passes, forward+backward = both with "
    "their backward, loss = the fused loss's value and gradient, optimizer = clipping + AdamW, step = the "
    "whole step; at few steps their noise can exceed the differences between rows, and the table's step s "
    "(timed apart) can differ from `step` here:"
)


def main(argv: list[str] | None = None) -> int:
    import jax

    from nextquill_jax.bench.flops import param_counts, peak_tflops, step_flops
    from nextquill_jax.bench.harness import TrainingHarness, step_breakdown
    from nextquill_jax.bench.record import append_results, invoked_command, results_header
    from nextquill_jax.bench.sweep import max_segments_arg
    from nextquill_jax.loss import LossConfig
    from nextquill_jax.loss.fused_head import OPERAND_DTYPES
    from nextquill_jax.models.presets import PRESETS
    from nextquill_jax.parallel import make_mesh

    accel = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="presets (default: qwen2.5-0.5b qwen2.5-1.5b; CPU: tiny)")
    parser.add_argument("--rows", type=positive_int)
    parser.add_argument("--seq-len", type=positive_int)
    parser.add_argument("--history", type=non_negative_int)
    parser.add_argument("--context-tokens", type=positive_int)
    parser.add_argument("--entry-tokens", type=positive_int)
    parser.add_argument("--target-tokens", type=positive_int)
    parser.add_argument("--compute-dtype")
    parser.add_argument(
        "--remat", nargs="+", help="ModelConfig.remat_policy (save:NAME,... too), one row each"
    )
    parser.add_argument(
        "--scan-unroll", type=positive_int, nargs="+", default=[1], metavar="N",
        help="ModelConfig.scan_unroll: decoder layers per iteration of the scan over them (the layer count: "
        "all unrolled), one row each",
    )  # fmt: skip
    parser.add_argument("--attention", help="ModelConfig.attention_impl")
    parser.add_argument(
        "--cudnn-max-segments", type=max_segments_arg, metavar="N|auto",
        help="ModelConfig.cudnn_max_segments (with --attention cudnn: its packed mode for rows of at most N "
        "examples; auto: the most a row of the batch holds, 2 in the default shape, twice that with "
        "--joint-forward). Unlike a training run, whose default is auto, none here: cuDNN's dense segment "
        "mask, the baseline gpu_checks.sh compares with",
    )  # fmt: skip
    parser.add_argument(
        "--grouped-kv", action="store_true",
        help="an experiment: the packed mode given grouped k / v unrepeated (see above; jax PR #39521)",
    )  # fmt: skip
    parser.add_argument("--micro-batches", type=positive_int, default=1)
    parser.add_argument(
        "--operand-dtype", choices=OPERAND_DTYPES, default="float32",
        help="fused loss: operands of the with/without logits products (loss.operand_dtype)",
    )  # fmt: skip
    parser.add_argument(
        "--joint-forward", action="store_true",
        help="both forward passes as one call on a joined batch (train.joint_forward)",
    )  # fmt: skip
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps (after --warmup)")
    parser.add_argument(
        "--warmup", type=positive_int, default=2, help="untimed steps first (at least 1, which compiles)"
    )
    parser.add_argument("--peak-tflops", type=float, help="per-chip peak (default: by device kind)")
    parser.add_argument("--breakdown", action="store_true", help="also time the step's parts alone")
    parser.add_argument(
        "--cost-analysis", action="store_true",
        help="compile only (any backend, nothing allocated): executed vs useful matmul FLOPs per part",
    )  # fmt: skip
    parser.add_argument(
        "--profile",
        type=Path,
        help="write a jax.profiler trace of the timed steps to DIR/<model>-<remat>[-unroll<N>] (the tracer's "
        "overhead is in those steps' times)",
    )
    parser.add_argument("--append-results", type=results_file, help="append a Markdown section to this file")
    args = parser.parse_args(argv)
    resolve_defaults(args, accel, jax.default_backend())
    if unknown := [m for m in args.models if m != "tiny" and m.lower() not in PRESETS]:
        parser.error(f"--models: no preset {', '.join(unknown)}; known: tiny, {', '.join(sorted(PRESETS))}")
    if args.cudnn_max_segments is not None and args.attention != "cudnn":
        parser.error(f"--cudnn-max-segments chooses cuDNN's packed attention: add --attention cudnn "
                     f"(the attention is {args.attention})")  # fmt: skip
    if args.grouped_kv:
        use_grouped_kv(parser, args)
    if args.cost_analysis:
        return cost_analysis(args, argv, parser)

    device_kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or peak_tflops(device_kind)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rows, breakdowns = [], []
    separator = "|" + " --- |" * (COLUMNS.count("|") - 1)
    print(COLUMNS)
    print(separator)
    for name, remat, unroll in itertools.product(args.models, args.remat, args.scan_unroll):
        cfg, batch, shape = checked_model_batch(parser, name, args, remat, unroll, accel)
        harness = TrainingHarness(
            cfg, mesh, loss=LossConfig(variant="nextquill"), micro_batches=args.micro_batches,
            operand_dtype=args.operand_dtype, joint_forward=args.joint_forward,
        )  # fmt: skip
        run_name = f"{name}-{remat}" + ("" if unroll == 1 else f"-unroll{unroll}")
        profile_dir = args.profile / run_name if args.profile else None
        timing = harness.time(batch, warmup=args.warmup, steps=args.steps, profile_dir=profile_dir)
        if args.breakdown:
            parts = step_breakdown(harness, batch, steps=args.steps)
            times = ", ".join(f"{k} {v * 1e3:,.1f} ms" for k, v in parts.items())
            breakdowns.append(f"- {name}, remat {remat_label(remat, unroll)}: {times}")
        del harness
        flops = step_flops(cfg, batch, param_counts(cfg)[1]).total
        tokens = int((batch["with_segment_ids"] > 0).sum() + (batch["without_segment_ids"] > 0).sum())
        step_s = timing.best_step_s
        tflops = flops / step_s / 1e12
        mfu = f"{tflops / (peak * mesh.size):.1%}" if peak else "-"
        memory = timing.device_peak_mib if timing.device_peak_mib is not None else timing.compiled_total_mib
        row = (
            f"| {mesh.size} × {device_kind} | {name} | {compute_label(args)} | {remat_label(remat, unroll)} "
            f"| {attention_label(args, cfg)} | "
            f"{args.rows} × {shape.as_tuple()} | {tokens:,} | {step_s:.4f} | {tokens / step_s:,.0f} | "
            f"{flops / 1e12:.4g} | {tflops:.4g} | {mfu} | {memory:,.0f} | {timing.compile_s:.1f} |"
        )
        print(row, flush=True)
        rows.append(row)
    # Below the table, not between its rows: the console's output stays Markdown, as the results file's.
    parts = ["", BREAKDOWN_TITLE, "", *breakdowns] if breakdowns else []
    if parts:
        print(*parts, sep="\n", flush=True)
    if args.append_results:
        command = invoked_command(["python", "benchmarks/mfu.py"], argv)
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
        append_results(args.append_results, [*lines, COLUMNS, separator, *rows, *parts])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
