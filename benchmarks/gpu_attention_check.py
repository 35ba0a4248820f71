"""cuDNN flash attention vs the XLA einsum attention on a GPU, bf16: equality of outputs and timings.

For each shape (B, T, heads, kv heads, head_dim), with and without packed segments:
  - forward outputs of `attention_impl="cudnn"` and of the dense einsum (`xla_attention`, the setting
    `"xla_dense"`) on bf16 inputs: max / mean abs difference from the dense path run in float32 on the same
    values,
  - median time of the jitted forward, and of forward + backward (grad of the output sum w.r.t. q, k, v).
Then a 4-layer Qwen2.5-0.5B-shaped CausalLM (random weights, fp32 params, bf16 compute): logits of
`cudnn` and `xla_dense` compared and the forward timed.

    python benchmarks/gpu_attention_check.py
    python benchmarks/gpu_attention_check.py --append-results benchmarks/RESULTS.md

Exits 1 if an output differs by more than --tolerance (default 2e-2, the bf16 level) or no GPU is present.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.record import results_file
from nextquill_jax.models import CausalLM, model_preset
from nextquill_jax.models.attention import attention_mask, cudnn_attention, xla_attention

SHAPES = [  # (B, T, H, K, Hd)
    (8, 1024, 14, 2, 64),  # Qwen2.5-0.5B heads
    (4, 2048, 16, 2, 128),  # Qwen2.5-3B heads
    (2, 4096, 16, 8, 128),  # Qwen3-1.7B heads, long rows
]


def median_time(fn, *args, repeats: int = 20) -> float:
    """Median wall seconds of fn(*args) after compilation and two warm-up calls."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def packed_segments(b: int, t: int) -> np.ndarray:
    """Each row: three examples of unequal length, then 5% padding (segment 0)."""
    seg = np.zeros((b, t), np.int32)
    cuts = [0, int(0.2 * t), int(0.55 * t), int(0.95 * t)]
    for k in range(3):
        seg[:, cuts[k] : cuts[k + 1]] = k + 1
    return seg


def implementations(seg: jax.Array, packed: bool) -> dict:
    """name -> attention function (q, k, v) -> out, with the segment ids bound."""
    slots = jnp.arange(seg.shape[1])
    return {
        "xla": lambda q, k, v: xla_attention(q, k, v, attention_mask(seg, seg, slots, slots)),
        "cudnn": lambda q, k, v: cudnn_attention(q, k, v, seg if packed else None),
    }


def forward_backward(fn):
    """jit of the gradient of sum(fn(q, k, v)) w.r.t. q, k and v."""
    return jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))


def attention_row(shape: tuple[int, ...], packed: bool) -> tuple[str, float]:
    """One table row and the cuDNN output's max abs difference."""
    b, t, h, kv, hd = shape
    rng = np.random.default_rng(0)
    exact = [
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in ((b, t, h, hd), (b, t, kv, hd), (b, t, kv, hd))
    ]
    qkv = [a.astype(jnp.bfloat16) for a in exact]
    seg = jnp.asarray(packed_segments(b, t) if packed else np.ones((b, t), np.int32))
    fns = implementations(seg, packed)
    reference = np.asarray(jax.jit(fns["xla"])(*exact), np.float32)
    real = np.asarray(seg) != 0  # padding outputs are unused (and defined differently)
    diffs = {
        name: np.abs(np.asarray(jax.jit(fn)(*qkv).astype(jnp.float32)) - reference)[real]
        for name, fn in fns.items()
    }
    times = {
        name: (median_time(jax.jit(fn), *qkv), median_time(forward_backward(fn), *qkv))
        for name, fn in fns.items()
    }
    row = (
        f"| ({b}, {t}, {h}, {kv}, {hd}) | {'packed' if packed else 'causal'} | "
        f"{diffs['cudnn'].max():.2e} / {diffs['cudnn'].mean():.1e} | {diffs['xla'].max():.2e} | "
        f"{times['xla'][0] * 1e3:.2f} | {times['cudnn'][0] * 1e3:.2f} | "
        f"{times['xla'][1] * 1e3:.2f} | {times['cudnn'][1] * 1e3:.2f} |"
    )
    print(row, flush=True)
    return row, float(diffs["cudnn"].max())


def model_row(tolerance: float) -> tuple[str, bool]:
    cfg = model_preset("qwen2.5-0.5b", num_layers=4, compute_dtype="bfloat16")
    _, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
    seg_np = packed_segments(4, 1024)
    pos_np = np.concatenate([np.arange((seg_np[0] == s).sum()) for s in (1, 2, 3, 0)])[None].repeat(4, 0)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 1024)), jnp.int32)
    seg, pos = jnp.asarray(seg_np), jnp.asarray(pos_np, jnp.int32)
    outs, times = {}, {}
    # "xla": the dense einsum the table's rows call `xla_attention` (the `xla` setting is blockwise since).
    for name, impl in (("xla", "xla_dense"), ("cudnn", "cudnn")):
        # Same weights, a graph built with the other attention implementation.
        graphdef, _ = nnx.split(
            nnx.eval_shape(lambda impl=impl: CausalLM(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0)))
        )
        fwd = jax.jit(lambda s, i, p, sg, graphdef=graphdef: nnx.merge(graphdef, s)(i, p, sg))
        outs[name] = np.asarray(fwd(state, ids, pos, seg))
        times[name] = median_time(fwd, state, ids, pos, seg, repeats=10)
    real = seg_np != 0
    diff = np.abs(outs["cudnn"] - outs["xla"])[real]
    scale = np.abs(outs["xla"][real]).max()
    ok = bool(diff.max() <= tolerance * max(scale, 1.0))
    row = (
        f"qwen2.5-0.5b shape, 4 layers, fp32 params / bf16 compute, ids (4, 1024) packed: logits "
        f"cudnn vs xla max abs diff {diff.max():.3e} (max |logit| {scale:.2f}); "
        f"forward {times['xla'] * 1e3:.2f} ms (xla) vs "
        f"{times['cudnn'] * 1e3:.2f} ms (cudnn)"
    )
    print(row, flush=True)
    return row, ok


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=2e-2)
    parser.add_argument("--append-results", type=results_file, default=None)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"no GPU: JAX backend is {jax.default_backend()!r}", file=sys.stderr)
        return 1
    results = [attention_row(shape, packed) for shape in SHAPES for packed in (False, True)]
    rows = [row for row, _ in results]
    ok = all(diff <= args.tolerance for _, diff in results)
    model_line, model_ok = model_row(args.tolerance)
    device = jax.devices()[0]
    lines = [
        "",
        f"## cuDNN vs XLA attention on GPU, bf16 ({datetime.date.today().isoformat()})",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- machine: {device.device_kind} ({platform.machine()}), jax {jax.__version__}, "
        f"python {platform.python_version()}",
        "- diff = |impl(bf16) - xla(float32)| over non-padding outputs; times = median of 20 jitted calls",
        "",
        "| (B, T, H, K, Hd) | mask | cudnn diff max / mean | xla bf16 diff max | xla fwd ms | cudnn fwd ms "
        "| xla fwd+bwd ms | cudnn fwd+bwd ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"- model: {model_line}",
    ]
    if args.append_results:
        with args.append_results.open("a") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok and model_ok else 1


if __name__ == "__main__":
    sys.exit(main())
