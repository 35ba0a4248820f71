"""Orbax checkpoints of a run: train state, data-iterator state, config, progress and the step's metrics.

One directory per step under `<workdir>/checkpoints/<step>/` with the items `state` (the TrainState pytree,
sharded arrays written by every process), `data` (the Grain iterator's position, one file per process),
`config` (the resolved config), `progress` (step and epoch) and Orbax's `metrics`. Saves are asynchronous;
Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it only once every item is complete,
so a process killed mid-save leaves a temporary directory that `latest_step` never returns and the next
start deletes (tests/test_train_runs.py kills a run mid-save to check this).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers as policies

from nextquill_jax.config import CheckpointConfig

ITEMS = ("state", "data", "config", "progress")


def preservation_policy(cfg: CheckpointConfig) -> policies.PreservationPolicy:
    """Keep the last `cfg.keep` checkpoints, plus the best one by `cfg.best_metric` when set.

    A checkpoint saved without that metric (no evaluation at its step) ranks worst.
    """
    latest = policies.LatestN(n=cfg.keep)
    if cfg.best_metric is None:
        return latest
    worst = math.inf if cfg.best_mode == "min" else -math.inf
    best = policies.BestN(
        get_metric_fn=lambda m: float(m.get(cfg.best_metric, worst)),
        reverse=cfg.best_mode == "min",
        n=1,
        keep_checkpoints_without_metrics=False,
    )
    return policies.AnyPreservationPolicy([latest, best])


@contextlib.contextmanager
def _absl_level(level: int) -> Iterator[None]:
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(level)
    try:
        yield
    finally:
        absl_logging.set_verbosity(previous)


class Checkpointer:
    """Saves and restores a run's checkpoints in `directory` (created if missing).

    Every process of a multi-process run constructs it and calls `save` / `restore` at the same steps.
    `read_only`: for reading another run's checkpoints (export, a reference model) while that run may still
    be saving: nothing is created, deleted or cleaned up.
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        self.directory = Path(directory).absolute()
        # Orbax logs two warnings for every read-only manager (that it will not save): not news to a reader.
        with _absl_level(absl_logging.ERROR if read_only else absl_logging.get_verbosity()):
            options = ocp.CheckpointManagerOptions(
                preservation_policy=None if read_only else preservation_policy(cfg),
                enable_async_checkpointing=cfg.async_save,
                create=not read_only,
                cleanup_tmp_directories=not read_only,
                read_only=read_only,
            )
            self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        """The newest COMPLETE checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, ascending."""
        return sorted(self.manager.all_steps())

    def _require_complete(self, step: int) -> None:
        if step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; complete ones: "
                f"{self.all_steps()}. Fix: choose one of those steps (--step), or leave the step out for the "
                "latest."
            )

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any,
        *,
        config: Mapping[str, Any],
        progress: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        wait: bool = False,
    ) -> bool:
        """Start saving step `step` (return at once unless `wait`); returns False if it is already saved.

        The data iterator's position is captured before this returns, so the caller may advance it at once.
        """
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(dict(config)),
            progress=ocp.args.JsonSave(dict(progress)),
        )
        saved = self.manager.save(step, args=args, metrics=dict(metrics or {}), force=True)
        if wait:
            self.manager.wait_until_finished()
        return saved

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
        """Load step `step`: the state laid out as `abstract_state` (a pytree of `jax.ShapeDtypeStruct` with
        shardings), the data iterator's position (set in place), and the progress dict.

        Raises:
            FileNotFoundError: no complete checkpoint at `step` (naming the ones there are).
        """
        self._require_complete(step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                progress=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["progress"])

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the model parameters of step `step` (for export or a frozen reference model), laid out as
        `abstract_params` (a pytree of `jax.ShapeDtypeStruct`, optionally with shardings).

        Raises:
            FileNotFoundError: no complete checkpoint at `step` (naming the ones there are).
        """
        self._require_complete(step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args=jax.tree.map(
                        lambda s: ocp.ArrayRestoreArgs(
                            sharding=s.sharding, global_shape=s.shape, dtype=s.dtype
                        ),
                        {"params": abstract_params},
                    ),
                    partial_restore=True,
                )
            ),
        )
        return restored["state"]["params"]

    def read_config(self, step: int) -> dict[str, Any]:
        """The resolved config saved with step `step`.

        Raises:
            FileNotFoundError: no complete checkpoint at `step` (naming the ones there are).
        """
        return self._read_json(step, "config")

    def read_progress(self, step: int) -> dict[str, Any]:
        """The progress saved with step `step`: step, epoch and, under LoRA, the base's identity (`base`).

        Raises:
            FileNotFoundError: no complete checkpoint at `step` (naming the ones there are).
        """
        return self._read_json(step, "progress")

    def _read_json(self, step: int, item: str) -> dict[str, Any]:
        self._require_complete(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(restored[item])

    def wait(self) -> None:
        """Block until any asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager's threads."""
        self.manager.wait_until_finished()
        self.manager.close()
