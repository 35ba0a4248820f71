"""Test-suite settings (CPU only, quiet logs) and the fixtures that tests in several folders share:

- `programs`: runs the programs under tests/programs in a fresh Python with N simulated CPU devices (the
  device count is fixed when JAX starts, so multi-device and multi-process runs are subprocesses instead of
  setting XLA_FLAGS for the whole suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = Path(__file__).resolve().parent / "programs"

# ------------------------------------------------------------------------------------------------------------
# Programs in subprocesses.

# Compilation dominates the training programs on CPU; backend optimisation level 0 compiles ~3x faster, and
# every run compared within a test uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


class Finished(NamedTuple):
    """A program's output, once it has exited as expected."""

    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        """The JSON the program printed on its `RESULT ` line."""
        line = next(line for line in self.stdout.splitlines() if line.startswith("RESULT "))
        return json.loads(line[len("RESULT ") :])


class Programs:
    """Runs tests/programs/<name> in a fresh Python with `devices` simulated CPU devices (XLA_FLAGS set in
    that process only), the repository first on its path and `env` added to its environment."""

    @staticmethod
    def start(
        name: str, *args: str, devices: int = 1, fast_compile: bool = False, env: dict | None = None
    ) -> subprocess.Popen:
        """Start the program with `args`; stdout and stderr are pipes. `fast_compile` adds FAST_COMPILE."""
        flags = f"--xla_force_host_platform_device_count={devices}"
        full_env = dict(os.environ)
        full_env.update(
            {
                "XLA_FLAGS": f"{flags} {FAST_COMPILE}" if fast_compile else flags,
                "JAX_PLATFORMS": "cpu",
                "PYTHONPATH": str(REPO),
                **(env or {}),
            }
        )
        return subprocess.Popen(
            [sys.executable, str(PROGRAMS / name), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=REPO,
        )

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 600, expect: int = 0) -> Finished:
        """Wait for `proc`; raises AssertionError (with its output's tail) unless it exits with `expect`."""
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != expect:
            raise AssertionError(
                f"{proc.args[1]} exited {proc.returncode}, not {expect}:\n{out[-3000:]}\n{err[-6000:]}"
            )
        return Finished(out, err)

    def run(
        self,
        name: str,
        *args: str,
        devices: int = 1,
        fast_compile: bool = False,
        timeout: float = 600,
        env: dict | None = None,
    ) -> Finished:
        """Run the program to completion; raises AssertionError (with its output) unless it exits with 0."""
        proc = self.start(name, *args, devices=devices, fast_compile=fast_compile, env=env)
        return self.finish(proc, timeout)


@pytest.fixture(scope="session")
def programs() -> Programs:
    """Starts and runs the programs under tests/programs (see `Programs`)."""
    return Programs()
