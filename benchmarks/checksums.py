"""What the integrity checksums cost: a full fine-tuning train state of the SmolLM2-135M shape (parameters and
both AdamW moments, float32, random values) saved and restored by the project's `Checkpointer`, with the time
its manifest takes (BLAKE2b-128 of every file, `data.checksums`) on each side; and the raw hashing rate, which
is also what rechecking prepared token arrays and source files costs per byte.

    python benchmarks/checksums.py
    python benchmarks/checksums.py --append-results benchmarks/RESULTS.md

Save: `Checkpointer.save(wait=True)` (the manifest is written inside it, before the commit) and the manifest
alone, hashed again from the same files. Restore: `Checkpointer.check` (what a resume verifies) and
`Checkpointer.restore`. Each is the best of `--rounds`.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import tempfile
import time
from pathlib import Path

import grain
import jax
import numpy as np

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.bench.record import publish, results_file, results_header
from nextquill_jax.config import CheckpointConfig
from nextquill_jax.models import model_preset
from nextquill_jax.subcommand import positive_int
from nextquill_jax.train import model_setup
from nextquill_jax.train.checkpoint import Checkpointer, write_manifest

MB = 1e6


def random_state(seed: int = 0) -> dict:
    """{"params", "mu", "nu"}: three float32 trees of the SmolLM2-135M parameter shapes."""
    abstract = model_setup.abstract_model(model_preset("smollm2-135m"))[1]
    rng = np.random.default_rng(seed)
    draw = lambda a: rng.standard_normal(a.shape, dtype=np.float32)
    return {name: jax.tree.map(draw, abstract) for name in ("params", "mu", "nu")}


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--append-results", type=results_file, default=None)
    args = parser.parse_args(argv)

    state = random_state()
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    blob = np.random.default_rng(1).bytes(256 * 2**20)
    rate = len(blob) / best(lambda: hashlib.blake2b(blob, digest_size=16).digest(), args.rounds) / MB
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp) / "ckpt", CheckpointConfig(keep=1, best_metric=None, async_save=False))
        data = iter(grain.MapDataset.range(10).to_iter_dataset())
        step = iter(range(1, 1000))
        save = lambda: ckpt.save(next(step), state, data, config={}, progress={}, wait=True)
        save_s = best(save, args.rounds)
        last = ckpt.latest_step()
        step_dir = ckpt.directory / str(last)
        manifest_s = best(lambda: write_manifest(step_dir), args.rounds)
        check_s = best(lambda: ckpt.check(last), args.rounds)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state)
        restore_s = best(lambda: jax.block_until_ready(ckpt.restore(last, abstract, data)[0]), args.rounds)
        ckpt.close()

    rows = [
        "| measure | seconds | share |",
        "| --- | ---: | ---: |",
        f"| save, manifest included | {save_s:.2f} | |",
        f"| manifest alone (hash every file) | {manifest_s:.2f} | {manifest_s / save_s:.0%} of the save |",
        f"| restore (Orbax) | {restore_s:.2f} | |",
        f"| verify before restoring | {check_s:.2f} | +{check_s / restore_s:.0%} on the restore |",
    ]
    header = results_header(
        "Integrity checksums: BLAKE2b-128 on a SmolLM2-135M train state (CPU, float32)",
        ["python", *map(shlex.quote, sys.argv)],
        [
            f"state: parameters + AdamW mu and nu, float32, {size / MB:.0f} MB; best of {args.rounds}",
            f"raw BLAKE2b-128 rate, one thread: {rate:.0f} MB/s (prepared token arrays and source files are "
            f"rechecked at this rate: {1e3 / rate:.2f} s per GB)",
        ],
    )
    lines = [*header, *rows]
    publish(lines, args.append_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
