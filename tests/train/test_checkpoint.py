"""Checkpoint retention (the last K plus the best by an eval metric); restoring state and data position;
manifests and verification (damaged and incomplete steps skipped), `checkpoint verify`'s exit status; a full
disk during a save."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading

import grain
import jax
import numpy as np
import pytest

from nextquill_jax.config import CheckpointConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.checksums import IntegrityError
from nextquill_jax.train.checkpoint import Checkpointer, CheckpointSaveError, moved_aside, verify_error


def test_keeps_the_last_k_plus_the_best_and_restores_the_data_position(tmp_path):
    cfg = CheckpointConfig(keep=2, best_metric="eval/loss", best_mode="min", async_save=False)
    ckpt = Checkpointer(tmp_path, cfg)
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    eval_losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: None, 5: 3.0, 6: None}  # None: no evaluation at that step
    for step, loss in eval_losses.items():
        for _ in range(step):
            next(data)  # after saving step s, the next element is 1 + 2 + ... + s
        metrics = {} if loss is None else {"eval/loss": loss}
        state = {"w": np.full((3,), step, np.float32)}
        ckpt.save(step, state, data, config={"x": 1}, progress={"step": step}, metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]  # the last two, plus step 2 with the lowest eval/loss

    fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=device)}
    state, progress = ckpt.restore(2, abstract, fresh)
    np.testing.assert_array_equal(np.asarray(state["w"]), [2, 2, 2])
    assert progress == {"step": 2, "manifest": True} and next(fresh) == 1 + 2
    assert ckpt.read_config(5) == {"x": 1}
    ckpt.close()


def _save_losses(ckpt: Checkpointer, eval_losses: dict[int, float | None]) -> None:
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step, loss in eval_losses.items():
        metrics = {} if loss is None else {"eval/loss": loss}
        state = {"w": np.full((3,), step, np.float32)}
        ckpt.save(step, state, data, config={"x": 1}, progress={"step": step}, metrics=metrics)
    ckpt.wait()


def test_a_garbled_metrics_file_of_an_old_step_is_that_steps_damage_not_a_crash_of_every_reader(tmp_path):
    """Orbax reads each step's metrics when a manager is built: a garbled `1/metrics/metrics` (a step the
    best metric keeps) failed every reader and writer with a JSON traceback. Now the manifest check names
    it: a reader lists both steps, uses step 3 and refuses step 1 naming the file; a writer is built too and
    finds step 1 damaged."""
    cfg = CheckpointConfig(keep=1, best_metric="eval/loss", best_mode="min", async_save=False)
    ckpt = Checkpointer(tmp_path, cfg)
    _save_losses(ckpt, {1: 1.0, 2: 5.0, 3: 4.0})
    assert ckpt.all_steps() == [1, 3]
    ckpt.close()
    garbled = tmp_path / "1" / "metrics" / "metrics"
    garbled.write_text("xx{")

    reader = Checkpointer(tmp_path, cfg, read_only=True)
    assert reader.all_steps() == [1, 3] and reader.newest_verified() == 3
    with pytest.raises(IntegrityError, match=f"{tmp_path / '1'} is damaged and not restorable: {garbled}"):
        reader.require_verified(1)
    reader.close()
    writer = Checkpointer(tmp_path, cfg)
    assert writer.check(1).status == "failed"
    writer.close()


def test_the_best_checkpoint_survives_a_resume_and_its_metric_is_in_the_manifest(tmp_path):
    cfg = CheckpointConfig(keep=1, best_metric="eval/loss", best_mode="min", async_save=False)
    ckpt = Checkpointer(tmp_path, cfg)
    _save_losses(ckpt, {1: 5.0, 2: 1.0, 3: 3.0, 4: 4.0})
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()

    resumed = Checkpointer(tmp_path, cfg)  # a new process: the metrics come from disk, not memory
    _save_losses(resumed, {5: 6.0, 6: None})
    assert resumed.all_steps() == [2, 6]  # step 2 (eval/loss 1.0) is still the best; 6 is the last
    assert json.loads((tmp_path / "2" / "metrics" / "metrics").read_text()) == {"eval/loss": 1.0}
    assert "metrics/metrics" in json.loads((tmp_path / "6" / "manifest.json").read_text())["files"]
    assert [resumed.check(s).status for s in (2, 6)] == ["ok", "ok"] and resumed.newest_verified() == 6
    resumed.close()

    resumed = Checkpointer(tmp_path, CheckpointConfig(keep=1, best_metric="eval/loss", best_mode="max"))
    _save_losses(resumed, {7: 2.0})
    assert resumed.all_steps() == [7]  # the best by the new mode: 2.0 beats 1.0 and the empty metrics
    resumed.close()


def test_steps_saved_without_a_metrics_item_are_kept_since_which_was_best_is_unknown(tmp_path):
    # best_metric unset writes no `metrics` item: the layout of every step saved before it was recorded
    before = Checkpointer(tmp_path, CheckpointConfig(keep=3, best_metric=None))
    _save_losses(before, {1: 5.0, 2: 1.0, 3: 3.0})
    before.close()
    assert not (tmp_path / "2" / "metrics").exists()
    resumed = Checkpointer(tmp_path, CheckpointConfig(keep=1, best_metric="eval/loss", best_mode="min"))
    _save_losses(resumed, {4: 4.0, 5: 6.0, 6: 7.0})
    assert resumed.all_steps() == [1, 2, 3, 4, 6]  # 4 is the best recorded, 6 the last; 5 goes
    resumed.close()


def test_a_read_only_checkpointer_logs_no_warnings_and_reads_progress(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt.save(1, {"w": np.zeros(2, np.float32)}, data, config={"x": 1}, progress={"step": 1, "base": None})
    ckpt.close()
    with caplog.at_level("WARNING"):
        reader = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    assert [r.getMessage() for r in caplog.records if "read only" in r.getMessage().lower()] == []
    assert reader.read_progress(1) == {"step": 1, "base": None, "manifest": True}
    assert reader.read_config(1) == {"x": 1}
    reader.close()


def _save_steps(ckpt: Checkpointer, steps, size: int = 64) -> None:
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in steps:
        next(data)
        state = {"w": np.arange(size, dtype=np.float32) * step}
        ckpt.save(step, state, data, config={"x": 1}, progress={"step": step})
    ckpt.wait()


def _as_saved_before_manifests(step_dir) -> None:
    """Make `step_dir` as an older version saved it: no manifest, nor its record in the progress item."""
    (step_dir / "manifest.json").unlink()
    progress = step_dir / "progress" / "metadata"
    saved = json.loads(progress.read_text())
    assert saved.pop("manifest") is True  # the layout `check_step` reads
    progress.write_text(json.dumps(saved))


def _largest_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_every_step_carries_a_manifest_of_its_files_with_independent_checksums(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1, 2])
    step_dir = tmp_path / "2"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["algorithm"] == "blake2b-128"
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
    # Orbax rewrites its step metadata and adds a commit marker after the rename; every other file is listed.
    assert set(manifest["files"]) == on_disk - {"manifest.json", "commit_success.txt", "_CHECKPOINT_METADATA"}
    assert any(name.startswith("state/") for name in manifest["files"])
    for name, entry in manifest["files"].items():
        raw = (step_dir / name).read_bytes()
        assert entry == {"size": len(raw), "blake2b": hashlib.blake2b(raw, digest_size=16).hexdigest()}, name
    assert ckpt.check(2).status == "ok" and ckpt.newest_verified() == 2
    ckpt.close()


def test_a_damaged_step_is_reported_by_file_and_the_newest_verified_step_is_used(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1, 2, 3])
    damaged = _largest_file(tmp_path / "3")
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    (tmp_path / "2" / "progress" / "metadata").unlink()
    ckpt.close()

    reader = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    lines = []
    assert reader.newest_verified(lines.append) == 1
    assert lines[0].startswith(f"checkpoint {tmp_path / '3'} is damaged and not restorable: {damaged}: ")
    assert "blake2b-128 checksum" in lines[0] and lines[0].endswith("trying the previous checkpoint")
    assert f"{tmp_path / '2' / 'progress' / 'metadata'}: missing" in lines[1]
    with pytest.raises(
        IntegrityError, match=f"{tmp_path / '3'} is damaged and not restorable: {damaged}"
    ) as e:
        reader.require_verified(3)
    assert str(e.value).endswith("Fix: choose another step (the other complete ones: [1, 2]).")  # not 3
    assert reader.all_steps() == [1, 2, 3]  # a reader moves nothing
    reader.close()

    writer = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    assert writer.newest_verified(lambda _: None) == 1
    assert (
        writer.all_steps() == [1] and (tmp_path / "3.corrupt").is_dir() and (tmp_path / "2.corrupt").is_dir()
    )
    _save_steps(writer, [2])  # the step is saved afresh when the run reaches it again
    assert writer.newest_verified() == 2
    writer.close()


def test_a_file_that_cannot_be_read_is_damage_of_its_step_not_a_crash_of_every_reader(
    tmp_path, monkeypatch, capsys
):
    """A failing disk's read error (EIO) or a permission on one file: its step fails verification naming the
    file (verify's table, a resume's fallback), like a checksum mismatch; so does an unreadable manifest.
    (The tests run as root, which reads a chmod 000 file: the errors are raised where the files are read.)"""
    from nextquill_jax.cli import main
    from nextquill_jax.data import checksums

    ckpts = tmp_path / "checkpoints"
    ckpt = Checkpointer(ckpts, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1, 2, 3])
    ckpt.close()
    bad_disk, manifest_3 = _largest_file(ckpts / "2"), ckpts / "3" / "manifest.json"
    digest, read_text = checksums.file_digest, type(manifest_3).read_text

    def failing_digest(path):
        if path == bad_disk:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return digest(path)

    def failing_read_text(path, *args, **kwargs):
        if path == manifest_3:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(checksums, "file_digest", failing_digest)
    monkeypatch.setattr(type(manifest_3), "read_text", failing_read_text)
    capsys.readouterr()
    assert main(["checkpoint", "verify", "--workdir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    rows = out.splitlines()[2:]
    assert rows[0].startswith("| 1 | ok | ")
    assert rows[1].startswith("| 2 | failed | ") and f"{bad_disk}: unreadable (Input/output error)" in rows[1]
    assert rows[2].startswith(f"| 3 | failed | 0 | 0.0 | {manifest_3}: unreadable (Permission denied)")
    assert err.startswith(f"error: damaged or incomplete: {ckpts / '2'}, {ckpts / '3'} (see the table).")

    reader = Checkpointer(ckpts, CheckpointConfig(), read_only=True)
    lines = []
    assert reader.newest_verified(lines.append) == 1
    damaged = "is damaged and not restorable:"
    assert lines[0].startswith(f"checkpoint {ckpts / '3'} {damaged} {manifest_3}: unreadable (Permission")
    assert lines[1].startswith(f"checkpoint {ckpts / '2'} {damaged} {bad_disk}: unreadable (Input/output")
    reader.close()


def test_a_step_damaged_again_is_moved_aside_beside_its_earlier_damaged_copy_never_over_it(tmp_path):
    """Moving a damaged step aside deleted an earlier `<step>.corrupt` of the same step, silently: a copy that
    may hold what is to be recovered. The next goes to `<step>.corrupt.1`, and so on, and `moved_aside`
    (which `checkpoint verify` and a refused start name) lists them all, by step and then in order."""
    writer = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(writer, [1, 2])
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    kept = {}
    for aside in ("2.corrupt", "2.corrupt.1", "2.corrupt.2"):
        damaged = _largest_file(tmp_path / "2")
        raw = bytearray(damaged.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        damaged.write_bytes(bytes(raw))
        lines = []
        assert writer.newest_verified(lines.append) == 1
        assert lines[0].endswith(f"(moved aside to {tmp_path / aside}); trying the previous checkpoint")
        kept[aside] = files(tmp_path / aside)
        assert {name: files(tmp_path / name) for name in kept} == kept  # the earlier copies untouched
        _save_steps(writer, [2])  # the run reaches step 2 again
    writer.close()
    (tmp_path / "2.corrupt.10").mkdir()
    (tmp_path / "10.corrupt").mkdir()
    (tmp_path / "2.corrupt.old").mkdir()  # not a name a resume gives
    names = ["2.corrupt", "2.corrupt.1", "2.corrupt.2", "2.corrupt.10", "10.corrupt"]
    assert moved_aside(tmp_path) == [tmp_path / name for name in names]


def test_a_step_lacking_items_is_damaged_and_only_one_with_every_item_is_used_without_a_manifest(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1, 2])
    ckpt.close()
    for step in (1, 2):  # as saved before manifests existed: every item is there
        _as_saved_before_manifests(tmp_path / str(step))
    shutil.copytree(tmp_path / "2" / "state", tmp_path / "3" / "state")  # a copy that stopped part-way
    (tmp_path / "3" / "config").mkdir()
    (tmp_path / "4").mkdir()  # `mkdir -p checkpoints/4` and nothing copied into it

    reader = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    lines = []
    assert reader.newest_verified(lines.append) == 2
    assert len(lines) == 3, lines
    missing = "; ".join(
        f"{tmp_path / '4' / item}: missing" for item in ("state", "data", "config", "progress")
    )
    assert lines[0] == (
        f"checkpoint {tmp_path / '4'} is damaged and not restorable: {tmp_path / '4' / 'manifest.json'}: "
        f"missing; {missing}; trying the previous checkpoint"
    )
    step3 = tmp_path / "3"
    assert f"{step3 / 'data'}: missing; {step3 / 'config'}: empty; {step3 / 'progress'}: missing;" in lines[1]
    assert f"{step3 / 'state'}:" not in lines[1]
    assert lines[2].startswith(f"warning: checkpoint {tmp_path / '2'} has no manifest.json")
    assert reader.read_config(2) == {"x": 1}  # what evaluation reads first
    with pytest.raises(IntegrityError, match=f"{tmp_path / '3'} is damaged and not restorable: "):
        reader.require_verified(3)
    assert reader.all_steps() == [1, 2, 3, 4]  # a reader moves nothing
    reader.close()

    writer = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    assert writer.newest_verified(lambda _: None) == 2
    assert writer.all_steps() == [1, 2]
    assert (tmp_path / "3.corrupt" / "state").is_dir() and (tmp_path / "4.corrupt").is_dir()
    writer.close()


def test_a_step_that_lost_its_manifest_while_an_older_step_has_one_is_damaged(tmp_path, capsys):
    from nextquill_jax.cli import main

    ckpts = tmp_path / "checkpoints"
    ckpt = Checkpointer(ckpts, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1, 2, 3])
    ckpt.close()
    (ckpts / "3" / "manifest.json").unlink()
    flipped = _largest_file(ckpts / "3")
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    _as_saved_before_manifests(ckpts / "1")  # the oldest: nothing older shows it had one

    reader = Checkpointer(ckpts, CheckpointConfig(), read_only=True)
    lines = []
    assert reader.newest_verified(lines.append) == 2
    assert lines == [
        f"checkpoint {ckpts / '3'} is damaged and not restorable: {ckpts / '3' / 'manifest.json'}: missing, "
        f"though the older {ckpts / '2' / 'manifest.json'} shows the run saves manifests; trying the "
        "previous checkpoint"
    ]
    assert [reader.check(s).status for s in (1, 2, 3)] == ["no manifest", "ok", "failed"]
    reader.close()
    assert main(["checkpoint", "verify", "--workdir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: damaged or incomplete: {ckpts / '3'} (see the table)")


def test_a_lost_manifest_is_witnessed_by_the_newest_older_step(tmp_path):
    """Steps 1 and 2 both carry manifests and step 3 lost its own: the problem names 2's manifest, the
    newest older one (`_older_manifest`), the closest evidence that the run saved manifests when it saved
    step 3, not the oldest step's."""
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1, 2, 3])
    (tmp_path / "3" / "manifest.json").unlink()
    assert ckpt.check(3).problems == [
        f"{tmp_path / '3' / 'manifest.json'}: missing, though the older {tmp_path / '2' / 'manifest.json'} "
        "shows the run saves manifests"
    ]
    ckpt.close()


def test_a_step_saved_before_manifests_is_used_with_a_warning_beside_one_that_verifies(tmp_path):
    """`require_verified` lets a step an older version saved (no manifest, nor a record of one) through,
    but says that it is unverified; `verify_error` accepts a directory holding such a step beside one that
    verifies (nothing is damaged), and refuses only one where no step verifies."""
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1, 2])
    _as_saved_before_manifests(tmp_path / "1")
    lines = []
    ckpt.require_verified(1, lines.append)
    assert lines == [
        f"warning: checkpoint {tmp_path / '1'} has no manifest.json, nor has any older step (it may predate "
        "manifests); it is used unverified"
    ]
    checks = [ckpt.check(1), ckpt.check(2)]
    ckpt.close()
    assert [c.status for c in checks] == ["no manifest", "ok"]
    assert verify_error(tmp_path, checks, []) is None
    assert verify_error(tmp_path, checks[:1], []).startswith(
        f"no checkpoint in {tmp_path} verifies: steps [1]"
    )


def test_the_only_step_that_lost_its_manifest_is_damaged_since_its_progress_records_one(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1])
    ckpt.close()
    (tmp_path / "1" / "manifest.json").unlink()  # no older step to show the run saves manifests
    reader = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    assert reader.check(1).problems == [
        f"{tmp_path / '1' / 'manifest.json'}: missing, though its progress records a manifest: it was lost"
    ]
    lines = []
    assert reader.newest_verified(lines.append) is None
    assert lines[0].startswith(f"checkpoint {tmp_path / '1'} is damaged and not restorable: ")
    with pytest.raises(IntegrityError, match="its progress records a manifest: it was lost"):
        reader.require_verified(1)

    (tmp_path / "1" / "progress" / "metadata").write_text("{not json")  # unreadable: the rules without it
    assert reader.check(1).status == "no manifest"
    reader.close()


def test_a_step_without_a_manifest_that_cannot_be_restored_is_one_integrity_error(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1])
    ckpt.close()
    _as_saved_before_manifests(tmp_path / "1")
    shutil.rmtree(tmp_path / "1" / "state" / "d")  # the arrays; the item still holds other files
    reader = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    lines = []
    assert reader.newest_verified(lines.append) == 1
    assert lines == [
        f"warning: checkpoint {tmp_path / '1'} has no manifest.json, nor has any older step (it may predate "
        "manifests); it is used unverified"
    ]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((64,), np.float32, sharding=device)}
    with pytest.raises(IntegrityError) as failed:
        reader.restore(1, abstract, iter(grain.MapDataset.range(100).to_iter_dataset()))
    message = str(failed.value)
    assert message.startswith(f"checkpoint {tmp_path / '1'} could not be read (")
    assert message.endswith(
        "); it has no manifest.json, so its files were never checked, and it is probably damaged. Fix: "
        "no other step is complete: start the run again, or restore it from a backup."
    )
    assert "\n" not in message
    reader.close()


def test_a_manifest_that_lists_no_file_of_an_item_or_is_not_a_mapping_fails(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1])
    manifest = tmp_path / "1" / "manifest.json"
    listed = json.loads(manifest.read_text())
    listed["files"] = {k: v for k, v in listed["files"].items() if not k.startswith("data/")}
    manifest.write_text(json.dumps(listed))
    assert ckpt.check(1).problems == [f"{manifest}: lists no file of {tmp_path / '1' / 'data'}"]
    manifest.write_text('{"algorithm": "blake2b-128", "files": {}}')
    result = ckpt.check(1)
    assert result.status == "failed" and len(result.problems) == 4, result
    for body, error in (
        ('{"files": []}', "AttributeError"),
        ("[1]", "TypeError"),
        ('{"files": {"a": 3}}', "TypeError"),
    ):
        manifest.write_text(body)
        result = ckpt.check(1)
        assert result.status == "failed" and result.problems[0].startswith(f"{manifest}: unreadable ({error}")
    ckpt.close()


def test_checkpoint_verify_fails_on_an_incomplete_step_or_none_verified_and_names_steps_moved_aside(
    tmp_path, capsys
):
    from nextquill_jax.cli import main

    ckpts = tmp_path / "checkpoints"
    ckpt = Checkpointer(ckpts, CheckpointConfig(keep=3))
    _save_steps(ckpt, [4])
    ckpt.close()
    verify = ["checkpoint", "verify", "--workdir", str(tmp_path)]
    assert main(verify) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| 4 | ok | ")

    (ckpts / "6").mkdir()  # an interrupted copy
    assert main(verify) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[2].startswith("| 4 | ok | ")
    assert out.splitlines()[3].startswith(
        f"| 6 | failed | 0 | 0.0 | {ckpts / '6' / 'manifest.json'}: missing, though the older "
        f"{ckpts / '4' / 'manifest.json'} shows the run saves manifests; {ckpts / '6' / 'state'}: missing; "
    )
    assert err.startswith(f"error: damaged or incomplete: {ckpts / '6'} (see the table). Fix: restore them")
    assert len(err.splitlines()) == 1

    shutil.rmtree(ckpts / "6")
    _as_saved_before_manifests(ckpts / "4")  # usable, not verifiable
    assert main(verify) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[2] == "| 4 | no manifest | 0 | 0.0 |  |"
    assert err.startswith(f"error: no checkpoint in {ckpts} verifies: steps [4] have no manifest.json ")

    (ckpts / "4").rename(ckpts / "4.corrupt")  # as a resume moves a damaged step aside
    assert main(verify) == 1
    out, err = capsys.readouterr()
    moved = f"a resume moved the damaged {ckpts / '4.corrupt'} aside. Fix: restore"
    assert out == "" and err.startswith(f"error: {ckpts} holds no complete checkpoint: {moved}")

    ckpt = Checkpointer(ckpts, CheckpointConfig(keep=3))
    _save_steps(ckpt, [2])
    ckpt.close()
    assert main(verify) == 0
    assert capsys.readouterr().err == f"moved aside by a resume as damaged: {ckpts / '4.corrupt'}\n"


def test_checkpoint_verify_on_only_damaged_steps_gives_the_fix_a_resume_then_asks_for(tmp_path, capsys):
    # Resuming from "the newest step that verifies" is no fix when none does: a resume moves every step aside
    # and refuses to start, so verify's fix must name what that refusal asks for.
    from nextquill_jax.cli import main

    ckpts = tmp_path / "checkpoints"
    ckpt = Checkpointer(ckpts, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1, 2])
    ckpt.close()
    for step in ("1", "2"):
        (ckpts / step / "state").rename(ckpts / step / "state.lost")
    assert main(["checkpoint", "verify", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: damaged or incomplete: {ckpts / '1'}, {ckpts / '2'} (see the table), and no step verifies. "
        f"Fix: restore them from a backup (`nextquill-jax train` moves them aside and refuses to start until "
        f"they are restored), or move {ckpts} away to train the run from the start."
    )
    assert "resumes from the newest step" not in err

    resume = Checkpointer(ckpts, CheckpointConfig(keep=3))
    assert resume.newest_verified(lambda line: None) is None
    resume.close()
    assert moved_aside(ckpts) == [ckpts / "1.corrupt", ckpts / "2.corrupt"]


def test_a_save_whose_wait_was_interrupted_still_commits_with_its_manifest(tmp_path, monkeypatch):
    """A second Ctrl-C during the stop's save interrupts Orbax's wait; its next wait then returns at once
    while the commit goes on (modelled here: the save's wait raises KeyboardInterrupt before the commit, the
    next returns at once). `close` then cleared the step being saved, and the commit callback failed on
    "step None": the step stayed a temporary directory. It must commit, verified by its manifest."""
    from nextquill_jax.train import checkpoint

    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    released = threading.Event()
    write = checkpoint.write_manifest
    monkeypatch.setattr(checkpoint, "write_manifest", lambda d: released.wait(10) and write(d))
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt.save(1, {"w": np.arange(8, dtype=np.float32)}, data, config={}, progress={})  # in flight
    waits, wait = [], ckpt.manager.wait_until_finished

    def interrupted_then_at_once():
        waits.append(len(waits))
        if len(waits) == 1:  # the stop's wait for its save, interrupted
            raise KeyboardInterrupt
        if len(waits) == 2:  # `close`'s: at once, the commit going on behind it
            released.set()
        else:  # Orbax's own close
            wait()

    monkeypatch.setattr(ckpt.manager, "wait_until_finished", interrupted_then_at_once)
    with pytest.raises(KeyboardInterrupt):
        ckpt.wait()
    ckpt.close()  # the run's `finally`
    assert len(waits) == 3
    assert Checkpointer(tmp_path, CheckpointConfig(), read_only=True).check(1).status == "ok"


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_marks_nothing_complete(
    tmp_path, monkeypatch
):
    from nextquill_jax.train import checkpoint

    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    _save_steps(ckpt, [1])
    before = {p: p.read_bytes() for p in (tmp_path / "1").rglob("*") if p.is_file()}
    write = checkpoint.write_manifest

    def disk_full(step_dir):
        (step_dir / "manifest.json").write_text('{"algorithm": "blak')  # the bytes that fitted
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(step_dir / "manifest.json"))

    monkeypatch.setattr(checkpoint, "write_manifest", disk_full)
    with pytest.raises(CheckpointSaveError) as failed:
        _save_steps(ckpt, [2])
    assert str(failed.value).startswith(f"saving checkpoint 2 in {tmp_path} failed: [Errno 28] No space left")
    assert f"the newest complete one, {tmp_path / '1'}, is intact" in str(failed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # no step 2, not even a partial one
    assert ckpt.all_steps() == [1] and ckpt.newest_verified() == 1
    assert {p: p.read_bytes() for p in (tmp_path / "1").rglob("*") if p.is_file()} == before
    monkeypatch.setattr(checkpoint, "write_manifest", write)
    _save_steps(ckpt, [3])  # the disk has room again: saving goes on
    assert ckpt.all_steps() == [1, 3] and ckpt.check(3).status == "ok"
    ckpt.close()


def test_a_step_without_a_checkpoint_names_the_steps_there_and_both_ways_to_choose_one(tmp_path):
    """The fix named only the CLI's --step, also when `restore_model(workdir, step=5)` was called from
    Python: it names both. It offered damaged steps as choices and promised "the latest" for leaving the step
    out, which gives the newest verified: it marks the damaged and names that one."""
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    with pytest.raises(FileNotFoundError) as e:
        ckpt.require_verified(5)
    assert str(e.value) == (
        f"no complete checkpoint for step 5 in {tmp_path}; it holds none. Fix: train until the run saves one "
        "(checkpoint.every_steps, or the end of an epoch)."
    )
    _save_steps(ckpt, [1, 2])
    with pytest.raises(FileNotFoundError) as e:
        ckpt.require_verified(5)
    assert str(e.value) == (
        f"no complete checkpoint for step 5 in {tmp_path}; complete ones: [1, 2]. Fix: choose one of those "
        "steps (--step on the command line, step= in Python), or leave the step out for the newest "
        "verified, 2."
    )
    _save_steps(ckpt, [4])
    ckpt.close()
    for step in (2, 4):
        (tmp_path / str(step) / "progress" / "metadata").unlink()
    reader = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    with pytest.raises(FileNotFoundError) as e:
        reader.require_verified(3)
    assert str(e.value) == (
        f"no complete checkpoint for step 3 in {tmp_path}; complete ones: [1, 2, 4], damaged: [2, 4]. Fix: "
        "choose one of those steps not damaged (--step on the command line, step= in Python), or leave the "
        "step out for the newest verified, 1."
    )
    assert reader.newest_verified(lambda _: None) == 1  # what leaving the step out gives
    (tmp_path / "1" / "progress" / "metadata").unlink()
    with pytest.raises(FileNotFoundError) as e:
        reader.require_verified(3)
    assert str(e.value) == (
        f"no complete checkpoint for step 3 in {tmp_path}; complete ones: [1, 2, 4], none of which verifies "
        "(`nextquill-jax checkpoint verify` names the damage). Fix: restore them from a backup, or train the "
        "run again."
    )
    assert reader.all_steps() == [1, 2, 4]  # a reader moves nothing
    reader.close()


def test_closing_a_checkpointer_straight_away_leaves_no_orbax_thread_to_fail_at_exit(tmp_path):
    """Orbax's clean-up of temporary directories ran on past `close`: a run that failed just after building
    its checkpointer ended with a second traceback, 'cannot schedule new futures after shutdown'."""
    program = (
        "from nextquill_jax.config import CheckpointConfig\n"
        "from nextquill_jax.train.checkpoint import Checkpointer\n"
        f"Checkpointer({str(tmp_path / 'checkpoints')!r}, CheckpointConfig()).close()\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize(
    ("files", "count"),
    [
        (["process_0-of-2.json", "process_1-of-2.json"], 2),
        (["process_0-of-1.json"], 1),
        ([], None),  # no data positions saved
        (["process_0-of-1.json", "process_0-of-2.json"], None),  # disagreeing files: not known
    ],
)
def test_a_checkpoint_says_how_many_processes_saved_its_data_positions(tmp_path, files, count):
    """grain writes one `process_I-of-N.json` per process; a resume by another N cannot take them up
    (`resume.check_same_process_count`, which names both counts and the fix)."""
    from nextquill_jax.train.resume import check_same_process_count

    data = tmp_path / "7" / "data"
    data.mkdir(parents=True)
    for name in [*files, "commit_success.txt"]:
        (data / name).write_text("{}")
    assert Checkpointer(tmp_path, CheckpointConfig(), read_only=True).saved_process_count(7) == count
    check_same_process_count(count, count or 3, "ckpt/7")
    check_same_process_count(None, 3, "ckpt/7")  # not known: not checked
    if count is not None:
        with pytest.raises(ConfigError, match=rf"ckpt/7 was saved by {count} processes and this run has 5.*"):
            check_same_process_count(count, 5, "ckpt/7")


@pytest.mark.parametrize("read_only", [False, True])
def test_a_checkpointer_leaves_the_absl_loggers_level_as_it_was(tmp_path, read_only):
    """Building one set the absl logger's level to WARNING for the rest of the process (it "restored" absl's
    verbosity flag, which is not the logger's level): a library caller's absl INFO records, and the CLI's
    third-party log's, were dropped from then on. A read-only one still keeps Orbax's warnings off the
    console while it is built."""
    import logging

    from absl import logging as absl_logging

    logger = absl_logging.get_absl_logger()
    seen = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = seen.append
    previous = logger.level
    logger.setLevel(logging.INFO)  # a caller's own choice, which the Checkpointer must keep
    logger.addHandler(handler)
    try:
        Checkpointer(tmp_path / "steps", CheckpointConfig(), read_only=read_only).close()
        assert logger.level == logging.INFO
        if read_only:
            assert not [r for r in seen if r.levelno == logging.WARNING]  # "will not save" notes dropped
        seen.clear()
        absl_logging.info("after")
        assert [r.getMessage() for r in seen] == ["after"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def test_checkpoint_verify_of_a_run_without_checkpoints_gives_a_fix_it_takes(tmp_path, capsys):
    """It advised `--step 0` (the readers' hint), a flag `checkpoint verify` refuses."""
    from nextquill_jax.cli import main

    (tmp_path / "config.yaml").write_text("{}\n")
    assert main(["checkpoint", "verify", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "holds a run's config.yaml but no checkpoints" in err and "--step" not in err
    assert "Nothing to verify: train the run until it saves a checkpoint." in err
