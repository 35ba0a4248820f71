"""Where and how a number was measured: the machine description and section header of a RESULTS.md entry."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def machine_description() -> dict[str, str]:
    """Date, CPU model and cores, JAX backend and device, library versions: what RESULTS.md rows need."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    devices = jax.devices()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} × {devices[0].device_kind}",
        "versions": f"python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}",
    }


def invoked_command(program: Sequence[str], argv: Sequence[str] | None) -> list[str]:
    """The command line a results section records: `program` (e.g. ["python", "benchmarks/mfu.py"]) and
    its arguments, `argv` where a caller passed them (a call from Python), else this process's own."""
    return [*program, *(argv if argv is not None else sys.argv[1:])]


def results_header(title: str, command: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The opening lines of a RESULTS.md section: title, exact command (led by `XLA_FLAGS='...'` when that
    variable is set: it changes what XLA compiles), machine and versions."""
    m = machine_description()
    flags = os.environ.get("XLA_FLAGS")
    env = f"XLA_FLAGS='{flags}' " if flags else ""
    return [
        f"## {title} ({m['date']})",
        "",
        f"- command: `{env}{shlex.join(command)}`",
        f"- machine: {m['cpu']}; backend {m['backend']}, {m['devices']}; {m['versions']}",
        *(f"- {line}" for line in extra),
        "",
    ]


def results_file(text: str) -> Path:
    """The argparse type of a results file to append to (`--append-results`, `bench scale --results`):
    checked when the command line is read, since a file that cannot be written would otherwise fail only
    after the measurement, losing it.

    Raises:
        argparse.ArgumentTypeError: the path is a directory, or the folder it goes in does not exist.
    """
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a Markdown file")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is not an existing directory (make it first)")
    return path


def append_results(path: str | Path, lines: Sequence[str]) -> None:
    """Append a section (lines) to a Markdown results file, separated by a blank line."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(lines) + "\n")


def publish(lines: Sequence[str], append_to: str | Path | None) -> None:
    """Print a results section (`lines`) and, when `append_to` names a Markdown results file, append it there
    (`append_results`)."""
    print("\n".join(lines))
    if append_to:
        append_results(append_to, lines)
