"""The loop (train/loop.py): its console output, and what a stop reports."""

from __future__ import annotations

import dataclasses

from nextquill_jax.config import load_config
from nextquill_jax.train import loop
from nextquill_jax.train.loop import eval_line


def test_the_eval_line_shows_the_loss_and_the_tracked_metric():
    metrics = {"eval/loss": 3.25, "eval/ce_with": 3.0, "eval/pref_fraction": 0.5, "eval/ce_without": 4.0}
    assert eval_line(7, metrics, "eval/ce_without") == (
        "step 7: eval/loss 3.2500, eval/ce_with 3.0000, eval/pref_fraction 0.5000, eval/ce_without 4.0000"
    )
    assert eval_line(7, {"eval/loss": 1.0}, "eval/loss") == "step 7: eval/loss 1.0000"


def test_a_stop_without_its_own_save_names_the_newest_saved_checkpoint(
    tmp_path, monkeypatch, capsys, write_random_data, tiny_config
):
    # Step 1 saves (every_steps: 1); step 2 is made a stop that does not save, which `actions_at` never
    # schedules: the stop must name step 1's checkpoint, not claim one for step 2.
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(every_steps=1, async_save=False)
    raw["train"]["max_steps"] = 3
    schedule = loop.actions_at
    monkeypatch.setattr(
        loop,
        "actions_at",
        lambda step, cfg, run, *, stop: (
            schedule(step, cfg, run, stop=stop)
            if step != 2
            else dataclasses.replace(schedule(step, cfg, run, stop=stop), stop=True, save=False)
        ),
    )
    result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    assert (result.status, result.step, result.last_checkpoint) == ("preempted", 2, 1)
    checkpoints = (tmp_path / "run" / "checkpoints").absolute()
    assert [p.name for p in checkpoints.iterdir() if p.is_dir()] == ["1"]
    assert (
        f"SIGTERM: stopped at step 2; checkpoint {checkpoints / '1'} is complete." in capsys.readouterr().out
    )


def test_a_stop_before_any_save_says_no_checkpoint_is_saved(
    tmp_path, monkeypatch, capsys, write_random_data, tiny_config
):
    # A SIGTERM at step 1 whose save is dropped: there is nothing to resume from, and the message must not
    # claim that a checkpoint "none" is complete.
    raw = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    raw["checkpoint"].update(every_steps=100, async_save=False)
    raw["train"]["max_steps"] = 3
    schedule = loop.actions_at
    monkeypatch.setattr(
        loop,
        "actions_at",
        lambda step, cfg, run, *, stop: dataclasses.replace(
            schedule(step, cfg, run, stop=stop), stop=step == 1, save=False
        ),
    )
    result = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    assert (result.status, result.step, result.last_checkpoint) == ("preempted", 1, None)
    out = capsys.readouterr().out
    assert (
        "SIGTERM: stopped at step 1; no checkpoint is saved or verifies, so the same command starts again "
        f"from step 0 (workdir {tmp_path / 'run'})." in out
    )
    assert "is complete" not in out
