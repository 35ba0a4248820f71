"""One `train` at a time in a workdir (train/workdir_lock.py): a second one is refused at once, before it
writes anything there (its third-party log lines included) or prepares data or builds a model; the lock dies
with its holder (SIGKILL included); only process 0 of a run takes it; a filesystem without flock trains on
unlocked, with a warning."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket

import jax
import pytest

from nextquill_jax import cli, third_party_logs
from nextquill_jax.config import load_config
from nextquill_jax.train import loop, setup, workdir_lock
from nextquill_jax.train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError


class PastTheLockError(Exception):
    """Raised where set-up goes on after the lock (data preparation): the run got past the lock step."""


@pytest.fixture
def no_set_up_past_the_lock(monkeypatch):
    """Set-up stops with `PastTheLockError` where it would first write in the workdir after locking it (data
    preparation, before any model is built): a refusal must come before that."""

    def prepared_data(*args, **kwargs):
        raise PastTheLockError

    monkeypatch.setattr(setup, "prepared_data", prepared_data)


@pytest.fixture
def holder(programs, tmp_path):
    """A subprocess holding `tmp_path / "run"`'s lock (programs/hold_workdir_lock.py): (Popen, its pid)."""
    proc = programs.start("hold_workdir_lock.py", tmp_path / "run")
    try:
        line = proc.stdout.readline()
        assert line.startswith("RESULT "), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield proc, json.loads(line[len("RESULT ") :])["pid"]
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def _listing(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _config(tmp_path, write_random_data, tiny_config, write_config):
    raw = tiny_config(write_random_data(tmp_path / "data", train=16, val=8), tmp_path / "run")
    raw["train"]["data_dir"] = str(tmp_path / "data")
    return load_config(write_config(raw, tmp_path / "cfg.yaml"))


def test_a_second_train_on_a_locked_workdir_is_refused_at_once_and_writes_nothing(
    tmp_path, holder, no_set_up_past_the_lock, write_random_data, tiny_config, write_config
):
    _, pid = holder
    workdir = tmp_path / "run"
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # as a running run's
    cfg = _config(tmp_path, write_random_data, tiny_config, write_config)
    before = _listing(workdir)
    with pytest.raises(WorkdirLockedError) as refused:
        loop.train(cfg, workdir, echo=lambda _: None)
    message = str(refused.value)
    assert message.startswith(
        f"{workdir} is in use by another `train` (pid {pid} on host {socket.gethostname()}, since "
    )
    assert f"lock {workdir / LOCK_FILE}" in message
    assert (
        f"Fix: wait for that run to end, or stop it (`kill {pid}` on " in message
        and "another --workdir" in message
    )
    assert _listing(workdir) == before


def test_a_holder_killed_by_sigkill_leaves_no_stale_lock(
    tmp_path, holder, no_set_up_past_the_lock, write_random_data, tiny_config, write_config
):
    proc, pid = holder
    workdir = tmp_path / "run"
    with pytest.raises(WorkdirLockedError):
        WorkdirLock(workdir).acquire(0, echo=lambda _: None)
    # The kernel drops the lock with the process (the file stays, naming the dead holder).
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == pid
    lock = WorkdirLock(workdir)
    try:
        assert lock.acquire(0, echo=lambda _: None)
        assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    # Now train gets past the lock, to data preparation (stopped there), and releases it on the way out.
    cfg = _config(tmp_path, write_random_data, tiny_config, write_config)
    with pytest.raises(PastTheLockError):
        loop.train(cfg, workdir, echo=lambda _: None)
    again = WorkdirLock(workdir)
    assert again.acquire(0, echo=lambda _: None)
    again.release()


def test_the_cli_prints_a_locked_workdir_as_one_error_line_with_status_1(
    tmp_path, holder, no_set_up_past_the_lock, write_random_data, tiny_config, write_config, capsys
):
    _, pid = holder
    _config(tmp_path, write_random_data, tiny_config, write_config)
    status = cli.main(["train", "--config", str(tmp_path / "cfg.yaml"), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith(f"error: {tmp_path / 'run'} is in use by another `train` (pid {pid} ")
    assert "Fix: " in err and "Traceback" not in err


PRE_LOCK_RECORD = "a third-party record logged during set-up, before the lock"


@pytest.fixture
def a_record_before_the_lock(monkeypatch):
    """Set-up logs one third-party record (as JAX's backend start-up does) in a step before the lock step,
    so that a `train` refused at the lock has a record it could wrongly append to the holder's log."""
    check = setup.check_micro_batches

    def logging_check(*args, **kwargs):
        logging.getLogger("jax._src.xla_bridge").info(PRE_LOCK_RECORD)
        return check(*args, **kwargs)

    monkeypatch.setattr(setup, "check_micro_batches", logging_check)


HOLDER_LOG = b"2026-01-01 00:00:00,000 INFO absl: the holder's own line\n"


@pytest.mark.parametrize("holder_log", [None, HOLDER_LOG], ids=["no_log_yet", "holder_log"])
def test_the_cli_refused_on_a_locked_workdir_leaves_the_holders_third_party_log_as_it_was(
    holder_log,
    tmp_path,
    holder,
    a_record_before_the_lock,
    no_set_up_past_the_lock,
    write_random_data,
    tiny_config,
    write_config,
):
    log = tmp_path / "run" / third_party_logs.LOG_FILE
    if holder_log is not None:
        log.parent.mkdir()
        log.write_bytes(holder_log)
    _config(tmp_path, write_random_data, tiny_config, write_config)
    status = cli.main(["train", "--config", str(tmp_path / "cfg.yaml"), "--workdir", str(tmp_path / "run")])
    assert status == 1
    if holder_log is None:
        assert not log.parent.exists()
    else:
        assert log.read_bytes() == holder_log


def test_the_cli_writes_the_records_held_before_the_lock_once_it_holds_it(
    tmp_path, a_record_before_the_lock, no_set_up_past_the_lock, write_random_data, tiny_config, write_config
):
    _config(tmp_path, write_random_data, tiny_config, write_config)
    with pytest.raises(PastTheLockError):
        cli.main(["train", "--config", str(tmp_path / "cfg.yaml"), "--workdir", str(tmp_path / "run")])
    log = (tmp_path / "run" / third_party_logs.LOG_FILE).read_text()
    assert f"INFO jax._src.xla_bridge: {PRE_LOCK_RECORD}\n" in log, log


def test_only_process_0_takes_the_lock(
    tmp_path, holder, no_set_up_past_the_lock, monkeypatch, write_random_data, tiny_config, write_config
):
    workdir = tmp_path / "run"
    # Another process of a multi-process run neither takes nor waits for the lock process 0 holds.
    other = WorkdirLock(workdir)
    assert other.acquire(1, echo=lambda _: None) is False and not other.held
    fresh = tmp_path / "fresh"
    assert WorkdirLock(fresh).acquire(3, echo=lambda _: None) is False
    assert not fresh.exists()
    # Through train's set-up too: as process 1, the held lock does not stop it (it goes on to the data).
    cfg = _config(tmp_path, write_random_data, tiny_config, write_config)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(PastTheLockError):
        loop.train(cfg, workdir, echo=lambda _: None)


def test_a_filesystem_without_flock_trains_on_unlocked_with_one_warning(tmp_path, monkeypatch):
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(workdir_lock.fcntl, "flock", flock)
    lines = []
    lock = WorkdirLock(tmp_path / "run")
    assert lock.acquire(0, echo=lines.append) is False and not lock.held
    assert len(lines) == 1
    assert lines[0].startswith(f"warning: cannot lock {tmp_path / 'run' / LOCK_FILE} (")
    assert "training without the workdir lock" in lines[0]


@pytest.mark.parametrize("interrupted", ["flock", "gethostname", "pwrite"])
def test_an_acquire_interrupted_by_ctrl_c_leaves_the_lock_free(tmp_path, monkeypatch, interrupted):
    """A KeyboardInterrupt inside `acquire` (during flock, or after it while the holder record is made or
    written) must not leave the lock held by a file nobody closes: in a long-lived process (a notebook) the
    next acquire, by this or another `WorkdirLock`, would be refused until the process exits."""
    modules = {"flock": workdir_lock.fcntl, "gethostname": workdir_lock.socket, "pwrite": workdir_lock.os}
    module = modules[interrupted]
    real = getattr(module, interrupted)

    def interrupt(*args):
        real(*args)  # the lock is taken (flock), or held while the holder is recorded, when the Ctrl-C lands
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(module, interrupted, interrupt)
        lock = WorkdirLock(tmp_path / "run")
        with pytest.raises(KeyboardInterrupt):
            lock.acquire(0, echo=lambda _: None)
    assert not lock.held
    again = WorkdirLock(tmp_path / "run")
    assert again.acquire(0, echo=lambda _: None) is True and again.held
    again.release()


def test_a_holder_records_itself_whole_over_a_longer_earlier_record(tmp_path):
    """The lock file outlives its holders; one that held it with a longer record (another host's name, say)
    left bytes a shorter record would not cover, and a refusal then read no holder. A second lock of the same
    workdir (another open file, as another process's) is refused naming this holder."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "h" * 300, "since": "then"}) + "\n")
    first = WorkdirLock(workdir)
    assert first.acquire(0, echo=lambda _: None)
    try:
        assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
            WorkdirLock(workdir).acquire(0, echo=lambda _: None)
    finally:
        first.release()


def _open_on(path: os.PathLike) -> int:
    """How many of this process's file descriptors are open on `path` (Linux's /proc/self/fd); other
    files, which other tests' threads may open meanwhile, are not counted."""
    fds = "/proc/self/fd"
    return sum(
        1
        for fd in os.listdir(fds)
        if os.path.islink(f"{fds}/{fd}") and os.readlink(f"{fds}/{fd}") == os.path.realpath(path)
    )


def test_acquire_again_release_and_acquire_anew_track_the_lock(tmp_path):
    """`acquire` on a lock this object holds says it holds it (True, as its docstring promises); `release`
    drops it, so another `WorkdirLock` gets it, and the first must then take it anew, not believe it still
    holds it."""
    workdir = tmp_path / "run"
    first = WorkdirLock(workdir)
    assert first.acquire(0, echo=lambda _: None) is True
    assert first.acquire(0, echo=lambda _: None) is True and first.held
    first.release()
    assert not first.held
    second = WorkdirLock(workdir)
    assert second.acquire(0, echo=lambda _: None) is True
    try:
        with pytest.raises(WorkdirLockedError):
            first.acquire(0, echo=lambda _: None)
        assert not first.held
    finally:
        second.release()
    first.release()  # a no-op when not held: no second close of a descriptor that may be another file's now


def test_a_refused_or_unlocked_acquire_leaves_no_file_open(tmp_path, monkeypatch):
    """A long-lived process (a notebook, a scheduler retrying) calling `acquire` again and again must not
    leak the lock file's descriptor each time it is refused or the filesystem refuses flock."""
    workdir = tmp_path / "run"
    holder = WorkdirLock(workdir)
    holder.acquire(0, echo=lambda _: None)
    try:
        for _ in range(5):
            with pytest.raises(WorkdirLockedError):
                WorkdirLock(workdir).acquire(0, echo=lambda _: None)
        assert _open_on(workdir / LOCK_FILE) == 1  # the holder's own
    finally:
        holder.release()

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(workdir_lock.fcntl, "flock", flock)
    for _ in range(5):
        assert WorkdirLock(workdir).acquire(0, echo=lambda _: None) is False
    assert _open_on(workdir / LOCK_FILE) == 0


@pytest.mark.parametrize(
    "record",
    [b"", b'{"pid": 12', b"[1, 2]\n", b"7\n", b"\xff\xfe"],
    ids=["empty", "cut", "list", "number", "binary"],
)
def test_a_holder_that_has_not_recorded_itself_is_named_as_such(tmp_path, record):
    """Between its flock and its write a holder's file is empty (truncated) or half-written, and a file left
    by anything else may hold any bytes: a refusal then says the holder has not recorded itself, rather than
    failing with a JSON or attribute error. The holder here is a bare flock on another open file."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    path = workdir / LOCK_FILE
    path.write_bytes(record)
    fd = os.open(path, os.O_RDWR)
    try:
        workdir_lock.fcntl.flock(fd, workdir_lock.fcntl.LOCK_EX | workdir_lock.fcntl.LOCK_NB)
        with pytest.raises(WorkdirLockedError, match="a process that has not recorded itself yet") as refused:
            WorkdirLock(workdir).acquire(0, echo=lambda _: None)
        assert "`kill" not in str(refused.value)
    finally:
        os.close(fd)


def test_a_child_process_does_not_inherit_the_lock(tmp_path):
    """flock belongs to the open file, which a child would share if it inherited the descriptor: a
    subprocess the run starts (a data tool, a shell) would then keep the workdir locked after the run
    released it or died. The descriptor is close-on-exec, so the release frees the lock at once.

    Run in an interpreter of its own: in a test worker, another thread's fork while the lock is held (a
    child holds every descriptor until it execs) could hold it too, which is not what this checks."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import subprocess, sys
        from nextquill_jax.train.workdir_lock import WorkdirLock
        lock = WorkdirLock({str(tmp_path / "run")!r})
        assert lock.acquire(0, echo=lambda _: None)
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, close_fds=False
        )
        try:
            lock.release()
            again = WorkdirLock({str(tmp_path / "run")!r})
            assert again.acquire(0, echo=lambda _: None) is True  # WorkdirLockedError if the child held it
            again.release()
        finally:
            child.communicate(timeout=30)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
