"""`nextquill-jax train --config FILE [--workdir DIR] [section.key=value ...]`.

Trains (or resumes, when DIR holds a checkpoint) the run the config describes. Exit status: 0 finished or
stopped by SIGTERM with a checkpoint saved, 1 bad config or data, 3 non-finite loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML config (see configs/)")
    parser.add_argument("--workdir", default=None, help="run directory (default: train.workdir)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. optim.learning_rate=1e-4",
    )


def run(args: argparse.Namespace) -> int:
    from nextquill_jax.config import ConfigError, load_config
    from nextquill_jax.data.records import DataError
    from nextquill_jax.train.loop import TrainingDivergedError, resolve_workdir, train

    try:
        cfg = load_config(args.config, args.overrides)
        workdir = resolve_workdir(cfg, args.workdir)
        result = train(cfg, workdir)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if result.status == "finished":
        print(f"finished at step {result.step}; workdir {result.workdir}")
    return 0
