"""The loop (train/loop.py): its console output, and what a stop reports."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from nextquill_jax.config import CheckpointConfig, load_config
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.train import loop
from nextquill_jax.train.checkpoint import Checkpointer, CheckpointSaveError
from nextquill_jax.train.loop import eval_line

# What the first Ctrl-C's acknowledgement says of a second.
SIGINT_AGAIN = "Ctrl-C again aborts (a checkpoint already being written is finished first)"


def test_the_eval_line_shows_the_loss_and_the_tracked_metric():
    metrics = {"eval/loss": 3.25, "eval/ce_with": 3.0, "eval/pref_fraction": 0.5, "eval/ce_without": 4.0}
    assert eval_line(7, metrics, "eval/ce_without") == (
        "step 7: eval/loss 3.2500, eval/ce_with 3.0000, eval/pref_fraction 0.5000, eval/ce_without 4.0000"
    )
    assert eval_line(7, {"eval/loss": 1.0}, "eval/loss") == "step 7: eval/loss 1.0000"


def test_a_best_metric_misspelt_between_two_names_suggests_both(tmp_path, tiny_config):
    """`eval/ce_witht` lies between `eval/ce_with` and `eval/ce_without`: difflib's ratios against the names
    without `eval/` are 2*7/15 and 2*8/18, both over the 0.6 cutoff, the nearer first. A hint naming only
    the nearest would leave out a name as likely meant. No data is read: the check runs before set-up."""
    raw = tiny_config(tmp_path / "data", tmp_path / "run")
    cfg = load_config(None, ["checkpoint.best_metric=eval/ce_witht"], base=raw)
    with pytest.raises(ConfigError, match="Did you mean `eval/ce_with` or `eval/ce_without`\\? Fix:"):
        loop.check_best_metric(cfg)


def _train_with_an_unsaved_stop(
    raw: dict, workdir, monkeypatch, *, every_steps: int, stop_step: int, echo=lambda _: None
):
    """Train `raw` for up to 3 steps, saving every `every_steps` (synchronously), with step `stop_step` made a
    stop whose own save is dropped (which `actions_at` never schedules); returns the TrainResult."""
    raw["checkpoint"].update(every_steps=every_steps, async_save=False)
    raw["train"]["max_steps"] = 3
    schedule = loop.actions_at

    def actions_at(step, cfg, run, *, stop):
        due = schedule(step, cfg, run, stop=stop)
        return dataclasses.replace(due, stop=True, save=False) if step == stop_step else due

    monkeypatch.setattr(loop, "actions_at", actions_at)
    return loop.train(load_config(None, base=raw), workdir, echo=echo)


def test_a_stop_without_its_own_save_names_the_newest_saved_checkpoint(
    tmp_path, monkeypatch, capsys, write_random_data, tiny_config
):
    # Step 1 saves (every_steps: 1); step 2 is made a stop that does not save, which `actions_at` never
    # schedules: the stop must name step 1's checkpoint, not claim one for step 2.
    # The message reaches `train`'s echo (a library caller's; it was printed past it), and only it.
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    said = []
    result = _train_with_an_unsaved_stop(
        raw, tmp_path / "run", monkeypatch, every_steps=1, stop_step=2, echo=said.append
    )
    assert (result.status, result.step, result.last_checkpoint) == ("preempted", 2, 1)
    checkpoints = (tmp_path / "run" / "checkpoints").absolute()
    assert [p.name for p in checkpoints.iterdir() if p.is_dir()] == ["1"]
    assert any(f"SIGTERM: stopped at step 2; checkpoint {checkpoints / '1'} is complete." in x for x in said)
    assert "SIGTERM" not in capsys.readouterr().out


def test_a_stop_before_any_save_says_no_checkpoint_is_saved(
    tmp_path, monkeypatch, capsys, write_random_data, tiny_config
):
    # A SIGTERM at step 1 whose save is dropped: there is nothing to resume from, and the message must not
    # claim that a checkpoint "none" is complete.
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    result = _train_with_an_unsaved_stop(
        raw, tmp_path / "run", monkeypatch, every_steps=100, stop_step=1, echo=print
    )
    assert (result.status, result.step, result.last_checkpoint) == ("preempted", 1, None)
    out = capsys.readouterr().out
    assert (
        "SIGTERM: stopped at step 1; no checkpoint is saved or verifies, so the same command starts again "
        f"from step 0 (workdir {tmp_path / 'run'})." in out
    )
    assert "is complete" not in out


def _signal_after_step(monkeypatch, at: int, *signals: signal.Signals) -> None:
    """Deliver `signals` to this process, in order, as the loop schedules step `at`'s actions."""
    schedule = loop.actions_at

    def schedule_then_signal(step, cfg, run, *, stop):
        if step == at:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return schedule(step, cfg, run, stop=stop)

    monkeypatch.setattr(loop, "actions_at", schedule_then_signal)


def test_ctrl_c_stops_like_sigterm_and_the_run_resumes_to_the_same_end(
    tmp_path, monkeypatch, capfd, write_random_data, tiny_config, read_state
):
    # The SIGINT arrives during step 1's actions, so the stop is step 2, saved, and named as a SIGINT.
    data = write_random_data(tmp_path / "data")
    raw = tiny_config(data, tmp_path / "run")
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 3
    before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        _signal_after_step(patch, 1, signal.SIGINT)
        try:
            stopped = loop.train(load_config(None, base=raw), tmp_path / "run", echo=print)
        except KeyboardInterrupt:  # would end the whole pytest session, not fail this test
            pytest.fail("the first Ctrl-C raised KeyboardInterrupt instead of stopping after the step")
    assert (stopped.status, stopped.step, stopped.last_checkpoint) == ("preempted", 2, 2)
    assert signal.getsignal(signal.SIGINT) is before
    checkpoints = (tmp_path / "run" / "checkpoints").absolute()
    out = capfd.readouterr()  # capfd: the acknowledgement is an os.write
    assert f"SIGINT: stopped at step 2; checkpoint {checkpoints / '2'} is complete." in out.out
    assert SIGINT_AGAIN in out.err
    resumed = loop.train(load_config(None, base=raw), tmp_path / "run", echo=print)
    assert (resumed.status, resumed.step) == ("finished", 3)
    assert f"resuming from {checkpoints / '2'}" in capfd.readouterr().out
    whole = tiny_config(data, tmp_path / "whole")
    whole["checkpoint"].update(every_steps=100, async_save=False)
    whole["train"]["max_steps"] = 3
    loop.train(load_config(None, base=whole), tmp_path / "whole", echo=lambda _: None)
    jax.tree.map(
        np.testing.assert_array_equal,
        read_state(tmp_path / "whole" / "checkpoints" / "3"),
        read_state(checkpoints / "3"),
    )


def test_ctrl_c_with_stderrs_reader_gone_still_stops_with_its_checkpoint(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """`train ... |& tee log`: the Ctrl-C ends tee too, so the acknowledgement's write met a closed pipe, and
    its BrokenPipeError left the signal handler wherever the loop was: no stop checkpoint (exit 141 through
    the CLI). The stop must save; the progress bar on the same stderr must not end it either."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 4
    raw["logging"]["progress_bar"] = True
    kept = os.dup(2)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        os.dup2(write_end, 2)  # stderr: a pipe whose reader has gone
        with monkeypatch.context() as patch:
            _signal_after_step(patch, 1, signal.SIGINT)
            stopped = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    finally:
        os.dup2(kept, 2)
        os.close(kept)
        os.close(write_end)
    assert (stopped.status, stopped.step, stopped.last_checkpoint) == ("preempted", 2, 2)
    reader = Checkpointer(tmp_path / "run" / "checkpoints", CheckpointConfig(), read_only=True)
    assert reader.check(2).status == "ok"


def _train_signalled(tmp_path, write_random_data, tiny_config, *, steps: int, at: int, **checkpoint):
    """(TrainResult, config dict) of a tiny `steps`-step run (saving at its end, synchronously, unless
    `checkpoint` says otherwise) sent a SIGINT as step `at`'s actions are scheduled; it prints messages."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update({"every_steps": 100, "async_save": False, **checkpoint})
    raw["train"]["max_steps"] = steps
    with pytest.MonkeyPatch.context() as patch:
        _signal_after_step(patch, at, signal.SIGINT)
        return loop.train(load_config(None, base=raw), tmp_path / "run", echo=print), raw


def test_a_ctrl_c_that_comes_with_the_last_step_finishes_the_run(
    tmp_path, monkeypatch, capfd, write_random_data, tiny_config
):
    """A SIGINT during step 2's actions of a 3-step run makes step 3, the last, the stop step: the run has
    finished, so it must say so (status finished), not ask for a resume that only says "already finished"."""
    result, raw = _train_signalled(tmp_path, write_random_data, tiny_config, steps=3, at=2)
    assert (result.status, result.step, result.last_checkpoint, result.stop_signal) == (
        "finished",
        3,
        3,
        "SIGINT",
    )
    out = capfd.readouterr().out
    checkpoints = (tmp_path / "run" / "checkpoints").absolute()
    assert (
        f"SIGINT at step 3, the run's last: training finished (checkpoint {checkpoints / '3'} is complete); "
        f"nothing to resume (workdir {tmp_path / 'run'})." in out
    ), out
    assert "Resume by running" not in out and "stopped at step" not in out
    assert out.count("the run's last") == 1, out  # said at the stop step, not again as the run ends
    # Inside a longer job the Ctrl-C still stops it, with what happened said truly.
    monkeypatch.setattr(loop, "train", lambda cfg, workdir, echo: result)
    with pytest.raises(
        loop.TrainingStoppedError, match="finished at step 3, but SIGINT came with its last step"
    ):
        loop.train_to_the_end(load_config(None, base=raw), tmp_path / "run")


def test_a_ctrl_c_after_the_last_steps_stop_check_still_stops_a_longer_job(
    tmp_path, capfd, write_random_data, tiny_config
):
    """A SIGINT during the last step's actions (its save, say) comes after that step's stop check: nothing is
    left to stop, but the run must still name the signal, so that compare or demo do not go on."""
    result, _ = _train_signalled(tmp_path, write_random_data, tiny_config, steps=2, at=2)
    assert (result.status, result.step, result.last_checkpoint, result.stop_signal) == (
        "finished",
        2,
        2,
        "SIGINT",
    )
    checkpoint = (tmp_path / "run" / "checkpoints" / "2").absolute()
    assert f"SIGINT at step 2, the run's last: training finished (checkpoint {checkpoint} is complete)" in (
        capfd.readouterr().out
    )


def _no_room_for_step_3(monkeypatch) -> None:
    """Step 3's save fails as on a full disk; the others are saved."""
    save = Checkpointer.save

    def no_room_for_step_3(self, step, *args, **kwargs):
        if step == 3:
            raise CheckpointSaveError(f"checkpoint {step}: no space left on device.")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", no_room_for_step_3)


def test_a_stop_on_the_last_step_whose_save_failed_says_a_resume_trains_it_again(
    tmp_path, monkeypatch, capfd, write_random_data, tiny_config
):
    """With `checkpoint.on_save_error: continue`, a stop whose last-step save failed is no finished run: a
    resume starts from the newest checkpoint and trains the last step again, and the run says so."""
    _no_room_for_step_3(monkeypatch)
    result, _ = _train_signalled(
        tmp_path, write_random_data, tiny_config, steps=3, at=2, every_steps=2, on_save_error="continue"
    )
    assert (result.status, result.step, result.last_checkpoint) == ("preempted", 3, 2)
    out = capfd.readouterr().out
    checkpoint = (tmp_path / "run" / "checkpoints" / "2").absolute()
    assert f"SIGINT: stopped at step 3; checkpoint {checkpoint} is complete. Resume by running" in out, out
    assert "nothing to resume" not in out


def test_a_second_ctrl_c_aborts_at_once_and_restores_the_handlers(
    tmp_path, monkeypatch, capfd, write_random_data, tiny_config
):
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 3
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _signal_after_step(monkeypatch, 1, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as e:
        loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    assert e.value.__notes__ == ["no checkpoint is saved"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert not (tmp_path / "run" / "checkpoints" / "2").exists()
    assert SIGINT_AGAIN in capfd.readouterr().err  # the first one was a stop request


def test_a_second_ctrl_c_during_the_stops_save_aborts_once_that_checkpoint_is_complete(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """README: a checkpoint already being written when the second Ctrl-C comes, the stop's own included, is
    finished first and verifies. With Orbax's real wait interrupted (its next returns at once, the commit
    going on), the commit callback found no step to write the manifest of: the step stayed temporary."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 3
    committing = threading.Event()  # set: the commit, slow as a big model's, reaches its callback
    callback = Checkpointer._write_saving_manifest
    monkeypatch.setattr(
        Checkpointer, "_write_saving_manifest", lambda self: committing.wait(30) and callback(self)
    )

    def second_ctrl_c():
        time.sleep(0.3)  # into Orbax's join of the commit, which waits for `committing`
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the KeyboardInterrupt is out of the wait well before the commit goes on
        committing.set()

    wait, interrupted = Checkpointer.wait, []

    def wait_interrupted(self):
        if self._saving is not None and not interrupted:  # the stop's wait for its own save
            interrupted.append(threading.Thread(target=second_ctrl_c))
            interrupted[0].start()
        wait(self)

    monkeypatch.setattr(Checkpointer, "wait", wait_interrupted)
    _signal_after_step(monkeypatch, 1, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as e:
        loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    interrupted[0].join()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2"]
    assert e.value.__notes__ == [f"the newest checkpoint is {checkpoints / '2'}"]  # what the CLI line says
    assert Checkpointer(checkpoints, CheckpointConfig(), read_only=True).check(2).status == "ok"


@pytest.mark.parametrize(
    ("nonfinite", "skipped", "resumable", "fix"),
    [
        ("stop", 0, "train.nonfinite=skip", "to resume from it skipping such updates"),
        ("skip", 21, "train.max_skips", "(an override) to resume from it"),
    ],
)
def test_a_divergence_stop_gives_fixes_that_a_resume_or_a_new_workdir_allows(
    nonfinite, skipped, resumable, fix
):
    """The fix used to say "lower optim.learning_rate, or set train.nonfinite: skip", which a resume in the
    same workdir refused; the max_skips stop gave no fix at all. Now the policy's key is resumable (the fix
    says to resume with it) and the learning rate is not (the fix says to use a new workdir)."""
    from types import SimpleNamespace

    from nextquill_jax.config import TrainConfig
    from nextquill_jax.train.resume import may_change

    pending = SimpleNamespace(cfg=SimpleNamespace(train=TrainConfig(nonfinite=nonfinite, max_skips=20)))
    metrics = {"nonfinite": 1.0, "skipped": float(skipped), "loss": float("nan"), "grad_norm": float("nan")}
    with pytest.raises(loop.TrainingDivergedError) as e:
        loop.PendingMetrics._check(pending, 5, metrics, lambda: "/w/checkpoints/3")
    message = str(e.value)
    assert "Last good checkpoint: /w/checkpoints/3. Fix: " in message, message
    assert resumable in message and fix in message and may_change(resumable.split("=")[0]), message
    new_workdir = (
        "train again in a new --workdir (a resume may not change it) with a lower optim.learning_rate"
    )
    assert new_workdir in message and not may_change("optim.learning_rate"), message


@pytest.mark.parametrize(("max_skips", "skipped", "stops"), [(0, 0, False), (20, 20, False), (20, 21, True)])
def test_a_skip_run_stops_once_more_than_max_skips_updates_were_skipped(max_skips, skipped, stops):
    """The documented bound (config, README): the run stops once MORE than `train.max_skips` updates were
    skipped; `max_skips: 0` tolerates a run with none, and exactly `max_skips` goes on."""
    from types import SimpleNamespace

    from nextquill_jax.config import TrainConfig

    pending = SimpleNamespace(cfg=SimpleNamespace(train=TrainConfig(nonfinite="skip", max_skips=max_skips)))
    metrics = {"nonfinite": 0.0, "skipped": float(skipped), "loss": 1.0, "grad_norm": 1.0}
    check = lambda: loop.PendingMetrics._check(pending, 5, metrics, lambda: "/w/checkpoints/3")
    if stops:
        with pytest.raises(loop.TrainingDivergedError, match=f"{skipped} updates skipped"):
            check()
    else:
        check()


def test_a_run_stopped_for_a_nonfinite_loss_resumes_with_skip_to_what_a_skip_run_trains(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """The stop's fix, followed: the run stops at the first update whose loss is not finite (made NaN here
    for every batch holding the marked example, once an epoch) with only finite updates checkpointed, and the
    same config with `train.nonfinite=skip` resumes it to the state and the skip count of a run that skipped
    from the start."""
    import jax.numpy as jnp

    from nextquill_jax.train import step as step_module
    from tests.shared import MARKED_TARGET

    data = write_random_data(tmp_path / "data", val=0, marked=0)
    batch_loss = step_module.batch_loss

    def poisoned(params, graphdef, batch, *args):
        loss, aux = batch_loss(params, graphdef, batch, *args)
        nan = jnp.where(jnp.any(batch["labels"] == MARKED_TARGET), jnp.nan, 1.0)
        return loss * nan, {
            k: v * nan if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in aux.items()
        }

    monkeypatch.setattr(step_module, "batch_loss", poisoned)

    def train(name: str, *overrides: str) -> loop.TrainResult:
        raw = tiny_config(data, tmp_path / name)
        raw["checkpoint"].update(every_steps=1, keep=10, async_save=False)
        return loop.train(load_config(None, overrides, base=raw), tmp_path / name, echo=lambda _: None)

    with pytest.raises(loop.TrainingDivergedError) as stopped:
        train("run")
    diverged = int(str(stopped.value).split(" at step ")[1].split(" ")[0])
    assert diverged >= 2, stopped.value  # a checkpoint to resume from (an earlier step of the first epoch)
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == diverged - 1, saved
    resumed = train("run", "train.nonfinite=skip")
    whole = train("whole", "train.nonfinite=skip")
    assert (resumed.status, resumed.step) == ("finished", whole.step)
    got, want = jax.device_get(resumed.state), jax.device_get(whole.state)
    assert (int(got.step), int(got.skipped)) == (int(want.step), 2)  # the marked batch of each epoch
    np.testing.assert_array_equal(got.rng, want.rng)
    # Not bitwise: the steps before the divergence ran the stop policy's program, which XLA fuses otherwise
    # than the skip policy's (~1e-8 apart on the weights; ~2e-6 on the key biases, whose exact gradient is
    # zero, so Adam scales float noise to steps of the learning rate's size). The tolerance of test_runs.py.
    same = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    jax.tree.map(same, (got.params, got.opt_state), (want.params, want.opt_state))


def test_an_endless_run_counts_evaluates_and_saves_its_epochs_as_a_run_with_num_epochs_does(
    tmp_path, write_random_data, tiny_config
):
    """`num_epochs: null` with `max_steps` 7 over epochs of 3 steps (24 examples, rows of 4) logs the same
    `epoch` for each step, evaluates and saves (`eval.every_steps: 0`, `checkpoint.on_epoch_end`) at the same
    steps as the same run with `num_epochs: 3`, which covers it: the endless iterator starts a new epoch after
    each pass too."""
    data = write_random_data(tmp_path / "data", train=24, val=8)

    def schedule(name: str, num_epochs: int | None) -> tuple[list, list, list]:
        """(step, epoch) of each training row, the steps of the eval rows and the checkpoints saved."""
        raw = tiny_config(data, tmp_path / name)
        raw["data"]["batching"].update(num_epochs=num_epochs, rows_per_batch=4)
        raw["train"]["max_steps"] = 7
        raw["checkpoint"].update(every_steps=0, keep=10, async_save=False)
        loop.train(load_config(None, base=raw), tmp_path / name, echo=lambda _: None)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        checkpoints = (tmp_path / name / "checkpoints").iterdir()
        return (
            [(r["step"], r["epoch"]) for r in rows if "epoch" in r],
            [r["step"] for r in rows if "eval/loss" in r],
            sorted(int(p.name) for p in checkpoints if p.name.isdigit()),
        )

    epochs, evaluated, saved = schedule("endless", None)
    assert (epochs, evaluated, saved) == schedule("three", 3)
    assert {e for _, e in epochs} == {0, 1, 2} and len(evaluated) > 1  # the comparison covers epoch ends


def test_on_metrics_gets_each_row_metrics_jsonl_gets_and_an_error_in_it_ends_the_run_resumably(
    tmp_path, write_random_data, tiny_config
):
    """A caller's own logging: every row appended to metrics.jsonl (training rows and evaluation rows), with
    the values as written; an exception raised in it stops the run like any error, and the same call resumes
    from the checkpoint saved before it."""
    raw = tiny_config(write_random_data(tmp_path / "data", train=16, val=8), tmp_path / "run")
    raw["logging"]["every_steps"] = 1
    raw["train"]["max_steps"] = 4
    raw["checkpoint"].update(every_steps=2, async_save=False)
    raw["data"]["batching"].update(rows_per_batch=4, num_epochs=2)
    cfg = load_config(None, base=raw)
    seen = []

    def stop_at_step_3(step, values):
        seen.append({"step": step, **values})
        if step == 3 and "loss" in values:
            raise RuntimeError("a caller's logger failed")

    with pytest.raises(RuntimeError, match="a caller's logger failed"):
        loop.train(cfg, tmp_path / "run", echo=lambda _: None, on_metrics=stop_at_step_3)
    rows = lambda: [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert seen == rows() and [r["step"] for r in seen if "loss" in r] == [1, 2, 3]
    assert any(key.startswith("eval/") for r in seen for key in r)  # the epoch end's evaluation row
    seen.clear()
    resumed = loop.train(cfg, tmp_path / "run", echo=lambda _: None, on_metrics=lambda s, v: seen.append(s))
    assert (resumed.status, resumed.step) == ("finished", 4)
    assert 3 in seen and 4 in seen and min(seen) == 3  # from checkpoint 2: step 3 again, then 4


def test_an_evaluation_and_a_save_are_not_counted_in_the_next_rows_tokens_per_second(
    tmp_path, write_random_data, tiny_config, monkeypatch
):
    """Each row's tokens/s and data wait cover the training since the previous row: the evaluation and the
    save that follow a row (here made EXTRA_S slower each) fell into the next row's wall time, which showed
    a third of the throughput after every evaluation."""
    extra_s = 2.0
    raw = tiny_config(write_random_data(tmp_path / "data", train=16, val=8), tmp_path / "run")
    raw["logging"]["every_steps"] = 1
    raw["train"]["max_steps"] = 4
    raw["eval"]["every_steps"] = 2
    raw["checkpoint"].update(every_steps=2, async_save=False)
    raw["data"]["batching"].update(rows_per_batch=4, num_epochs=2)
    cfg = load_config(None, base=raw)
    evaluate_split, save = loop.evaluate_split, Checkpointer.save

    def slow_evaluation(*args, **kwargs):
        time.sleep(extra_s)
        return evaluate_split(*args, **kwargs)

    def slow_save(*args, **kwargs):
        time.sleep(extra_s)
        return save(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_split", slow_evaluation)
    monkeypatch.setattr(Checkpointer, "save", slow_save)
    loop.train(cfg, tmp_path / "run", echo=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert any(
        key.startswith("eval/") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        for key in json.loads(line)
    )  # fmt: skip
    # Step 3 follows step 2's evaluation and save (2 x EXTRA_S); a tiny step itself takes milliseconds.
    wall = {r["step"]: r["input_tokens"] / r["tokens_per_second"] for r in rows}
    assert wall[3] < extra_s / 2, wall


def test_set_up_says_how_many_examples_batching_cuts_or_leaves_out(tmp_path, write_random_data, tiny_config):
    """`too_long: truncate` and `drop_remainder` were counted (`EpochStats`) but never shown: a run cut 11 of
    45 targets and left 5 examples out of every epoch without a word. The cut is checked against the rows'
    own lengths: a target is cut where prompt + target exceed the longest row, seq_len_with."""
    from nextquill_jax.data.pipeline import BatchPipeline
    from nextquill_jax.data.prepared_split import PreparedSplit

    data = write_random_data(tmp_path / "data", train=45, val=0)
    raw = tiny_config(data, tmp_path / "run")
    raw["data"]["batching"] = {
        "mode": "bucket", "seq_len_with": 24, "seq_len_without": 32, "response_slots": 32,
        "bucket_boundaries": [16], "rows_per_batch": 4, "too_long": "truncate", "drop_remainder": True,
    }  # fmt: skip
    raw["train"]["max_steps"] = 1
    cfg = load_config(None, [], base=raw)
    split = PreparedSplit(data, "train")
    over = [len(split[i]["prompt_with"]) + len(split[i]["target"]) - 24 for i in range(len(split))]
    cut, cut_tokens = sum(o > 0 for o in over), sum(o for o in over if o > 0)
    dropped = BatchPipeline(split, cfg.data.batching).epoch_stats(0).dropped_examples
    assert cut > 0 and dropped > 0
    said = []
    loop.train(cfg, tmp_path / "run", echo=said.append)
    assert (
        f"note: {cut} of the 45 train examples have their target cut to fit a row ({cut_tokens} target "
        f"tokens in all; data.batching.too_long: truncate); its first epoch leaves {dropped} of the 45 train "
        "examples out (data.batching.drop_remainder: its partly filled last batches)"
    ) in said, said


def _other_live_threads() -> list[str]:
    """Names of the live non-daemon threads but this one (a data loader's prefetch threads are such)."""
    return [t.name for t in threading.enumerate() if not t.daemon and t is not threading.current_thread()]


def test_a_run_ended_by_a_keyboard_interrupt_lets_go_of_its_threads_and_arrays_at_once(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """The run's frame kept its own KeyboardInterrupt (a reference cycle) and never closed its data iterator:
    until the garbage collector happened to run, its prefetch threads (not daemons), open .npy files and
    every array (the model's and the optimizer's: a GPU's memory) stayed alive, through a caller's retry."""
    import gc
    import weakref

    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 3
    raw["data"]["batching"]["read_threads"] = 2
    schedule, states = loop.actions_at, []

    def interrupted_at_2(step, cfg, run, *, stop):
        if step == 2:
            raise KeyboardInterrupt
        return schedule(step, cfg, run, stop=stop)

    original_setup = loop.set_up_run

    def kept_setup(*args, **kwargs):
        run = original_setup(*args, **kwargs)
        states.append(weakref.ref(run))
        return run

    monkeypatch.setattr(loop, "actions_at", interrupted_at_2)
    monkeypatch.setattr(loop, "set_up_run", kept_setup)
    assert not _other_live_threads()
    gc.disable()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
        deadline = time.monotonic() + 10
        while _other_live_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _other_live_threads()
        assert states[0]() is None  # the run's set-up (its params, steps, pipelines) is freed
    finally:
        gc.enable()


def test_a_run_on_another_thread_than_the_main_one_trains_and_leaves_the_signal_handlers(
    tmp_path, write_random_data, tiny_config
):
    """Python sets signal handlers on the main thread only: a run started on a worker thread raised
    ValueError ("signal only works in main thread") once set up and compiled, leaving its log open."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["train"]["max_steps"] = 2
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    results, errors = [], []

    def run():
        try:
            results.append(loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None))
        except Exception as e:  # handed to the test's thread
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(300)
    assert errors == [] and [(r.status, r.step) for r in results] == [("finished", 2)]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("best_metric", [None, "eval/loss"])
def test_rows_evaluations_and_saves_fall_on_the_steps_their_schedules_give(
    tmp_path, write_random_data, tiny_config, best_metric
):
    """One epoch of T steps, rows every 4, evaluation every 3, no periodic or epoch-end save: a training row
    at every 4th step, at every evaluation (so the evaluation's time is not the next row's) and at the last
    step, which neither 4 nor 3 divides; evaluations at every 3rd step and the last; checkpoints at the last
    step alone, and with `checkpoint.best_metric` at every evaluation too (a best one can be kept only if it
    is saved). Stated here by hand from T."""
    raw = tiny_config(write_random_data(tmp_path / "data", train=56, val=8), tmp_path / "run")
    raw["logging"]["every_steps"] = 4
    raw["eval"]["every_steps"] = 3
    raw["checkpoint"].update(
        every_steps=0, on_epoch_end=False, keep=50, best_metric=best_metric, async_save=False
    )
    raw["data"]["batching"].update(rows_per_batch=4, num_epochs=1)
    result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    last = result.step
    assert last >= 7 and last % 4 and last % 3, last  # the schedules alone do not reach the last step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = {s for s in range(1, last + 1) if s % 3 == 0} | {last}
    logged = {s for s in range(1, last + 1) if s % 4 == 0} | evaluated
    assert [r["step"] for r in rows if "loss" in r] == sorted(logged)
    assert {r["step"] for r in rows if "eval/loss" in r} == evaluated
    saved = {int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()}
    assert saved == ({last} if best_metric is None else evaluated)


@pytest.mark.parametrize("on_epoch_end", [False, True])
def test_a_run_cut_short_inside_an_epoch_evaluates_its_last_step_and_logs_each_steps_epoch(
    tmp_path, write_random_data, tiny_config, on_epoch_end
):
    """Three epochs cut short by `train.max_steps` one step into the third: evaluations (`eval.every_steps:
    0`) at the two epoch ends reached and at the last step, which ends no epoch; checkpoints at the last step,
    and at the epoch ends only with `checkpoint.on_epoch_end`; each row's `epoch` is the 0-based epoch its
    step falls in, an epoch's last step included. The one-epoch schedule test cannot tell these apart, since
    its last step ends its epoch. The epoch lengths are the data pipeline's batch counts; the rest is stated
    here from them."""
    from nextquill_jax.data.pipeline import BatchPipeline
    from nextquill_jax.data.prepared_split import PreparedSplit

    data = write_random_data(tmp_path / "data", train=24, val=8)
    raw = tiny_config(data, tmp_path / "run")
    raw["data"]["batching"].update(rows_per_batch=4, num_epochs=3)
    raw["checkpoint"].update(
        every_steps=0, on_epoch_end=on_epoch_end, keep=50, best_metric=None, async_save=False
    )
    pipeline = BatchPipeline(PreparedSplit(data, "train"), load_config(None, base=raw).data.batching)
    lengths = [pipeline.num_batches(epoch) for epoch in range(3)]
    assert min(lengths) >= 2, lengths  # the last step below is inside the third epoch, not its end
    ends = [lengths[0], lengths[0] + lengths[1]]
    last = ends[1] + 1
    raw["train"]["max_steps"] = last
    result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    assert (result.status, result.step) == ("finished", last)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = lambda s: 0 if s <= ends[0] else 1 if s <= ends[1] else 2
    assert [(r["step"], r["epoch"]) for r in rows if "loss" in r] == [
        (s, epoch(s)) for s in range(1, last + 1)
    ]
    assert [r["step"] for r in rows if "eval/loss" in r] == [*ends, last]
    saved = {int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()}
    assert saved == ({*ends, last} if on_epoch_end else {last})


def test_a_save_fetches_and_checks_the_steps_before_it_even_between_rows(
    tmp_path, write_random_data, tiny_config
):
    """A checkpoint is saved only once the metrics of the steps up to it are fetched, checked finite
    (`PendingMetrics._check`) and logged: otherwise a run with rows every 100 steps would checkpoint a
    diverged state unchecked. With one epoch, rows every 100 steps, a save every 2 and no evaluation, the
    rows fall on the even steps and the last, which is the epoch's end."""
    raw = tiny_config(write_random_data(tmp_path / "data", train=56, val=0), tmp_path / "run")
    raw["logging"]["every_steps"] = 100
    raw["checkpoint"].update(every_steps=2, on_epoch_end=False, keep=50, best_metric=None, async_save=False)
    raw["data"]["batching"].update(rows_per_batch=4, num_epochs=1)
    events, check, save = [], loop.PendingMetrics._check, Checkpointer.save
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            loop.PendingMetrics,
            "_check",
            lambda self, s, *a: events.append(("check", s)) or check(self, s, *a),
        )
        patch.setattr(
            Checkpointer,
            "save",
            lambda self, s, *a, **k: events.append(("save", s)) or save(self, s, *a, **k),
        )
        result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    last = result.step
    assert last >= 5, last
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted({s for s in range(2, last + 1, 2)} | {last})
    saves = [s for what, s in events if what == "save"]
    assert saves == [r["step"] for r in rows]
    for saved in saves:  # every step up to a saved one is checked before that save
        before = events[: events.index(("save", saved))]
        assert [s for what, s in before if what == "check"] == list(range(1, saved + 1)), events


def test_each_rows_tokens_per_second_and_data_wait_cover_the_steps_since_the_previous_row(
    tmp_path, write_random_data, tiny_config, monkeypatch
):
    """On a clock of the test's own (the loop's `time`), each batch waits WAIT_S, each step computes STEP_S
    and each save takes SAVE_S. A row every 2 steps then covers its 2 steps, or the 1 since the previous row
    at an odd last step: its tokens/s is their input tokens over n * (WAIT_S + STEP_S), and its data-wait
    fraction WAIT_S / (WAIT_S + STEP_S) = 1/4 on every row. The save at step 4 is not in step 6's wall time
    (`restart_interval`), and the waits are summed over the row's steps, then cleared for the next row."""
    wait_s, step_s, save_s = 1.0, 3.0, 100.0
    now = [0.0]
    clock = lambda: now[0]
    raw = tiny_config(write_random_data(tmp_path / "data", train=56, val=0), tmp_path / "run")
    raw["logging"]["every_steps"] = 2
    raw["checkpoint"].update(every_steps=4, on_epoch_end=False, keep=50, best_metric=None, async_save=False)
    raw["data"]["batching"].update(rows_per_batch=4, num_epochs=1)
    tokens: dict[int, float] = {}
    to_global_batch, add, save = loop.to_global_batch, loop.PendingMetrics.add, Checkpointer.save

    def waited_for(*args):
        now[0] += wait_s
        return to_global_batch(*args)

    def computed(self, step, metrics, data_wait_s):
        tokens[step] = float(metrics["input_tokens"])
        now[0] += step_s
        add(self, step, metrics, data_wait_s)

    def saved(*args, **kwargs):
        now[0] += save_s
        return save(*args, **kwargs)

    monkeypatch.setattr(loop, "time", type("Clock", (), {"perf_counter": staticmethod(clock)}))
    monkeypatch.setattr(loop, "to_global_batch", waited_for)
    monkeypatch.setattr(loop.PendingMetrics, "add", computed)
    monkeypatch.setattr(Checkpointer, "save", saved)
    last = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None).step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted({*range(2, last + 1, 2), last}) and last >= 7, rows
    previous = 0
    for r in rows:
        covered = range(previous + 1, r["step"] + 1)
        wall = len(covered) * (wait_s + step_s)
        assert r["tokens_per_second"] == pytest.approx(sum(tokens[s] for s in covered) / wall, rel=1e-9)
        assert r["data_wait_fraction"] == pytest.approx(0.25, rel=1e-9), r
        previous = r["step"]


def test_a_stop_names_the_signal_that_came_first(tmp_path, capfd, write_random_data, tiny_config):
    """A SIGTERM and then a Ctrl-C during step 1's actions: the run stops once, at step 2, and the message
    names the SIGTERM that asked for the stop (`_Preemption.signal_name`), not the Ctrl-C that followed."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 3
    with pytest.MonkeyPatch.context() as patch:
        _signal_after_step(patch, 1, signal.SIGTERM, signal.SIGINT)
        result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=print)
    assert (result.status, result.step, result.stop_signal) == ("preempted", 2, "SIGTERM")
    checkpoint = (tmp_path / "run" / "checkpoints" / "2").absolute()
    assert f"SIGTERM: stopped at step 2; checkpoint {checkpoint} is complete." in capfd.readouterr().out


def test_an_ignored_ctrl_c_stays_ignored_and_the_run_trains_to_its_end(
    tmp_path, write_random_data, tiny_config
):
    """A job started in the background (`nohup`, `cmd &` in a script) ignores SIGINT: the run must keep it
    ignored, so that a Ctrl-C meant for the foreground neither stops it nor is answered by it."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 3
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.MonkeyPatch.context() as patch:
            _signal_after_step(patch, 1, signal.SIGINT)
            result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (result.status, result.step, result.last_checkpoint, result.stop_signal) == (
        "finished",
        3,
        3,
        None,
    )


@pytest.mark.parametrize(
    ("window", "traced", "said"),
    [([2, 4], [2, 3, 4], "2-4"), ([5, 10], [5, 6], "5-6")],  # the second ends with the run, at step 6
)
def test_a_profile_traces_exactly_the_steps_of_its_window(
    tmp_path, monkeypatch, write_random_data, tiny_config, window, traced, said
):
    """`logging.profile_steps` [first, last] of a 6-step run: the trace starts before step `first` is
    dispatched and stops once step `last` (or the run's last step, inside the window) has run, and the message
    names the steps traced. jax.profiler is replaced by a recorder of the order of starts, stops and steps."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["train"]["max_steps"] = 6
    raw["logging"]["profile_steps"] = window
    events, said_lines = [], []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda directory: events.append(("start", directory)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append(("stop", None)))
    set_up_run = loop.set_up_run

    def counted_steps(*args, **kwargs):
        run = set_up_run(*args, **kwargs)
        step = run.train_step
        counting = lambda *a: events.append(("step", None)) or step(*a)
        return dataclasses.replace(run, train_step=counting)

    monkeypatch.setattr(loop, "set_up_run", counted_steps)
    result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=said_lines.append)
    assert result.step == 6
    directory = tmp_path / "run" / "profile"
    numbered, step = [], 0
    for what, where in events:
        step += what == "step"
        numbered.append((what, step) if what == "step" else (what, where))
    started, stopped = numbered.index(("start", str(directory))), numbered.index(("stop", None))
    assert [s for what, s in numbered[started:stopped] if what == "step"] == traced, numbered
    assert [what for what, _ in numbered].count("start") == 1 and len(numbered) == 8
    assert f"profile of steps {said} written to {directory} (open it with" in "\n".join(said_lines)


def _commit_fails_at(monkeypatch, failing: int) -> list[Checkpointer]:
    """Make the asynchronous commit of step `failing` fail in Orbax's background thread, as a disk that
    fills up while the step is written would (no space for its manifest); returns a list that gets the run's
    Checkpointer at its first save."""
    callback, save, checkpointers = Checkpointer._write_saving_manifest, Checkpointer.save, []

    def full_disk(self):
        if self._committing == failing:
            raise OSError(28, "No space left on device")
        callback(self)

    def saving(self, *args, **kwargs):
        checkpointers[:] = [self]
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "_write_saving_manifest", full_disk)
    monkeypatch.setattr(Checkpointer, "save", saving)
    return checkpointers


@pytest.mark.parametrize("on_save_error", ["stop", "continue"])
def test_the_last_steps_asynchronous_save_is_waited_for_and_its_failure_handled(
    tmp_path, monkeypatch, write_random_data, tiny_config, on_save_error
):
    """The last step's save is asynchronous like the others, but the run ends on it: it must be committed
    before the run says it finished, so that its failure is handled by `checkpoint.on_save_error` (stop:
    raised; continue: said, with the previous checkpoint as the last one) instead of being only logged as
    the run closes its Checkpointer, reporting a checkpoint that does not exist."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(
        every_steps=2, on_epoch_end=False, best_metric=None, async_save=True, on_save_error=on_save_error
    )
    raw["train"]["max_steps"] = 4
    _commit_fails_at(monkeypatch, 4)
    said = []
    train = lambda: loop.train(load_config(None, base=raw), tmp_path / "run", echo=said.append)
    if on_save_error == "stop":
        with pytest.raises(CheckpointSaveError, match=r"saving checkpoint 4 in .* No space left on device"):
            train()
    else:
        result = train()
        assert (result.status, result.step, result.last_checkpoint) == ("finished", 4, 2)
        assert any(
            "saving checkpoint 4 in" in line and "Training goes on without it" in line for line in said
        )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]


def test_a_failed_asynchronous_save_stops_the_run_at_the_next_step_not_the_next_save(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """With `checkpoint.on_save_error: stop`, a save that failed in the background stops the run at the
    first step after it has failed (`Checkpointer.poll`), not at the next save, which could be hours of
    training later. Here step 3's save has failed before step 4 is recorded; the next save would be step 6."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(
        every_steps=3, on_epoch_end=False, best_metric=None, async_save=True, on_save_error="stop"
    )
    raw["train"]["max_steps"] = 6
    checkpointers = _commit_fails_at(monkeypatch, 3)
    trained, add = [], loop.PendingMetrics.add

    def failed_before_step_4(self, step, *args):
        if step == 4:
            while checkpointers[0].manager.is_saving_in_progress():
                time.sleep(0.01)
        trained.append(step)
        add(self, step, *args)

    monkeypatch.setattr(loop.PendingMetrics, "add", failed_before_step_4)
    with pytest.raises(CheckpointSaveError, match="saving checkpoint 3 in"):
        loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    assert trained == [1, 2, 3, 4]


def test_a_second_ctrl_c_names_the_highest_numbered_committed_checkpoint(tmp_path):
    """What the CLI line of a second Ctrl-C names: the committed step of the highest number (10, not 9 or
    "2" by its name's order), never a step moved aside, one still temporary or a file."""
    for name in ["2", "9", "10", "11.corrupt", "12.orbax-checkpoint-tmp-1"]:
        (tmp_path / name).mkdir()
    (tmp_path / "13").write_text("not a step")
    assert loop._newest_committed(tmp_path) == f"the newest checkpoint is {tmp_path / '10'}"
    assert loop._newest_committed(tmp_path / "none") == "no checkpoint is saved"


def test_a_ctrl_c_after_the_last_steps_stop_check_whose_save_failed_says_a_resume_trains_it_again(
    tmp_path, monkeypatch, capfd, write_random_data, tiny_config
):
    """A SIGINT during the last step's actions (after its stop check) whose save then fails, with
    `checkpoint.on_save_error: continue`: the run finished, but it must not claim the last step's checkpoint
    is complete: a resume trains that step again from checkpoint 2, and the message says so."""
    _no_room_for_step_3(monkeypatch)
    result, _ = _train_signalled(
        tmp_path, write_random_data, tiny_config, steps=3, at=3, every_steps=2, on_save_error="continue"
    )
    assert (result.status, result.step, result.last_checkpoint, result.stop_signal) == (
        "finished",
        3,
        2,
        "SIGINT",
    )
    out = capfd.readouterr().out
    assert (
        "SIGINT at step 3, the run's last: training finished (its checkpoint was not saved: see above; "
        f"running the same command again trains it again) (workdir {tmp_path / 'run'})."
    ) in out, out
    assert "is complete" not in out


def test_a_stop_without_its_own_save_waits_for_the_save_in_flight_before_naming_the_newest(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """Step 1's asynchronous save is still committing (slowly, as a big model's) when step 2 is made a stop
    without a save of its own: the message must name checkpoint 1, once committed, not say that there is
    none (`_newest_verified_name` waits for the save in flight before looking)."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(every_steps=1, async_save=True)
    raw["train"]["max_steps"] = 3
    callback, schedule = Checkpointer._write_saving_manifest, loop.actions_at
    monkeypatch.setattr(Checkpointer, "_write_saving_manifest", lambda self: time.sleep(1) or callback(self))

    def unsaved_stop_at_2(step, cfg, run, *, stop):
        due = schedule(step, cfg, run, stop=stop)
        return dataclasses.replace(due, stop=True, save=False) if step == 2 else due

    monkeypatch.setattr(loop, "actions_at", unsaved_stop_at_2)
    said = []
    result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=said.append)
    assert (result.status, result.step, result.last_checkpoint) == ("preempted", 2, 1)
    checkpoint = (tmp_path / "run" / "checkpoints" / "1").absolute()
    assert any(f"SIGTERM: stopped at step 2; checkpoint {checkpoint} is complete." in x for x in said), said


def test_an_evaluation_reads_at_most_eval_max_batches_of_the_eval_split(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """`eval.max_batches: 1` on an eval split of several batches: each evaluation runs the eval step once."""
    raw = tiny_config(write_random_data(tmp_path / "data", train=16, val=32), tmp_path / "run")
    raw["data"]["batching"].update(rows_per_batch=4, num_epochs=2)
    raw["eval"]["max_batches"] = 1
    set_up_run, eval_batches, calls = loop.set_up_run, [], []

    def counted_eval_steps(*args, **kwargs):
        run = set_up_run(*args, **kwargs)
        eval_batches.append(sum(1 for _ in run.eval_data.dataset()))
        step = run.eval_step
        return dataclasses.replace(run, eval_step=lambda *a: calls.append(1) or step(*a))

    monkeypatch.setattr(loop, "set_up_run", counted_eval_steps)
    loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluations = sum("eval/loss" in r for r in rows)
    assert eval_batches[0] > 1 and evaluations >= 2, (eval_batches, evaluations)
    assert len(calls) == evaluations


def test_a_sigterm_handler_set_outside_python_is_left_alone(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """A SIGTERM handler installed by C code (an embedding program, a library) reads as None through
    `signal.getsignal`: Python could neither hand it a signal nor put it back, so the run must not replace it.
    Simulated by reporting None for SIGTERM; the handler really in place must stay so during the run."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["train"]["max_steps"] = 2
    getsignal, schedule = signal.getsignal, loop.actions_at
    before, during = getsignal(signal.SIGTERM), []
    monkeypatch.setattr(signal, "getsignal", lambda s: None if s == signal.SIGTERM else getsignal(s))

    def looking(step, cfg, run, *, stop):
        during.append(getsignal(signal.SIGTERM))
        return schedule(step, cfg, run, stop=stop)

    monkeypatch.setattr(loop, "actions_at", looking)
    result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    assert (result.status, result.step) == ("finished", 2)
    assert during == [before, before] and getsignal(signal.SIGTERM) is before


def test_a_checkpoint_saved_by_another_number_of_processes_is_refused_before_restoring(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """Each process saves the data position of its own share: a one-process resume of a checkpoint saved
    by two (`Checkpointer.saved_process_count`, made to say 2 here) is refused, naming both counts, before
    Orbax restores anything (test_runs.py's G1 does it for real, in the slow suite)."""
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["train"]["max_steps"] = 2
    loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    restores, restore = [], Checkpointer.restore
    monkeypatch.setattr(Checkpointer, "saved_process_count", lambda self, step: 2)
    monkeypatch.setattr(
        Checkpointer, "restore", lambda self, *a, **k: restores.append(a) or restore(self, *a, **k)
    )
    with pytest.raises(ConfigError, match=r"checkpoints/2 was saved by 2 processes and this run has 1"):
        loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    assert restores == []
