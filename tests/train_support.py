"""Shared pieces of the training tests: tiny random prepared data and a tiny config (hidden 32, 2 layers,
vocab 128, rows of 64 tokens), and a runner for training subprocesses with simulated devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import yaml

from nextquill_jax.data.prepared_split import TokenizedExample, write_split

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128
# Compilation dominates these runs on CPU; backend optimisation level 0 compiles ~3x faster and every run
# compared within a test uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def write_random_data(out_dir: Path, *, train: int = 48, val: int = 8, seed: int = 0) -> Path:
    """Random token examples (ids 1..VOCAB-1) whose targets repeat a per-example pattern, so loss can fall."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        if count == 0:
            continue
        examples = []
        for _ in range(count):
            target = np.tile(rng.integers(1, 16, 3), 4)[: rng.integers(6, 12)]
            examples.append(
                TokenizedExample(
                    prompt_with=rng.integers(1, VOCAB, rng.integers(8, 20)).astype(np.int32),
                    prompt_without=rng.integers(1, VOCAB, rng.integers(3, 8)).astype(np.int32),
                    target=target.astype(np.int32),
                )
            )
        write_split(out_dir, split, examples)
    return out_dir


def tiny_config(data_dir: Path, workdir: Path, **sections) -> dict:
    """A config dict for a tiny random qwen2-family model on `data_dir`; `sections` update sections."""
    cfg = {
        "model": {
            "preset": "qwen2.5-0.5b",
            "overrides": {
                "vocab_size": VOCAB,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "head_dim": 8,
            },
            "compute_dtype": "float32",
        },
        "data": {
            "batching": {
                "mode": "pack",
                "seq_len_with": 64,
                "seq_len_without": 32,
                "response_slots": 32,
                "length_multiple": 8,
                "rows_per_batch": 8,
                "num_epochs": 2,
                "read_threads": 0,
                "prefetch_batches": 0,
            }
        },
        "loss": {"variant": "nextquill", "token_chunk": 64, "vocab_chunk": 64},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 1},
        "train": {"workdir": str(workdir), "data_dir": str(data_dir), "seed": 0},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every_steps": 3, "keep": 2, "async_save": True},
        "eval": {"every_steps": 0},
        "logging": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def subprocess_env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
            **extra,
        }
    )
    return env


def start_python(code: str, devices: int, args: tuple[str, ...] = (), **extra_env: str) -> subprocess.Popen:
    """Start `code` (with `args` as sys.argv[1:]) in a fresh Python with `devices` CPU devices; stdout and
    stderr are pipes."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(devices, **extra_env),
        cwd=REPO,
    )


def finish(proc: subprocess.Popen, timeout: float = 300, expect: int = 0) -> tuple[str, str]:
    """Wait for `proc`; returns (stdout, stderr), raises AssertionError unless it exits with `expect`."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != expect:
        raise AssertionError(
            f"subprocess exited {proc.returncode}, not {expect}:\n{out[-3000:]}\n{err[-6000:]}"
        )
    return out, err


def run_python(
    code: str, devices: int = 1, args: tuple[str, ...] = (), timeout: float = 300, **env: str
) -> str:
    """Run `code` to completion; returns stdout, raises AssertionError with stderr on failure."""
    return finish(start_python(code, devices, args, **env), timeout)[0]


def losses(workdir: Path) -> dict[int, float]:
    """step -> training loss from <workdir>/metrics.jsonl."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def read_state(step_dir: Path) -> dict:
    """The TrainState saved in a checkpoint step directory, as a nested dict of numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=restore_args))


# A training process for the tests: trains with the config at argv[1], optionally with a fault injected
# (FAULT=sigterm: a real SIGTERM to this process right after metrics row FAULT_STEP is written; FAULT=sigkill:
# SIGKILL right after the asynchronous save of step FAULT_STEP has started; FAULT=nan: the parameters turn NaN
# as step FAULT_STEP starts), then prints one JSON line with the outcome and the final parameters' sharding
# specs. With CLI=1 it runs `nextquill-jax train --config` instead and exits with its status.
RUNNER = """
import json, os, signal, sys
import jax, jax.numpy as jnp, optax
if os.environ.get("GLOO"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
from nextquill_jax.config import load_config
from nextquill_jax.train import loop, setup
from nextquill_jax.train.checkpoint import Checkpointer
from nextquill_jax.train.metrics_log import MetricsLog

fault, at = os.environ.get("FAULT", ""), int(os.environ.get("FAULT_STEP", "0"))
if fault == "sigterm":
    write = MetricsLog.write
    def write_then_sigterm(self, step, metrics):
        write(self, step, metrics)
        if step == at and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)
    MetricsLog.write = write_then_sigterm
if fault == "sigkill":
    save = Checkpointer.save
    def save_then_sigkill(self, step, *args, **kwargs):
        started = save(self, step, *args, **kwargs)
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return started
    Checkpointer.save = save_then_sigkill
if fault == "nan":
    make = setup.make_train_step
    def make_poisoned(*args, **kwargs):
        step = make(*args, **kwargs)
        def poisoned(state, batch, reference=None):
            nan_params = jax.tree.map(lambda p: jnp.where(state.step == at - 1, jnp.nan, p), state.params)
            return step(state.replace(params=nan_params), batch, reference)
        return poisoned
    setup.make_train_step = make_poisoned
if os.environ.get("CLI"):
    from nextquill_jax.cli import main
    sys.exit(main(["train", "--config", sys.argv[1]]))

cfg = load_config(sys.argv[1])
result = loop.train(cfg, setup.resolve_workdir(cfg, None))
specs = {jax.tree_util.keystr(path): str(x.sharding.spec)
         for path, x in jax.tree_util.tree_flatten_with_path(result.state.params)[0]}
mu = optax.tree_utils.tree_get(result.state.opt_state, "mu")
mu_specs = {jax.tree_util.keystr(path): str(x.sharding.spec)
            for path, x in jax.tree_util.tree_flatten_with_path(mu)[0]}
print("RESULT " + json.dumps({"status": result.status, "step": result.step, "process": jax.process_index(),
                              "params": specs, "mu": mu_specs}))
"""


def result_of(stdout: str) -> dict:
    """The JSON outcome RUNNER printed."""
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])
