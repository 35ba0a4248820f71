"""`nextquill-jax bench NAME [ARGS...]`: run one benchmark; ARGS go to it unchanged (`bench NAME --help`).

Every benchmark but `scale` is a script in the repository's `benchmarks/` folder, also runnable on its own as
`python benchmarks/SCRIPT.py`; it runs here in a child process of the same Python. `scale` is the scaling
harness in `nextquill_jax.bench.sweep` and needs only the installed package.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from nextquill_jax.subcommand import Subcommand

# name -> (script in benchmarks/, or None for the in-package harness; what it measures)
BENCHMARKS: dict[str, tuple[str | None, str]] = {
    "loss": ("loss_memory.py", "fused vs naive NextQuill loss: compiled temporary memory and time"),
    "step": ("step.py", "full training step vs the public code's PyTorch step: tokens/s and peak memory"),
    "attention": ("attention.py", "blockwise vs dense attention (value + gradient): memory and time"),
    "padding": ("padding.py", "padding efficiency: packing vs bucketing vs fixed 4,097-token padding"),
    "compile": ("compile.py", "compile time vs number of layers (scan) and vs sequence-length bucket"),
    "mfu": ("mfu.py", "tokens/s and MFU of the training step for Qwen2.5 0.5B / 1.5B shapes"),
    "prefill": ("prefill.py", "generation's prefill through the configured attention vs dense: memory, time"),
    "lora": (
        "lora.py",
        "LoRA vs full fine-tuning: step time, gradient + optimizer memory, base in int8 / nf4",
    ),
    "scale": (None, "scaling sweep from a YAML file (--config configs/scaling/...yaml): CSV + PNG"),
}


def benchmarks_dir() -> Path:
    """The repository's `benchmarks/` folder (next to the package in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """`bench`'s arguments: the benchmark's name and the arguments passed on to it."""
    parser.description = __doc__.splitlines()[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    listing = [f"  {name:<9} {help_}" for name, (_, help_) in BENCHMARKS.items()]
    parser.epilog = "benchmarks:\n" + "\n".join(listing)
    parser.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME", help="a benchmark listed below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark itself")


def run_bench(args: argparse.Namespace) -> int:
    """Run benchmark `args.name` with `args.args`; returns its exit status.

    Raises nothing: a missing `benchmarks/` folder (an installed package without the source tree) is reported
    with the fix and status 1.
    """
    script, _ = BENCHMARKS[args.name]
    if script is None:
        from nextquill_jax.bench import sweep

        return sweep.main(args.args)
    path = benchmarks_dir() / script
    if not path.exists():
        print(
            f"error: {path} not found: benchmark {args.name!r} is a script of the source repository. "
            "Fix: run it from a source checkout (pip install -e .).",
            file=sys.stderr,
        )
        return 1
    return subprocess.call([sys.executable, str(path), *args.args])


COMMANDS = {
    "bench": Subcommand(
        "run a benchmark from benchmarks/",
        add_bench_arguments,
        run_bench,
        "nextquill-jax bench lora --rank 8",
    )
}
