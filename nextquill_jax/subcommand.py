"""What a subcommand of `nextquill-jax` is: the contract between `cli.py` and each `<subpackage>/command.py`,
how a command with actions adds one (`add_action`), and the argparse types those modules share for counts
(`positive_int`, `non_negative_int`, `sampling_seed`), settings
(`positive_float`, `non_negative_float`, `dce_threshold`, `probability`) and directories (`directory`), and
the line an error the user fixes is printed as (`error_line`).

Imports nothing of this package, so every layer's command module can name it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

# The positional that takes a command's `section.key=value` config overrides (`train`, `data prepare`):
# `cli.parse_args` gives it those written after an option too.
OVERRIDES = "overrides"


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


def add_action(
    sub: argparse._SubParsersAction, name: str, help: str, example: str
) -> argparse.ArgumentParser:
    """Add the action `name` of a command with actions (`data prepare`, `checkpoint verify`) to `sub`, the
    command's subparsers: its `--help` opens with `help` as a sentence and ends with `example`, as a
    command's own does (`cli.build_parser`). Returns the action's parser, for its arguments."""
    return sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def error_line(e: BaseException, message: str | None = None) -> str:
    """What a command prints for an error the user fixes: `error: ` and its message (or `message`, a
    command's own wording of it), then the notes added where it passed (`BaseException.add_note`: `compare`
    names the run it came from), space-separated."""
    return " ".join([f"error: {e if message is None else message}", *getattr(e, "__notes__", ())])


def positive_int(text: str) -> int:
    """An argparse `type` for a count that must be at least 1 (`--batch-size`, `--max-examples`, ...): 0 or a
    negative is refused while the command line is parsed, before any work.

    Raises:
        argparse.ArgumentTypeError: `text` is not an integer >= 1 (argparse prints it with the flag, exit 2).
    """
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse `type` for an index or a count where 0 means off (`data show --index`, `--top-k`).

    Raises:
        argparse.ArgumentTypeError: `text` is not an integer >= 0.
    """
    return _int_at_least(text, 0)


def directory(text: str) -> Path:
    """An argparse `type` for a directory a command reads or writes (`--workdir`, `--out`): an empty one is
    refused, where `Path("")` would be the current directory (`--out "$DIR"` with DIR unset would write the
    command's files, or train a run, there).

    Raises:
        argparse.ArgumentTypeError: `text` is empty or whitespace.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "expected a directory, got an empty string (an unset shell variable?)"
        )
    return Path(text)


def sampling_seed(text: str) -> int:
    """An argparse `type` for a sampling seed (`evaluate --seed`): an integer in [0, 2**32), the seeds JAX
    tells apart (it keeps a seed's low 32 bits).

    Raises:
        argparse.ArgumentTypeError: `text` is not such an integer.
    """
    value = _int_at_least(text, 0)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return value


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def logit_scale(text: str) -> float:
    """An argparse `type` for a number in [1e-6, 1e6] that float32 logits are divided or multiplied by
    (`evaluate --temperature`, `--repetition-penalty`: `generate.FLOAT32_SAFE`, which this module states
    without importing JAX; a test checks they agree).

    Raises:
        argparse.ArgumentTypeError: `text` is not a number in [1e-6, 1e6].
    """
    return _float_where(text, lambda x: 1e-6 <= x <= 1e6, "in [1e-06, 1e+06]")


def positive_float(text: str) -> float:
    """An argparse `type` for a finite number > 0 (`effects --high`).

    Raises:
        argparse.ArgumentTypeError: `text` is not a finite number > 0.
    """
    return _float_where(text, lambda x: x > 0, "> 0")


def non_negative_float(text: str) -> float:
    """An argparse `type` for a finite number >= 0 (`effects --low`).

    Raises:
        argparse.ArgumentTypeError: `text` is not a finite number >= 0.
    """
    return _float_where(text, lambda x: x >= 0, ">= 0")


def dce_threshold(text: str) -> float:
    """An argparse `type` for a DCE threshold δ in [-1, 1) (`effects --threshold`), as `LossConfig.threshold`
    requires: DCE is a probability difference in [-1, 1].

    Raises:
        argparse.ArgumentTypeError: `text` is not a number in [-1, 1).
    """
    return _float_where(text, lambda x: -1 <= x < 1, "in [-1, 1)")


def probability(text: str) -> float:
    """An argparse `type` for a probability in (0, 1] (`evaluate --top-p`).

    Raises:
        argparse.ArgumentTypeError: `text` is not a number in (0, 1].
    """
    return _float_where(text, lambda x: 0 < x <= 1, "in (0, 1]")


def _float_where(text: str, holds: Callable[[float], bool], wanted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and holds(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number {wanted}, got {text!r}")
    return value
