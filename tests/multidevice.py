"""Run a Python snippet in a fresh process with N simulated CPU devices.

The device count is fixed when JAX starts, so multi-device tests run in a subprocess instead of setting
XLA_FLAGS for the whole suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_with_devices(code: str, devices: int = 8, timeout: float = 600, env: dict | None = None) -> str:
    """Run `code` with `devices` CPU devices; returns stdout, raises AssertionError with stderr on failure."""
    full_env = dict(os.environ)
    full_env.update(
        {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
        }
    )
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout
