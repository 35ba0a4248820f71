"""Compile time of the CausalLM forward (and forward + backward) against depth: the layers are scanned, so a
16-layer model should compile about as fast as a 2-layer one.

Tiny model (hidden 64, 4 heads / 2 kv heads, mlp 128, vocab 300), ids [2, 64]. Times `jit(...).lower()` and
`.compile()` separately, median of --repeats fresh compilations each.

    python benchmarks/compile_scan.py
    python benchmarks/compile_scan.py --layers 2 16 64 --append-results benchmarks/RESULTS.md

Exits 1 if the forward compile time of any depth exceeds --max-ratio (default 2) times the shallowest's.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.record import invoked_command, publish, results_file
from nextquill_jax.models import CausalLM, ModelConfig
from nextquill_jax.subcommand import positive_int


def compile_seconds(fn, *args, repeats: int) -> tuple[float, float]:
    """Median (lower seconds, compile seconds) of `repeats` fresh jit compilations of fn(*args)."""
    lowers, compiles = [], []
    for _ in range(repeats):
        jitted = jax.jit(lambda *a: fn(*a))  # a new function each time: no cached trace or executable
        start = time.perf_counter()
        lowered = jitted.lower(*args)
        middle = time.perf_counter()
        lowered.compile()
        lowers.append(middle - start)
        compiles.append(time.perf_counter() - middle)
    return statistics.median(lowers), statistics.median(compiles)


def measure(num_layers: int, repeats: int, remat: str) -> dict[str, float]:
    cfg = ModelConfig(
        family="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=num_layers,
        num_heads=4, num_kv_heads=2, head_dim=16, remat_policy=remat,
    )  # fmt: skip
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    forward = lambda s, x: nnx.merge(graphdef, s)(x)
    loss = lambda s, x: forward(s, x).mean()
    fwd_lower, fwd_compile = compile_seconds(forward, state, ids, repeats=repeats)
    bwd_lower, bwd_compile = compile_seconds(jax.grad(loss), state, ids, repeats=repeats)
    return {
        "fwd_lower": fwd_lower,
        "fwd_compile": fwd_compile,
        "grad_lower": bwd_lower,
        "grad_compile": bwd_compile,
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=positive_int, nargs="+", default=[2, 16])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--remat", default="full", help="remat policy used for the backward compile")
    parser.add_argument("--max-ratio", type=float, default=2.0)
    parser.add_argument("--append-results", type=results_file, default=None)
    args = parser.parse_args(argv)
    results = {n: measure(n, args.repeats, args.remat) for n in args.layers}
    shallow = min(args.layers)
    fwd_total = {n: r["fwd_lower"] + r["fwd_compile"] for n, r in results.items()}
    ratios = {n: fwd_total[n] / fwd_total[shallow] for n in args.layers if n != shallow}
    lines = [
        "",
        f"## Compile time vs depth, scanned layers ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{shlex.join(invoked_command(['python', 'benchmarks/compile_scan.py'], argv))}`",
        f"- machine: {platform.node()} ({platform.machine()}), backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), jax {jax.__version__}, flax {flax.__version__}, "
        f"python {platform.python_version()}",
        f"- model: llama-style, hidden 64, 4/2 heads, mlp 128, vocab 300; ids [2, 64]; grad with remat "
        f"'{args.remat}'; median of {args.repeats} fresh compilations, seconds",
        "",
        "| layers | fwd lower | fwd compile | fwd total | grad lower | grad compile | grad total |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in args.layers:
        r = results[n]
        fwd, grad = r["fwd_lower"] + r["fwd_compile"], r["grad_lower"] + r["grad_compile"]
        lines.append(
            f"| {n} | {r['fwd_lower']:.3f} | {r['fwd_compile']:.3f} | {fwd:.3f} "
            f"| {r['grad_lower']:.3f} | {r['grad_compile']:.3f} | {grad:.3f} |"
        )
    ratio_text = ", ".join(f"{n} / {shallow} layers {ratio:.2f}x" for n, ratio in ratios.items())
    lines += ["", f"- forward compile time ratios: {ratio_text} (limit {args.max_ratio}x)"]
    publish(lines, args.append_results)
    return 0 if all(ratio < args.max_ratio for ratio in ratios.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
