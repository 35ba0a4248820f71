"""The training loop: step, log, evaluate, checkpoint, and stop cleanly on SIGTERM or Ctrl-C.

It resumes from the newest checkpoint that verifies against its manifest (damaged newer ones are named and
moved aside; the data iterator's position comes with the state, so the same batches follow), once the
config agrees with that checkpoint's in every key a resume may not change (`resume.MAY_CHANGE`). A checkpoint
that cannot be saved (a full disk) stops the run or is skipped, by `checkpoint.on_save_error`.

    result = train(load_config("configs/tiny_synthetic.yaml"), workdir)

Set-up (mesh, data, model, shardings, compiled steps) is `setup.set_up_run`; the step is pure
(`step.make_train_step`). The loop owns the I/O: the metrics log, checkpoints, the data iterator (and the
time spent waiting for it) and an optional `jax.profiler` trace of chosen steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from nextquill_jax.config import Config, config_to_dict, save_config
from nextquill_jax.config_paths import absolute_paths
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.checksums import IntegrityError
from nextquill_jax.data.global_batch import to_global_batch
from nextquill_jax.loss import LossConfig, metric_names, metrics_from_aux
from nextquill_jax.loss.weighting_record import weighting_note
from nextquill_jax.train.adapters import check_same_base, legacy_fingerprint
from nextquill_jax.train.checkpoint import Checkpointer, CheckpointSaveError, moved_aside, verify_error
from nextquill_jax.train.dispatch_queue import summed_eval_aux, wait_behind
from nextquill_jax.train.health import HealthMonitor
from nextquill_jax.train.metrics_log import EVAL_PREFIX, MetricsLog
from nextquill_jax.train.resume import (
    check_resumable,
    check_same_data,
    check_same_process_count,
    check_same_reference,
)
from nextquill_jax.train.setup import Echo, RunSetup, abstract_state, init_state, set_up_run
from nextquill_jax.train.state import TrainState
from nextquill_jax.train.workdir import CHECKPOINT_DIR, CONFIG_FILE
from nextquill_jax.train.workdir_lock import WorkdirLock

PROFILE_DIR = "profile"
# What a message names as the last good checkpoint when none has been saved (or none verifies).
NO_CHECKPOINT = "none"

# Step metrics that are not loss aux (the aux sums are logged through metrics_from_aux).
_STEP_EXTRAS = ("grad_norm", "learning_rate", "input_tokens", "padding_efficiency", "skipped")


# `train`'s on_metrics: (step, the values of the row appended to metrics.jsonl) on process 0.
OnMetrics = Callable[[int, dict[str, int | float | None]], object]


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN/inf (`train.nonfinite: stop`), or more than `train.max_skips` updates
    were skipped. The message is `diagnosis` (the step, the values, the last good checkpoint) and `train`'s
    fix; `resume_setting` is the setting a resume from that checkpoint may change to go on, which a command
    that takes no overrides (`compare`) words its own way."""

    def __init__(self, diagnosis: str, resume_setting: str, train_fix: str) -> None:
        super().__init__(f"{diagnosis} Fix: {train_fix}")
        self.diagnosis, self.resume_setting = diagnosis, resume_setting


class TrainingStoppedError(RuntimeError):
    """Training stopped on SIGTERM or Ctrl-C, its checkpoint saved, inside a longer job (`compare`, `demo`)
    that must stop with it rather than go on with a partly trained model (`train_to_the_end`)."""


@dataclass(frozen=True)
class TrainResult:
    """How a run ended: `status` "finished" or "preempted" (SIGTERM or Ctrl-C: saved, resume by running
    again), the last step, the last checkpoint's step and the final train state (sharded arrays).
    `stop_signal` names the signal that asked this run to stop ("SIGTERM", "SIGINT"), None if none did: a
    stop that falls on the last step leaves the run "finished" with its signal named here."""

    status: str
    step: int
    workdir: Path
    last_checkpoint: int | None
    state: TrainState
    stop_signal: str | None = None


def train(
    cfg: Config,
    workdir: Path,
    *,
    echo: Echo = print,
    on_locked: Callable[[], object] | None = None,
    on_metrics: OnMetrics | None = None,
) -> TrainResult:
    """Run (or resume) the training `cfg` describes in `workdir`.

    The config's relative paths are relative to the current directory: the run uses them joined to it
    (`config_paths.absolute_paths`), so config.yaml and every checkpoint record them absolute.

    Only one `train` at a time writes a workdir: process 0 holds `<workdir>/train.lock` (`workdir_lock`)
    from before set-up writes there until the run ends. `on_locked` is called once past the lock (on every
    process, `setup.set_up_run`), before set-up writes in `workdir`: a caller that writes there itself (the
    CLI opens its third-party log) starts there, so that a run refused the lock writes nothing in the
    workdir of the run that holds it. `echo` gets every line the run shows (set-up notes, evaluation lines,
    warnings, what a stop saved) on process 0; the progress bar (`logging.progress_bar`) draws on stderr.
    `on_metrics(step, values)` gets each row this run appends to metrics.jsonl, on process 0, once it is
    written: a training row every `logging.every_steps` (and at each flush's last step), an evaluation row
    (`eval/...` keys) where one is due; `values` as the row holds them (null, None here, for a non-finite
    value). For a caller's own logging or plots; an exception it raises ends the run as any error does (the
    checkpoints saved stay, and the same call resumes).

    Raises:
        WorkdirLockedError: another `train` is running in `workdir` (nothing there is changed).
        ConfigError: a config problem found during set-up (before compiling; `checkpoint.best_metric`
            first, `check_best_metric`), or a resume whose config differs from its checkpoint's
            (`resume.check_resumable`); config.yaml is then left as it was.
        TrainingDivergedError: a non-finite loss with `train.nonfinite: stop`, or too many skipped updates.
        CheckpointSaveError: a checkpoint could not be saved, with `checkpoint.on_save_error: stop`.
        checksums.IntegrityError: the workdir holds no checkpoint that verifies but damaged ones (moved
            aside, by this start or an earlier one), or the prepared data is damaged.
    """
    cfg = absolute_paths(cfg, Path.cwd())
    check_best_metric(cfg)
    # Held from before anything is written in the workdir (`set_up_run` takes it on process 0) to the end.
    lock = WorkdirLock(workdir)
    try:
        return _train(cfg, workdir, lock, echo, on_locked, on_metrics)
    finally:
        lock.release()


def _train(
    cfg: Config,
    workdir: Path,
    lock: WorkdirLock,
    echo,
    on_locked: Callable[[], object] | None,
    on_metrics: OnMetrics | None,
) -> TrainResult:
    run = set_up_run(cfg, workdir, echo, lock=lock, on_locked=on_locked)
    # As resolved (config.yaml and every checkpoint record what the steps were built from), with the workdir
    # this run uses: `--config <workdir>/config.yaml` then resumes this run, not the config file's workdir.
    # Absolute, so that it names the same directory from any current directory.
    cfg = dataclasses.replace(
        run.config, train=dataclasses.replace(run.config.train, workdir=str(Path(workdir).absolute()))
    )
    ckpt = Checkpointer(workdir / CHECKPOINT_DIR, cfg.checkpoint)
    iterator = iter(run.train_data.dataset())

    def release() -> None:
        """On every way out: a save in flight (the stop's own, say) is committed first; the iterator is
        closed, not left to the garbage collector, since its prefetch threads are not daemons and a caller
        that keeps an exception keeps this frame, and so the iterator, alive."""
        ckpt.close()
        iterator.close()

    try:
        state, step = start_state(run, cfg, ckpt, iterator, echo)
    except BaseException:
        release()
        raise
    # Only now that the start is settled: a refused or failed resume leaves the config of the run that ran.
    save_config(cfg, workdir / CONFIG_FILE)
    last_saved = step if step > 0 else None
    if step >= run.total_steps:
        # Running a finished run again must not train (and log, and evaluate) one step past its end.
        echo(f"{workdir} already finished at step {step} of {run.total_steps}: nothing to train")
        release()
        return TrainResult("finished", step, workdir, last_saved, state)
    log = MetricsLog(
        workdir, cfg.logging, start_step=step, total_steps=run.total_steps, echo=echo, on_row=on_metrics
    )
    pending = PendingMetrics(cfg, run.settings.loss, run.epoch_ends, log)
    profile = _Profile(cfg.logging.profile_steps, workdir / PROFILE_DIR, log)
    preemption = _Preemption()
    config_dict = config_to_dict(cfg)
    last_good = lambda: _newest_verified_name(ckpt, log)
    stop_signal = None  # a stop that came with the last step: the run finishes, and says so
    interrupted = None  # a second Ctrl-C's KeyboardInterrupt, told which checkpoint it leaves
    try:
        with jax.set_mesh(run.mesh):
            while True:
                waiting = time.perf_counter()
                local = next(iterator, None)
                if local is None:
                    break
                batch = to_global_batch(local, run.mesh)
                waited = time.perf_counter() - waiting
                profile.before(step + 1)
                state, metrics = run.train_step(state, batch, run.reference_params, run.base_params)
                step += 1
                profile.after(step, state)
                pending.add(step, metrics, waited)
                _on_save_error(ckpt.poll, cfg, log)
                due = actions_at(step, cfg, run, stop=preemption.reached(step))
                if due.fetch:
                    log.progress(step, pending.flush(last_good))
                eval_metrics = evaluate_split(run, state.params, cfg.eval.max_batches) if due.evaluate else {}
                if eval_metrics:
                    log.write(step, eval_metrics)
                    log.message(eval_line(step, eval_metrics, cfg.checkpoint.best_metric))
                # True only once this step's own checkpoint is saved: a stop step is a save step
                # (`actions_at`), but should that save fail (`on_save_error: continue`) or the schedule
                # change, the stop names the newest verified checkpoint instead, never an unsaved step.
                saved = False
                if due.save:
                    progress = {
                        "step": step,
                        "epoch": epoch_of(step, run.epoch_ends),
                        "base": run.base_identity,
                        "data": run.data_identity,
                        "reference": run.reference_identity,
                        "weighting": run.weighting_identity,
                    }
                    save = functools.partial(
                        ckpt.save, step, state, iterator, config=config_dict, progress=progress,
                        metrics=eval_metrics, wait=due.stop or due.last,
                    )  # fmt: skip
                    saved = _on_save_error(save, cfg, log)
                    last_saved = step if saved else last_saved
                if (eval_metrics or due.save) and not pending:
                    # Not training: the next row's tokens/s and data wait start after them.
                    pending.restart_interval()
                if due.stop and due.last and saved:
                    # The signal came too late to stop anything: the run is done, and a resume would only
                    # say "already finished".
                    stop_signal = preemption.signal_name
                    log.message(_finished_despite(stop_signal, step, ckpt.directory / str(step), workdir))
                elif due.stop:  # the last step too when its save failed: a resume trains it again
                    where = str(ckpt.directory / str(step)) if saved else last_good()
                    resume = (
                        f"checkpoint {where} is complete. Resume by running the same command again"
                        if where != NO_CHECKPOINT
                        else "no checkpoint is saved or verifies, so the same command starts again from "
                        "step 0"
                    )
                    log.message(
                        f"{preemption.signal_name}: stopped at step {step}; {resume} (workdir {workdir})."
                    )
                    return TrainResult(
                        "preempted", step, workdir, last_saved, state, stop_signal=preemption.signal_name
                    )
                if due.last:
                    break
        if pending:
            pending.flush(last_good)
        if stop_signal is None and preemption.requested and jax.process_count() == 1:
            # It came after the last step's stop check (during its save, say): nothing was left to stop, but
            # the caller's job (compare, demo) was asked to stop. Several processes agree on a stop through
            # JAX's preemption service at the step checks only, so one process alone must not act on it.
            stop_signal = preemption.signal_name
            saved_at = ckpt.directory / str(step) if last_saved == step else None
            log.message(_finished_despite(stop_signal, step, saved_at, workdir))
        return TrainResult("finished", step, workdir, last_saved, state, stop_signal=stop_signal)
    except KeyboardInterrupt as e:
        interrupted = e
        raise
    finally:
        profile.stop()
        preemption.restore()
        release()
        log.close()
        if interrupted is not None:
            interrupted.add_note(_newest_committed(ckpt.directory))
            interrupted = None  # this frame holding its own exception kept the whole run alive (a cycle)


def _newest_committed(directory: Path) -> str:
    """What a run interrupted by a second Ctrl-C leaves, once its saves in flight are committed: the newest
    committed checkpoint (a step's directory takes its number only at its commit), or that there is none."""
    steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit() and p.is_dir()]
    return f"the newest checkpoint is {directory / str(max(steps))}" if steps else "no checkpoint is saved"


def _finished_despite(signal_name: str, step: int, checkpoint: Path | None, workdir: Path) -> str:
    """The message of a stop signal that came with (or after) the run's last step, `step`, whose checkpoint
    is `checkpoint` (None: its save failed, and a resume would train that step again)."""
    if checkpoint is None:
        where = " (its checkpoint was not saved: see above; running the same command again trains it again)"
    else:
        where = f" (checkpoint {checkpoint} is complete); nothing to resume"
    return f"{signal_name} at step {step}, the run's last: training finished{where} (workdir {workdir})."


def train_to_the_end(cfg: Config, workdir: Path, *, echo: Echo = print) -> TrainResult:
    """`train`, for a job that goes on to use the trained model.

    Raises:
        TrainingStoppedError: training stopped on SIGTERM or Ctrl-C (`train` has said where it saved);
            the message says that running the job again resumes it. Also for a signal that came with the
            last step: training finished, but the job was asked to stop.
        as `train`.
    """
    result = train(cfg, workdir, echo=echo)
    if result.status != "finished":
        raise TrainingStoppedError(
            f"training in {workdir} stopped at step {result.step} before its end, so nothing that needs the "
            f"trained model was run; run the same command again to resume"
        )
    if result.stop_signal is not None:  # the job was asked to stop: it must not go on to evaluate
        raise TrainingStoppedError(
            f"training in {workdir} finished at step {result.step}, but {result.stop_signal} came with its "
            f"last step, so nothing that needs the trained model was run; run the same command again to go "
            f"on from the trained model"
        )
    return result


def start_state(
    run: RunSetup, cfg: Config, ckpt: Checkpointer, iterator: Iterator, echo: Echo
) -> tuple[TrainState, int]:
    """(state, step): the newest checkpoint that verifies restored (the data iterator too; damaged newer ones
    are `echo`ed file by file and moved aside), else step 0 with the initial parameters.

    Raises:
        checksums.IntegrityError: no checkpoint verifies but damaged ones were moved aside, now or by an
            earlier start (`checkpoint.verify_error`), rather than silently start afresh beside them.
        ConfigError: the checkpoint was saved by another number of processes
            (`resume.check_same_process_count`), `cfg` differs from the checkpoint's config in a key a resume
            may not change (`resume.check_resumable`), or, under the same config, the LoRA base's content
            from the one the checkpoint was trained on (`adapters.check_same_base`, whose note on a
            checkpoint with the earlier base fingerprint is `echo`ed), the prepared data's
            (`resume.check_same_data`) or the fixed-DCE reference model's (`resume.check_same_reference`,
            whose note on a checkpoint saved before it was recorded is `echo`ed); in that order, found before
            anything is restored.
    """
    start = ckpt.newest_verified(echo)
    # The scan moves each damaged step aside, so the next start would find no step at all and train from
    # step 0 beside them: whichever start moved them, the run is refused until the user acts.
    if start is None and (aside := moved_aside(ckpt.directory)):
        raise IntegrityError(verify_error(ckpt.directory, [], aside))
    if start is None:
        params = run.initial_params()
        return init_state(params, run.tx, cfg.train.seed, run.state_shardings), 0
    where = str(ckpt.directory / str(start))
    # The process count first: under another, a config that keeps the global batch would be refused naming
    # only data.batching.rows_per_batch. Then the config: it names each changed key (LoRA added or removed, a
    # preset base's seed or overrides, another model.path), where the base check could only say that the
    # base differs; then the LoRA base's content, the data's and the reference model's, which can change
    # under the same config, and the weighting module's (a warning only). All read only the checkpoint's
    # file names and JSON items, before Orbax restores any array.
    check_same_process_count(ckpt.saved_process_count(start), jax.process_count(), where)
    check_resumable(ckpt.read_config(start), cfg, ckpt.directory.parent, start, data_reused=run.data_reused)
    progress = ckpt.read_progress(start)
    legacy = lambda: legacy_fingerprint(cfg.model, cfg.train.seed)
    if note := check_same_base(progress.get("base"), run.base_identity, where, legacy):
        echo(note)
    check_same_data(progress.get("data"), run.data_identity, where)
    if note := check_same_reference(progress.get("reference"), run.reference_identity, where):
        echo(note)
    if note := weighting_note(progress.get("weighting"), run.weighting_identity, where):
        echo(note)
    target = abstract_state(run.abstract_params, run.tx, cfg.train.seed, run.state_shardings)
    state, _ = ckpt.restore(start, target, iterator)
    echo(f"resuming from {where} (step {start})")
    return state, start


@dataclass(frozen=True)
class StepActions:
    """What is due after a step: `fetch` the pending metrics (and log them), `evaluate`, `save`; `last` step
    of the run; `stop` on SIGTERM or a first Ctrl-C."""

    fetch: bool
    evaluate: bool
    save: bool
    last: bool
    stop: bool


def actions_at(step: int, cfg: Config, run: RunSetup, *, stop: bool) -> StepActions:
    """The schedule of `logging`, `eval` and `checkpoint` at optimizer step `step` (1-based)."""
    epoch_end = step in run.epoch_ends
    last = step >= run.total_steps
    every = lambda n: bool(n) and step % n == 0
    evaluate = run.eval_data is not None and (epoch_end or last or every(cfg.eval.every_steps))
    save = (
        last
        or stop
        or (epoch_end and cfg.checkpoint.on_epoch_end)
        or every(cfg.checkpoint.every_steps)
        or (evaluate and cfg.checkpoint.best_metric is not None)
    )
    fetch = every(cfg.logging.every_steps) or save or evaluate
    return StepActions(fetch=fetch, evaluate=evaluate, save=save, last=last, stop=stop)


def check_best_metric(cfg: Config) -> None:
    """Raise ConfigError if `checkpoint.best_metric` is set to a name evaluation never reports under `cfg`'s
    loss (`EVAL_PREFIX` + `loss.metric_names`, what `evaluate_split` returns): a misspelt name would keep no
    best checkpoint, silently. The message names the nearest valid names and lists them all.
    """
    tracked = cfg.checkpoint.best_metric
    if tracked is None:
        return
    names = metric_names(cfg.loss.loss_config())
    valid = [EVAL_PREFIX + name for name in names]
    if tracked in valid:
        return
    # Matched without the prefix, which every valid name shares: `loss` and `eval/lss` both find eval/loss.
    close = difflib.get_close_matches(tracked.removeprefix(EVAL_PREFIX), names, n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(f'`{EVAL_PREFIX}{c}`' for c in close)}?" if close else ""
    raise ConfigError(
        f"checkpoint.best_metric `{tracked}` is not a metric evaluation reports for this run's loss "
        f"(loss.variant {cfg.loss.variant}), so no best checkpoint would be kept.{hint} Fix: set "
        f"checkpoint.best_metric to one of {', '.join(valid)}, or null."
    )


def evaluate_split(run: RunSetup, params: dict, max_batches: int | None) -> dict[str, float]:
    """`EVAL_PREFIX<metric>` over the eval split (its first `max_batches` batches; None: all)."""
    references = (run.reference_params, run.base_params)
    step = lambda local: run.eval_step(params, to_global_batch(local, run.mesh), *references)
    aux = summed_eval_aux(step, itertools.islice(run.eval_data.dataset(), max_batches))
    values = metrics_from_aux(aux, run.settings.loss)
    return {EVAL_PREFIX + k: v for k, v in values.items()}


def eval_line(step: int, metrics: dict[str, float], tracked: str | None) -> str:
    """The console line of one evaluation: the eval loss, CE with history, the preference-bearing fraction
    and the tracked checkpoint metric (`checkpoint.best_metric`), those present."""
    keys = dict.fromkeys(k for k in ("eval/loss", "eval/ce_with", "eval/pref_fraction", tracked) if k)
    return f"step {step}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


class PendingMetrics:
    """Step metrics left on the device until they are due, so steps are dispatched without waiting.

    `flush` fetches them, stops the run on a non-finite loss (or too many skipped updates), writes the rows
    due to the log and reports counterfactual health (`health.HealthMonitor`). Tokens/s and the data-wait
    fraction (the share of the wall time spent waiting for batches) cover the interval since the previous
    flush (compilation at first), or since the evaluation or checkpoint save that followed it
    (`restart_interval`).
    """

    def __init__(self, cfg: Config, loss_cfg: LossConfig, epoch_ends: list[int], log: MetricsLog) -> None:
        self.cfg, self.loss_cfg, self.epoch_ends, self.log = cfg, loss_cfg, epoch_ends, log
        self.steps: list[tuple[int, dict]] = []
        self.interval_start = time.perf_counter()
        self.data_wait_s = 0.0
        logging = cfg.logging
        self.health = HealthMonitor(
            logging.health_ce_ratio,
            logging.health_pref_fraction,
            baseline=log.first_value("ce_without"),
            threshold=loss_cfg.threshold,
        )

    def __bool__(self) -> bool:
        return bool(self.steps)

    def add(self, step: int, metrics: dict, data_wait_s: float) -> None:
        """Hold `step`'s metrics (device arrays) and count the `data_wait_s` seconds its batch took; wait for
        the step before it (`dispatch_queue.wait_behind`), so that a stop's checkpoint waits for two steps at
        most, not for every step since the last fetch."""
        self.steps.append((step, metrics))
        self.data_wait_s += data_wait_s
        wait_behind([m for _, m in self.steps])

    def restart_interval(self) -> None:
        """Start the next row's wall-time interval now: after an evaluation or a checkpoint save that came
        after a flush, whose time is not training's (the next row's tokens/s would otherwise count it)."""
        self.interval_start = time.perf_counter()

    def flush(self, last_good: Callable[[], str]) -> dict[str, float]:
        """Fetch, check and log the pending steps; returns the last row written ({} if none was due).

        Raises:
            TrainingDivergedError: naming the step and `last_good()` (the newest verified checkpoint, only
                looked for then).
        """
        fetched = jax.device_get([m for _, m in self.steps])
        now = time.perf_counter()
        wall = max(now - self.interval_start, 1e-9)
        rate = sum(float(m["input_tokens"]) for m in fetched) / wall
        data_wait = self.data_wait_s / wall
        self.interval_start, self.data_wait_s = now, 0.0
        row: dict[str, float] = {}
        for (s, _), m in zip(self.steps, fetched, strict=True):
            self._check(s, m, last_good)
            if s % self.cfg.logging.every_steps == 0 or s == self.steps[-1][0]:
                aux = {k: v for k, v in m.items() if k not in (*_STEP_EXTRAS, "loss", "nonfinite")}
                row = {
                    **metrics_from_aux(aux, self.loss_cfg),
                    **{k: float(m[k]) for k in _STEP_EXTRAS},
                    "tokens_per_second": rate,
                    "data_wait_fraction": data_wait,
                    "epoch": epoch_of(s, self.epoch_ends),
                }
                self.log.write(s, row)
                for warning in self.health.check(s, row):
                    self.log.message(warning)
        self.steps = []
        return row

    def _check(self, step: int, m: dict, last_good: Callable[[], str]) -> None:
        train = self.cfg.train
        if m["nonfinite"] and train.nonfinite == "stop":
            raise TrainingDivergedError(
                f"the loss or gradient is not finite at step {step} (loss {float(m['loss'])}, grad norm "
                f"{float(m['grad_norm'])}). Last good checkpoint: {last_good()}.",
                "train.nonfinite: skip",
                "run the same command with the override train.nonfinite=skip to resume from it skipping "
                "such updates, or train again in a new --workdir (a resume may not change it) with a lower "
                "optim.learning_rate.",
            )
        if m["skipped"] > train.max_skips:
            raise TrainingDivergedError(
                f"{int(m['skipped'])} updates skipped for non-finite losses by step {step} (limit "
                f"train.max_skips={train.max_skips}). Last good checkpoint: {last_good()}.",
                f"a train.max_skips above {train.max_skips}",
                "if the skipped updates are rare outliers, run the same command with a higher "
                "train.max_skips (an override) to resume from it; otherwise train again in a new --workdir "
                "(a resume may not change it) with a lower optim.learning_rate.",
            )


def _newest_verified_name(ckpt: Checkpointer, log: MetricsLog) -> str:
    """The newest checkpoint that verifies (once any save in flight has finished), or `NO_CHECKPOINT`."""
    try:
        ckpt.wait()
    except CheckpointSaveError as e:
        log.message(f"error: {e}")
    step = ckpt.newest_verified(log.message)
    return NO_CHECKPOINT if step is None else str(ckpt.directory / str(step))


def _on_save_error(action: Callable[[], object], cfg: Config, log: MetricsLog) -> bool:
    """Run a checkpoint `action`; True unless it failed and `checkpoint.on_save_error` is `continue` (then
    the error is logged and training goes on).

    Raises:
        CheckpointSaveError: it failed and `on_save_error` is `stop`.
    """
    try:
        action()
    except CheckpointSaveError as e:
        if cfg.checkpoint.on_save_error == "stop":
            raise
        log.message(f"error: {e} Training goes on without it (checkpoint.on_save_error: continue).")
        return False
    return True


def epoch_of(step: int, epoch_ends: list[int]) -> int:
    """0-based epoch that `step` (1-based) belongs to."""
    return int(np.searchsorted(np.asarray(epoch_ends), step, side="left")) if epoch_ends else 0


class _Profile:
    """A `jax.profiler` trace of optimizer steps first..last (`logging.profile_steps`) into `directory`.

    Started before the first of those steps that this run executes (a resumed run traces the rest of the
    window), stopped once the last has finished on the device, or when the run ends inside the window.
    """

    def __init__(self, steps: list[int] | None, directory: Path, log: MetricsLog) -> None:
        self.first, self.last = steps if steps is not None else (None, None)
        self.directory, self.log = directory, log
        self.started: int | None = None
        self.step = 0

    def before(self, step: int) -> None:
        """Start tracing if `step` (about to be dispatched) is in the window and no trace runs yet."""
        if self.started is None and self.first is not None and self.first <= step <= self.last:
            jax.profiler.start_trace(str(self.directory))
            self.started = step

    def after(self, step: int, state: TrainState) -> None:
        """Stop after the window's last step, once `state` (that step's output) is computed: dispatch is
        asynchronous, so without the wait the trace would miss the device work of the last steps."""
        self.step = step
        if self.started is not None and step >= self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        """End a running trace (writes it) and say where it is; nothing if none runs."""
        if self.started is None:
            return
        jax.profiler.stop_trace()
        self.log.message(
            f"profile of steps {self.started}-{self.step} written to {self.directory} (open it with "
            f"TensorBoard's profile plugin or XProf)"
        )
        self.started = None


class _Preemption:
    """SIGTERM or a first SIGINT (Ctrl-C) → stop after the current step; a second SIGINT goes to the handler
    that was there before (Python's KeyboardInterrupt), so a user is never stuck waiting for a step. A
    checkpoint already being written, the stop's own included, is finished first, with its manifest
    (`Checkpointer.close` in the run's `finally`); one the Ctrl-C cut short is never marked complete.
    Single-process: our own handlers. Multi-process: JAX's preemption sync service (it traps SIGTERM and
    makes all processes agree on the step), so a SIGINT is passed on to it as a SIGTERM to this process."""

    # Not "after this step": a signal during the fetch of step N's metrics, when N + 1 may be dispatched,
    # is seen at N + 1's check.
    _SIGINT_ACK = (
        b"SIGINT: stopping after the step under way or the next, to save a checkpoint; Ctrl-C again aborts "
        b"(a checkpoint already being written is finished first)\n"
    )

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = "SIGTERM"  # what the stop message names: the signal that arrived first
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            # Python sets signal handlers on the main thread only: a run started on another thread (a
            # caller's worker thread) stops on no signal of its own; the process's handlers stay as they are.
            return
        # A handler set outside Python is None: it could be neither put back nor handed the second Ctrl-C, so
        # such a signal is left alone.
        if jax.process_count() == 1 and signal.getsignal(signal.SIGTERM) is not None:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        # An ignored SIGINT (a job started in the background, `nohup`) stays ignored.
        if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
            # os.write, not print: a print here could re-enter a print the loop was in the middle of. On a
            # terminal the progress bar holds the line without a newline: start a line of our own. A failed
            # write must not raise: raised here it would end the run wherever it is, unsaved, and stderr's
            # reader is often gone by now (`train ... |& tee log`: the same Ctrl-C ended tee).
            with contextlib.suppress(OSError):
                os.write(2, (b"\n" if os.isatty(2) else b"") + self._SIGINT_ACK)
            if jax.process_count() > 1:
                os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether the run stops and saves at `step`: a signal came (one process), or the processes
        reached JAX's preemption sync point (several; False where that service is not running)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is not running
            return False

    def restore(self) -> None:
        """Put back the signal handlers this object replaced."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
