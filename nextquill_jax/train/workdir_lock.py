"""One command at a time in a directory it owns: an exclusive lock on a file there, held until the run ends.

Two runs writing one workdir at once (the same command started twice, `compare` and a hand-started `train`)
would interleave their checkpoints and metrics.jsonl. `train` takes this lock on `<workdir>/train.lock`
(`fcntl.flock`, exclusive and non-blocking) before it writes anything there (the CLI's third-party log
included: `loop.train`'s `on_locked`), and a second `train` is refused at once with `WorkdirLockedError`,
naming the holder the file records (pid, host, start time). The kernel drops the lock when its process ends,
SIGKILL included, so it is never stale; the file stays behind, harmless. Only process 0 of a multi-process run
takes it: the others share the workdir by design. Where the filesystem does not support flock (some network
filesystems), the run goes on unlocked, with a warning. Readers (evaluate, effects, export, checkpoint verify)
take no lock.

The commands that own a whole output directory lock it the same way, each on its own file and with its own
words (a `LockUse`): `demo` (`<out>/demo.lock`, `demo.run.LOCK`), which deletes its earlier runs there, and
`compare` (`<compare.out>/compare.lock`, `eval.compare.LOCK`). Their trainings lock their own workdirs below
with `train.lock`, another file, so the two locks never meet.

    lock = WorkdirLock(workdir)              # train's; `WorkdirLock(out, LOCK)`: demo's or compare's
    lock.acquire(jax.process_index(), echo)  # WorkdirLockedError if another run holds it
    ...
    lock.release()

No JAX here: the CLI names `WorkdirLockedError` among the errors a user fixes.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "train.lock"


@dataclass(frozen=True)
class LockUse:
    """Which command locks a directory: the lock file's name there and the words of its messages.

    Fields:
        command: the command a refusal names ("another `train`").
        file_name: the lock file in the directory.
        clash: what two runs in the directory at once would do (the refusal's reason).
        on_stop: what stopping the holder costs, after "stop it (`kill PID` on HOST: ".
        elsewhere: the fix of running beside it ("train in another --workdir").
        unlocked: what goes on without the lock, in the warning where flock is not supported.
    """

    command: str
    file_name: str
    clash: str
    on_stop: str
    elsewhere: str
    unlocked: str


TRAIN = LockUse(
    command="train",
    file_name=LOCK_FILE,
    clash="two runs writing one workdir would interleave their checkpoints and metrics.jsonl",
    on_stop="it saves a checkpoint that the same command resumes from",
    elsewhere="train in another --workdir",
    unlocked="training without the workdir lock",
)


class WorkdirLockedError(RuntimeError):
    """Another run holds the directory's lock; the message names the directory, the holder and the fix."""


class WorkdirLock:
    """The lock on `<workdir>/<use.file_name>` (`train.lock`, `LOCK_FILE`, by default); `acquire` takes it,
    `release` (or the end of the process) drops it. flock locks belong to an open file, so a second
    `WorkdirLock` on the same file is refused even within one process; locks on other files of the same
    directory (`demo.lock` and the `train.lock` of a run below it) are independent."""

    def __init__(self, workdir: str | Path, use: LockUse = TRAIN) -> None:
        self.workdir = Path(workdir)
        self.use = use
        self.path = self.workdir / use.file_name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, process_index: int = 0, echo: Callable[[str], None] = print) -> bool:
        """On process 0, create the directory if need be and take the lock, recording this process in the
        file; on any other process, do nothing (it shares process 0's directory). Returns whether the lock is
        held.

        Where the filesystem refuses flock itself (ENOLCK, EOPNOTSUPP, ... on some network filesystems), says
        so once through `echo` and returns False: the run goes on without the lock.

        Raises:
            WorkdirLockedError: another process holds the lock; nothing in the directory was changed.
            OSError: the directory or lock file cannot be created or written. Whatever interrupts `acquire`
                (this, or a KeyboardInterrupt) leaves the lock not held: a long-lived process can take it
                again.
        """
        if process_index != 0 or self._fd is not None:
            return self._fd is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: held by another open file, in this process or another
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirLockedError(_locked_message(self.use, self.workdir, self.path, holder)) from None
        except OSError as e:
            os.close(fd)
            echo(
                f"warning: cannot lock {self.path} ({e.strerror or e}; the filesystem may not support "
                f"flock): {self.use.unlocked}, so nothing stops a second `{self.use.command}` from writing "
                f"{self.workdir} at the same time"
            )
            return False
        except BaseException:  # a Ctrl-C during flock: the open file must not outlive the failed acquire
            os.close(fd)
            raise
        try:  # from the flock on, anything that stops `acquire` closes the file, which drops the lock
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self._fd = fd
        except BaseException:  # a Ctrl-C or a full disk here: closing drops the lock, so none stays held
            os.close(fd)
            raise
        return True

    def release(self) -> None:
        """Drop the lock (closing the file drops it); the file stays. A no-op when not held."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _read_holder(fd: int) -> dict | None:
    """The holder the lock file records, or None where it has not written itself yet (or is unreadable)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _locked_message(use: LockUse, workdir: Path, path: Path, holder: dict | None) -> str:
    if holder is None:
        who, kill = "a process that has not recorded itself yet", ""
    else:
        pid, host, since = holder.get("pid", "?"), holder.get("host", "?"), holder.get("since", "?")
        who, kill = f"pid {pid} on host {host}, since {since}", f"`kill {pid}` on {host}: "
    return (
        f"{workdir} is in use by another `{use.command}` ({who}; lock {path}): {use.clash}. Fix: wait for "
        f"that run to end, or stop it ({kill}{use.on_stop}), or {use.elsewhere}."
    )
