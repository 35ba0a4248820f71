"""The `nextquill-jax` command line.

Each subpackage's `command.py` lists its subcommands in `COMMANDS` (see `subcommand.Subcommand`); this
module only collects them and dispatches. Command modules import JAX only when a subcommand runs, so `--help`
is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

from nextquill_jax import __version__, lost_signals, third_party_logs
from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.subcommand import OVERRIDES, Subcommand, error_line

DESCRIPTION = (
    "NextQuill causal preference fine-tuning of LLMs in JAX: train a model with and without the user's "
    "history in its prompt, evaluate and compare variants, report per-token causal effects, export to "
    "Hugging Face and PEFT, and benchmark."
)

VERBOSE_HELP = (
    "also show third-party log lines (absl/Orbax, JAX, transformers, warnings) on the console; they "
    "always go to logs/third_party.log in the run's directory"
)

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
    parser = ArgumentParser(
        prog="nextquill-jax",
        description=DESCRIPTION,
        epilog="Start with `nextquill-jax demo`; `nextquill-jax COMMAND --help` explains each command.",
    )
    parser.add_argument("--version", action="version", version=f"nextquill-jax {__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in subcommands().items():
        sub_parser = sub.add_parser(
            name,
            help=command.help,
            description=command.help[0].upper() + command.help[1:] + ".",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub_parser)
        _accept_verbose(sub_parser)
        ending = f"example:\n  {command.example}"
        sub_parser.epilog = f"{sub_parser.epilog}\n\n{ending}" if sub_parser.epilog else ending
    return parser


def _accept_verbose(parser: argparse.ArgumentParser) -> None:
    """`--verbose` after a subcommand (and after an action such as `data synth`) too; SUPPRESS keeps a
    `--verbose` given earlier on the line."""
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for nested in action.choices.values():
                _accept_verbose(nested)


def expected_errors() -> tuple[type[Exception], ...]:
    """The errors a user fixes, not a bug: a bad config, bad data, a missing file or checkpoint, a file where
    an output directory is to be (`output_dir.check_output_dir`), a file or directory this user may not read
    or write (`PermissionError`, which names it), an export directory that already holds weights or files
    transformers would read over the export's (`models.hf.refuse_stale_files`), damaged prepared data or
    checkpoints, a packaged model whose pip package is not installed, a directory another `train`, `compare`
    or `demo` is running in (`WorkdirLockedError`), such an error of process 0 seen by another process of the
    run. Their messages name the fix. Imported on use: `--help` imports no JAX. `MissingPackageError` and
    `Process0FailedError` are named only once their modules are loaded, as they are wherever one was raised:
    importing them imports JAX (and for the first the model code, models/__init__.py), which a failed `data
    show` need not wait for."""
    from nextquill_jax.config_schema import ConfigError
    from nextquill_jax.data.checksums import IntegrityError
    from nextquill_jax.data.sources.records import DataError
    from nextquill_jax.train.workdir_lock import WorkdirLockedError

    packaged = sys.modules.get("nextquill_jax.models.packaged")
    missing_package = (packaged.MissingPackageError,) if packaged else ()
    parallel = sys.modules.get("nextquill_jax.parallel")
    process_0 = (parallel.Process0FailedError,) if parallel else ()
    return (
        ConfigError,
        DataError,
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        IntegrityError,
        *missing_package,
        WorkdirLockedError,
        *process_0,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv`; returns the exit status (1: an expected error, printed as `error: ...`
    on stderr without a traceback; 130: interrupted by Ctrl-C; 141: stdout's reader went away, as in
    `nextquill-jax data show DIR --index 0 | head`; other statuses as each subcommand documents)."""
    try:
        try:
            return _dispatch(sys.argv[1:] if argv is None else argv)
        finally:
            # Flushed here, not at interpreter exit, so that a closed pipe is met inside the handler below.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader took what it wanted (`| head`); later writes, including the exit-time flush, go to
        # /dev/null. 141 = 128 + SIGPIPE, what a shell reports for `yes | head`.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def entry() -> None:
    """The `nextquill-jax` console script (and `python -m nextquill_jax.cli`): exit with `main`'s status.

    A command interrupted by Ctrl-C (130) exits at once, its output flushed, without the interpreter's exit
    handlers: the Ctrl-C can land while XLA compiles on a thread of its own, and JAX's exit handler then
    tears the backend down under that compilation, which ended `bench scale` in a segmentation fault (139)
    in about half the tries. Nothing is lost by it: a run stopped by Ctrl-C has saved (status 0, not 130),
    and the checkpoints survive an abort as they survive a SIGKILL (`tests/train/test_runs.py`)."""
    status = main()
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, but a command's `section.key=value` overrides may stand anywhere among its
    options (`train --config F a=1 --workdir D b=2`), in the order given.

    argparse fills a `nargs="*"` positional from one run of words only, so the words after the next option
    would be left over, and `parse_intermixed_args` refuses a parser with subcommands (Python 3.11). Each
    leftover word that is not an option goes to the chosen command's `overrides`, as it would have in the
    first run; `load_config` then checks every one alike.

    Raises:
        SystemExit: status 2 with the chosen command's usage (argparse's `error`), for a word argparse refuses
            or a leftover one the command does not take: an unknown option, or any word for a command
            without overrides.
    """
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    chosen = _chosen_parser(parser, args)
    takes_overrides = any(a.dest == OVERRIDES for a in chosen._get_positional_actions())
    if takes_overrides and not any(word.startswith("-") for word in extra):
        setattr(args, OVERRIDES, [*getattr(args, OVERRIDES), *extra])
        return args
    chosen.error(f"unrecognized arguments: {' '.join(extra)}")


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the innermost (sub)command `args` chose, such as `data prepare`'s; `parser` if none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None)
            if name in action.choices:
                return _chosen_parser(action.choices[name], args)
    return parser


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    with third_party_logs.captured(verbose=args.verbose), _lost_interrupts_redelivered():
        try:
            return int(subcommands()[args.command].run(args) or 0)
        except KeyboardInterrupt as e:
            # A Ctrl-C no command turned into a clean stop (during set-up, or training's second one): one
            # line, not a traceback, with what training noted (the checkpoint it leaves); 130 is what a shell
            # reports for a process ended by SIGINT.
            print("; ".join(["interrupted (Ctrl-C)", *getattr(e, "__notes__", ())]), file=sys.stderr)
            return 130
        except Exception as e:
            if not isinstance(e, expected_errors()):
                raise
            print(error_line(e), file=sys.stderr)
            return 1


@contextlib.contextmanager
def _lost_interrupts_redelivered() -> Iterator[None]:
    """While entered, a Ctrl-C whose KeyboardInterrupt Python could not raise (inside a garbage-collector
    callback, such as the one JAX runs at every collection) is delivered again (`lost_signals`): before, a
    Ctrl-C during set-up was lost and the command ran to its end.
    """
    previous = sys.unraisablehook

    def redeliver(unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            lost_signals.deliver_again(signal.SIGINT)
        else:
            previous(unraisable)

    sys.unraisablehook = redeliver
    try:
        yield
    finally:
        sys.unraisablehook = previous


if __name__ == "__main__":
    entry()
