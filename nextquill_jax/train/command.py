"""`nextquill-jax train`, `nextquill-jax export` and `nextquill-jax checkpoint verify`.

    nextquill-jax train --config FILE [--workdir DIR] [section.key=value ...]
    nextquill-jax export --workdir DIR [--step N] --out DIR [--merged | --adapter]
    nextquill-jax checkpoint verify --workdir DIR

`train` trains (or resumes, when DIR holds a checkpoint) the run the config describes. Exit status: 0 finished
or stopped by SIGTERM or Ctrl-C with a checkpoint saved, 1 bad config or data (damaged prepared data or
checkpoints included) or a workdir another `train` is running in (`workdir_lock`), 3 non-finite loss, 4
another process of a multi-process run was lost (`mesh.peer_timeout_s`), 5 a checkpoint could not be saved
(`checkpoint.on_save_error: stop`); those and `cli.main`'s 2, 130 and 141, and the signal's 143, end
`train --help` (`TRAIN_EXIT_STATUSES`). `export` writes a checkpoint as a Hugging Face directory (a LoRA
run's adapters merged in), or with `--adapter` a LoRA run's adapters as a PEFT directory (see
`train.export`). `checkpoint verify` checks every checkpoint of a workdir
against its manifest and prints a table; exit status 1, with an `error:` line naming the steps and the fix,
if any is damaged or incomplete, if none verifies (steps saved before manifests existed cannot), or if there
is none (naming the steps a resume moved aside as damaged).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nextquill_jax import third_party_logs
from nextquill_jax.subcommand import (
    OVERRIDES,
    Subcommand,
    add_action,
    directory,
    error_line,
    non_negative_int,
)

if TYPE_CHECKING:  # the commands import their modules only when they run
    from nextquill_jax.config_schema import ConfigError

# `train --help` ends with these (README.md lists them too; 2 is argparse's, 130 and 141 are `cli.main`'s).
TRAIN_EXIT_STATUSES = """exit status:
  0    finished, or stopped by SIGTERM or Ctrl-C with a checkpoint saved (the same command resumes)
  1    an error you fix (config, data, damaged prepared data or checkpoints, a missing packaged model, a
       workdir another train is running in), printed as one error: line
  2    a command line that cannot be parsed
  3    non-finite loss or gradient (train.nonfinite: stop), or more than train.max_skips skipped updates
  4    another process of a multi-process run was lost (mesh.peer_timeout_s)
  5    a checkpoint could not be saved (checkpoint.on_save_error: stop)
  130  Ctrl-C during set-up, or a second Ctrl-C during training (nothing more saved: a checkpoint
       already being written is finished first)
  141  stdout's reader went away (a closed pipe)
  143  SIGTERM during set-up or data preparation (the default signal exit, nothing saved)"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`train`'s flags and its exit-status table (the help's epilog)."""
    parser.epilog = TRAIN_EXIT_STATUSES
    parser.add_argument("--config", required=True, type=Path, help="YAML config (see configs/)")
    parser.add_argument("--workdir", default=None, help="run directory (default: train.workdir)")
    parser.add_argument(
        OVERRIDES,
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. optim.learning_rate=1e-4",
    )


def _overridden(key: str, args: argparse.Namespace) -> bool:
    """Whether a command-line override of `train` sets `key` (or a key under it: `mesh.data` for `mesh`)."""
    keys = (override.partition("=")[0].strip() for override in args.overrides)
    return any(k == key or k.startswith(f"{key}.") for k in keys)


def _source_of(key: str, args: argparse.Namespace) -> str:
    """`key` as an error names it: after "command line: " where an override set it, else after the file."""
    return f"command line: {key}" if _overridden(key, args) else f"{args.config}: {key}"


def _located(error: ConfigError, args: argparse.Namespace) -> ConfigError:
    """`error`, raised by set-up once the config was built (a check against the backend, the loss or the
    data, where the file is not known), headed by where the key it starts with was set: "command line: " for
    an override, else "{config}, line N: " where the file writes it; as it is otherwise (a default value, a
    message naming no key first). The mesh's errors start with the section, `mesh`: an override of any of
    its keys, else the file's `mesh:` line."""
    from nextquill_jax.config_schema import ConfigError, key_lines

    message = str(error)
    key = re.match(r"[a-z_]+(?:\.[a-z_0-9]+)+|mesh\b", message)
    if key is None:
        return error
    if _overridden(key[0], args):
        return ConfigError(f"command line: {message}")
    line = key_lines(args.config).get(key[0])
    return error if line is None else ConfigError(f"{args.config}, line {line}: {message}")


def run_train(args: argparse.Namespace) -> int:
    """Train; a bad config, data or missing package reaches `cli.main`, which prints it (status 1)."""
    from nextquill_jax.config import load_config
    from nextquill_jax.config_schema import ConfigError
    from nextquill_jax.output_dir import check_output_dir
    from nextquill_jax.train.checkpoint import CheckpointSaveError
    from nextquill_jax.train.loop import TrainingDivergedError, train
    from nextquill_jax.train.metrics_log import tensorboard_dir
    from nextquill_jax.train.setup import resolve_workdir

    cfg = load_config(args.config, args.overrides)
    workdir = resolve_workdir(cfg, args.workdir, args.config)
    named = "--workdir" if args.workdir else _source_of("train.workdir", args)
    check_output_dir(workdir, named)
    if cfg.logging.tensorboard and cfg.logging.tensorboard_dir:
        # Its event file is opened only after config.yaml and the lock are written, by an error naming no key.
        check_output_dir(tensorboard_dir(cfg.logging, workdir), _source_of("logging.tensorboard_dir", args))
    # The log goes into the workdir only once this run holds its lock (records are held until then): a run
    # refused there would otherwise append its lines to the log of the run that holds it.
    log_to = lambda: third_party_logs.log_to(workdir, named)
    try:
        result = train(cfg, workdir, on_locked=log_to)
    except ConfigError as e:
        raise _located(e, args) from None
    except TrainingDivergedError as e:
        print(error_line(e), file=sys.stderr)
        return 3
    except CheckpointSaveError as e:
        print(
            f"error: {e} Training stopped (checkpoint.on_save_error: stop): free space and run the same "
            f"command again to resume from it, or set checkpoint.on_save_error: continue to train on "
            f"without the checkpoints that fail.",
            file=sys.stderr,
        )
        return 5
    if result.status == "finished":
        print(f"finished at step {result.step}; workdir {result.workdir}")
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """`export`'s flags: the run, the step, --merged or --adapter, and the output directory."""
    parser.add_argument("--workdir", required=True, type=directory, help="a training run's directory")
    parser.add_argument(
        "--step",
        type=non_negative_int,
        default=None,
        help="checkpoint step (default: the newest verified; 0: the untrained model the run starts from)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=directory,
        help=(
            "output directory; one that holds weight files, or files transformers reads over the export's "
            "(generation_config.json, special_tokens_map.json, a chat template), is refused"
        ),
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer saved with a merged model (default: the run's data.tokenizer, as the "
        "checkpoint's config names it); name the run's tokenizer where it moved",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--merged", action="store_true", help="a Hugging Face model directory (the default; LoRA merged in)"
    )
    what.add_argument("--adapter", action="store_true", help="a LoRA run's adapters as a PEFT directory")


def run_export(args: argparse.Namespace) -> int:
    """Export; a missing workdir or checkpoint reaches `cli.main`, which prints it (status 1)."""
    from nextquill_jax.output_dir import check_output_dir
    from nextquill_jax.parallel import refuse_several_processes
    from nextquill_jax.train.export import export, export_adapter

    third_party_logs.log_to(args.workdir, named="--workdir")
    check_output_dir(args.out, "--out")
    try:
        refuse_several_processes("export")
        if args.adapter and args.tokenizer is not None:
            raise ValueError("--tokenizer: --adapter writes the adapters alone, no tokenizer; leave it out")
        if args.adapter:
            step = export_adapter(args.workdir, args.out, args.step)
        else:
            step = export(args.workdir, args.out, args.step, tokenizer=args.tokenizer)
    except ValueError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    print(f"exported step {step} of {args.workdir} to {args.out}")
    return 0


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """`checkpoint`'s actions (`verify`) and their flags."""
    sub = parser.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    v = add_action(
        sub, "verify", "check every checkpoint against its manifest and print a table",
        "nextquill-jax checkpoint verify --workdir runs/tiny_synthetic",
    )  # fmt: skip
    v.add_argument("--workdir", required=True, type=directory, help="a training run's directory")


def run_checkpoint(args: argparse.Namespace) -> int:
    """`checkpoint verify`: the table of every step, the steps moved aside, and status 1 with `verify_error`'s
    line when it finds something wrong.

    Raises:
        FileNotFoundError: `args.workdir` is not a training workdir.
    """
    from nextquill_jax.config import CheckpointConfig
    from nextquill_jax.train.checkpoint import Checkpointer, moved_aside, verify_error
    from nextquill_jax.train.workdir import checkpoints_dir

    # No checkpoint: nothing to verify (evaluate / effects / export read such a run's step 0 instead).
    directory = checkpoints_dir(
        args.workdir, no_checkpoint_hint="Nothing to verify: train the run until it saves a checkpoint."
    )
    ckpt = Checkpointer(directory, CheckpointConfig(), read_only=True)
    try:
        checks = [ckpt.check(step) for step in ckpt.all_steps()]
    finally:
        ckpt.close()
    aside = moved_aside(directory)
    if checks:
        print("| step | status | files | MB | problems |\n| ---: | --- | ---: | ---: | --- |")
        for c in checks:
            print(f"| {c.step} | {c.status} | {c.files} | {c.size / 1e6:.1f} | {'; '.join(c.problems)} |")
        if aside:
            print(f"moved aside by a resume as damaged: {', '.join(map(str, aside))}", file=sys.stderr)
    error = verify_error(directory, checks, aside)
    if error is None:
        return 0
    print(f"error: {error}", file=sys.stderr)
    return 1


COMMANDS = {
    "train": Subcommand(
        "train a model from a YAML config",
        add_train_arguments,
        run_train,
        "nextquill-jax train --config configs/tiny_synthetic.yaml optim.learning_rate=1e-3",
    ),
    "export": Subcommand(
        "write a Hugging Face directory from a checkpoint",
        add_export_arguments,
        run_export,
        "nextquill-jax export --workdir runs/tiny_synthetic --out hf_out/   # or --adapter for LoRA runs",
    ),
    "checkpoint": Subcommand(
        "check a run's checkpoints against their manifests (sizes and checksums of every file)",
        add_checkpoint_arguments,
        run_checkpoint,
        "nextquill-jax checkpoint verify --workdir runs/tiny_synthetic",
    ),
}
