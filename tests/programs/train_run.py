"""A training process for the tests: trains with the config CONFIG, optionally with a fault injected, and
prints one line `RESULT {json}` with the outcome and the final parameters' (and Adam moments') sharding specs.

    train_run.py CONFIG [--fault {sigterm,sigkill,nan,enospc} --fault-step N [--fault-process P]] [--gloo]
                 [--cli] [--batch-delay SECONDS]

--fault sigterm: a real SIGTERM to this process right after the metrics row of step N is written;
--fault sigkill: SIGKILL right after the asynchronous save of step N has started;
--fault nan: the parameters turn NaN as step N starts;
--fault enospc: the disk is full while step N's checkpoint is written: its manifest, the last file written
before the commit, gets a few bytes and then ENOSPC.
--fault-process P: only process P (NEXTQUILL_PROCESS_ID) suffers the fault.
--gloo: gloo CPU collectives, for runs of several processes (the environment's NEXTQUILL_COORDINATOR,
NEXTQUILL_NUM_PROCESSES and NEXTQUILL_PROCESS_ID say which).
--cli: run `nextquill-jax train --config CONFIG` instead and exit with its status (faults still apply).
--batch-delay SECONDS: every batch reaches the step SECONDS late (a slow input pipeline).

The result: {"status", "step", "process", "params": {path: spec}, "mu": {path: spec}, "mesh": {axis: size}}
(the mesh the final parameters lie on).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import optax


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--fault", choices=["sigterm", "sigkill", "nan", "enospc"])
    parser.add_argument("--fault-step", type=int, default=0)
    parser.add_argument("--fault-process", type=int, default=None)
    parser.add_argument("--gloo", action="store_true")
    parser.add_argument("--cli", action="store_true")
    parser.add_argument("--batch-delay", type=float, default=0.0)
    return parser.parse_args()


def inject(fault: str | None, at: int) -> None:
    """Patch the training code so that `fault` happens at step `at`."""
    from nextquill_jax.train import checkpoint, setup
    from nextquill_jax.train.checkpoint import Checkpointer
    from nextquill_jax.train.metrics_log import MetricsLog

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

            def poisoned(state, batch, *rest):  # rest: the reference and base parameters, if any
                nan_params = jax.tree.map(lambda p: jnp.where(state.step == at - 1, jnp.nan, p), state.params)
                return step(state.replace(params=nan_params), batch, *rest)

            return poisoned

        setup.make_train_step = make_poisoned
    if fault == "enospc":
        write = checkpoint.write_manifest

        def disk_full_at(step_dir):
            if int(step_dir.name.split(".")[0]) != at:
                return write(step_dir)
            (step_dir / checkpoint.MANIFEST).write_text('{"algorithm": "bla')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(step_dir / checkpoint.MANIFEST))

        checkpoint.write_manifest = disk_full_at


def delay_batches(seconds: float) -> None:
    """Patch the loop so that every batch is handed to the step `seconds` late."""
    from nextquill_jax.train import loop

    place = loop.to_global_batch

    def slow_place(local, mesh):
        time.sleep(seconds)
        return place(local, mesh)

    loop.to_global_batch = slow_place


def specs(tree) -> dict[str, str]:
    return {
        jax.tree_util.keystr(path): str(x.sharding.spec)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def main() -> int:
    args = parse_args()
    if args.gloo:  # before anything of the package is imported
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.fault_process in (None, int(os.environ.get("NEXTQUILL_PROCESS_ID", "0"))):
        inject(args.fault, args.fault_step)
    if args.batch_delay:
        delay_batches(args.batch_delay)
    if args.cli:
        from nextquill_jax.cli import main as cli

        return cli(["train", "--config", args.config])

    from nextquill_jax.config import load_config
    from nextquill_jax.train import loop, setup

    cfg = load_config(args.config)
    result = loop.train(cfg, setup.resolve_workdir(cfg, None))
    mu = optax.tree_utils.tree_get(result.state.opt_state, "mu")
    outcome = {
        "status": result.status,
        "step": result.step,
        "process": jax.process_index(),
        "params": specs(result.state.params),
        "mu": specs(mu),
        "mesh": dict(jax.tree.leaves(result.state.params)[0].sharding.mesh.shape),
    }
    print("RESULT " + json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
