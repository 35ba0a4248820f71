r"""What the packed-segment mask costs cuDNN attention (GPU); whether cuDNN's packed mode is right and faster.

    python benchmarks/cudnn_mask.py [--rows 4 --seq-len 4096 --heads 12 --kv-heads 2 --head-dim 128]
        [--segments 4] [--max-segments M] [--tolerance 0.02] [--append-results FILE]

1. Check: `models.attention.cudnn_attention` in its packed mode (segment ids as per-segment lengths and
   offsets, `ModelConfig.cudnn_max_segments` = M, private JAX API) against float32 blockwise XLA attention
   on the same bf16 values, outputs at real tokens and q/k/v gradients (a random cotangent, zero at padding),
   on rows of unequal segments: M examples then padding, a left-padded single example (a prefill prompt),
   all padding, min(2, M) examples filling the row. The dense-mask path's errors on the same rows are shown
   as the bf16 level the incumbent reaches. Exit 1 (after printing and appending the results) unless every
   packed output and gradient is finite, padding outputs are 0, and each error (max |error| / max
   |reference|) is within max(--tolerance, 2 × the dense-mask path's). On a jax whose packed-mode kv offsets
   count the key's heads (`cudnn_packed.kv_offsets_follow_key_heads`, jax PR #39521), grouped k / v passed
   as they are (`repeat_kv=False`, which training does not use yet) is checked the same way and timed beside
   the repeated form: the evidence for dropping the repeat.
2. Timing, on rows of `--segments` equal examples: forward and forward+backward of the dense mask, the packed
   mode and no segment ids at all (causal only, cuDNN's fastest path; it computes a different function, tokens
   seeing earlier examples of their row, and is timed as the floor a packed kernel could reach). Times are of
   one layer's attention; multiply by the layers and both streams for the step's share.

Without a GPU the script's own logic runs against the tests' emulation of the private API (the packed calls go
through the real wrapper, the dense-mask and causal calls through `xla_dense`), at a small shape:

    PYTHONPATH=. JAX_PLATFORMS=cpu python - --rows 4 --seq-len 256 --heads 4 --kv-heads 2 --head-dim 64 \
        --repeats 2 <<'EOF'
    import runpy
    from tests.models import cudnn_emulation
    cudnn_emulation.install()
    runpy.run_path("benchmarks/cudnn_mask.py", run_name="__main__")
    EOF
"""

from __future__ import annotations

import inspect
import time

import numpy as np

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.record import results_file
from nextquill_jax.subcommand import positive_int


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


def check_rows(rows: int, t: int, max_segments: int) -> np.ndarray:
    """Segment ids [rows, t] cycling through four layouts: `max_segments` unequal examples (lengths 1 : 2 :
    ...) over 95% of the row then padding; 25% left padding then one example; all padding; min(2,
    max_segments) unequal examples filling the row."""
    seg = np.zeros((rows, t), np.int32)
    for r in range(rows):
        layout = r % 4
        if layout == 2:
            continue
        n, start, end = {
            0: (max_segments, 0, t * 95 // 100),
            1: (1, t // 4, t),
            3: (min(2, max_segments), 0, t),
        }[layout]
        weights = np.cumsum(np.arange(n + 1))  # 0, 1, 3, 6, ...: unequal lengths
        cuts = start + (end - start) * weights // weights[-1]
        for k in range(n):
            seg[r, cuts[k] : cuts[k + 1]] = k + 1
    return seg


PACKED = "cuDNN packed offsets"
GROUPED = "cuDNN packed offsets, grouped k/v"


def check_packed(
    attention, qkv, seg: np.ndarray, max_segments: int, tolerance: float, grouped: bool = False
) -> tuple[list[str], bool]:
    """Table lines of the packed and dense-mask paths' errors against float32 blockwise XLA; the verdict.

    `grouped`: also check the packed mode given grouped k / v as they are (`repeat_kv=False`), which only a
    jax whose kv offsets count the key's heads takes; its verdict is a line of its own and counts in the
    returned one.
    """
    import jax
    import jax.numpy as jnp

    from nextquill_jax.models.cudnn_packed import cudnn_packed_attention

    real = seg > 0
    seg_j = jnp.asarray(seg)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(qkv[0].shape) * real[..., None, None])
    paths = {
        "blockwise xla, float32 (reference)": lambda q, k, v: attention.self_attention(q, k, v, seg_j, "xla"),
        PACKED: lambda q, k, v: attention.cudnn_attention(q, k, v, seg_j, max_segments),
        "cuDNN dense mask": lambda q, k, v: attention.cudnn_attention(q, k, v, seg_j),
    }
    if grouped:
        paths[GROUPED] = lambda q, k, v: cudnn_packed_attention(q, k, v, seg_j, max_segments, repeat_kv=False)

    def value_and_grads(fn, *args):
        out, vjp = jax.vjp(fn, *args)
        return out, *vjp(cotangent.astype(out.dtype))

    results = {}
    for name, fn in paths.items():
        args = [x.astype(jnp.float32) for x in qkv] if "reference" in name else qkv
        got = jax.jit(lambda *a, fn=fn: value_and_grads(fn, *a))(*args)
        results[name] = [np.asarray(x, np.float32) for x in got]
    reference = results.pop(next(iter(paths)))
    where = [real, slice(None), slice(None), slice(None)]  # outputs at real tokens; gradients everywhere
    errors = {
        name: [
            np.abs(x[w] - r[w]).max() / np.abs(r[w]).max()
            for x, r, w in zip(got, reference, where, strict=True)
        ]
        for name, got in results.items()
    }
    limits = [max(tolerance, 2 * e) for e in errors["cuDNN dense mask"]]
    lines = [
        "| attention call | output | dq | dk | dv |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs) + " |" for name, errs in errors.items()),
        "| packed limit | " + " | ".join(f"{e:.2e}" for e in limits) + " |",
        "",
    ]
    verdicts = []
    for name, title in ((PACKED, "Packed offsets"), (GROUPED, "Packed offsets with grouped k/v")):
        if name not in results:
            continue
        finite = all(np.isfinite(x).all() for x in results[name])
        zero_padding = bool((results[name][0][~real] == 0).all())
        ok = finite and zero_padding and all(e <= lim for e, lim in zip(errors[name], limits, strict=True))
        verdicts.append(ok)
        lines.append(
            f"{title}: {'PASS' if ok else 'FAIL'} (finite outputs and gradients: {finite}; padding outputs "
            f"0: {zero_padding}; errors within the limit row)."
        )
    return lines, all(verdicts)


def _mask_backward_computes_dbias() -> bool:
    """Whether jax's cuDNN backward computes a [B, 1, T, T] gradient for a boolean mask (until jax PR #39512,
    after 0.11.0, it did, and discarded it): part of what the dense-mask path costs here."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    return "bias_is_differentiable" not in inspect.getsource(fused)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=4)
    parser.add_argument("--seq-len", type=positive_int, default=4096)
    parser.add_argument("--heads", type=positive_int, default=12)
    parser.add_argument("--kv-heads", type=positive_int, default=2)
    parser.add_argument("--head-dim", type=positive_int, default=128)
    parser.add_argument(
        "--segments", type=positive_int, default=4, help="examples packed per row when timing (equal)"
    )
    parser.add_argument("--max-segments", type=positive_int, help="the packed mode's M (default: --segments)")
    parser.add_argument("--tolerance", type=float, default=2e-2, help="packed error allowed, of max |ref|")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--append-results", type=results_file)
    args = parser.parse_args(argv)
    max_segments = args.max_segments or args.segments

    import jax
    import jax.numpy as jnp

    from nextquill_jax.bench.record import append_results, invoked_command, results_header
    from nextquill_jax.models import attention
    from nextquill_jax.models.cudnn_packed import cudnn_packed_attention, kv_offsets_follow_key_heads

    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    b, t, h, k, hd = args.rows, args.seq_len, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, hd), jnp.bfloat16)
    kv = [jax.random.normal(key, (b, t, k, hd), jnp.bfloat16) for key in keys[1:]]

    # Grouped k / v unrepeated: only where this jax's offsets allow it (jax PR #39521), to be compared.
    grouped = k != h and kv_offsets_follow_key_heads()
    check_lines, ok = check_packed(
        attention, (q, *kv), check_rows(b, t, max_segments), max_segments, args.tolerance, grouped
    )
    print("\n".join(check_lines))

    segment_ids = jnp.broadcast_to(1 + jnp.arange(t) * args.segments // t, (b, t)).astype(jnp.int32)

    def call(seg, m, repeat_kv=True):
        """cudnn_attention(q, k, v, seg, m), or the packed mode given grouped k / v as they are."""
        if not repeat_kv:
            return lambda q, k, v: cudnn_packed_attention(q, k, v, seg, m, repeat_kv=False)
        return lambda q, k, v: attention.cudnn_attention(q, k, v, seg, m)

    rows = []
    calls = [
        ("packed: segment mask", call(segment_ids, None)),
        (f"packed: segment offsets (M = {max_segments})", call(segment_ids, max_segments)),
        ("causal only (floor)", call(None, None)),
    ]
    if grouped:
        grouped_call = call(segment_ids, max_segments, repeat_kv=False)
        calls.insert(2, (f"packed: segment offsets (M = {max_segments}), grouped k/v", grouped_call))
    for label, fn in calls:
        forward = jax.jit(fn)
        backward = jax.jit(
            jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
        )
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
        command = invoked_command(["python", "benchmarks/cudnn_mask.py"], argv)
        header = results_header(
            "cuDNN attention: the packed-segment mask against cuDNN's packed mode (segment offsets)",
            command,
            [
                f"shape: {b} rows × {t} tokens, {h} query heads ({k} kv) of {hd}, bf16; one layer; best of "
                f"{args.repeats} after a warm-up",
                f"check rows: `check_rows({b}, {t}, {max_segments})` (M unequal examples + padding, "
                f"left-padded prompt, all padding, min(2, M) examples); errors = max |error| / max |float32 "
                f"blockwise reference|, outputs at real tokens, gradients everywhere",
                f"timing rows: {args.segments} equal examples per row",
                f"training's packed mode repeats k/v to the query heads (jax <= 0.11.0's kv-offset bug): "
                f"{h != k}; this jax's kv offsets count the key's heads (grouped k/v checked and timed too): "
                f"{grouped}; this jax's dense-mask backward computes a bias gradient: "
                f"{_mask_backward_computes_dbias()}",
            ],
        )
        append_results(args.append_results, [*header, *check_lines, "", *lines])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
