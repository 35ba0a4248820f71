"""Orbax checkpoints of a run: train state, data-iterator state, config, progress and the step's metrics.

One directory per step under `<workdir>/checkpoints/<step>/` with the items `state` (the TrainState pytree,
sharded arrays written by every process), `data` (the Grain iterator's position, one file per process),
`config` (the resolved config), `progress` (step, epoch, the LoRA base's, the data's and the fixed-DCE
reference model's identities, the `loss.weighting` module's digest, and `"manifest": true`: the step was
saved with a manifest) and,
while `checkpoint.best_metric` is set, Orbax's `metrics` (the step's evaluation metrics, `{}` without one),
which ranks the steps for retention after a restart as well. Saves are asynchronous; Orbax writes each step
into `<step>.orbax-checkpoint-tmp*` and renames it only once every item is complete, so a process killed
mid-save leaves a temporary directory that `latest_step` never returns and the next start deletes
(tests/train/test_runs.py kills a run mid-save to check this).

Integrity: once every process has written its files, and before the rename that commits the step, the
primary process writes `<step>/manifest.json` (every file of the step with its size and BLAKE2b-128
checksum, `data.checksums`), so a committed step always carries its manifest. `verify` checks a step
against it; `newest_verified` is the newest step that passes (the others reported, file by file), which is
what training resumes from and what evaluation, export and effect reports read. A step without a manifest is
damaged like a step that fails its manifest if its progress records one or an older step has one (the run
saved manifests: this one was lost), or if it lacks an item (an empty or partly copied step directory);
otherwise (it may predate manifests: its progress has no such key, or cannot be read) it is used as it is,
with a warning, and a read that fails there is reported as damage too.

A failed save (a full disk, say) raises `CheckpointSaveError`: from `save` itself, or from the next `save`,
`poll`, `wait` or `close` when it failed in the background. Its partial directory is removed and never
marked complete; earlier steps are untouched.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers as policies

from nextquill_jax import parallel
from nextquill_jax.config import CheckpointConfig
from nextquill_jax.data import checksums

ITEMS = ("state", "data", "config", "progress")
MANIFEST = "manifest.json"
PROGRESS_FILE = "progress/metadata"  # where Orbax's JsonSave writes the progress item
PROGRESS_MANIFEST = "manifest"  # the progress key recording that the step was saved with a manifest
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix of a step directory still being written
CORRUPT_SUFFIX = ".corrupt"
_ASIDE_NAME = re.compile(rf"(\d+){re.escape(CORRUPT_SUFFIX)}(?:\.(\d+))?")  # `aside_path`'s names
# Orbax's own bookkeeping at a step's top level, rewritten after the commit (timestamps, a commit marker):
# the only files a manifest does not list. The state, data position, config and progress are all listed.
ORBAX_BOOKKEEPING = ("_CHECKPOINT_METADATA", "commit_success.txt")


class CheckpointSaveError(RuntimeError):
    """Saving a step failed (e.g. the disk is full); the message names the step, the cause and the newest
    complete checkpoint, which is intact."""


def best_metric_fn(cfg: CheckpointConfig) -> Callable[[Mapping[str, float]], float]:
    """A step's saved metrics -> its `cfg.best_metric` (set), the worst value by `cfg.best_mode` when the step
    has none (no evaluation at its step)."""
    worst = math.inf if cfg.best_mode == "min" else -math.inf
    return lambda m: float(m.get(cfg.best_metric, worst))


def preservation_policy(cfg: CheckpointConfig) -> policies.PreservationPolicy:
    """Keep the last `cfg.keep` checkpoints, plus the best one by `cfg.best_metric` when set.

    A step saved without a metric ranks worst. A step with no `metrics` item at all (saved before this
    version recorded it, or while `best_metric` was unset) is kept: whether it was the best is unknown.
    """
    latest = policies.LatestN(n=cfg.keep)
    if cfg.best_metric is None:
        return latest
    best = policies.BestN(
        get_metric_fn=best_metric_fn(cfg),
        reverse=cfg.best_mode == "min",
        n=1,
        keep_checkpoints_without_metrics=True,
    )
    return policies.AnyPreservationPolicy([latest, best])


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
    """Drop absl (Orbax) records below ERROR while the block runs, then give the absl logger back its own
    level, unset included: `absl.logging.set_verbosity(get_verbosity())` would set it to WARNING for good,
    dropping a library caller's absl INFO records and the CLI's third-party log's."""
    logger = absl_logging.get_absl_logger()
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


@dataclass(frozen=True)
class StepCheck:
    """One step directory against its manifest: `status` "ok", "failed" (a file differs or is missing, or
    there is no manifest and its progress records one, an older step has one or an item is missing) or "no
    manifest" (every item there, no manifest recorded nor older: as an older version saved it); `problems`
    names each missing or differing file or item; `files` and `size` (bytes) are what the manifest lists."""

    step: int
    status: str
    problems: list[str]
    files: int
    size: int


def write_manifest(step_dir: Path) -> None:
    """Write `<step_dir>/manifest.json`: every file below `step_dir` (but `ORBAX_BOOKKEEPING`) with its size
    and checksum."""
    names = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
    files = checksums.manifest(step_dir, [n for n in names if n not in ORBAX_BOOKKEEPING])
    (step_dir / MANIFEST).write_text(json.dumps({"algorithm": checksums.ALGORITHM, "files": files}, indent=1))


def _missing_items(step_dir: Path) -> list[str]:
    """One line per item of `ITEMS` that `step_dir` lacks or holds no file of."""
    found = []
    for item in ITEMS:
        where = step_dir / item
        if not where.is_dir():
            found.append(f"{where}: missing")
        elif not any(p.is_file() for p in where.rglob("*")):
            found.append(f"{where}: empty")
    return found


def _older_manifest(step_dir: Path) -> Path | None:
    """The manifest of the newest step older than `step_dir` in the same directory, or None."""
    step = int(step_dir.name)
    older = [int(p.name) for p in step_dir.parent.iterdir() if p.name.isdigit() and int(p.name) < step]
    found = (step_dir.parent / str(s) / MANIFEST for s in sorted(older, reverse=True))
    return next((m for m in found if m.is_file()), None)


def _progress_records_manifest(step_dir: Path) -> bool:
    """Whether the progress item of `step_dir` (Orbax's JsonSave writes it to `progress/metadata`) records
    that the step was saved with a manifest; False when it does not or cannot be read."""
    try:
        return (
            json.loads((step_dir / PROGRESS_FILE).read_text(encoding="utf-8")).get(PROGRESS_MANIFEST) is True
        )
    except (OSError, ValueError, AttributeError):  # missing or unreadable, not JSON, not a mapping
        return False


def check_step(step_dir: Path) -> StepCheck:
    """`step_dir` (a step's directory, as Orbax lists it) checked against its manifest, or without one for
    every item when neither its progress records a manifest nor an older step of the directory has one."""
    step = int(step_dir.name)
    path = step_dir / MANIFEST
    if not path.is_file():
        # Every version has saved all of `ITEMS` in one commit, so an item missing here means a copy or
        # sync that stopped part-way (Orbax lists any directory named as a step), not an older save. And a
        # run that saved an older step with a manifest saved this one with a manifest too: it was lost; so was
        # the manifest of a step whose progress records one (the oldest or only step has no older witness).
        # (A newer step with one proves nothing: a run begun before manifests may have been resumed since.)
        missing = _missing_items(step_dir)
        older = _older_manifest(step_dir)
        if older is not None:
            missing.insert(0, f"{path}: missing, though the older {older} shows the run saves manifests")
        elif _progress_records_manifest(step_dir):
            missing.insert(0, f"{path}: missing, though its progress records a manifest: it was lost")
        elif missing:
            missing.insert(0, f"{path}: missing")
        if missing:
            return StepCheck(step, "failed", missing, 0, 0)
        return StepCheck(step, "no manifest", [], 0, 0)
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        found = checksums.problems(step_dir, files)
        size = sum(int(f["size"]) for f in files.values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not the manifest's layout
        return StepCheck(step, "failed", [f"{path}: unreadable ({type(e).__name__}: {e})"], 0, 0)
    except OSError as e:  # a read error or permission: the disk's problem, not the manifest's layout
        return StepCheck(step, "failed", [checksums.unreadable(path, e)], 0, 0)
    # Every item is saved with at least one file: a manifest listing none of one is not the one saved here.
    found += [
        f"{path}: lists no file of {step_dir / item}"
        for item in ITEMS
        if not any(name.startswith(f"{item}/") for name in files)
    ]
    return StepCheck(step, "failed" if found else "ok", found, len(files), size)


def aside_path(step_dir: Path) -> Path:
    """Where to move the damaged `step_dir` aside: `<step>.corrupt`, or when an earlier damaged copy of the
    step holds that name, the first of `<step>.corrupt.1`, `<step>.corrupt.2`, ... not taken."""
    names = (f"{step_dir.name}{CORRUPT_SUFFIX}{f'.{n}' if n else ''}" for n in itertools.count())
    return next(p for p in map(step_dir.with_name, names) if not p.exists())


def moved_aside(directory: Path) -> list[Path]:
    """The step directories in `directory` that a resume moved aside as damaged (`aside_path`), by step, each
    step's in the order they were moved."""
    found = {p: _ASIDE_NAME.fullmatch(p.name) for p in directory.glob(f"*{CORRUPT_SUFFIX}*")}
    order = {p: (int(m[1]), int(m[2] or 0)) for p, m in found.items() if m}
    return sorted(order, key=order.__getitem__)


def verify_error(directory: Path, checks: list[StepCheck], aside: list[Path]) -> str | None:
    """What `checkpoint verify` finds wrong with the checkpoints in `directory` (`checks`, one per step, and
    `aside`, the steps moved aside as damaged), as one line naming the step directories and the fix; None
    when no step is damaged or incomplete and at least one verifies."""
    if not checks and aside:
        # `train` refuses to start in this state too (it would train from step 0 beside them): the same fix.
        return (
            f"{directory} holds no complete checkpoint: a resume moved the damaged "
            f"{', '.join(map(str, aside))} aside. Fix: restore the checkpoints from a backup, or move "
            f"{directory} away to train the run from the start."
        )
    if not checks:
        return (
            f"{directory} holds no complete checkpoint. Fix: train until the run saves one "
            "(checkpoint.every_steps, or the end of an epoch)."
        )
    failed = [str(directory / str(c.step)) for c in checks if c.status == "failed"]
    if failed and len(failed) == len(checks):
        # A resume moves every one of them aside and then refuses to start (`loop.start_state`).
        return (
            f"damaged or incomplete: {', '.join(failed)} (see the table), and no step verifies. Fix: restore "
            f"them from a backup (`nextquill-jax train` moves them aside and refuses to start until they are "
            f"restored), or move {directory} away to train the run from the start."
        )
    if failed:
        return (
            f"damaged or incomplete: {', '.join(failed)} (see the table). Fix: restore them from a backup, "
            "or delete them (`nextquill-jax train` resumes from the newest step that verifies, moving aside "
            "any damaged step newer than it)."
        )
    if not any(c.status == "ok" for c in checks):
        return (
            f"no checkpoint in {directory} verifies: steps {[c.step for c in checks]} have no {MANIFEST} "
            "(they may predate manifests). Fix: evaluation and export still use them, unverified; "
            "for a verified one, train the run on (`nextquill-jax train`) until it saves a checkpoint."
        )
    return None


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, reading a step's damaged metrics file as no metrics.

    Orbax reads every step's metrics when the manager is built and lets anything but a missing file through,
    so one truncated or garbled `<step>/metrics/metrics` (an old step's too) made `verify`, a resume and
    `export` fail with a JSON traceback before any step was checked. The manifest lists that file, so the
    step's own check reports the damage, and readers and resumes treat it as any damaged step."""

    def _get_metrics(self, step: int) -> Any:
        try:
            return super()._get_metrics(step)
        except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
            return None


class Checkpointer:
    """Saves and restores a run's checkpoints in `directory` (created if missing).

    Every process of a multi-process run constructs it and calls `save` / `restore` / `newest_verified` at
    the same steps. `read_only`: for reading another run's checkpoints (export, a reference model) while that
    run may still be saving: nothing is created, deleted, moved or cleaned up.
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False) -> None:
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self.async_save = cfg.async_save
        self._saving: int | None = None  # the step whose save may still be in flight
        # The step the commit callback writes the manifest of: set by each save and cleared by nothing, since
        # after an interrupted wait Orbax's next wait returns at once while the commit goes on (Python's
        # Thread.join, interrupted, marks the thread finished). A second Ctrl-C during a save: `close`
        # cleared `_saving`, and the callback failed on step None.
        self._committing: int | None = None
        # Orbax logs two warnings for every read-only manager (that it will not save): not news to a reader.
        with _absl_errors_only() if read_only else contextlib.nullcontext():
            options = ocp.CheckpointManagerOptions(
                preservation_policy=None if read_only else preservation_policy(cfg),
                # Orbax writes a step's metrics (its `metrics` item, before the commit, so the manifest lists
                # it) only with a `best_fn`; the preservation policy ranks steps by them, and after a restart
                # they are all it has.
                best_fn=None if read_only or cfg.best_metric is None else best_metric_fn(cfg),
                best_mode=cfg.best_mode,
                # Always Orbax's asynchronous path, whose commit callback writes the manifest before the
                # step is renamed into place; `async_save: false` waits for each save instead.
                enable_async_checkpointing=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._write_saving_manifest),
                create=not read_only,
                cleanup_tmp_directories=not read_only,
                read_only=read_only,
            )
            self.manager = _Manager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        """The newest COMPLETE checkpoint's step (verified or not), or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, ascending."""
        return sorted(self.manager.all_steps())

    def _require_complete(self, step: int) -> None:
        """Return if step `step` is complete, else raise FileNotFoundError naming the complete steps, those
        of them damaged, and the newest verified, which leaving the step out gives (checked only then)."""
        if step in self.manager.all_steps():
            return
        missing = f"no complete checkpoint for step {step} in {self.directory}"
        complete = self.all_steps()
        if not complete:
            raise FileNotFoundError(
                f"{missing}; it holds none. Fix: train until the run saves one (checkpoint.every_steps, or "
                "the end of an epoch)."
            )
        usable, damaged = self._newest_usable()
        if usable is None:
            raise FileNotFoundError(
                f"{missing}; complete ones: {complete}, none of which verifies (`nextquill-jax checkpoint "
                "verify` names the damage). Fix: restore them from a backup, or train the run again."
            )
        bad = sorted(c.step for c in damaged)
        listed, which = (f"{complete}, damaged: {bad}", " not damaged") if bad else (f"{complete}", "")
        raise FileNotFoundError(
            f"{missing}; complete ones: {listed}. Fix: choose one of those steps{which} (--step on the "
            f"command line, step= in Python), or leave the step out for the newest verified, {usable.step}."
        )

    def _other_steps(self, step: int) -> str:
        """The fix for damaged step `step`: the other complete steps to choose, or that there is none."""
        others = [s for s in self.all_steps() if s != step]
        if not others:
            return "no other step is complete: start the run again"
        return f"choose another step (the other complete ones: {others})"

    def check(self, step: int) -> StepCheck:
        """Step `step` checked against its manifest (reads every file of the step once).

        Raises:
            FileNotFoundError: no complete checkpoint at `step` (naming the ones there are).
        """
        self._require_complete(step)
        return check_step(self.directory / str(step))

    def require_verified(self, step: int, report: Callable[[str], None] = _to_stderr) -> None:
        """Return if step `step` matches its manifest (or has none but holds every item, and neither its
        progress nor an older step shows that it was saved with one: `report`ed as unverified).

        Raises:
            FileNotFoundError: no complete checkpoint at `step`.
            checksums.IntegrityError: a file of the step is missing or differs, or it has no manifest and its
                progress or an older step shows it had one, or it lacks an item (naming each).
        """
        result = self.check(step)
        if result.status == "failed":
            raise checksums.IntegrityError(
                f"checkpoint {self.directory / str(step)} is damaged and not restorable: "
                f"{'; '.join(result.problems)}. Fix: {self._other_steps(step)}."
            )
        if result.status == "no manifest":
            report(self._unverified_line(step))

    def newest_verified(self, report: Callable[[str], None] = _to_stderr) -> int | None:
        """The newest step that matches its manifest (or has none but holds every item, and neither its
        progress nor an older step shows that it was saved with one: `report`ed as unverified), or None.

        Newer steps that fail (a missing item counts) are `report`ed file by file and, unless read-only,
        moved aside (`aside_path`: `<step>.corrupt`, beside any earlier damaged copy of the step) so that the
        run saves that step afresh when it gets there again.
        Process 0 checks and the others take its answer (raising `parallel.Process0FailedError` when its
        check raised).
        """

        def scan() -> int:
            chosen = self._scan(report)
            return -1 if chosen is None else chosen

        answer = parallel.process_0_result(scan, f"to check the checkpoints in {self.directory}")
        if jax.process_count() > 1:
            self.manager.reload()
        return None if answer < 0 else answer

    def _newest_usable(self) -> tuple[StepCheck | None, list[StepCheck]]:
        """(the newest step that verifies or is used without a manifest, or None; the newer ones that
        failed, newest first): each step's check from the newest down, until one does not fail."""
        failed = []
        for step in reversed(self.all_steps()):
            result = check_step(self.directory / str(step))
            if result.status != "failed":
                return result, failed
            failed.append(result)
        return None, failed

    def _scan(self, report: Callable[[str], None]) -> int | None:
        usable, failed = self._newest_usable()
        for result in failed:
            where = self.directory / str(result.step)
            line = f"checkpoint {where} is damaged and not restorable: {'; '.join(result.problems)}"
            if not self.read_only:
                # Beside any earlier damaged copy of the step, never over it: it may be the one to recover.
                aside = aside_path(where)
                where.rename(aside)
                self.manager.reload()
                line += f" (moved aside to {aside})"
            report(line + "; trying the previous checkpoint")
        if usable is None:
            return None
        if usable.status == "no manifest":
            report(self._unverified_line(usable.step))
        return usable.step

    def _unverified_line(self, step: int) -> str:
        return (
            f"warning: checkpoint {self.directory / str(step)} has no {MANIFEST}, nor has any older step (it "
            f"may predate manifests); it is used unverified"
        )

    def _write_saving_manifest(self) -> None:
        # Orbax's commit callback, on the primary process once every process has written its files: the
        # step is still in its temporary directory, which the rename that follows commits.
        found = [p for p in self.directory.glob(f"{self._committing}{TMP_MARK}*") if p.is_dir()]
        if len(found) != 1:
            raise RuntimeError(f"cannot find the directory of step {self._committing} being saved: {found}")
        write_manifest(found[0])

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
        """Start saving step `step` (return at once unless `wait` or `async_save: false`); returns False if it
        is already saved. The previous save is finished first.

        The data iterator's position is captured before this returns, so the caller may advance it at once.

        Raises:
            CheckpointSaveError: this save failed, or the previous one did in the background.
        """
        self.wait()
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(dict(config)),
            progress=ocp.args.JsonSave({**progress, PROGRESS_MANIFEST: True}),
        )
        self._saving = self._committing = step
        try:
            saved = self.manager.save(step, args=args, metrics=dict(metrics or {}), force=True)
        except Exception as e:  # whatever the writer raised (ENOSPC: OSError), the step must not count
            self._failed(e)
        if wait or not self.async_save:
            self.wait()
        return saved

    def poll(self) -> None:
        """Return at once, unless the save in flight has failed.

        Raises:
            CheckpointSaveError: it failed.
        """
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until any asynchronous save has been committed.

        Raises:
            CheckpointSaveError: it failed.
        """
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # Orbax re-raises the background writer's error as it was
            self._failed(e)
        self._saving = None

    def _failed(self, error: Exception) -> None:
        step, self._saving = self._saving, None
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}{TMP_MARK}*"):
                shutil.rmtree(partial, ignore_errors=True)
        self.manager.reload()
        latest = self.latest_step()
        kept = (
            "no earlier checkpoint"
            if latest is None
            else f"the newest complete one, {self.directory / str(latest)}, is intact"
        )
        raise CheckpointSaveError(
            f"saving checkpoint {step} in {self.directory} failed: {error}. Step {step} is not marked "
            f"complete (its partial files were removed); {kept}."
        ) from error

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
        """Load step `step`: the state laid out as `abstract_state` (a pytree of `jax.ShapeDtypeStruct` with
        shardings), the data iterator's position (set in place), and the progress dict. Choose `step` with
        `newest_verified` (or check it with `require_verified`) first.

        Raises:
            FileNotFoundError: no complete checkpoint at `step` (naming the ones there are).
            checksums.IntegrityError: a step without a manifest that cannot be read (naming the error).
        """
        self._require_complete(step)
        with self._reading_unverified(step):
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
            checksums.IntegrityError: a step without a manifest that cannot be read (naming the error).
        """
        self._require_complete(step)
        with self._reading_unverified(step):
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
            checksums.IntegrityError: a step without a manifest that cannot be read (naming the error).
        """
        return self._read_json(step, "config")

    def saved_process_count(self, step: int) -> int | None:
        """How many processes saved step `step`'s data positions (grain writes one `process_I-of-N.json` per
        process); None where the step holds none (or files that disagree on N)."""
        counts = {
            int(found.group(1))
            for path in (self.directory / str(step) / "data").glob("process_*-of-*.json")
            if (found := re.fullmatch(r"process_\d+-of-(\d+)\.json", path.name))
        }
        return counts.pop() if len(counts) == 1 else None

    def read_progress(self, step: int) -> dict[str, Any]:
        """The progress saved with step `step`: step, epoch, under LoRA the base's identity (`base`), the
        prepared data's (`data`, `resume.data_identity`), the fixed-DCE reference model's (`reference`,
        `reference_model.Reference.identity`), the `loss.weighting` module's (`weighting`,
        `loss.weighting_record.weighting_fingerprint`) and `manifest` (true: saved with a manifest); the last
        four are absent from checkpoints saved before they were recorded.

        Raises:
            FileNotFoundError: no complete checkpoint at `step` (naming the ones there are).
            checksums.IntegrityError: a step without a manifest that cannot be read (naming the error).
        """
        return self._read_json(step, "progress")

    def _read_json(self, step: int, item: str) -> dict[str, Any]:
        self._require_complete(step)
        with self._reading_unverified(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(restored[item])

    @contextlib.contextmanager
    def _reading_unverified(self, step: int) -> Iterator[None]:
        # A step without a manifest was never checked: what fails to read there is most likely damage, which
        # the user fixes like any other (another step, a backup), not a traceback.
        try:
            yield
        except Exception as e:
            where = self.directory / str(step)
            if (where / MANIFEST).is_file():
                raise
            first = next(iter(str(e).splitlines()), "")
            first = first if len(first) <= 300 else first[:300] + " ..."  # TensorStore's lines run long
            raise checksums.IntegrityError(
                f"checkpoint {where} could not be read ({type(e).__name__}: {first}); it has no {MANIFEST}, "
                f"so its files were never checked, and it is probably damaged. Fix: "
                f"{self._other_steps(step)}, or restore it from a backup."
            ) from e

    def close(self) -> None:
        """Finish pending saves and release the manager's threads. A save that failed in the background was
        already reported by `wait` or `poll` on every path that ends a run normally; here it must not mask the
        error that ends a run early, so it is only logged."""
        try:
            self.wait()
        except CheckpointSaveError as e:
            absl_logging.error("%s", e)
        # Orbax cleans up temporary directories on a thread the manager starts and awaits in its first save,
        # not in `close`: a run that failed soon after building its manager (truncated weights, found as
        # `train` loaded them) left it running into interpreter shutdown, whose thread pool then refused it,
        # printing a second traceback ("cannot schedule new futures after shutdown") after the run's error.
        self.manager._maybe_await_cleanup_tmp_directory()
        self.manager.close()
