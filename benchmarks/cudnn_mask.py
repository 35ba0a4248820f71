"""What the packed-segment mask costs cuDNN attention (GPU): forward and forward+backward time of
`models.attention.cudnn_attention` on packed rows (segment ids: a dense [B, 1, T, T] boolean mask) against the
same call without segment ids (causal only, cuDNN's fastest path), at the MFU benchmark's shape.

    python benchmarks/cudnn_mask.py [--rows 4 --seq-len 4096 --heads 12 --kv-heads 2 --head-dim 128]
        [--segments 4] [--append-results FILE]

The causal-only call computes a different function (tokens see earlier examples of their row); it is timed as
the floor that a packed-sequence kernel (segment ids or per-example offsets instead of a mask) could reach.
Times are of one layer's attention; multiply by the layers and both streams for the step's share.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _time(fn, args, repeats: int) -> float:
    """Best wall seconds of `fn(*args)` after one warm-up call (compile excluded)."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--segments", type=int, default=4, help="examples packed per row (equal lengths)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--append-results", type=Path)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from nextquill_jax.bench.record import append_results, results_header
    from nextquill_jax.models.attention import cudnn_attention

    b, t, h, k, hd = args.rows, args.seq_len, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, hd), jnp.bfloat16)
    kv = [jax.random.normal(key, (b, t, k, hd), jnp.bfloat16) for key in keys[1:]]
    segment_ids = jnp.broadcast_to(1 + jnp.arange(t) * args.segments // t, (b, t)).astype(jnp.int32)

    def loss(q, k, v, seg):
        return cudnn_attention(q, k, v, seg).astype(jnp.float32).sum()

    rows = []
    for label, seg in (("packed: segment mask", segment_ids), ("causal only (floor)", None)):
        forward = jax.jit(lambda q, k, v, s=seg: cudnn_attention(q, k, v, s))
        backward = jax.jit(jax.grad(lambda q, k, v, s=seg: loss(q, k, v, s), argnums=(0, 1, 2)))
        fwd = _time(forward, (q, *kv), args.repeats)
        both = _time(backward, (q, *kv), args.repeats)
        rows.append((label, fwd, both))
    lines = [
        "| attention call | forward ms | forward+backward ms | vs causal only |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {label} | {fwd * 1e3:.2f} | {both * 1e3:.2f} | {both / rows[-1][2]:.2f}× |"
            for label, fwd, both in rows
        ),
    ]
    print("\n".join(lines))
    if args.append_results:
        command = ["python", "benchmarks/cudnn_mask.py", *(argv if argv is not None else [])]
        header = results_header(
            "cuDNN attention: the packed-segment mask's cost",
            command,
            [
                f"shape: {b} rows × {t} tokens, {h} query heads ({k} kv) of {hd}, bf16, {args.segments} "
                f"equal examples per row; one layer; best of {args.repeats} after a warm-up"
            ],
        )
        append_results(args.append_results, [*header, *lines])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
