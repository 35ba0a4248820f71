"""This project's NextQuill training step against the public code's (PyTorch + transformers), CPU, float32.

Both sides train the same tiny Qwen2 model (our random initialisation, saved with `save_pretrained` and loaded
by `Qwen2ForCausalLM`) on the same examples (the synthetic benchmark rendered with the `review` template and
tokenised with the Qwen2.5 tokenizer; ids are then taken modulo the tiny vocabulary, which keeps every length)
with the same global batch, loss (NextQuill, dynamic DCE, δ 0.05, λ 0.9, ε 0.1, α 0.1) and optimizer (AdamW
lr 5e-6, weight decay 0.025, clipping 1.0). Two cases:

- "same lengths": both sides get the same padded batch: one example per row, both streams padded to one
  length T (default: the longest example, rounded up to 128), the same micro-batching.
- "as each runs": the public code left-pads every sequence to 4,097 tokens, batch 1 with gradient
  accumulation over the global batch; this project packs the examples into rows of `--pack-len` tokens
  (the pipeline's first-fit packer, `data.pipeline.BatchPipeline`).

Throughput: real (non-padding) tokens of both streams of the global batch / the best step time of
`--steps` timed steps after one warm-up step (which also compiles). The numerator is the same for both
sides, so the ratio is the inverse ratio of step times.

Our side runs once per `--remat` policy (default: none and full); the public code has no gradient
checkpointing in its description, so its side runs without.

Peak memory: each side runs in its own child process; the driver reads the child's peak resident set
(`os.wait4` -> `ru_maxrss`, which covers XLA's and PyTorch's native allocations, unlike tracemalloc) and
subtracts the peak of a child that only imports the same libraries. The difference holds the model,
optimizer state, data, activations and (for JAX) compilation. The driver itself imports neither library
and builds the data in a child too: Linux keeps a process's high-water mark across fork and exec, so a
child's ru_maxrss can never be below its parent's resident set at the fork. XLA's own estimate of the
step's temporary buffers (`memory_analysis()`) is printed beside it. Runs of the sides alternate
(`--repeats`), and each ratio uses the best time of each side, so a noisy shared machine biases neither.

    python benchmarks/step.py                                     # both cases, defaults below
    python benchmarks/step.py --cases same --same-pad-len 512 --examples 4
    python benchmarks/step.py --append-results benchmarks/RESULTS.md

Exits 1 if, in some case, none of our remat policies meets the target (same lengths: ≥ 1.5× tokens/s and
≤ 0.7× peak memory; as each runs: ≥ 4× tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.record import results_file
from nextquill_jax.subcommand import non_negative_int, positive_int

HERE = Path(__file__).resolve().parent
# The public step restated in PyTorch; the tests compare the JAX step against it too.
TORCH_PUBLIC_STEP = HERE.parent / "tests" / "reference" / "torch_public_step.py"
MIB_PER_KIB = 1 / 1024
TARGETS = {"same": (1.5, 0.7), "asrun": (4.0, None)}  # (min tokens/s ratio, max memory ratio)
CASE_TITLES = {"same": "same lengths", "asrun": "as each runs"}


# ----------------------------------------------------------------------------------------------------------
# The data and the model both sides share


def build_inputs(args: argparse.Namespace, work: Path) -> int:
    """Write `examples.npz`, `prepared/train` (the same examples for our pipeline), `model/` and
    `inputs.json` (the model config and the examples' token counts) to `work`."""
    from flax import nnx

    from nextquill_jax.bench.harness import synthetic_train_split
    from nextquill_jax.data.prepared_split import TokenizedExample, write_split
    from nextquill_jax.models import CausalLM, ModelConfig, save_pretrained

    full = synthetic_train_split(
        work / "prepared_full",
        users=args.users,
        seed=args.seed,
        tokenizer=args.tokenizer,
        max_history=args.max_history,
    )
    if len(full) < args.examples:
        raise SystemExit(f"only {len(full)} training examples; raise --users")
    chosen = np.random.default_rng(args.seed).choice(len(full), args.examples, replace=False)
    examples = [{k: np.asarray(v, np.int32) % args.vocab for k, v in full[int(i)].items()} for i in chosen]
    fields = ("prompt_with", "prompt_without", "target")
    np.savez(work / "examples.npz", **{f: _object_array([ex[f] for ex in examples]) for f in fields})
    write_split(
        work / "prepared", "train", (TokenizedExample(**{f: ex[f] for f in fields}) for ex in examples)
    )

    cfg = ModelConfig(
        family="qwen2",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        rope_theta=1_000_000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        qkv_bias=True,
        pad_token_id=0,
    )
    # An earlier build's random model in a reused --work-dir: save_pretrained refuses to write beside it.
    shutil.rmtree(work / "model", ignore_errors=True)
    save_pretrained(CausalLM(cfg, rngs=nnx.Rngs(args.seed)), work / "model")
    lengths = {f: [len(ex[f]) for ex in examples] for f in fields}
    (work / "inputs.json").write_text(json.dumps({"config": cfg.to_hf_config(), "lengths": lengths}))
    return 0


def _object_array(items: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


# ----------------------------------------------------------------------------------------------------------
# Our side (a child process)


def jax_worker(args: argparse.Namespace) -> int:
    import jax

    from nextquill_jax.bench.harness import TrainingHarness
    from nextquill_jax.data.assemble import RowShape, assemble_batch
    from nextquill_jax.data.config import BatchingConfig
    from nextquill_jax.data.pipeline import BatchPipeline
    from nextquill_jax.data.prepared_split import PreparedSplit
    from nextquill_jax.loss import LossConfig
    from nextquill_jax.models import load_pretrained
    from nextquill_jax.parallel import make_mesh

    if args.imports_only:
        return 0
    split = PreparedSplit(args.work / "prepared", "train")
    if args.layout == "padded":
        examples = [split[i] for i in range(len(split))]
        slots = max(len(ex["target"]) for ex in examples)
        batch = assemble_batch(
            [[ex] for ex in examples], RowShape(args.pad_len, args.pad_len, slots), with_reference_dce=False
        )
    else:
        batching = dict(mode="pack", seq_len_with=args.pad_len, shuffle=False, num_epochs=1, read_threads=0)
        rows = BatchPipeline(
            split, BatchingConfig(rows_per_batch=1, **batching), process_index=0, process_count=1
        )
        count = -(-rows.num_batches(0) // args.micro_batches) * args.micro_batches
        pipe = BatchPipeline(
            split, BatchingConfig(rows_per_batch=count, **batching), process_index=0, process_count=1
        )
        if pipe.num_batches(0) != 1:
            raise RuntimeError(
                f"the examples took {pipe.num_batches(0)} batches of {count} rows, expected one"
            )
        batch = pipe.local_batch(0, 0)
    model = load_pretrained(str(args.work / "model"), dtype="float32", remat_policy=args.remat[0])
    harness = TrainingHarness(
        model.cfg, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
        loss=LossConfig(variant="nextquill"), micro_batches=args.micro_batches, model=model,
    )  # fmt: skip
    timing = harness.time(batch, warmup=1, steps=args.steps)
    real = int((batch["with_segment_ids"] > 0).sum() + (batch["without_segment_ids"] > 0).sum())
    print(
        json.dumps(
            {
                "side": "jax",
                "first_loss": timing.first_loss,
                "step_s": timing.step_s,
                "compile_s": timing.compile_s,
                "real_tokens": real,
                "slots": int(batch["with_ids"].size + batch["without_ids"].size),
                "shape": [
                    list(batch["with_ids"].shape),
                    list(batch["without_ids"].shape),
                    list(batch["labels"].shape),
                ],
                "compiled_temp_mib": timing.compiled_temp_mib,
                "jax": jax.__version__,
            }
        )
    )
    return 0


# ----------------------------------------------------------------------------------------------------------
# The driver


def run_child(command: list[str]) -> tuple[dict | None, float]:
    """Run one child; returns (its JSON line or None, its peak resident set in MiB) via os.wait4.

    Raises:
        RuntimeError: the child failed (its stderr is included).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), usage.ru_maxrss * MIB_PER_KIB


def side_command(side: str, work: Path, pad_len: int, micro: int, layout: str, steps: int) -> list[str]:
    """The child command of one side ("torch" or "jax:<remat policy>"). `micro`: torch examples per
    micro-batch; jax micro-batch count."""
    if side == "torch":
        return [
            sys.executable, str(TORCH_PUBLIC_STEP), "--model-dir", str(work / "model"),
            "--examples", str(work / "examples.npz"), "--pad-len", str(pad_len), "--micro-batch", str(micro),
            "--steps", str(steps),
        ]  # fmt: skip
    return [
        sys.executable, str(Path(__file__).resolve()), "--worker", "jax", "--work-dir", str(work),
        "--layout", layout, "--pad-len", str(pad_len), "--micro-batches", str(micro), "--steps", str(steps),
        "--remat", side.split(":", 1)[1],
    ]  # fmt: skip


def measure_case(case: str, args: argparse.Namespace, work: Path, baseline: dict[str, float]) -> dict:
    """Alternate the sides `--repeats` times; keep each side's best step time and largest peak."""
    n = args.examples
    sides = ["torch", *(f"jax:{policy}" for policy in args.remat)]
    if case == "same":
        pad, torch_micro, jax_micro = args.same_pad_len, args.same_micro_batch, n // args.same_micro_batch
        commands = {
            s: side_command(s, work, pad, torch_micro if s == "torch" else jax_micro, "padded", args.steps)
            for s in sides
        }
    else:
        commands = {
            s: side_command(s, work, args.public_pad_len, args.public_micro_batch, "", args.steps)
            if s == "torch"
            else side_command(s, work, args.pack_len, args.pack_micro_batches, "packed", args.steps)
            for s in sides
        }
    runs: dict[str, list[tuple[dict, float]]] = {s: [] for s in sides}
    for _ in range(args.repeats):
        for side in sides:
            start = time.perf_counter()
            result, peak = run_child(commands[side])
            print(f"  {case} {side}: best step {min(result['step_s']):.3f} s, peak {peak:.0f} MiB "
                  f"(child ran {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
            runs[side].append((result, peak))
    out = {}
    for side, items in runs.items():
        best = min(min(r["step_s"]) for r, _ in items)
        result = items[0][0]
        if side == "torch":
            micro = args.same_micro_batch if case == "same" else args.public_micro_batch
            pad = args.same_pad_len if case == "same" else args.public_pad_len
            layout = f"left-padded to {pad}; {n // micro} micro-batch(es) of {micro}"
        else:
            (b, t_w), (_, t_o), (_, r) = result["shape"]
            micro = n // args.same_micro_batch if case == "same" else args.pack_micro_batches
            kind = "one example per row" if case == "same" else "packed"
            layout = f"{kind}: {b} × (T_w {t_w}, T_o {t_o}, R {r}); {micro} micro-batch(es); remat {side[4:]}"
        out[side] = {
            **result,
            "layout": layout,
            "best_step_s": best,
            "tokens_per_s": result["real_tokens"] / best,
            "peak_mib": max(p for _, p in items) - baseline[side.split(":")[0]],
        }
    return out


def report(
    args: argparse.Namespace, results: dict, lengths: dict, cfg, command: list[str]
) -> tuple[list[str], bool]:
    from nextquill_jax.bench.record import results_header

    torch_run = next(iter(results.values()))["torch"]

    stats = "; ".join(f"{k} {v.min()}/{v.mean():.0f}/{v.max()}" for k, v in lengths.items())
    lines = results_header(
        "Training step vs the public code's PyTorch step (CPU, float32)",
        ["python", *command],
        [
            f"torch {torch_run['torch']} ({torch_run['threads']} threads), transformers "
            f"{torch_run['transformers']} (`attn_implementation=sdpa`); XLA CPU with its default threads",
            f"model: Qwen2, vocab {cfg['vocab_size']:,}, hidden {cfg['hidden_size']}, "
            f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads "
            f"({cfg['num_key_value_heads']} kv), MLP {cfg['intermediate_size']}, tied embeddings; "
            f"global batch {args.examples} synthetic examples (users {args.users}, max_history "
            f"{args.max_history}, tokenizer {args.tokenizer}; tokens min/mean/max: {stats})",
            f"tokens/s = real tokens of both streams / best step time ({args.steps} timed steps × "
            f"{args.repeats} alternating runs, after a warm-up/compile step); peak = the child's ru_maxrss "
            "(os.wait4) minus an import-only child's; XLA temp = the compiled step's memory_analysis()",
            "first loss: of the initial weights (equal where the normalisation is: one micro-batch)",
        ],
    )
    lines += [
        "| case | side | layout | token slots | real tokens | best step s | tokens/s | peak MiB "
        "| XLA temp MiB | first loss |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    verdicts, failed = [], False
    for case, res in results.items():
        met = False
        torch_row = res["torch"]
        for side, r in res.items():
            temp = f"{r['compiled_temp_mib']:,.0f}" if "compiled_temp_mib" in r else "-"
            lines.append(
                f"| {CASE_TITLES[case]} | {'public (torch)' if side == 'torch' else 'nextquill-jax'} | "
                f"{r['layout']} | {r['slots']:,} | {r['real_tokens']:,} | {r['best_step_s']:.3f} | "
                f"{r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} | {temp} | {r['first_loss']:.5f} |"
            )
        for side, r in res.items():
            if side == "torch":
                continue
            speed = r["tokens_per_s"] / torch_row["tokens_per_s"]
            memory = r["peak_mib"] / torch_row["peak_mib"]
            min_speed, max_memory = TARGETS[case]
            ok = speed >= min_speed and (max_memory is None or memory <= max_memory)
            met |= ok
            target = f"≥ {min_speed}× tokens/s" + (f", ≤ {max_memory}× memory" if max_memory else "")
            verdicts.append(
                f"- **{CASE_TITLES[case]}**, remat {side[4:]}: tokens/s ratio {speed:.2f}×, "
                f"peak-memory ratio {memory:.2f}× (target {target}): {'MET' if ok else 'NOT MET'}"
            )
        failed |= not met
    lines += ["", *verdicts]
    return lines, failed


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=("same", "asrun"), default=["same", "asrun"])
    parser.add_argument(
        "--examples", type=positive_int, default=8, help="global batch (examples per optimizer step)"
    )
    parser.add_argument("--users", type=positive_int, default=40)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--tokenizer", default="qwen2.5")
    parser.add_argument("--max-history", type=non_negative_int, default=8)
    parser.add_argument("--vocab", type=positive_int, default=8192)
    parser.add_argument("--hidden", type=positive_int, default=64)
    parser.add_argument("--intermediate", type=positive_int, default=256)
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--kv-heads", type=positive_int, default=2)
    parser.add_argument(
        "--same-pad-len", type=positive_int, help="T of the same-lengths case (default: longest, ↑128)"
    )
    parser.add_argument(
        "--same-micro-batch", type=positive_int, help="examples per pass, same lengths (default: all)"
    )
    parser.add_argument("--public-pad-len", type=positive_int, default=4097)
    parser.add_argument("--public-micro-batch", type=positive_int, default=1)
    parser.add_argument(
        "--pack-len", type=positive_int, default=2048, help="our with-stream row length (as each runs)"
    )
    parser.add_argument("--pack-micro-batches", type=positive_int, default=1)
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per run")
    parser.add_argument("--repeats", type=positive_int, default=1, help="alternating runs per side")
    parser.add_argument(
        "--work-dir", type=Path, help="keep data and model here (default: a temporary folder)"
    )
    parser.add_argument("--append-results", type=results_file, help="append a Markdown section to this file")
    parser.add_argument("--worker", choices=("jax", "build"), help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=("padded", "packed"), help=argparse.SUPPRESS)
    parser.add_argument("--pad-len", type=positive_int, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batches", type=positive_int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--imports-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--remat", nargs="+", default=["none", "full"], help="our remat policies to run")
    args = parser.parse_args(argv)
    if args.worker == "build":
        return build_inputs(args, args.work_dir)
    if args.worker:
        args.work = args.work_dir
        return jax_worker(args)

    # This process imports neither JAX nor PyTorch and builds nothing: a child's ru_maxrss starts from its
    # parent's high-water mark (kept across fork and exec), so a large parent would hide the children's peaks.
    command = ["benchmarks/step.py", *(argv if argv is not None else sys.argv[1:])]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="step_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    run_child(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            *command[1:],
            "--worker",
            "build",
            "--work-dir",
            str(work),
        ]
    )
    inputs = json.loads((work / "inputs.json").read_text())
    lengths = {k: np.asarray(v) for k, v in inputs["lengths"].items()}
    longest = int((lengths["prompt_with"] + lengths["target"]).max())
    args.same_pad_len = args.same_pad_len or -(-longest // 128) * 128
    args.same_micro_batch = args.same_micro_batch or args.examples
    if args.examples % args.same_micro_batch:
        parser.error("--same-micro-batch must divide --examples")
    baseline = {
        "torch": run_child([sys.executable, str(TORCH_PUBLIC_STEP), "--imports-only",
                            "--model-dir", "-", "--examples", "-", "--pad-len", "0"])[1],
        "jax": run_child([sys.executable, str(Path(__file__).resolve()), "--worker", "jax",
                          "--imports-only"])[1],
    }  # fmt: skip
    print(f"import-only peaks: torch {baseline['torch']:.0f} MiB, jax {baseline['jax']:.0f} MiB", flush=True)
    results = {case: measure_case(case, args, work, baseline) for case in args.cases}
    lines, failed = report(args, results, lengths, inputs["config"], command)
    from nextquill_jax.bench.record import publish

    publish(lines, args.append_results)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
