"""Third-party log chatter (absl/Orbax, JAX, transformers, Python warnings) goes to a file in the run's
directory, `<dir>/logs/third_party.log`, instead of the console, which keeps this package's own lines
(printed, not logged). `--verbose` shows the chatter on the console too.

    with third_party_logs.captured(verbose=False):   # cli.main, around a subcommand
        ...                                          # records are held in memory until
        third_party_logs.log_to(workdir)             # the command knows its directory (held ones go first)

Imports nothing of this package, so any layer may name it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

LOG_FILE = Path("logs") / "third_party.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Sink(logging.Handler):
    """Holds records until `open(path)` names the file, then appends them (and every later one) there."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(FORMAT))
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.held.append(record)
        else:
            self.file.emit(record)

    def open(self, path: Path) -> None:
        if self.file is not None and Path(self.file.baseFilename) == path.absolute():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.file is not None:
            self.file.close()
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(self.formatter)
        for record in self.held:
            self.file.emit(record)
        self.held = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


_sink: _Sink | None = None


@contextlib.contextmanager
def captured(verbose: bool) -> Iterator[None]:
    """Route third-party logging (INFO and above) and Python warnings to the log file while the block runs;
    with `verbose` also to stderr. Restores the logging set-up afterwards, except that transformers' records
    keep propagating to the root logger instead of its own stderr handler."""
    global _sink
    root = logging.getLogger()
    sink, console = _Sink(), logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    handlers = [sink, console] if verbose else [sink]
    level = root.level
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    _sink = sink
    try:
        _route_transformers()
        yield
    finally:
        _sink = None
        logging.captureWarnings(False)
        root.setLevel(level)
        for handler in handlers:
            root.removeHandler(handler)
        sink.close()


def log_to(directory: str | Path) -> Path | None:
    """Write the captured records to `directory/logs/third_party.log` from now on (appending; those held so
    far first). Returns the file, or None outside `captured` (nothing is captured then)."""
    if _sink is None:
        return None
    path = Path(directory) / LOG_FILE
    _sink.open(path)
    return path


def _route_transformers() -> None:
    """Send transformers' records to the root logger. It prints advisories such as "PyTorch was not found..."
    while being imported, through a stderr handler of its own: those are caught and logged here."""
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        from transformers.utils import logging as hf_logging
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    for line in printed.getvalue().splitlines():
        logging.getLogger("transformers").warning(line)
