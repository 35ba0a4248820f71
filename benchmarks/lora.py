"""LoRA against full fine-tuning on the SmolLM2-135M shape (random weights): step time, gradient and
optimizer-state memory, checkpoint size, and the frozen base's memory in float32, bfloat16, int8 and nf4 (the
last two quantized from the base in bfloat16, as a run stores them).

Both runs use the project's real train step (`bench.harness.TrainingHarness`, NextQuill loss, dynamic DCE)
on the same packed synthetic batch, in this process. Step times alternate the two runs (`--rounds`) and keep
each one's best, so slow drift of the machine affects both alike. Memory ratios are exact byte counts of the
arrays: gradients (one per trainable parameter, float32) plus the AdamW moments; the checkpoint is the train
state written by Orbax (`du` of the directory); the base is the frozen parameters as training stores them.

    python benchmarks/lora.py                                     # r = 8 on q/v, 2 rows x 256 tokens
    python benchmarks/lora.py --append-results benchmarks/RESULTS.md

Exits 1 unless the step-time ratio is <= --max-time-ratio (0.75) and the gradient + optimizer-state ratio
<= --max-state-ratio (0.05).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.harness import TrainingHarness, alternating_best_seconds, synthetic_batch
from nextquill_jax.bench.record import append_results, invoked_command, results_file, results_header
from nextquill_jax.config import LoraConfig
from nextquill_jax.models import model_preset
from nextquill_jax.models.quantize import stored_bytes
from nextquill_jax.parallel import make_mesh
from nextquill_jax.subcommand import positive_int
from nextquill_jax.train.adapters import frozen_base

MIB = 2**20


def state_bytes(harness: TrainingHarness) -> int:
    """Gradient + optimizer-state bytes: one float32 gradient per trainable parameter, plus the moments."""
    grads = sum(x.size * 4 for x in jax.tree.leaves(harness.state.params))
    return grads + stored_bytes(harness.state.opt_state)


def checkpoint_bytes(harness: TrainingHarness) -> int:
    """Bytes on disk of the train state written by Orbax (what a checkpoint holds besides the iterator)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(Path(tmp) / "state", harness.state)
        ckpt.wait_until_finished()
        return sum(f.stat().st_size for f in (Path(tmp) / "state").rglob("*") if f.is_file())


def best_step_seconds(harnesses: dict[str, TrainingHarness], batch: dict, rounds: int) -> dict[str, float]:
    """Best seconds per step of each harness, compiled once, the harnesses alternating `rounds` times."""
    return alternating_best_seconds({name: h.stepper(batch) for name, h in harnesses.items()}, rounds=rounds)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--targets", nargs="+", default=["attn/(q|v)_proj"])
    parser.add_argument("--rows", type=positive_int, default=2)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--rounds", type=positive_int, default=4)
    parser.add_argument("--max-time-ratio", type=float, default=0.75)
    parser.add_argument("--max-state-ratio", type=float, default=0.05)
    parser.add_argument("--append-results", type=results_file, help="append a markdown section to this file")
    args = parser.parse_args(argv)

    cfg = model_preset("smollm2-135m", compute_dtype="float32")
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=args.targets)
    try:
        batch, shape = synthetic_batch(
            args.rows, args.seq_len, 2, context_tokens=32, entry_tokens=48, target_tokens=32,
            vocab=cfg.vocab_size, length_multiple=32,
        )  # fmt: skip
    except ValueError as e:  # an example longer than --seq-len
        parser.error(str(e))
    harnesses = {"full": TrainingHarness(cfg, mesh), "lora": TrainingHarness(cfg, mesh, lora=lora)}
    seconds = best_step_seconds(harnesses, batch, args.rounds)
    state = {name: state_bytes(h) for name, h in harnesses.items()}
    disk = {name: checkpoint_bytes(h) for name, h in harnesses.items()}
    base = harnesses["lora"].base
    # As a run stores its base (`adapters.frozen_runtime`): int8 / nf4 are quantized from it in bfloat16.
    in_bfloat16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    base_bytes = {"float32": stored_bytes(base), "bfloat16": stored_bytes(in_bfloat16)}
    for kind in ("int8", "nf4"):
        base_bytes[kind] = stored_bytes(frozen_base(in_bfloat16, LoraConfig(base_dtype=kind)))
    trainable = {name: sum(x.size for x in jax.tree.leaves(h.state.params)) for name, h in harnesses.items()}

    time_ratio = seconds["lora"] / seconds["full"]
    state_ratio = state["lora"] / state["full"]
    rows = [
        "| measure | full fine-tuning | LoRA | LoRA / full |",
        "| --- | ---: | ---: | ---: |",
        f"| trainable parameters | {trainable['full']:,} | {trainable['lora']:,} | "
        f"{trainable['lora'] / trainable['full']:.4f} |",
        f"| best step (s) | {seconds['full']:.3f} | {seconds['lora']:.3f} | {time_ratio:.3f} |",
        f"| gradients + AdamW moments (MiB) | {state['full'] / MIB:.1f} | {state['lora'] / MIB:.2f} | "
        f"{state_ratio:.4f} |",
        f"| checkpointed train state (MiB) | {disk['full'] / MIB:.1f} | {disk['lora'] / MIB:.2f} | "
        f"{disk['lora'] / disk['full']:.4f} |",
    ]
    base_rows = ["| frozen base stored as | MiB | / float32 |", "| --- | ---: | ---: |"] + [
        f"| {kind} | {n / MIB:.1f} | {n / base_bytes['float32']:.3f} |" for kind, n in base_bytes.items()
    ]
    checks = [
        f"step-time ratio {time_ratio:.3f} <= {args.max_time_ratio}: {time_ratio <= args.max_time_ratio}",
        f"gradient + optimizer-state ratio {state_ratio:.4f} <= {args.max_state_ratio}: "
        f"{state_ratio <= args.max_state_ratio}",
    ]
    print("\n".join([*rows, "", *base_rows, "", *checks]))
    if args.append_results:
        lines = results_header(
            f"LoRA vs full fine-tuning, SmolLM2-135M shape ({jax.default_backend().upper()}, float32)",
            invoked_command(["python", "benchmarks/lora.py"], argv),
            [
                f"LoRA r = {args.rank}, alpha = {2 * args.rank}, targets {args.targets}; batch {args.rows} "
                f"packed rows of {args.seq_len} with-stream tokens ({shape.as_tuple()}); NextQuill loss, "
                f"dynamic DCE; best of {args.rounds} alternating steps each",
            ],
        )
        append_results(args.append_results, [*lines, *rows, "", *base_rows, "", *(f"- {c}" for c in checks)])
    ok = time_ratio <= args.max_time_ratio and state_ratio <= args.max_state_ratio
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
