"""Third-party log chatter (absl/Orbax, JAX, transformers, Python warnings) goes to a file in the run's
directory, `<dir>/logs/third_party.log`, instead of the console, which keeps this package's own lines
(printed, not logged). `--verbose` shows the chatter on the console too.

    with third_party_logs.captured(verbose=False):   # cli.main, around a subcommand
        ...                                          # records are held in memory until
        third_party_logs.log_to(out, named="--out")  # the command names its directory and has made it

Imports only `output_dir` and `plural`, which import nothing of this package, so any layer may name it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import io
import logging
import os
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nextquill_jax.output_dir import check_output_dir
from nextquill_jax.plural import counted

LOG_FILE = Path("logs") / "third_party.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Held warnings not shown on stderr when a command fails before making its directory: transformers' advice
# at import on an install without PyTorch (which only the tests use) read there as the cause of the failure.
_NOT_FOR_THE_CONSOLE = ("PyTorch was not found.",)


class _Sink(logging.Handler):
    """Holds records until `open(path)` names the file and the command has made the directory the file's
    `logs/` folder goes in, then appends them (and every later one) there. So a command that fails before
    making its directory (a misspelt `--workdir`) leaves nothing behind: at `close`, records still held are
    dropped, except warnings and errors, which go to stderr unless the console has shown them (`shown`) or
    they are `_NOT_FOR_THE_CONSOLE`.
    The file (and `logs/`) is made at the first record only: a command that logs nothing into a directory
    that was already there (a `data prepare` refused before it wrote) leaves no empty log in it.
    The file is closed after each write, as `metrics.jsonl` is: on a Cloud Storage FUSE workdir a file
    reaches the bucket only when closed (tpu_scripts/README.md). Each process of a multi-process run writes a
    file of its own (`log_file`): one file appended to through several mounts keeps one writer's lines.
    A file that cannot be written (a read-only run directory that `export` reads, a full disk) is said once on
    stderr; from then on records go where those left at `close` go, and `close` counts the lines dropped."""

    def __init__(self, shown: bool) -> None:
        super().__init__(logging.INFO)
        self.shown = shown
        self.setFormatter(logging.Formatter(FORMAT))
        self.held: list[logging.LogRecord] = []
        self.directory: Path | None = None
        self.unwritable: Path | None = None  # the file that could not be written, once one could not
        self.dropped = 0  # records neither written nor shown since

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(record)
        self._flush_held()

    def open(self, directory: Path) -> None:
        with self.lock:  # as `emit` runs (`Handler.handle`): another thread may log meanwhile
            self.directory = directory.absolute()
            self._flush_held()

    def _flush_held(self) -> None:
        if self.unwritable is not None:
            self._show_or_drop()
        if self.directory is None or not self.held or not self.directory.is_dir():
            return
        path = self.directory / log_file()
        try:
            path.parent.mkdir(exist_ok=True)
            with path.open("a", encoding="utf-8") as file:
                file.writelines(self.format(record) + "\n" for record in self.held)
        except OSError as e:  # said on stderr, never raised into the third-party code that logged
            self.unwritable = path
            print(
                f"note: cannot write the third-party log {path} ({e.strerror or e}); from now on its "
                "warnings go to stderr, its other lines nowhere (--verbose shows them all on the console)",
                file=sys.stderr,
            )
            self._show_or_drop()
        self.held = []

    def _show_or_drop(self) -> None:
        """Print the held warnings and errors on stderr (those the console has not shown and are for it);
        drop the rest, counting those that were meant for the file."""
        for record in self.held:
            if self.shown:  # the console has
                continue
            if record.levelno >= logging.WARNING:
                if not any(text in record.getMessage() for text in _NOT_FOR_THE_CONSOLE):
                    print(self.format(record), file=sys.stderr)
            elif self.unwritable is not None:
                self.dropped += 1
        self.held = []

    def close(self) -> None:
        with self.lock:  # as `emit` and `open`: a thread may still be logging
            self._flush_held()
            self._show_or_drop()
        if self.dropped:
            print(f"note: {counted(self.dropped, 'third-party log line')} not written to {self.unwritable}",
                  file=sys.stderr)  # fmt: skip
        super().close()


def log_file() -> Path:
    """This process's log file, relative to the command's directory: `LOG_FILE`, or for process N > 0 of a
    multi-process run `logs/third_party.process<N>.log`. N is `NEXTQUILL_PROCESS_ID` where the environment
    sets it (known before anything starts), else the index JAX's multi-process runtime records once it starts
    (on a TPU pod; records before that go to `LOG_FILE` from every process). Not `jax.process_index()`: that
    takes the lock under which JAX starts its backend, which logs, so a record logged there would wait on
    itself."""
    process = os.environ.get("NEXTQUILL_PROCESS_ID", "")
    if not process.isdigit():  # unset (or malformed, which start-up names)
        distributed = sys.modules.get("jax._src.distributed")  # no public handle in jax 0.10 (as `parallel`)
        process = "0" if distributed is None else str(distributed.global_state.process_id)
    return LOG_FILE if int(process) == 0 else LOG_FILE.with_name(f"third_party.process{int(process)}.log")


_sink: _Sink | None = None


@contextlib.contextmanager
def captured(verbose: bool) -> Iterator[None]:
    """Route third-party logging (INFO and above) and Python warnings to the log file while the block runs;
    with `verbose` also to stderr. transformers is not imported for this (half a second or more, which
    commands such as `data show` need not pay): its records are routed when it is first imported inside the
    block, or at once if it already is. Restores the logging set-up afterwards, except that transformers'
    records keep propagating to the root logger instead of its own stderr handler."""
    global _sink
    root = logging.getLogger()
    sink, console = _Sink(shown=verbose), logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    handlers = [sink, console] if verbose else [sink]
    level = root.level
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    _sink = sink
    finder = _TransformersFinder()
    try:
        if "transformers" in sys.modules:
            _route_transformers(printed="")
        else:
            sys.meta_path.insert(0, finder)
        yield
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        _sink = None
        logging.captureWarnings(False)
        root.setLevel(level)
        for handler in handlers:
            root.removeHandler(handler)
        sink.close()


def log_to(directory: str | Path, named: str) -> Path | None:
    """Write the captured records to `directory/logs/third_party.log` (appending; those held so far first;
    `log_file` names another process's) once the command has made `directory`. Returns the file, or None
    outside `captured` (nothing is captured then).

    Every command calls this with the directory it writes into, first, so it is also where that directory is
    checked, before any work: `named` is where it came from (`--out`, `FILE: compare.out`). Except the
    commands that lock their directory, `train`, `compare` and `demo`: they check it first
    (`output_dir.check_output_dir`) and call this once they hold its lock (the `on_locked` of `loop.train`,
    `compare.run_comparison` and `demo.run.run_demo`), so that a run refused there appends nothing to the log
    of the run that holds it.

    Raises:
        NotADirectoryError: `directory` (or a folder above it) is a file (`output_dir.check_output_dir`).
    """
    directory = check_output_dir(directory, named)
    if _sink is None:
        return None
    _sink.open(directory)
    return directory / log_file()


class _TransformersFinder(importlib.abc.MetaPathFinder):
    """First on `sys.meta_path` inside `captured`: finds `transformers` with the finders after it and hands
    its import to `_RoutingLoader`; any other name is left to those finders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "transformers":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RoutingLoader(spec.loader)
                return spec
        return None


class _RoutingLoader:
    """Loads transformers with its own loader, catching what it prints to stderr while being imported (the
    advisory "PyTorch was not found..." goes through a stderr handler of its own), then routes it."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                self.loader.exec_module(module)
        except BaseException:
            # transformers did not load, so nothing can route its lines; what it printed may say why.
            sys.stderr.write(printed.getvalue())
            raise
        _route_transformers(printed.getvalue())

    def __getattr__(self, name: str) -> Any:
        # The rest of the loader API (is_package, get_resource_reader, ...) is the wrapped loader's.
        return getattr(self.loader, name)


def _route_transformers(printed: str) -> None:
    """Send transformers' records to the root logger instead of its own stderr handler, and log the lines
    it `printed` while being imported as its warnings. Needs transformers imported."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    for line in printed.splitlines():
        logging.getLogger("transformers").warning(line)
