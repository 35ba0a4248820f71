"""`nextquill-jax compare --config FILE`: named variants of one base config through train, evaluate and an
effect report, in one table, each metric's difference to a baseline variant with a paired bootstrap interval
(but BLEU's and the DCE AUROC's: statistics of a whole run, `compare_table.NO_INTERVAL`).

The file and where its runs live: `eval.compare_file`. A finished run writes `compare_done.json`, which
records what its numbers depend on, so an interrupted comparison resumes, and running the file again reuses,
evaluates again or refuses each finished run by its recorded settings, checked before any run starts
(`eval.compare_record`). A variant with `trained_in` trains nothing here: it evaluates the finished run of the
same name and seed in another comparison's `compare.out`; its evaluation, effect report and compare_done.json
are written here, and nothing there changes. The per-example numbers (`compare_table.per_example_metrics`) of
all runs become `<out>/results.json` and `<out>/results.md` (`compare_table`).

SIGTERM or Ctrl-C during a run's training is `train`'s (it saves a checkpoint and stops:
`TrainingStoppedError`). Outside training (the checks, data preparation, evaluation, an effect report, the
table) `run_comparison` abandons the stage it is in and raises `ComparisonStoppedError` naming it: only
compare_done.json, written atomically after everything else, marks a run done, so an abandoned stage runs
again when the same command is run again. A second signal while it stops gets the handler there was before
(SIGTERM's default exit, Ctrl-C's KeyboardInterrupt).

One comparison at a time owns `compare.out`: `run_comparison` holds `<out>/compare.lock` (`LOCK`,
`train.workdir_lock`) from once its checks have passed (they only read) until it ends, before it deletes or
writes anything there (a run's compare_done.json, an untrained variant's data and config.yaml, the table), so
a second one on the same `compare.out` is refused at once with `WorkdirLockedError`. Each run's training
locks its own workdir below (`train.lock`, another file). As with `train`, only process 0 of a multi-process
run takes it (the runtime is started first, as the first run's training would start it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nextquill_jax import lost_signals
from nextquill_jax.config import Config, save_config
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.eval.compare_file import Comparison
from nextquill_jax.eval.compare_record import (
    DONE_FILE,
    check_interrupted_run,
    check_trained_in,
    finished_changes,
    run_settings,
    write_done,
)
from nextquill_jax.train.resume import listed_changes
from nextquill_jax.train.workdir_lock import LockUse, WorkdirLock

Echo = Callable[[str], None]


# The lock on `compare.out`. The runs below it take their own (`train.lock` in each run's workdir).
LOCK = LockUse(
    command="compare",
    file_name="compare.lock",
    clash=(
        "two comparisons in one compare.out would train, evaluate and record the same runs at once, and both "
        "write its table"
    ),
    on_stop="running the same command again resumes it",
    elsewhere="set another compare.out",
    unlocked="comparing without the compare.out lock",
)


def untrained_config(cfg: Config, workdir: Path, split: str, echo: Echo = print) -> Config:
    """The config a `train: false` variant is evaluated with, saved as `workdir`/config.yaml once its data is
    prepared: `cfg` with `model.cudnn_max_segments: auto` resolved from the rows of the evaluated `split`
    (`train.setup.resolve_packed_segments`; the set-up that resolves it for training does not run here).

    Raises:
        FileNotFoundError: with `auto`, the prepared data has no `split`.
        DataError / ConfigError: as `train.setup.prepared_data`.
    """
    from nextquill_jax.data.prepared_split import PreparedSplit
    from nextquill_jax.train.setup import evaluation_pipeline, prepared_data, resolve_packed_segments

    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = prepared_data(cfg, workdir, echo).dir
    if cfg.model.cudnn_max_segments == "auto":
        pipeline = evaluation_pipeline(cfg, PreparedSplit(data_dir, split))
        cfg = resolve_packed_segments(cfg, {split: pipeline}, echo)
    save_config(cfg, workdir / "config.yaml")
    return cfg


class ComparisonStoppedError(RuntimeError):
    """SIGTERM or Ctrl-C stopped `run_comparison` outside training; the message names the signal, the run and
    stage it stopped in, the runs finished, and that running the same command again resumes."""


class _Signalled(BaseException):
    """Raised by `_StopOnSignal`'s handler wherever the main thread is: a BaseException, as KeyboardInterrupt,
    so that no `except Exception` on the way takes it for an error and goes on."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


def _distributed() -> bool:
    """Whether JAX's multi-process runtime has started (its preemption service then owns SIGTERM)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


class _StopOnSignal:
    """While entered: SIGTERM and SIGINT (Ctrl-C) raise `_Signalled` (once: the handler puts back the
    handlers there were before), and `where` names the stage the comparison is in (`at`). `suspended()`
    puts the earlier handlers back for a block, so that training's own (`loop._Preemption`) are what they
    would be under `train`. Left alone: an ignored signal (`nohup`, a background job), a handler set outside
    Python, SIGTERM once JAX's multi-process runtime has started, and every signal off the main thread
    (where `signal` cannot set handlers).

    A `_Signalled` raised where Python cannot propagate it (inside a garbage-collector callback, such as the
    one JAX runs at every collection) reaches `sys.unraisablehook`: while entered, that hook installs the
    handler for its signal again and delivers the signal again (`lost_signals`), so that the stop is not
    lost; `cli` does the same for a plain Ctrl-C."""

    def __init__(self) -> None:
        self.where = "the checks of every run's settings, before any run starts"
        self._previous: dict[int, Any] = {}
        self._unraisable: Callable[[Any], Any] | None = None

    def at(self, where: str) -> None:
        """Name the stage the comparison is in (a stop's message says it)."""
        self.where = where

    def __enter__(self) -> _StopOnSignal:
        self._install()
        self._unraisable, sys.unraisablehook = sys.unraisablehook, self._lost
        return self

    def __exit__(self, *exc: object) -> None:
        sys.unraisablehook = self._unraisable
        self._restore()

    def _lost(self, unraisable: Any) -> None:
        signalled = unraisable.exc_value
        # Under JAX's multi-process runtime SIGTERM is its service's (`_install` leaves it alone too).
        if not isinstance(signalled, _Signalled) or (signalled.signum == signal.SIGTERM and _distributed()):
            self._unraisable(unraisable)
            return
        self._previous[signalled.signum] = signal.signal(signalled.signum, self._handle)
        lost_signals.deliver_again(signalled.signum)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """A block in which the signal handlers are the previous ones (training installs its own)."""
        self._restore()
        try:
            yield
        finally:
            self._install()

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(signum) in (signal.SIG_IGN, None):
                continue
            if signum == signal.SIGTERM and _distributed():
                continue
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            if not (signum == signal.SIGTERM and _distributed()):  # JAX's service has set its own since
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self._restore()
        raise _Signalled(signum)


def run_variant(
    comparison: Comparison,
    name: str,
    seed: int,
    echo: Echo = print,
    *,
    stop: _StopOnSignal | None = None,
) -> dict[str, Any]:
    """Train (unless `train: false`, or `trained_in` another comparison, whose run is evaluated), evaluate and
    report the effects of one run; returns what `compare_done.json` holds: where its evaluation and effect
    report are, and the settings it ran with. A finished run with the same settings is not rerun, one whose
    evaluation settings changed is evaluated again (`eval.compare_record`).

    Raises:
        ConfigError: the run finished training with other training settings (`finished_changes`), or the
            config cannot be used (as `train`).
        TrainingStoppedError: its training stopped on SIGTERM or Ctrl-C; nothing is evaluated or recorded.

    `stop` (`run_comparison`'s) is told each stage, and its handlers are suspended while the run trains.
    """
    from nextquill_jax.data.checksums import file_digest
    from nextquill_jax.data.prepare import load_fast_tokenizer
    from nextquill_jax.eval.effect_report import build_effect_report
    from nextquill_jax.eval.evaluate import evaluate
    from nextquill_jax.train import model_setup
    from nextquill_jax.train.loop import train_to_the_end
    from nextquill_jax.train.metrics_log import last_value
    from nextquill_jax.train.workdir import data_dir_of, initial_model, restore_model

    workdir, trained_run = comparison.workdir(name, seed), comparison.trained_workdir(name, seed)
    done, label = workdir / DONE_FILE, f"{name} (seed {seed})"
    at = (lambda stage: stop.at(f"{label}'s {stage}")) if stop else (lambda stage: None)
    at("settings check")
    cfg, variant, plan = comparison.run_config(name, seed), comparison.variants[name], comparison.compare
    settings = run_settings(comparison, name, cfg)
    changes = finished_changes(comparison, name, seed, cfg)
    trained = False  # whether the workdir holds this run's finished training, which need not run again
    if changes == []:
        echo(f"{label}: done already ({done})")
        record = json.loads(done.read_text(encoding="utf-8"))
        # Recorded relative before compare.out was made absolute: this run's evaluation, read from here.
        if not Path(record["eval_dir"]).is_absolute():
            record["eval_dir"] = str(workdir / "eval" / plan.split)
        return record
    if changes is None and done.exists():
        again = (
            "resuming its training (`train` refuses a checkpoint of another config and trains nothing when "
            "the run finished), then evaluating it again"
            if variant.train and variant.trained_in is None
            else "evaluating it again"
        )
        echo(f"{label}: {done} does not record the settings it ran with (an older version wrote it): {again}")
    elif changes is not None:
        recorded = json.loads(done.read_text(encoding="utf-8"))["settings"]
        trained = variant.train and recorded["train"] and recorded.get("trained_in") is None
        again = (
            "evaluating its checkpoint again"
            if trained or variant.trained_in is not None
            else ("training it, then evaluating it" if variant.train else "evaluating it again")
        )
        echo(f"{label}: {again}: settings changed since it finished: {listed_changes(changes)}")
    # Until this run finishes again, an interrupted one must not leave the old record to stand for it.
    done.unlink(missing_ok=True)
    if variant.trained_in is not None:
        echo(f"{label}: evaluating the run in {trained_run} (`trained_in`), which trained there")
        workdir.mkdir(parents=True, exist_ok=True)
    elif variant.train and not trained:
        at("training")
        with stop.suspended() if stop else contextlib.nullcontext():
            train_to_the_end(cfg, workdir, echo=echo)
            at("model loading")  # before a signal is ours again
    elif not variant.train:
        at("data preparation")
        cfg = untrained_config(cfg, workdir, plan.split, echo)
    at("model loading")
    # One model serves the evaluation and the effect report: its checkpoint is read and verified once.
    loaded = restore_model(trained_run) if variant.train else initial_model(workdir)
    # The decoding of this file's config: a checkpoint evaluated again would otherwise decode as saved.
    overrides = {} if plan.max_new_tokens is None else {"max_new_tokens": plan.max_new_tokens}
    generation = dataclasses.replace(cfg.eval.generation, **overrides)
    data_dir = data_dir_of(cfg, trained_run)  # the checkpoint's config may name where the data was
    at("evaluation")
    metrics = evaluate(
        trained_run, plan.split, out_dir=workdir / "eval" / plan.split, max_examples=plan.max_examples,
        generation=generation, batch_size=plan.eval_batch_size, loaded=loaded,
        max_new_tokens_setting="compare.max_new_tokens", batch_size_setting="compare.eval_batch_size",
        keep_hint=None, data_dir=data_dir, tokenizer_setting=None, echo=echo,
    )  # fmt: skip
    at("effect report")
    summary = build_effect_report(
        loaded.model,
        load_fast_tokenizer(cfg.data.tokenizer),
        data_dir,
        plan.split,
        workdir / "effects",
        cfg.loss.loss_config(),
        num_examples=plan.effect_examples,
        source=f"{name} ({loaded.source})",
        vocab_origin=model_setup.vocab_origin(cfg.model, saved_with=loaded.source),
    )
    record = {
        "variant": name,
        "seed": seed,
        "eval_dir": str(workdir / "eval" / plan.split),
        "effects_summary": summary["files"]["summary"],
        # `compare_table.recorded_effects` checks the table reads this report, not one written there since.
        "effects_blake2b": file_digest(summary["files"]["summary"]),
        "rendered_split": str(data_dir / f"{plan.split}.jsonl"),
        # Only where it generated (max_new_tokens >= 1): `compare_table` reads the text metrics of a record
        # that has a BLEU, and leaves them out of one that has none.
        **({"bleu": metrics["overall"]["bleu"]} if "overall" in metrics else {}),
        "settings": settings,
        # Updates its training skipped for a non-finite loss (None untrained): with none, the non-finite
        # policy does not matter to its numbers (`finished_changes`).
        "skipped_updates": last_value(trained_run, "skipped") if variant.train else None,
    }
    at(f"record ({DONE_FILE})")
    return write_done(done, record)


def run_comparison(
    comparison: Comparison, echo: Echo = print, *, on_locked: Callable[[], object] | None = None
) -> dict[str, Any]:
    """Every variant with every seed (`run_variant`), then the table (`compare_table.write_results`);
    returns results.json's contents.

    Holds `<out>/compare.lock` (`LOCK`; on process 0 of a multi-process run alone) from once the checks of
    every run have passed, before anything in `compare.out` is deleted or written, until it returns or raises.
    `on_locked` (the CLI's: it opens the third-party log in `compare.out`) is called once the lock is held, on
    every process, and not at all when it is refused.

    Raises:
        WorkdirLockedError: another `compare` is running in `compare.out` (nothing there is changed); on the
            other processes of a multi-process run, `parallel.Process0FailedError`.
        ConfigError: before any run starts, every finished run trained with other training settings than
            the file now gives it (`finished_changes`), every unfinished one whose checkpoints `train` would
            not resume under them (`check_interrupted_run`), every `trained_in` run that cannot stand for its
            variant (`check_trained_in`), every variant whose `checkpoint.best_metric` evaluation never
            reports (`loop.check_best_metric`) and every variant with a run to do whose `model.path` (or
            fixed-DCE `loss.reference_model`) names nothing loadable (`setup.check_model_sources`), one line
            each; as `run_variant`.
        ComparisonStoppedError: SIGTERM or Ctrl-C outside training (module docstring); the stage it arrived
            in is abandoned and not recorded as done.

    An error raised by one run (`run_variant`'s) carries a note naming that run and the runs finished before
    it (`add_note`; the CLI's `error:` line ends with it).
    """
    from nextquill_jax.eval.compare_table import write_results

    runs = [(name, seed) for seed in comparison.compare.seeds for name in comparison.variants]
    records: list[dict[str, Any]] = []
    lock = WorkdirLock(comparison.compare.out, LOCK)
    with _StopOnSignal() as stop:
        try:
            _check_runs(comparison, runs)
            _lock(comparison, runs[0], lock, echo)
            _check_eval_batch_size(comparison)  # needs the devices: once the multi-process runtime is up
            if on_locked is not None:
                on_locked()
            for name, seed in runs:
                try:
                    records.append(run_variant(comparison, name, seed, echo, stop=stop))
                except Exception as e:  # its message may name only what the runs share (their prepared data)
                    e.add_note(f"(run {name} (seed {seed}) of the comparison; {_finished(records)})")
                    raise
            stop.at("the table (results.json, results.md)")
            return write_results(comparison, records)
        except _Signalled as e:
            raise ComparisonStoppedError(
                f"{e.signal_name} during {stop.where} (outside training; nothing unfinished is recorded as "
                f"done); {_finished(records)}; run the same command again to resume (finished runs are not "
                f"run again)"
            ) from None
        finally:
            lock.release()


def _finished(records: list[dict[str, Any]]) -> str:
    """`runs finished: ` and the runs of `records` (`run_variant`'s), or `none`."""
    return "runs finished: " + (", ".join(f"{r['variant']} (seed {r['seed']})" for r in records) or "none")


def _lock(comparison: Comparison, first: tuple[str, int], lock: WorkdirLock, echo: Echo) -> None:
    """Take `run_comparison`'s `lock` on process 0 (its Raises: WorkdirLockedError, Process0FailedError).
    Which process is 0 is known only once the multi-process runtime has started, so it is started here, with
    the config of the `first` run, as that run's training or reading would start it."""
    import jax

    from nextquill_jax import parallel
    from nextquill_jax.train.workdir import start_distributed

    start_distributed(comparison.run_config(*first))
    parallel.process_0_result(lambda: int(lock.acquire(jax.process_index(), echo)), f"to lock {lock.path}")


def _check_eval_batch_size(comparison: Comparison) -> None:
    """Refuse a `compare.eval_batch_size` that some variant's mesh does not split, before any run starts:
    `evaluate` refuses it only after that variant's training.

    Raises:
        ConfigError: naming each such variant, its mesh and the fix.
    """
    from nextquill_jax import parallel
    from nextquill_jax.eval.evaluate import unsplit_batch_message

    plan = comparison.compare
    if plan.eval_batch_size is None or plan.max_new_tokens == 0:  # evaluate's default, or nothing decoded
        return
    refused = []
    for name in comparison.variants:
        cfg = comparison.run_config(name, plan.seeds[0])
        try:
            mesh = parallel.make_mesh(cfg.mesh.sizes())
        except ValueError:  # a mesh these devices cannot make: training (or reading) names it
            continue
        if plan.eval_batch_size % (shards := parallel.batch_shard_count(mesh)):
            message = unsplit_batch_message(
                plan.eval_batch_size, shards, dict(mesh.shape), "compare.eval_batch_size"
            )
            refused.append(f"{comparison.source}: variant {name!r}: {message}")
    if refused:
        raise ConfigError("\n".join(refused))


def _without_own_reference(cfg: Config, comparison: Comparison) -> Config:
    """`cfg` without its `loss.reference_model` where that is a path under `compare.out`: the workdir of a run
    of this comparison, which an earlier variant trains before this one reads it (and which `train` checks
    then)."""
    reference = cfg.loss.reference_model
    out = Path(comparison.compare.out).expanduser().resolve()
    if (
        reference is None
        or reference == "base"
        or not Path(reference).expanduser().resolve().is_relative_to(out)
    ):
        return cfg
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, reference_model=None))


def _check_runs(comparison: Comparison, runs: list[tuple[str, int]]) -> None:
    """`run_comparison`'s checks of every run before any starts (its Raises: ConfigError)."""
    from nextquill_jax.train.loop import check_best_metric
    from nextquill_jax.train.setup import check_model_sources

    refused, sources_checked = [], set()
    for name, seed in runs:  # all of them first: no run is evaluated again only for a later one to refuse
        trains_here = comparison.variants[name].train and comparison.variants[name].trained_in is None
        try:
            cfg = comparison.run_config(name, seed)
            check_trained_in(comparison, name, seed, cfg)
            changes = finished_changes(comparison, name, seed, cfg)
            if changes is None:
                check_interrupted_run(comparison, name, seed, cfg)
        except ConfigError as e:
            refused.append(str(e))
            continue
        if changes != [] and name not in sources_checked:  # it loads its model: to train or evaluate
            sources_checked.add(name)  # the same for every seed
            try:  # a path that names nothing would otherwise stop the comparison only when this run starts
                check_model_sources(_without_own_reference(cfg, comparison))
            except ConfigError as e:
                refused.append(f"{comparison.source}: variant {name!r}: {e}")
        if trains_here and seed == comparison.compare.seeds[0]:
            try:  # a misspelt metric would otherwise stop the comparison only when this variant starts
                check_best_metric(cfg)
            except ConfigError as e:
                refused.append(f"{comparison.source}: variant {name!r}: {e}")
    if refused:
        raise ConfigError("\n".join(refused))
