"""The `nextquill-jax` command: a thin dispatcher over the subpackages' `command.py` modules.

Each of them lists its subcommands in `COMMANDS` (see `subcommand.Subcommand`); this module only collects
them and dispatches. Command modules import JAX only when a subcommand runs, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nextquill_jax.subcommand import Subcommand

COMMAND_MODULES = (
    "nextquill_jax.train.command",
    "nextquill_jax.eval.command",
    "nextquill_jax.data.command",
    "nextquill_jax.demo.command",
    "nextquill_jax.bench.command",
)


def subcommands() -> dict[str, Subcommand]:
    """Every subcommand by name, in the order of `COMMAND_MODULES`."""
    found: dict[str, Subcommand] = {}
    for module_name in COMMAND_MODULES:
        found.update(importlib.import_module(module_name).COMMANDS)
    return found


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; `args.command` names the one chosen."""
    parser = argparse.ArgumentParser(prog="nextquill-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in subcommands().items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(subcommands()[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
