"""A resume continues the run its checkpoints hold: a config that differs in what is trained is refused
before anything is restored (train/resume.py), and config.yaml records the run that ran. `evaluate` checks a
checkpoint's fixed-DCE reference model as a resume does."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from nextquill_jax import cli
from nextquill_jax.config import ModelRunConfig, config_to_dict, load_config
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.checksums import IntegrityError
from nextquill_jax.data.prepare import prepare
from nextquill_jax.loss.weighting_record import weighting_note
from nextquill_jax.train import adapters, loop
from nextquill_jax.train.checkpoint import MANIFEST, PROGRESS_FILE, Checkpointer, write_manifest
from nextquill_jax.train.resume import MAX_LISTED, check_resumable, check_same_data
from nextquill_jax.train.setup import prepared_data
from nextquill_jax.train.workdir import restore_model
from tests.shared import FIXTURES


def _stopped_run(tmp_path, monkeypatch, write_random_data, tiny_config, write_config):
    """A 3-step run stopped (as by SIGTERM) after step 1, whose checkpoint is saved; the config file's
    train.workdir names another directory than the one the run uses. Returns (config path, workdir)."""
    raw = tiny_config(write_random_data(tmp_path / "data", train=24, val=8), tmp_path / "named_in_file")
    raw["train"]["max_steps"] = 3
    path = write_config(raw, tmp_path / "cfg.yaml")
    schedule = loop.actions_at
    monkeypatch.setattr(
        loop, "actions_at", lambda step, cfg, run, *, stop: schedule(step, cfg, run, stop=stop or step == 1)
    )
    workdir = tmp_path / "run"
    result = loop.train(load_config(path), workdir, echo=lambda _: None)
    assert (result.status, result.step, result.last_checkpoint) == ("preempted", 1, 1)
    return path, workdir


def test_a_resume_with_another_learning_rate_and_loss_is_refused_and_leaves_the_workdir_as_it_was(
    tmp_path, monkeypatch, write_random_data, tiny_config, write_config
):
    path, workdir = _stopped_run(tmp_path, monkeypatch, write_random_data, tiny_config, write_config)
    before = {name: (workdir / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    changed = load_config(path, ["optim.learning_rate=0.1", "loss.variant=sft"])
    with pytest.raises(ConfigError) as refused:
        loop.train(changed, workdir, echo=lambda _: None)
    message = str(refused.value)
    assert "optim.learning_rate: 0.003 -> 0.1" in message and 'loss.variant: "nextquill" -> "sft"' in message
    assert message.count(" -> ") == 2 and f"workdir {workdir.absolute()}" in message
    assert "run the same config again" in message and "new --workdir" in message
    assert {name: (workdir / name).read_bytes() for name in before} == before


def test_a_resume_that_changes_only_logging_eval_checkpoint_data_dir_and_micro_batches_trains_on(
    tmp_path, monkeypatch, write_random_data, tiny_config, write_config
):
    path, workdir = _stopped_run(tmp_path, monkeypatch, write_random_data, tiny_config, write_config)
    moved = shutil.copytree(tmp_path / "data", tmp_path / "data_moved")
    allowed = [
        "logging.every_steps=2",
        "eval.every_steps=1",
        "eval.max_batches=1",
        "checkpoint.every_steps=1",
        "checkpoint.keep=3",
        f"train.data_dir={moved}",
        "train.micro_batches=2",
        "data.batching.read_threads=2",
        "data.batching.prefetch_batches=1",
    ]
    lines = []
    result = loop.train(load_config(path, allowed), workdir, echo=lines.append)
    assert (result.status, result.step) == ("finished", 3)
    assert any(line.startswith("resuming from") and line.endswith("(step 1)") for line in lines)
    saved = load_config(workdir / "config.yaml")
    assert (saved.logging.every_steps, saved.eval.every_steps, saved.train.data_dir) == (2, 1, str(moved))
    assert saved.train.micro_batches == 2


def test_a_resume_on_other_data_under_the_same_config_is_refused_before_orbax_restores_anything(
    tmp_path, monkeypatch, write_random_data, tiny_config, write_config
):
    path, workdir = _stopped_run(tmp_path, monkeypatch, write_random_data, tiny_config, write_config)
    restores = []
    monkeypatch.setattr(Checkpointer, "restore", lambda self, *a, **k: restores.append(a))
    other = write_random_data(tmp_path / "other", train=24, val=8, seed=1)
    with pytest.raises(ConfigError) as moved:
        loop.train(load_config(path, [f"train.data_dir={other}"]), workdir, echo=lambda _: None)
    message = str(moved.value)
    assert f"{other} holds other data than {tmp_path / 'data'}" in message and "splits train, val" in message
    # The same directory prepared again with other examples: still refused.
    shutil.rmtree(tmp_path / "data")
    write_random_data(tmp_path / "data", train=24, val=8, seed=1)
    with pytest.raises(ConfigError) as changed:
        loop.train(load_config(path), workdir, echo=lambda _: None)
    assert f"the data in {tmp_path / 'data'} has changed since" in str(changed.value)
    assert "Fix: point train.data_dir at the data the run was trained on" in str(changed.value)
    assert restores == []


def test_check_same_data_compares_split_contents_wherever_they_lie():
    saved = {"dir": "/a", "splits": {"train": "t1", "val": "v1"}}
    check_same_data(saved, {"dir": "/b", "splits": {"train": "t1", "val": "v1"}}, "ckpt")
    check_same_data(None, {"dir": "/b", "splits": {"train": "t2"}}, "ckpt")  # saved before it was recorded
    with pytest.raises(ConfigError, match=r"^ckpt was trained on other prepared data: /b .*\(split val: "):
        check_same_data(saved, {"dir": "/b", "splits": {"train": "t1"}}, "ckpt")


def test_weighting_note_warns_when_the_modules_digest_changed_and_only_then():
    fingerprint = lambda sha: {"name": "w:f", "module": "w", "file": "/src/w.py", "sha256": sha}
    before, after = fingerprint("a" * 12 + "1" * 52), fingerprint("b" * 12 + "2" * 52)
    note = weighting_note(before, after, "ckpt/2")
    assert note.startswith("warning: loss.weighting w:f: its module /src/w.py has changed since checkpoint ")
    assert "ckpt/2 was saved (sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb)" in note and "\n" not in note
    assert "the rest of the run weights tokens with the current code" in note
    assert note.endswith(
        "Fix: restore the module's code to continue the same run, or use a new --workdir for the new weights."
    )
    assert weighting_note(before, fingerprint(before["sha256"]), "ckpt/2") is None
    assert weighting_note(None, after, "ckpt/2") is None  # saved before checkpoints recorded it
    assert weighting_note(None, None, "ckpt/2") is None  # the paper's weights
    assert weighting_note(fingerprint(None), after, "ckpt/2") is None  # no source file to compare


def test_a_resume_after_the_weighting_module_changed_warns_and_trains_on(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """Each checkpoint records the SHA-256 of the `loss.weighting` module's file; a resume after the file
    changed (here a comment, which changes nothing trained but the digest all the same) says so in one line,
    naming the checkpoint and both digests, and trains on."""
    import hashlib
    import uuid

    name = f"weights_{uuid.uuid4().hex}"  # imported fresh: no other test has this module
    module = tmp_path / f"{name}.py"
    module.write_bytes((FIXTURES.parent / "loss" / "custom_weighting.py").read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = tiny_config(write_random_data(tmp_path / "data", train=24, val=0), tmp_path / "run")
    raw["loss"]["weighting"] = f"{name}:soft_weights"
    raw["train"]["max_steps"] = 3
    raw["checkpoint"].update(every_steps=100, async_save=False)
    schedule = loop.actions_at
    with monkeypatch.context() as patch:  # stopped (as by SIGTERM) after step 2, its checkpoint saved
        patch.setattr(
            loop, "actions_at", lambda s, cfg, run, *, stop: schedule(s, cfg, run, stop=stop or s == 2)
        )
        stopped = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    assert (stopped.status, stopped.last_checkpoint) == ("preempted", 2)
    where = tmp_path / "run" / "checkpoints" / "2"
    before = hashlib.sha256(module.read_bytes()).hexdigest()
    assert json.loads((where / PROGRESS_FILE).read_text())["weighting"]["sha256"] == before
    module.write_text(module.read_text() + "# τ tuned later\n")
    after = hashlib.sha256(module.read_bytes()).hexdigest()
    lines = []
    resumed = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lines.append)
    assert (resumed.status, resumed.step) == ("finished", 3)
    warned = [line for line in lines if line.startswith("warning: loss.weighting")]
    assert len(warned) == 1, lines
    assert warned[0].startswith(
        f"warning: loss.weighting {name}:soft_weights: its module {module} has changed"
    )
    assert f"checkpoint {where} was saved (sha256 {before[:12]} -> {after[:12]})" in warned[0]
    assert "Fix: restore the module's code to continue the same run, or use a new --workdir" in warned[0]
    # A command that reads checkpoint 2 (evaluate, effects) is told its weights come from the edited code;
    # checkpoint 3, saved by the resumed run, was trained with that code.
    read = restore_model(tmp_path / "run", step=2).weighting_note
    assert read.startswith(f"warning: loss.weighting {name}:soft_weights: its module {module} has changed")
    assert f"(sha256 {before[:12]} -> {after[:12]}), so this command's weighted loss terms" in read
    assert read.endswith("Fix: restore the module's code to measure with the run's own weights.")
    assert restore_model(tmp_path / "run").weighting_note is None


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_at_every_start_until_the_user_acts(
    tmp_path, monkeypatch, write_random_data, tiny_config, write_config
):
    """The refusal to start when no checkpoint verifies held once: the scan had moved the damaged steps aside,
    so the next `train` found no step and trained from step 0 beside them, silently. It now refuses while
    steps moved aside are all there is, naming them and the fix, as `checkpoint verify` does."""
    path, workdir = _stopped_run(tmp_path, monkeypatch, write_random_data, tiny_config, write_config)
    checkpoints = workdir.absolute() / "checkpoints"
    state_file = max((checkpoints / "1" / "state").rglob("*"), key=lambda p: p.stat().st_size)
    raw = bytearray(state_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state_file.write_bytes(bytes(raw))
    metrics = (workdir / "metrics.jsonl").read_bytes()
    refusal = (
        f"{checkpoints} holds no complete checkpoint: a resume moved the damaged {checkpoints / '1.corrupt'} "
        f"aside. Fix: restore the checkpoints from a backup, or move {checkpoints} away to train the run "
        "from the start."
    )
    for start in ("first", "second"):
        lines = []
        with pytest.raises(IntegrityError) as refused:
            loop.train(load_config(path), workdir, echo=lines.append)
        assert str(refused.value) == refusal, start
        assert sorted(p.name for p in checkpoints.iterdir()) == ["1.corrupt"], start
        assert (workdir / "metrics.jsonl").read_bytes() == metrics, start  # nothing trained
    assert lines == []  # the second start found nothing more to move
    assert cli.main(["checkpoint", "verify", "--workdir", str(workdir)]) == 1  # its error: the same fix

    checkpoints.rename(workdir / "checkpoints.damaged")  # the fix: the run starts afresh
    monkeypatch.undo()  # no stop after step 1 this time
    assert loop.train(load_config(path), workdir, echo=lambda _: None).step == 3


def _stopped_against(raw: dict, workdir, monkeypatch, stop_step: int = 1):
    """Train `raw` (3 steps, no save but the stop's) stopped as by SIGTERM after `stop_step`; returns the
    stopped step's checkpoint directory."""
    raw["train"]["max_steps"] = 3
    raw["checkpoint"].update(every_steps=100, async_save=False)
    schedule = loop.actions_at
    with monkeypatch.context() as patch:
        patch.setattr(
            loop,
            "actions_at",
            lambda s, cfg, run, *, stop: schedule(s, cfg, run, stop=stop or s == stop_step),
        )
        stopped = loop.train(load_config(None, base=raw), workdir, echo=lambda _: None)
    assert (stopped.status, stopped.last_checkpoint) == ("preempted", stop_step)
    return workdir.absolute() / "checkpoints" / str(stop_step)


def _as_saved_without(step_dir, key: str) -> None:
    """Remove `key` from `step_dir`'s progress item (re-hashed in its manifest): as an earlier version saved
    the step."""
    progress = step_dir / PROGRESS_FILE
    saved = json.loads(progress.read_text())
    del saved[key]
    progress.write_text(json.dumps(saved))
    (step_dir / MANIFEST).unlink()  # else listed in the new one
    write_manifest(step_dir)


def test_a_resume_after_a_workdir_reference_saved_a_newer_checkpoint_is_refused_and_resumes_once_it_is_back(
    tmp_path, monkeypatch, write_random_data, tiny_config, run_losses, read_state
):
    """A training workdir as `loss.reference_model` gives its newest verified checkpoint when a run starts: a
    resume after the reference run had saved a newer one trained the rest of the run against that one,
    silently, and ended elsewhere than the uninterrupted run. Each checkpoint now records the reference's
    step and manifest digest, and a resume against another is refused; against the same, it ends where the
    uninterrupted run does."""
    data = write_random_data(tmp_path / "data", train=24, val=0)
    reference = tiny_config(data, tmp_path / "ref")
    reference["train"]["max_steps"] = 2
    reference["checkpoint"].update(every_steps=1, async_save=False)
    loop.train(load_config(None, base=reference), tmp_path / "ref", echo=lambda _: None)
    ref_checkpoints = (tmp_path / "ref" / "checkpoints").absolute()
    (ref_checkpoints / "2").rename(tmp_path / "ref_2")  # the reference run has saved step 1 alone so far
    raw = tiny_config(data, tmp_path / "run", loss={"dce": "fixed", "reference_model": str(tmp_path / "ref")})
    stopped = _stopped_against(raw, tmp_path / "run", monkeypatch)
    recorded = json.loads((stopped / PROGRESS_FILE).read_text())["reference"]
    digest = hashlib.blake2b((ref_checkpoints / "1" / MANIFEST).read_bytes(), digest_size=16).hexdigest()
    assert recorded == {"source": str(tmp_path / "ref"), "step": 1, "manifest": digest}

    (tmp_path / "ref_2").rename(ref_checkpoints / "2")  # the reference run trained on meanwhile
    restores = []
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "restore", lambda self, *a, **k: restores.append(a))
        with pytest.raises(ConfigError) as refused:
            loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    message = str(refused.value)
    assert message.startswith(
        f"{stopped} was trained against the fixed-DCE reference model checkpoint 1 of the run in "
        f"{tmp_path / 'ref'} (manifest.json {digest[:12]}), but loss.reference_model now gives checkpoint 2 "
        f"of the run in {tmp_path / 'ref'} (manifest.json "
    )
    assert message.endswith(
        f"Fix: make checkpoint 1 the newest verified one in {ref_checkpoints} again (move the newer ones out "
        "of it until this run has finished, or restore that step from a backup), or train in a new --workdir."
    )
    assert restores == []

    (ref_checkpoints / "2").rename(tmp_path / "ref_2")
    resumed = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    whole = tiny_config(data, tmp_path / "whole", loss=raw["loss"])
    whole["train"]["max_steps"] = 3
    whole["checkpoint"].update(every_steps=100, async_save=False)
    uninterrupted = loop.train(load_config(None, base=whole), tmp_path / "whole", echo=lambda _: None)
    assert (resumed.status, resumed.step, uninterrupted.step) == ("finished", 3, 3)
    assert run_losses(tmp_path / "run") == run_losses(tmp_path / "whole")
    final = [read_state(w / "checkpoints" / "3")["params"] for w in (tmp_path / "run", tmp_path / "whole")]
    jax.tree.map(np.testing.assert_array_equal, *final)


def test_a_resume_after_a_model_reference_was_overwritten_is_refused_and_an_unrecorded_one_noted(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """A model directory as `loss.reference_model` is recorded by its content fingerprint: overwritten with
    another model, a resume is refused. A checkpoint saved before the reference was recorded cannot be
    checked: it resumes with a note naming the reference, as one saved before the base's content
    fingerprint does (`adapters.check_same_base`)."""
    from flax import nnx

    from nextquill_jax.models import CausalLM, model_preset, save_pretrained
    from tests.shared import TINY_EOS_ID, TINY_QWEN

    tiny = {**TINY_QWEN, "eos_token_ids": (TINY_EOS_ID,)}
    model = tmp_path / "ref"
    save_pretrained(CausalLM(model_preset("qwen2.5-0.5b", **tiny), rngs=nnx.Rngs(5)), model)
    data = write_random_data(tmp_path / "data", train=24, val=0)
    raw = tiny_config(data, tmp_path / "run", loss={"dce": "fixed", "reference_model": str(model)})
    stopped = _stopped_against(raw, tmp_path / "run", monkeypatch)
    recorded = json.loads((stopped / PROGRESS_FILE).read_text())["reference"]
    assert (recorded["source"], recorded["scheme"]) == (str(model), adapters.CONTENT_SCHEME)

    shutil.rmtree(model)
    save_pretrained(CausalLM(model_preset("qwen2.5-0.5b", **tiny), rngs=nnx.Rngs(6)), model)
    with pytest.raises(ConfigError) as refused:
        loop.train(load_config(None, base=raw), tmp_path / "run", echo=lambda _: None)
    message = str(refused.value)
    assert message.startswith(
        f"{stopped} was trained against the fixed-DCE reference model {model} (fingerprint "
        f"{recorded['fingerprint'][:12]}), but loss.reference_model now gives {model} (fingerprint "
    )
    assert message.endswith(
        f"Fix: put the model this run was trained against back at {model}, or train in a new --workdir."
    )

    _as_saved_without(stopped, "reference")
    lines = []
    resumed = loop.train(load_config(None, base=raw), tmp_path / "run", echo=lines.append)
    assert (resumed.status, resumed.step) == ("finished", 3)
    now = adapters.path_identity(ModelRunConfig(path=str(model)))["fingerprint"]
    assert now != recorded["fingerprint"]
    assert [line for line in lines if line.startswith("note: ")] == [
        f"note: {stopped} was saved before checkpoints recorded their fixed-DCE reference model, so this "
        f"resume cannot check that loss.reference_model, now {model} (fingerprint {now[:12]}), is the model "
        "it was trained against; make sure it is. Checkpoints saved from now on record it."
    ]


def test_evaluate_refuses_a_checkpoint_whose_workdir_reference_has_moved_on_and_runs_against_its_own(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    """`evaluate` loads the checkpoint's `loss.reference_model` as it is now: a workdir's newest verified
    step, which may not be the one the checkpoint was trained against (the reference run saved a newer
    one), and its weighted loss terms and DCE statistics would silently come from another reference. It
    checks the recorded reference as a resume does: another is refused, naming both, before the loss pass;
    the same one evaluates; a checkpoint saved before the record evaluates with the resume's note."""
    from nextquill_jax.eval import evaluate as evaluate_module
    from nextquill_jax.models.generate import GenerationConfig

    data = write_random_data(tmp_path / "data", train=24, val=4)
    (data / "val.jsonl").write_text("".join(json.dumps({"index": i}) + "\n" for i in range(4)))
    dense, ref, run = {"attention_impl": "xla_dense"}, tmp_path / "ref", tmp_path / "run"
    reference = tiny_config(data, ref, model=dense)
    reference["train"]["max_steps"] = 2
    reference["checkpoint"].update(every_steps=1, async_save=False)
    loop.train(load_config(None, base=reference), ref, echo=lambda _: None)
    ref_checkpoints = (ref / "checkpoints").absolute()
    (ref_checkpoints / "2").rename(tmp_path / "ref_2")  # the reference run has saved step 1 alone so far
    raw = tiny_config(data, run, loss={"dce": "fixed", "reference_model": str(ref)}, model=dense)
    stopped = _stopped_against(raw, run, monkeypatch)
    (tmp_path / "ref_2").rename(ref_checkpoints / "2")  # the reference run trained on meanwhile
    digests = [
        hashlib.blake2b((ref_checkpoints / step / MANIFEST).read_bytes(), digest_size=16).hexdigest()
        for step in ("1", "2")
    ]
    nothing = GenerationConfig(max_new_tokens=0)
    lines, passes = [], []
    measure = evaluate_module.split_losses
    monkeypatch.setattr(evaluate_module, "split_losses", lambda *a: passes.append(a) or measure(*a))
    evaluate = lambda: evaluate_module.evaluate(run, "val", generation=nothing, echo=lines.append)

    with pytest.raises(ConfigError) as refused:
        evaluate()
    assert str(refused.value) == (
        f"{stopped} was trained against the fixed-DCE reference model checkpoint 1 of the run in {ref} "
        f"(manifest.json {digests[0][:12]}), but loss.reference_model now gives checkpoint 2 of the run in "
        f"{ref} (manifest.json {digests[1][:12]}), so evaluating it would weigh its loss terms and compute "
        "its DCE statistics against another reference (other reference DCEs, so other token weights) than "
        "the one it was trained against. Fix: make checkpoint 1 the newest verified one in "
        f"{ref_checkpoints} again (move the newer ones out of it until this evaluation has finished, or "
        "restore that step from a backup)."
    )
    assert passes == [] and not (run / "eval").exists()

    (ref_checkpoints / "2").rename(tmp_path / "ref_2")
    metrics = evaluate()
    assert (metrics["step"], len(passes)) == (1, 1)
    assert math.isfinite(metrics["loss"]["loss"]) and metrics["loss"]["effects"]
    assert not [line for line in lines if line.startswith("note: ")]

    (tmp_path / "ref_2").rename(ref_checkpoints / "2")
    _as_saved_without(stopped, "reference")
    lines.clear()
    assert evaluate()["step"] == 1
    assert [line for line in lines if line.startswith("note: ")] == [
        f"note: {stopped} was saved before checkpoints recorded their fixed-DCE reference model, so this "
        f"evaluation cannot check that loss.reference_model, now checkpoint 2 of the run in {ref} "
        f"(manifest.json {digests[1][:12]}), is the model it was trained against; make sure it is. "
        "Checkpoints saved from now on record it."
    ]


@pytest.mark.parametrize("named", [True, False], ids=["train.data_dir", "workdir_with_checkpoints"])
def test_train_does_not_replace_data_it_is_pointed_at_or_that_checkpoints_were_trained_on(
    named, tmp_path, tiny_config, save_tiny_tokenizer
):
    source = tmp_path / "records.jsonl"
    source.write_bytes((FIXTURES / "generic" / "records.jsonl").read_bytes())
    data = {"format": "generic", "template": "plain", "sources": [str(source)]}
    data["tokenizer"] = str(save_tiny_tokenizer(tmp_path / "tok"))
    workdir = tmp_path / "run"
    raw = tiny_config(tmp_path / "named", workdir)
    raw["data"].update(data)
    raw["train"]["data_dir"] = raw["train"]["data_dir"] if named else None
    cfg = load_config(None, base=raw)
    target = tmp_path / "named" if named else workdir / "prepared"
    # Prepared as `data prepare ... data.max_history=1` would.
    prepare(dataclasses.replace(cfg.data, max_history=1), target, echo=lambda _: None)
    if not named:
        (workdir / "checkpoints" / "3").mkdir(parents=True)
    files = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as refused:
        prepared_data(cfg, workdir, echo=lambda _: None)
    message = str(refused.value)
    assert f"{target} was prepared with other settings (data.max_history: 1 -> " in message
    assert ("train.data_dir names it" if named else "the checkpoints in") in message and "Fix: " in message
    fix = (
        "Fix: give the data settings it was prepared with, prepare it again on purpose (`nextquill-jax data "
        f"prepare --config FILE --out {target} --force`), or point train.data_dir at another directory."
        if named
        else "Fix: run with the data settings the run was trained on (`nextquill-jax train --config "
        f"{workdir / 'config.yaml'}` resumes it), or use a new --workdir."
    )
    assert message.endswith(fix), message
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == files
    if not named:  # without checkpoints, the workdir's own data is the run's to replace
        shutil.rmtree(workdir / "checkpoints")
        assert prepared_data(cfg, workdir, echo=lambda _: None).dir == target
        assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} != files


def test_a_data_dir_without_prepared_data_and_no_sources_is_refused_naming_both_fixes(tmp_path, tiny_config):
    """No data.sources: train.data_dir is taken as it is, and one that holds no prepared data says what to
    set (data.sources, or a train.data_dir that `data prepare` wrote)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = load_config(None, base=tiny_config(empty, tmp_path / "run"))
    with pytest.raises(ConfigError) as refused:
        prepared_data(cfg, tmp_path / "run", echo=lambda _: None)
    message = str(refused.value)
    assert message.startswith(f"data.sources is empty and {empty} holds no prepared data"), message
    assert "Fix: list the record files in data.sources, or point train.data_dir at the output of" in message


def test_synthetic_data_is_prepared_into_the_workdir_from_no_sources(tmp_path):
    """The synthetic format generates its records in-process: no data.sources, and still prepared (into
    <workdir>/prepared), not taken as a train.data_dir that holds prepared data."""
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "tiny_synthetic.yaml", ["data.synthetic_users=2"])
    assert not cfg.data.sources and cfg.train.data_dir is None
    got = prepared_data(cfg, tmp_path / "run", echo=lambda _: None)
    assert got == (tmp_path / "run" / "prepared", False)
    assert (got.dir / "train" / "meta.json").is_file()


def test_a_run_resumes_after_its_record_files_moved_and_only_then_may_name_other_ones(
    tmp_path, tiny_config, save_tiny_tokenizer, capsys
):
    """A stopped run whose record files moved (the old path names no file) resumes, and trains on, with
    `data.sources` naming their new place: preparing reuses the data from the same files there
    (`PreparedData.reused`), so `check_resumable` lets that key differ; and again once they moved back. It
    was a dead end: the old path named no file, the new one was other settings. Other files there are still
    refused, and so is a change of data.sources where the data is prepared afresh (a new train.data_dir),
    which a checkpoint without the data's record (earlier versions) could not otherwise refuse."""
    from tests.conftest import _write_records

    old, new = tmp_path / "a" / "data", tmp_path / "b" / "data"
    old.mkdir(parents=True)
    _write_records(old / "records.jsonl")
    workdir = _stopped_generic_run(tmp_path, tiny_config, save_tiny_tokenizer, capsys, old / "records.jsonl")
    new.parent.mkdir()
    old.rename(new)
    resume = lambda *overrides: cli.main(["train", "--config", str(workdir / "config.yaml"), *overrides])

    assert resume() == 1
    assert f"data.sources: no file matches '{old / 'records.jsonl'}'" in capsys.readouterr().err
    assert resume(f"data.sources=[{new / 'records.jsonl'}]") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert (
        f"its record files moved, the same content: {old / 'records.jsonl'} -> {new / 'records.jsonl'}" in out
    )
    assert "resuming from" in out and "finished at step 4" in out
    assert yaml.safe_load((workdir / "config.yaml").read_text())["data"]["sources"] == [
        str(new / "records.jsonl")
    ]

    shutil.rmtree(workdir / "checkpoints" / "4")
    new.rename(old)  # back: the checkpoint names the new place now, the data's summary the old one
    assert resume(f"data.sources=[{old / 'records.jsonl'}]") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "prepared data up to date" in out and "resuming from" in out and "finished at step 4" in out
    shutil.rmtree(workdir / "checkpoints" / "4")
    saved = (workdir / "config.yaml").read_bytes()
    other = tmp_path / "other" / "data" / "records.jsonl"
    other.parent.mkdir(parents=True)
    _write_records(other, seed=1)
    assert resume(f"data.sources=[{other}]") == 1
    assert f"{workdir / 'prepared'} was prepared with other settings" in capsys.readouterr().err
    assert resume(f"data.sources=[{other}]", f"train.data_dir={tmp_path / 'fresh'}") == 1
    err = capsys.readouterr().err
    assert "of a run with another config" in err and "data.sources: [" in err
    assert (workdir / "config.yaml").read_bytes() == saved


def _stopped_generic_run(tmp_path, tiny_config, save_tiny_tokenizer, capsys, records: Path) -> Path:
    """The workdir of a 4-step run on the generic `records` with the tiny tokenizer saved in tmp_path/tok,
    its last checkpoint removed (stopped before its last step); capsys is read empty."""
    raw = tiny_config(None, tmp_path / "run")
    raw["model"]["overrides"]["vocab_size"] = 704  # the tokenizer has 700 ids
    raw["data"].update(
        format="generic",
        template="plain",
        sources=[str(records)],
        tokenizer=str(save_tiny_tokenizer(tmp_path / "tok")),
    )
    raw["data"]["batching"].update(seq_len_with=160, seq_len_without=96, rows_per_batch=4)
    raw["train"].update(max_steps=4, data_dir=None)
    raw["checkpoint"].update(every_steps=2, keep=3, async_save=False)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", str(config)]) == 0, capsys.readouterr().err
    shutil.rmtree(workdir / "checkpoints" / "4")
    capsys.readouterr()
    return workdir


def test_a_run_resumes_after_its_tokenizer_moved_and_not_with_another_tokenizer(
    tmp_path, tiny_config, save_tiny_tokenizer, capsys
):
    """The prepared data's fingerprint holds the tokenizer's content, not its path, so preparing reuses the
    data from the same tokenizer moved; a resume naming its new place was refused all the same
    (`data.tokenizer` differed from the checkpoint's). Another tokenizer there is still refused."""
    from tests.conftest import _write_records

    _write_records(tmp_path / "records.jsonl")
    workdir = _stopped_generic_run(
        tmp_path, tiny_config, save_tiny_tokenizer, capsys, tmp_path / "records.jsonl"
    )
    (tmp_path / "tok").rename(tmp_path / "moved_tok")
    resume = lambda *overrides: cli.main(["train", "--config", str(workdir / "config.yaml"), *overrides])
    assert resume(f"data.tokenizer={tmp_path / 'moved_tok'}") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "prepared data up to date" in out and "resuming from" in out and "finished at step 4" in out

    shutil.rmtree(workdir / "checkpoints" / "4")
    save_tiny_tokenizer(tmp_path / "other_tok", vocab_size=690)
    assert resume(f"data.tokenizer={tmp_path / 'other_tok'}") == 1
    assert f"{workdir / 'prepared'} was prepared with other settings" in capsys.readouterr().err


def test_the_saved_config_records_the_workdir_the_run_used(
    tmp_path, monkeypatch, write_random_data, tiny_config, write_config
):
    path, workdir = _stopped_run(tmp_path, monkeypatch, write_random_data, tiny_config, write_config)
    assert load_config(path).train.workdir == str(tmp_path / "named_in_file")
    saved = load_config(workdir / "config.yaml")
    assert saved.train.workdir == str(workdir.absolute())
    # So the saved config alone (no --workdir) resumes this run.
    lines = []
    assert loop.train(saved, workdir, echo=lines.append).step == 3
    assert any(line.startswith(f"resuming from {workdir.absolute() / 'checkpoints' / '1'}") for line in lines)


def test_a_changed_model_shape_is_one_error_line_before_orbax_restores_anything(
    tmp_path, monkeypatch, capsys, write_random_data, tiny_config, write_config
):
    path, workdir = _stopped_run(tmp_path, monkeypatch, write_random_data, tiny_config, write_config)
    restores = []
    monkeypatch.setattr(Checkpointer, "restore", lambda self, *a, **k: restores.append(a))
    capsys.readouterr()
    argv = ["train", "--config", str(path), "--workdir", str(workdir), "model.overrides.hidden_size=64"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert "model.overrides.hidden_size: 32 -> 64" in err and restores == []


def test_a_refusal_lists_the_first_differing_keys_and_counts_the_rest(tmp_path, tiny_config):
    cfg = load_config(None, base=tiny_config(tmp_path / "data", tmp_path / "run"))
    recorded = config_to_dict(cfg)
    # Twelve differing keys a resume may not change, and allowed ones that must not be listed.
    recorded["model"]["overrides"] = {**recorded["model"]["overrides"], "hidden_size": 16, "num_layers": 1}
    recorded["optim"].update(learning_rate=1.0, weight_decay=0.5, schedule="cosine", eps=1e-6, clip_norm=9.0)
    recorded["train"].update(seed=7, max_steps=9, nonfinite="skip", max_skips=3, micro_batches=2)
    recorded["train"]["workdir"] = "/elsewhere"
    recorded["data"]["batching"].update(num_epochs=5, seq_len_with=128, rows_per_batch=4)
    recorded["logging"]["every_steps"] = 99
    recorded["mesh"]["fsdp"] = 4
    with pytest.raises(ConfigError) as refused:
        check_resumable(recorded, cfg, tmp_path / "run", 4)
    message = str(refused.value)
    assert message.count(" -> ") == MAX_LISTED and f"and {12 - MAX_LISTED} more" in message
    assert "data.batching.num_epochs: 5 -> 2" in message  # listed sorted by key: data first
    assert "train.workdir:" not in message and "logging." not in message.split("A resume may")[0]
    assert "train.micro_batches:" not in message and "train.nonfinite:" not in message
    assert "train.max_skips:" not in message
    # The same config, and one that differs only in allowed keys, may resume.
    check_resumable(config_to_dict(cfg), cfg, tmp_path / "run", 4)
    allowed = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, every_steps=99))
    check_resumable(config_to_dict(cfg), allowed, tmp_path / "run", 4)


# README ("Training resumes automatically"): the keys a resume may change, written out by hand.
README_RESUMABLE = (
    "logging.every_steps", "eval.every_steps", "eval.max_batches", "eval.generation.max_new_tokens",
    "checkpoint.keep", "mesh.fsdp", "train.workdir", "train.data_dir", "model.remat_policy",
    "model.scan_unroll", "model.cudnn_max_segments", "train.joint_forward", "train.micro_batches",
    "loss.token_chunk", "loss.vocab_chunk", "data.batching.read_threads", "data.batching.prefetch_batches",
    "train.nonfinite", "train.max_skips",
)  # fmt: skip
# What is trained, which a resume may not change (README: model, loss, optim, data, max_steps, seed, ...).
NOT_RESUMABLE = (
    "model.path", "model.overrides.hidden_size", "model.lora.rank", "loss.variant", "loss.threshold",
    "optim.learning_rate", "train.max_steps", "train.seed", "data.sources", "data.batching.seq_len_with",
    "data.batching.num_epochs", "eval.split", "logging_extra", "meshes", "model.remat_policy_x",
)  # fmt: skip


def test_a_resume_may_change_exactly_the_keys_the_readme_lists():
    """`may_change` of every key the README says a resume may change, and of none of what is trained; a key
    covers the keys below it (`mesh.fsdp` below `mesh`) but not a key it is only the start of (`meshes`)."""
    from nextquill_jax.train.resume import covered, may_change

    assert [key for key in README_RESUMABLE if not may_change(key)] == []
    assert [key for key in NOT_RESUMABLE if may_change(key)] == []
    assert covered("model.lora", ["model.lora"]) and covered("model.lora.rank", ["model.lora"])
    assert not covered("model.lora_rank", ["model.lora"]) and not covered("model", ["model.lora"])


def test_config_changes_lists_each_differing_leaf_sorted_by_key():
    """Every differing leaf, the recorded value first, sorted by dotted key (twelve keys given in reverse
    order); a leaf only one side has, an empty mapping included, against `<absent>`; a tuple equals its list.
    Written out by hand."""
    from nextquill_jax.train.resume import config_changes

    names = [f"k{i:02d}" for i in reversed(range(12))]
    recorded = {"s": {name: 0 for name in names}, "t": {"empty": {}, "pair": [1, 2], "same": "x"}}
    current = {"s": {name: 1 for name in names}, "t": {"pair": (1, 2), "same": "x", "new": None}}
    want = [(f"s.k{i:02d}", 0, 1) for i in range(12)]
    want += [("t.empty", {}, "<absent>"), ("t.new", "<absent>", None)]
    assert config_changes(recorded, current, ignore=lambda _: False) == want


def test_only_path_fields_compare_as_files_and_only_absolute_lists_of_the_same_length():
    """`_same` reads a value as files only for a path field (`PATH_FIELDS`), as absolute paths, one for one:
    another count of record files, relative spellings (which name files of whatever directory a command runs
    from) and a non-path list of path-like text all differ."""
    from nextquill_jax.train.resume import config_changes

    recorded = {"data": {"sources": ["/d/a.jsonl"], "meta": ["rel/m.jsonl"], "tokenizer": "tok"},
                "optim": {"trainable": ["/x/../y"]}}  # fmt: skip
    two = ["/d/a.jsonl", "/d/b.jsonl"]
    current = {"data": {"sources": two, "meta": ["./rel/m.jsonl"], "tokenizer": "./tok"},
               "optim": {"trainable": ["/y"]}}  # fmt: skip
    assert [key for key, *_ in config_changes(recorded, current)] == [
        "data.meta", "data.sources", "data.tokenizer", "optim.trainable"
    ]  # fmt: skip
    same = {"data": {"sources": ["/d/./a.jsonl"], "meta": ["rel/m.jsonl"], "tokenizer": "tok"},
            "optim": {"trainable": ["/x/../y"]}}  # fmt: skip
    assert config_changes(recorded, same) == []


def test_listed_changes_counts_only_the_changes_past_the_limit_and_writes_absent_bare():
    """`MAX_LISTED` changes are all listed with no count; one more is counted (" and 1 more"); `<absent>`
    is written as it is, other values as JSON. Expected strings written out by hand."""
    from nextquill_jax.train.resume import listed_changes

    changes = [(f"k{i}", i, [i]) for i in range(MAX_LISTED)]
    assert listed_changes(changes) == "; ".join(f"k{i}: {i} -> [{i}]" for i in range(MAX_LISTED))
    assert listed_changes([*changes, ("z", "a", "b")]).endswith(f"k{MAX_LISTED - 1}: 9 -> [9] and 1 more")
    assert (
        listed_changes([("a", "<absent>", "x"), ("b", None, "<absent>")])
        == 'a: <absent> -> "x"; b: null -> <absent>'
    )


def test_a_data_input_may_name_other_files_only_where_the_data_was_reused(tmp_path, tiny_config):
    """`data.sources`, `data.meta`, `data.template` and `data.tokenizer` may differ where preparing reused the
    data from the files the config names (`data_reused`), and are refused otherwise."""
    cfg = load_config(None, base=tiny_config(tmp_path / "data", tmp_path / "run"))
    moved = {
        "sources": ["/old/a.jsonl"],
        "meta": ["/old/m.jsonl"],
        "template": "/old/t.yaml",
        "tokenizer": "/old/t",
    }
    for key, value in moved.items():
        recorded = config_to_dict(cfg)
        recorded["data"][key] = value
        check_resumable(recorded, cfg, tmp_path / "run", 4, data_reused=True)
        with pytest.raises(ConfigError, match=rf"data\.{key}: "):
            check_resumable(recorded, cfg, tmp_path / "run", 4)


def test_a_recorded_config_this_version_cannot_read_is_compared_as_it_was_saved(tmp_path, tiny_config):
    """`normalised` returns a saved config the schema no longer reads (a key it dropped) as saved, so that
    the comparison lists the extra key instead of failing."""
    from nextquill_jax.train.resume import config_changes, normalised

    current = config_to_dict(load_config(None, base=tiny_config(tmp_path / "data", tmp_path / "run")))
    recorded = {**current, "optim": {**current["optim"], "dropped_key": 1}}
    assert normalised(recorded) == recorded
    assert config_changes(normalised(recorded), current) == [("optim.dropped_key", 1, "<absent>")]


def test_a_moved_workdir_resumes_where_its_config_yaml_is_not_where_it_was(trained_run, tmp_path, capsys):
    """Its config.yaml records the old absolute workdir; training there would have started a new run from
    step 0 (or continued the original, had it still existed)."""
    moved = tmp_path / "moved"
    shutil.copytree(trained_run.workdir, moved)
    before = sorted(p.name for p in (trained_run.workdir / "checkpoints").iterdir())
    assert cli.main(["train", "--config", str(moved / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert (
        f"note: {moved / 'config.yaml'} is the config of the run in {moved}, which records its workdir as "
        f"{trained_run.workdir} (moved or copied): it resumes in {moved}"
    ) in out
    assert f"{moved} already finished at step 2 of 2: nothing to train" in out
    assert sorted(p.name for p in (trained_run.workdir / "checkpoints").iterdir()) == before


def test_a_workdir_reached_through_a_symbolic_link_has_not_moved(trained_run, tmp_path, capsys):
    """`train --config link/config.yaml`, `link` a symbolic link to the run's own workdir: the run resumes
    there with no note that it was moved or copied (it said it was)."""
    from nextquill_jax.train.setup import resolve_workdir

    link = tmp_path / "link"
    link.symlink_to(trained_run.workdir)
    said = []
    cfg = load_config(link / "config.yaml")
    assert resolve_workdir(cfg, None, link / "config.yaml", said.append) == link
    assert said == []
    moved = shutil.copytree(trained_run.workdir, tmp_path / "moved")
    assert resolve_workdir(cfg, None, moved / "config.yaml", said.append) == moved
    assert len(said) == 1 and "(moved or copied)" in said[0]


def test_a_workdirs_config_that_records_no_workdir_resumes_where_it_is(tmp_path, tiny_config, write_config):
    """A run's config.yaml whose train.workdir was emptied by hand (null): `--config that/config.yaml` is
    still that run, said as for a moved one (the comparison with the recorded path used to be a TypeError)."""
    from nextquill_jax.train.setup import resolve_workdir

    home = tmp_path / "run"
    (home / "checkpoints").mkdir(parents=True)
    raw = tiny_config(tmp_path / "data", tmp_path / "elsewhere")
    raw["train"]["workdir"] = None
    path = write_config(raw, home / "config.yaml")
    said = []
    assert resolve_workdir(load_config(path), None, path, said.append) == home
    assert len(said) == 1 and said[0].startswith(f"note: {path} is the config of the run in {home}"), said


def _saved_with(workdir, **sections) -> None:
    """Update `sections` of `workdir`'s config.yaml and of its checkpoint 2's saved config (re-hashed in its
    manifest): the records of a run with those settings."""
    from nextquill_jax.train.checkpoint import MANIFEST, write_manifest

    saved = workdir / "checkpoints" / "2" / "config" / "metadata"
    for path, read, write in (
        (workdir / "config.yaml", yaml.safe_load, lambda c: yaml.safe_dump(c, sort_keys=False)),
        (saved, json.loads, json.dumps),
    ):
        cfg = read(path.read_text())
        for name, values in sections.items():
            cfg[name].update(values)
        path.write_text(write(cfg))
    (saved.parents[1] / MANIFEST).unlink()  # else listed in the new one
    write_manifest(saved.parents[1])


def test_a_run_records_its_relative_paths_absolute_so_its_config_yaml_resumes_it_from_anywhere(
    trained_run, tmp_path, monkeypatch, capsys
):
    """Paths in a config are the current directory's. A run started in `a` with relative sources, tokenizer
    and data_dir records them joined to `a`, so `train --config a/wd/config.yaml` from `b` is the same run on
    the same data, reused (not prepared again into `b/prep`, as when config.yaml kept them relative), and
    writes nothing in `b`. A record of an earlier version, relative, still resumes from `a`."""
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    shutil.copytree(trained_run.workdir, a / "wd")
    (a / "wd" / "prepared").rename(a / "prep")
    recorded = yaml.safe_load((a / "wd" / "config.yaml").read_text())["data"]
    relative = {
        "data": {
            "sources": [os.path.relpath(recorded["sources"][0], a)],
            "tokenizer": os.path.relpath(recorded["tokenizer"], a),
        },
        "train": {"data_dir": "prep"},
    }
    absolute = {
        "data": {
            "sources": [str(a / relative["data"]["sources"][0])],
            "tokenizer": str(a / relative["data"]["tokenizer"]),
        },
        "train": {"data_dir": str(a / "prep")},
    }
    # The checkpoint as this version records a run started in `a` with the relative config.
    _saved_with(a / "wd", **absolute)
    raw = yaml.safe_load((a / "wd" / "config.yaml").read_text())
    for name, values in relative.items():
        raw[name].update(values)
    (a / "run.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    summary = (a / "prep" / "summary.json").read_bytes()
    reused = f"{a / 'prep'}: prepared data up to date"

    monkeypatch.chdir(a)
    capsys.readouterr()
    assert cli.main(["train", "--config", "run.yaml", "--workdir", "wd"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "already finished at step 2 of 2" in out and reused in out
    saved = yaml.safe_load((a / "wd" / "config.yaml").read_text())
    assert {name: {k: saved[name][k] for k in values} for name, values in absolute.items()} == absolute

    monkeypatch.chdir(b)
    assert cli.main(["train", "--config", str(a / "wd" / "config.yaml")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "already finished at step 2 of 2" in out and reused in out
    assert list(b.iterdir()) == [] and (a / "prep" / "summary.json").read_bytes() == summary

    _saved_with(a / "wd", **relative)  # as an earlier version recorded the run
    monkeypatch.chdir(a)
    assert cli.main(["train", "--config", "wd/config.yaml"]) == 0, capsys.readouterr().err
    assert "already finished at step 2 of 2" in capsys.readouterr().out
