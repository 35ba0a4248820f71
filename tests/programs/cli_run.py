"""Run the `nextquill-jax` command line with this program's arguments in this process and exit with its
status; with gloo CPU collectives where the environment names several processes (NEXTQUILL_NUM_PROCESSES), as
train_run.py's --gloo does, so that a command runs as one of several hosts."""

from __future__ import annotations

import os
import sys

import jax

if int(os.environ.get("NEXTQUILL_NUM_PROCESSES", "1")) > 1:  # before anything of the package is imported
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

from nextquill_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
