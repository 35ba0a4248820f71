"""Fixtures the training tests share: whole runs of programs/train_run.py in subprocesses, reading a run's
metrics and checkpoints."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="session")
def run_losses():
    """`run_losses(workdir)`: step -> training loss from <workdir>/metrics.jsonl."""
    return _run_losses


@pytest.fixture(scope="session")
def read_state():
    """`read_state(step_dir)`: the TrainState saved in a checkpoint step directory, as nested numpy arrays."""
    return _read_state


class TrainRuns:
    """Runs of programs/train_run.py under `root` on the random data `data`, sharing one persistent
    compilation cache so later runs reuse earlier compilations. `steps`: each run's train.max_steps."""

    def __init__(self, programs, tiny_config, write_config, root: Path, data: Path, steps: int):
        self.programs, self.tiny_config, self.write_config = programs, tiny_config, write_config
        self.root, self.data, self.steps = root, data, steps
        self.cache = {
            "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }

    def config(self, name: str, rows_per_batch: int = 8, lora: dict | None = None, **sections) -> str:
        """The tiny config of run `name` (4 epochs, `steps` steps; LoRA adapters if `lora`) as a YAML path."""
        cfg = self.tiny_config(self.data, self.root / name, **sections)
        if lora is not None:
            cfg["model"]["lora"] = dict(lora)
        cfg["data"]["batching"].update(num_epochs=4, rows_per_batch=rows_per_batch)
        cfg["train"]["max_steps"] = self.steps
        return str(self.write_config(cfg, self.root / f"{name}.yaml"))

    def start(self, cfg: str, devices: int, *args: str, **env: str):
        """programs/train_run.py on `cfg` with `args`, `devices` devices and the shared compilation cache."""
        env = {**env, **self.cache}
        return self.programs.start("train_run.py", cfg, *args, devices=devices, fast_compile=True, env=env)

    def finish(self, proc, expect: int = 0):
        return self.programs.finish(proc, timeout=300, expect=expect)

    def two_processes(self, cfg: str, *args: str) -> list:
        """Two processes of 4 devices each, joined over gloo on a free local port."""
        return [self.start(cfg, 4, "--gloo", *args, **host) for host in self.programs.hosts(2)]


@pytest.fixture(scope="session")
def train_runs(programs, write_random_data, tiny_config, write_config):
    """`train_runs(root, steps)`: a `TrainRuns` under `root`, with random data written to `root/data`."""
    return lambda root, steps: TrainRuns(
        programs, tiny_config, write_config, root, write_random_data(root / "data"), steps
    )
