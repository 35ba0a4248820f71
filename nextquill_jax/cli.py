"""The `nextquill-jax` command: a thin dispatcher over one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their subcommand runs, so `nextquill-jax --help` does not import JAX.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("nextquill_jax.train.command", "train a model from a YAML config"),
    "evaluate": ("nextquill_jax.evaluate_command", "generate for a split and score it"),
    "effects": ("nextquill_jax.effects_report", "per-token causal effect report (HTML + PNG)"),
    "export": ("nextquill_jax.train.export_command", "write a Hugging Face directory from a checkpoint"),
    "data": ("nextquill_jax.data.command", "prepare, inspect or synthesise data"),
    "demo": ("nextquill_jax.demo", "the offline end-to-end demo"),
    "bench": ("nextquill_jax.bench_command", "run a benchmark from benchmarks/"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="nextquill-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
