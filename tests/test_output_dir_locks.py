"""One `demo` per --out and one `compare` per compare.out (`demo.run.LOCK`, `eval.compare.LOCK`, both
`train.workdir_lock`): a second one, started while another holds the directory's lock, exits 1 with one
`error:` line naming the directory, the holder and the fix, and leaves every file there as it was (the runs
a demo would delete, the record a comparison would unlink, the running one's third-party log); the lock is
held while the command works, released when it ends, and independent of the `train.lock` its trainings take
below. Nothing is trained or compiled: each command is stopped where its work would start."""

from __future__ import annotations

import json
import logging
import os
import socket

import jax
import pytest
import yaml

from nextquill_jax import cli
from nextquill_jax.data.sources import synth
from nextquill_jax.demo import run as demo_run
from nextquill_jax.eval import compare, compare_file, compare_record
from nextquill_jax.train import loop, setup
from nextquill_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError


class PastTheLockError(Exception):
    """Raised where the command's work would start: it got past its lock."""


PRE_LOCK_RECORD = "a third-party record logged while the config loads, before the lock"


def _logging(load):
    """`load`, logging a third-party record first (as JAX's start-up does while a command sets up), so a
    refused command has a record it could wrongly append to the holder's log."""

    def logged(*args, **kwargs):
        logging.getLogger("jax._src.xla_bridge").info(PRE_LOCK_RECORD)
        return load(*args, **kwargs)

    return logged


@pytest.fixture
def hold(programs):
    """`hold(directory, file_name)`: a subprocess holding that lock file (programs/hold_workdir_lock.py);
    returns its pid. Killed at the end of the test."""
    procs = []

    def start(directory, file_name):
        proc = programs.start("hold_workdir_lock.py", directory, "--file", file_name)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.startswith("RESULT "), (line, proc.stderr.read() if proc.poll() is not None else "")
        return json.loads(line[len("RESULT ") :])["pid"]

    yield start
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=30)


def _listing(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _a_running_demos_out(out):
    """Files a running demo has in --out: the runs a new demo deletes first, its data and its log."""
    files = {
        "runs/base/checkpoints/1/x": "the base's checkpoint\n",
        "seed0/context_sft/checkpoints/1/x": "a variant's checkpoint\n",
        "seed0/context_sft/compare_done.json": '{"variant": "context_sft"}\n',
        "base/config.json": "{}\n",
        "data/synthetic.jsonl": '{"user_id": "u0"}\n',
        "logs/third_party.log": "2026-01-01 00:00:00,000 INFO absl: the running demo's own line\n",
    }
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)


def _assert_refused(err, out, lock_file, pid, fix):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        f"error: {out} is in use by another `{lock_file.split('.')[0]}` (pid {pid} on host "
        f"{socket.gethostname()}, since "
    ), err
    assert f"; lock {out / lock_file}): " in err, err
    assert f"Fix: wait for that run to end, or stop it (`kill {pid}` on {socket.gethostname()}: " in err, err
    assert err.endswith(f"), or {fix}.\n"), err


def test_a_second_demo_on_a_locked_out_is_refused_and_deletes_or_writes_nothing(
    tmp_path, hold, monkeypatch, capsys
):
    out = tmp_path / "demo_out"
    _a_running_demos_out(out)
    pid = hold(out, demo_run.LOCK.file_name)
    before = _listing(out)
    assert out / "demo.lock" in [out / p for p in before]  # the holder's record, part of what must stay

    def generate(*args, **kwargs):
        raise PastTheLockError

    monkeypatch.setattr(synth, "generate_synthetic", generate)  # without the lock: the runs deleted by now
    monkeypatch.setattr(demo_run, "load_demo_config", _logging(demo_run.load_demo_config))
    status = cli.main(["demo", "--quick", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1
    _assert_refused(err, out, "demo.lock", pid, "use another --out")
    assert _listing(out) == before
    assert (out / "runs/base/checkpoints/1/x").read_text() == "the base's checkpoint\n"


def test_a_demo_holds_its_out_lock_while_it_works_and_releases_it_when_it_ends(tmp_path, monkeypatch):
    out = tmp_path / "demo_out"
    _a_running_demos_out(out)  # now an earlier, finished demo's: its runs are deleted, as before
    left = []

    def generate(*args, **kwargs):  # the demo's first work after deleting its earlier runs
        left.append([run for run in ("runs/base", "seed0/context_sft", "base") if (out / run).exists()])
        with pytest.raises(WorkdirLockedError):
            WorkdirLock(out, demo_run.LOCK).acquire(0, echo=lambda _: None)
        assert json.loads((out / "demo.lock").read_text())["pid"] == os.getpid()
        # The base's training will lock its own workdir below --out: another file, free under the demo's.
        base = WorkdirLock(out / "runs" / "base")
        assert base.acquire(0, echo=lambda _: None)
        base.release()
        raise PastTheLockError

    monkeypatch.setattr(synth, "generate_synthetic", generate)
    with pytest.raises(PastTheLockError):
        cli.main(["demo", "--quick", "--out", str(out)])
    assert left == [[]]  # it got there, having deleted the earlier runs
    again = WorkdirLock(out, demo_run.LOCK)
    assert again.acquire(0, echo=lambda _: None)
    again.release()


def _compare_file(tmp_path, tiny_config, write_random_data):
    """A compare file with a trained variant `a` (first) and an untrained one `b`, in `tmp_path / "out"`."""
    base = tiny_config(write_random_data(tmp_path / "data", train=8, val=8), tmp_path / "unused")
    file = tmp_path / "c.yaml"
    variants = {"a": {}, "b": {"train": False}}
    compare_section = {"out": str(tmp_path / "out"), "baseline": "a", "split": "val"}
    file.write_text(yaml.safe_dump({"compare": compare_section, "variants": variants, "base": base}))
    return file


def _a_running_comparisons_out(out):
    """Files a running comparison has in compare.out: a run's checkpoint, the record (without settings, as
    an older version wrote it) that a comparison unlinks before running that run again, its log and table."""
    files = {
        "seed0/a/checkpoints/1/x": "a's checkpoint\n",
        f"seed0/a/{compare_record.DONE_FILE}": '{"variant": "a"}\n',
        "logs/third_party.log": "2026-01-01 00:00:00,000 INFO absl: the running comparison's own line\n",
        "results.md": "the running comparison's table\n",
    }
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)


def test_a_second_compare_on_a_locked_out_is_refused_and_writes_nothing(
    tmp_path, hold, monkeypatch, capsys, tiny_config, write_random_data
):
    file = _compare_file(tmp_path, tiny_config, write_random_data)
    out = tmp_path / "out"
    _a_running_comparisons_out(out)
    pid = hold(out, compare.LOCK.file_name)
    before = _listing(out)

    def train(*args, **kwargs):
        raise PastTheLockError

    monkeypatch.setattr(loop, "train", train)  # without the lock: a's record unlinked by now
    monkeypatch.setattr(compare_file, "load_comparison", _logging(compare_file.load_comparison))
    status = cli.main(["compare", "--config", str(file)])
    err = capsys.readouterr().err
    assert status == 1
    _assert_refused(err, out, "compare.lock", pid, "set another compare.out")
    assert _listing(out) == before
    # Another process of a multi-process comparison neither takes process 0's lock nor is refused by it.
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(PastTheLockError):
        compare.run_comparison(compare_file.load_comparison(file), echo=lambda _: None)


def test_a_compare_holds_its_out_lock_beside_its_trainings_and_releases_it_when_it_ends(
    tmp_path, monkeypatch, tiny_config, write_random_data
):
    """The real training set-up of the first run takes `train.lock` in `<out>/seed0/a` under compare's
    lock; it is stopped at its data preparation, the first thing it does past its own lock."""
    file = _compare_file(tmp_path, tiny_config, write_random_data)
    out, workdir = tmp_path / "out", tmp_path / "out" / "seed0" / "a"
    held = []

    def prepared_data(*args, **kwargs):
        for lock in (WorkdirLock(out, compare.LOCK), WorkdirLock(workdir)):
            with pytest.raises(WorkdirLockedError):
                lock.acquire(0, echo=lambda _: None)
            held.append(json.loads(lock.path.read_text())["pid"])
        raise PastTheLockError

    monkeypatch.setattr(setup, "prepared_data", prepared_data)
    with pytest.raises(PastTheLockError):
        compare.run_comparison(compare_file.load_comparison(file), echo=lambda _: None)
    assert held == [os.getpid(), os.getpid()]
    for lock in (WorkdirLock(out, compare.LOCK), WorkdirLock(workdir)):
        assert lock.acquire(0, echo=lambda _: None)
        lock.release()
