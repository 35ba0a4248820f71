"""Compile time of the full training step against depth (scanned layers) and against sequence-length buckets.

The step is the project's real one (`train.step.make_train_step`: both forward passes, fused NextQuill loss,
backward, clipped AdamW) for a tiny Qwen2-shaped model, compiled from abstract shapes (nothing is allocated).
Each point is the median of `--repeats` fresh compilations, `jit(...).lower()` and `.compile()` timed apart
(`compile_seconds` of `benchmarks/compile_scan.py`, which measures the model's forward and gradient alone).

Depth sweep: `--layers` at `--seq-len`. Bucket sweep: `--buckets` (with-stream lengths; the without-history
stream is a quarter of it, the response slots an eighth, as a packed history-heavy row has) at 2 layers:
what bucketed batching pays, once per bucket.

    python benchmarks/compile.py                              # layers 2 4 8 16; buckets 256 512 1024 2048
    python benchmarks/compile.py --repeats 1 --append-results benchmarks/RESULTS.md

Exits 1 if the deepest model's compile time exceeds `--max-ratio` (default 2) times the shallowest's.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from compile_scan import compile_seconds

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.record import invoked_command, publish, results_file, results_header
from nextquill_jax.config import OptimConfig
from nextquill_jax.loss import LossConfig
from nextquill_jax.models import ModelConfig
from nextquill_jax.parallel import make_mesh
from nextquill_jax.subcommand import positive_int
from nextquill_jax.train.model_setup import abstract_model
from nextquill_jax.train.optimizer import learning_rate_schedule, make_optimizer
from nextquill_jax.train.state import TrainState
from nextquill_jax.train.step import StepSettings, make_train_step


def abstract_batch(rows: int, t_with: int, t_without: int, slots: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Batch shapes (`data/batch.py`): with_* [rows, t_with], without_* [rows, t_without], [rows, slots]."""
    out = {}
    for stream, t in (("with", t_with), ("without", t_without)):
        for name in ("ids", "positions", "segment_ids"):
            out[f"{stream}_{name}"] = jax.ShapeDtypeStruct((rows, t), jnp.int32)
    for name in ("response_index_with", "response_index_without", "labels"):
        out[name] = jax.ShapeDtypeStruct((rows, slots), jnp.int32)
    return out


def step_compile_seconds(
    num_layers: int, seq_len: int, rows: int, remat: str, repeats: int
) -> tuple[float, float]:
    """Median (lower s, compile s) of the train step of a tiny model with `num_layers` layers."""
    cfg = ModelConfig(
        family="qwen2", vocab_size=2048, hidden_size=64, intermediate_size=192, num_layers=num_layers,
        num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True, remat_policy=remat,
    )  # fmt: skip
    graphdef, abstract_params = abstract_model(cfg)
    optim = OptimConfig()
    tx = make_optimizer(optim, abstract_params, 1000)
    state = jax.eval_shape(
        lambda p: TrainState(
            step=jnp.zeros((), jnp.int32),
            params=p,
            opt_state=tx.init(p),
            rng=jax.random.PRNGKey(0),
            skipped=jnp.zeros((), jnp.int32),
        ),
        abstract_params,
    )
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    step = make_train_step(
        graphdef, tx, learning_rate_schedule(optim, 1000), StepSettings(loss=LossConfig()), mesh
    )
    batch = abstract_batch(rows, seq_len, max(seq_len // 4, 1), max(seq_len // 8, 1))
    with jax.set_mesh(mesh):
        return compile_seconds(step, state, batch, repeats=repeats)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=positive_int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument(
        "--seq-len", type=positive_int, default=512, help="with-stream length of the depth sweep"
    )
    parser.add_argument("--buckets", type=positive_int, nargs="*", default=[256, 512, 1024, 2048])
    parser.add_argument("--rows", type=positive_int, default=2)
    parser.add_argument("--remat", default="none", help="ModelConfig.remat_policy")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--max-ratio", type=float, default=2.0)
    parser.add_argument("--append-results", type=results_file, help="append a Markdown section to this file")
    args = parser.parse_args(argv)

    table = [
        "| sweep | layers | T_w / T_o / R | lower s | compile s | total s |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    totals = {}
    points = [("depth", n, args.seq_len) for n in args.layers] + [("bucket", 2, t) for t in args.buckets]
    for sweep, layers, seq_len in points:
        lower, compile_ = step_compile_seconds(layers, seq_len, args.rows, args.remat, args.repeats)
        if sweep == "depth":
            totals[layers] = lower + compile_
        shape = f"{seq_len} / {max(seq_len // 4, 1)} / {max(seq_len // 8, 1)}"
        table.append(
            f"| {sweep} | {layers} | {shape} | {lower:.2f} | {compile_:.2f} | {lower + compile_:.2f} |"
        )
        print(table[-1], flush=True)
    deep, shallow = max(totals), min(totals)
    ratio = totals[deep] / totals[shallow]
    ok = ratio <= args.max_ratio
    lines = results_header(
        "Compile time of the training step",
        invoked_command(["python", "benchmarks/compile.py"], argv),
        [
            f"tiny Qwen2 (hidden 64, 4/2 heads, MLP 192, vocab 2,048), {args.rows} rows, "
            f"remat {args.remat!r}; "
            f"whole train step (NextQuill loss, AdamW) from abstract shapes; median of {args.repeats} fresh "
            "compilations, seconds",
        ],
    )
    lines += [
        *table,
        "",
        f"- {deep} layers / {shallow} layers: {ratio:.2f}× (target ≤ {args.max_ratio}×): "
        + ("MET" if ok else "NOT MET"),
    ]
    publish(lines, args.append_results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
