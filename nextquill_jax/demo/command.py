"""`nextquill-jax demo [--quick] [--out DIR] [--seed N] [--config FILE]`: the offline demo (`demo.run`).

An --out another demo is running in is refused at once with one `error:` line and status 1 (`demo.run.LOCK`),
before anything there is deleted or written, the third-party log included.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nextquill_jax import third_party_logs
from nextquill_jax.output_dir import check_output_dir
from nextquill_jax.subcommand import Subcommand, directory, error_line, non_negative_int


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """`demo`'s flags: `--quick` or `--config`, the output directory and the seed."""
    # --quick chooses a config file too: with --config it would be ignored without a word.
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--quick", action="store_true", help="the reduced smoke-check run (configs/demo_quick.yaml)"
    )
    parser.add_argument("--out", type=directory, default=None, help="output directory (default: demo_out/)")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the data, initialisation and data order"
    )
    which.add_argument("--config", type=Path, default=None, help="a demo config (default: configs/demo.yaml)")


def run_demo_command(args: argparse.Namespace) -> int:
    """Run the demo and print its results; bad input 1, a diverged run 3, a stop in training 0."""
    from nextquill_jax.demo.run import DEFAULT_OUT, default_config, load_demo_config, run_demo
    from nextquill_jax.train.loop import TrainingDivergedError, TrainingStoppedError

    try:
        out = args.out if args.out is not None else DEFAULT_OUT
        check_output_dir(out, named="--out")
        cfg = load_demo_config(args.config or default_config(args.quick), out, args.seed)
        # The log in --out is opened only under the demo's lock: a demo refused there (another one is running
        # in --out) appends nothing to the running one's log.
        run_demo(cfg, on_locked=lambda: third_party_logs.log_to(out, named="--out"))
    except ValueError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    except TrainingDivergedError as e:  # its fix is `train`'s, which does not apply: a demo starts over
        print(error_line(e, f"{e.diagnosis} The demo starts over when run again."), file=sys.stderr)
        return 3
    except TrainingStoppedError:  # status 0, as `train` stopped this way
        print("demo stopped before its end; `nextquill-jax demo` starts over when run again")
        return 0
    print()
    print((Path(out) / "results.md").read_text(encoding="utf-8"))
    return 0


COMMANDS = {
    "demo": Subcommand(
        "the offline end-to-end demo",
        add_demo_arguments,
        run_demo_command,
        "nextquill-jax demo --quick --out demo_quick/",
    )
}
