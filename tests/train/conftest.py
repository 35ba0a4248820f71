"""Fixtures the training tests share: reading a run's metrics and checkpoints, and a free local port."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import jax
import numpy as np
import pytest


def _run_losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _read_state(step_dir: Path) -> dict:
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def run_losses():
    """`run_losses(workdir)`: step -> training loss from <workdir>/metrics.jsonl."""
    return _run_losses


@pytest.fixture(scope="session")
def read_state():
    """`read_state(step_dir)`: the TrainState saved in a checkpoint step directory, as nested numpy arrays."""
    return _read_state


@pytest.fixture(scope="session")
def free_port():
    """`free_port()`: a free TCP port on 127.0.0.1 (for a multi-process coordinator)."""
    return _free_port
