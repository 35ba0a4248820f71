"""What a subcommand of `nextquill-jax` is: the contract between `cli.py` and each `<subpackage>/command.py`.

Imports nothing of this package, so every layer's command module can name it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple


class Subcommand(NamedTuple):
    """One subcommand: its one-line help, `add_arguments(parser)`, `run(args) -> exit status`, and an example
    command line that its `--help` ends with.

    A command module lists its subcommands as `COMMANDS: dict[str, Subcommand]` and imports JAX only inside
    `run`, so `nextquill-jax --help` stays fast.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    example: str
