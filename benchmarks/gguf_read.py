"""What reading a GGUF checkpoint costs: the packaged SmolLM2-135M file's metadata and tensor table read by
`models.gguf_file.read_gguf_file` against the `gguf` package's `GGUFReader` (which `read_gguf` used before),
in the same process; `read_gguf` whole (layout, every tensor dequantized to float32, Hugging Face names);
and the host's peak memory (tracemalloc: NumPy's and Python's allocations, not XLA's) while
`model_from_hf` builds the model from `read_gguf`'s tensors, read as the load asks for them, against the
same load from all of them read first into a dict (what `read_gguf` gave until 2026-12-05).

    python benchmarks/gguf_read.py
    python benchmarks/gguf_read.py --append-results benchmarks/RESULTS.md

Each is the best of `--rounds` alternating rounds after a first call of each (the file is then in the page
cache).
"""

from __future__ import annotations

import math
import shlex
import sys
import tracemalloc
from collections.abc import Callable
from importlib.metadata import version

import gguf

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.harness import alternating_best_seconds
from nextquill_jax.bench.record import publish, results_file, results_header
from nextquill_jax.models.gguf import read_gguf, read_gguf_config
from nextquill_jax.models.gguf_file import read_gguf_file
from nextquill_jax.models.hf import model_from_hf
from nextquill_jax.models.packaged import packaged_model_path
from nextquill_jax.subcommand import positive_int


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--append-results", type=results_file, default=None)
    args = parser.parse_args(argv)

    path = packaged_model_path("smollm2-135m")
    contents = read_gguf_file(path)
    best = alternating_best_seconds(
        {
            "reader": lambda: gguf.GGUFReader(path),
            "ours": lambda: read_gguf_file(path),
            "config": lambda: read_gguf_config(path),
            "whole": lambda: _read_every_tensor(path),
        },
        rounds=args.rounds,
    )
    config, tensors = read_gguf(path)
    as_read = _peak_bytes(lambda: model_from_hf(config, tensors))
    read_first = _peak_bytes(lambda: model_from_hf(config, _read_every_tensor(path)))
    float32_mib = sum(4 * math.prod(tensors.shape(name)) for name in tensors) / 2**20
    reader_s, ours_s, config_s, whole_s = best["reader"], best["ours"], best["config"], best["whole"]
    rows = [
        "| read | seconds | against GGUFReader |",
        "| --- | ---: | ---: |",
        f"| `gguf.GGUFReader` (metadata and tensor table) | {reader_s:.3f} | 1.00 |",
        f"| `read_gguf_file` (the same) | {ours_s:.3f} | {ours_s / reader_s:.3f} |",
        f"| `read_gguf_config` (config.json, metadata only) | {config_s:.3f} | {config_s / reader_s:.3f} |",
        f"| `read_gguf`, every tensor read (float32) | {whole_s:.3f} | {whole_s / reader_s:.3f} |",
        "",
        f"| `model_from_hf` of the file's tensors (float32 total {float32_mib:,.1f} MiB) | host peak MiB "
        "| against all read first |",
        "| --- | ---: | ---: |",
        f"| all read first into a dict | {read_first / 2**20:,.1f} | 1.00 |",
        f"| read as the load asks (`GGUFTensors`) | {as_read / 2**20:,.1f} | {as_read / read_first:.3f} |",
    ]
    header = results_header(
        "GGUF reading: the file's layout (struct against gguf's GGUFReader), its tensors, and the host's "
        "peak memory while a model loads from them",
        ["python", *map(shlex.quote, sys.argv)],
        [
            f"file: {path.name}, {path.stat().st_size / 1e6:.0f} MB, {len(contents.metadata)} metadata keys "
            f"({len(contents.metadata.get('tokenizer.ggml.tokens', []))} tokens, "
            f"{len(contents.metadata.get('tokenizer.ggml.merges', []))} merges), {len(contents.tensors)} "
            f"tensors; gguf {version('gguf')}; best of {args.rounds} alternating rounds after a warm-up",
        ],
    )
    lines = [*header, *rows]
    publish(lines, args.append_results)
    return 0


def _read_every_tensor(path) -> dict:
    _, tensors = read_gguf(path)
    return {name: tensors[name] for name in tensors}


def _peak_bytes(load: Callable[[], object]) -> int:
    """The largest host memory tracemalloc saw traced while `load` ran, in bytes."""
    tracemalloc.start()
    try:
        load()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


if __name__ == "__main__":
    sys.exit(main())
