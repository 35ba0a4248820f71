"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files and a progress bar.

Only process 0 writes. On resume from step S, rows of `metrics.jsonl` after S (steps that ran but were not
checkpointed) are dropped and TensorBoard purges them too, so every step appears once: the resumed writer
starts a new event file (named as tensorboardX names them, `events.out.tfevents.<unix seconds>.<hostname>`, so
it sorts after the earlier ones and replaces none) with a session-start event at step S + 1, and TensorBoard,
reading a directory's files in name order, drops the steps >= S + 1 it read before. Lines that are not a JSON
row (a write cut short by a full disk or a kill, NUL bytes after a power loss) are dropped then too, and
counted in a warning naming the file. `metrics.jsonl` is opened and closed for each row: on a bucket mounted
with Cloud Storage FUSE a file reaches the bucket only when it is closed, so a file held open for the whole
run would be invisible there until the end, and lost on a kill. The event files are held open, so on such a
mount `logging.tensorboard_dir` puts them on a local disk, from which tpu_scripts/worker_train.sh copies them
into the workdir. A row's events are in that file when `write` returns (`ScalarEventFile`), so a kill loses no
row's events that metrics.jsonl has.

The fields `INTEGER_FIELDS` names (the counts `tokens`, `input_tokens`, `skipped`, and `epoch`), an evaluation
row's `eval/tokens` too, are written as JSON integers, every other number as a float.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from nextquill_jax.atomic_file import write_text_atomic
from nextquill_jax.config import LoggingConfig
from nextquill_jax.json_object import nonfinite_to_null

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# What an evaluation's metrics are named with in metrics.jsonl and `checkpoint.best_metric`: eval/loss, ...
EVAL_PREFIX = "eval/"
# The fields of a row (with or without `EVAL_PREFIX`) that are whole numbers by construction, written as JSON
# integers: target tokens, real input tokens and skipped updates (counts), and the 0-based epoch.
INTEGER_FIELDS = ("tokens", "input_tokens", "skipped", "epoch")


class MetricsLog:
    """Writes metric rows for steps `start_step + 1 ... total_steps` of a run in `workdir`; `echo` shows its
    messages (`message`) and `on_row(step, values)` gets each row as written (`write`), on process 0."""

    def __init__(
        self,
        workdir: str | Path,
        cfg: LoggingConfig,
        *,
        start_step: int,
        total_steps: int,
        echo: Callable[[str], None] = print,
        on_row: Callable[[int, dict[str, int | float | None]], object] | None = None,
    ) -> None:
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / METRICS_FILE
        self._echo = echo
        self._on_row = on_row
        self._tb = None
        self._bar = None
        self._console_gone = False  # see `_to_console`
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if unreadable := _truncate_after(self.path, start_step):
            shown = ", ".join(map(str, unreadable[:5])) + (", ..." if len(unreadable) > 5 else "")
            self.message(
                f"warning: {self.path}: dropped {len(unreadable)} line(s) that are not a JSON row with a "
                f"step (line {shown}: a write cut short, e.g. by a full disk, a kill or a power loss)"
            )
        if cfg.tensorboard:
            self._tb = ScalarEventFile(tensorboard_dir(cfg, workdir), purge_step=start_step + 1)
        if cfg.progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one row {"step": step, **metrics}: the `INTEGER_FIELDS` as integers, the other values as
        floats, non-finite ones as null; then `on_row(step, values)` with the row's values as written.

        Raises:
            ValueError: an `INTEGER_FIELDS` value that is not a whole number (nothing is written).
            Whatever `on_row` raises (the row is written first).
        """
        if not self.enabled:
            return
        values = {k: self._json_value(k, v) for k, v in metrics.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            self._tb.write(step, metrics)
        if self._on_row is not None:
            self._on_row(step, values)

    def _json_value(self, key: str, value: float) -> int | float | None:
        """`value` as the row writes field `key`: an int for `INTEGER_FIELDS`, else `_json_number`."""
        if key.removeprefix(EVAL_PREFIX) not in INTEGER_FIELDS:
            return _json_number(value)
        number = float(value)  # exact: the counts stay far below 2**53
        if not number.is_integer():
            raise ValueError(
                f"{self.path}: field {key!r} is written as an integer (metrics_log.INTEGER_FIELDS) but its "
                f"value is {value!r}. Fix: compute it as a whole number, or take {key!r} out of "
                f"INTEGER_FIELDS if it is not one by construction."
            )
        return int(number)

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        """Move the bar to `step` and show loss, tokens/s, the without-history CE and the preference-token
        fraction."""
        if self._bar is None:
            return
        shown = {
            "loss": metrics.get("loss"),
            "tok/s": metrics.get("tokens_per_second"),
            "ce∅": metrics.get("ce_without"),
            "pref": metrics.get("pref_fraction"),
        }
        # The numbers first: `update` redraws the line, which would show the new step with the last row's.
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False)
        self._to_console(lambda: self._bar.update(step - self._bar.n))

    def first_value(self, key: str) -> float | None:
        """`key` in the first row of metrics.jsonl that has it (this run's rows, earlier starts included), or
        None."""
        if not self.enabled:
            return None
        return next((row[key] for row in read_rows(self.path.parent) if row.get(key) is not None), None)

    def message(self, text: str) -> None:
        """Show `text` through `echo` on process 0, without breaking the bar, and flush stdout (where `echo`
        prints, a piped console sees the line at once)."""
        if self.enabled:
            self._to_console(lambda: self._show(text))

    def _show(self, text: str) -> None:
        with tqdm.external_write_mode() if self._bar is not None else contextlib.nullcontext():
            self._echo(text)
        sys.stdout.flush()

    def _to_console(self, write: Callable[[], None]) -> None:
        """Run `write`, a write to stdout or stderr; once one finds the reader gone, write there no more.

        `train ... |& tee log` ends tee with the same Ctrl-C that asks the run to stop: the stop's save must
        not die on a message it cannot show. metrics.jsonl, a file, keeps every row."""
        if self._console_gone:
            return
        try:
            write()
        except BrokenPipeError:
            self._console_gone = True

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._to_console(self._bar.close)


class ScalarEventFile:
    """A new TensorBoard event file in `folder` (created if missing) that starts with a session-start event at
    `purge_step`, so TensorBoard drops the steps >= `purge_step` that earlier files of the folder hold.

    Each `write` has its events in the file, flushed, when it returns. (tensorboardX's `SummaryWriter` hands
    events to a thread through a queue and its `flush()` does not wait for the queue, so a row's events could
    still be queued when a kill came.)
    """

    def __init__(self, folder: Path, purge_step: int) -> None:
        # Imported here, as in `write`: tensorboardX takes about a second to import, and most commands never
        # write events.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        folder.mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(folder / "events"))  # it writes the file-version event first
        self._writer.write_event(
            Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START))
        )
        self._writer.flush()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """One scalar event per metric at `step` (a value as `float(value)`), then the file flushed."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        for key, value in metrics.items():
            self._writer.write_event(Event(wall_time=now, step=step, summary=scalar(key, float(value))))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_rows(workdir: str | Path) -> list[dict[str, Any]]:
    """The rows of `<workdir>/metrics.jsonl`, in order (none if there is no such file); lines that are no
    row (one cut short by a kill while it was written, which a resume drops) are passed over."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    with path.open(encoding="utf-8", errors="replace") as f:
        return [row for row in map(_row, f) if row is not None]


def last_value(workdir: str | Path, key: str) -> Any:
    """`key` in the last row of `<workdir>/metrics.jsonl` that has it (None if none does, or there is no
    such file; `read_rows`)."""
    found = [row[key] for row in read_rows(workdir) if row.get(key) is not None]
    return found[-1] if found else None


def tensorboard_dir(cfg: LoggingConfig, workdir: str | Path) -> Path:
    """The folder of the run's TensorBoard event files: `cfg.tensorboard_dir` with `~` expanded (a relative
    path stays relative to the current directory), or `<workdir>/tensorboard` when it is null."""
    return Path(cfg.tensorboard_dir).expanduser() if cfg.tensorboard_dir else Path(workdir) / TENSORBOARD_DIR


def _row(line: str) -> dict[str, Any] | None:
    """`line` of metrics.jsonl as a row, or None if it is not a JSON object with an integer step."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _truncate_after(path: Path, step: int) -> list[int]:
    """Keep the rows of `path` up to `step`; return the (1-based) numbers of the non-blank lines dropped as
    unreadable (`_row`)."""
    if not path.exists():
        return []
    lines = [
        (n, line)
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if line.strip()
    ]
    rows = [(n, line, _row(line)) for n, line in lines]
    kept = [line for _, line, row in rows if row is not None and row["step"] <= step]
    # Replaced whole: a kill while rewriting must not lose the rows of every step before `step`.
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return [n for n, _, row in rows if row is None]


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def strict_json(value: Any, *, ensure_ascii: bool = True) -> str:
    """`value` as indented JSON text ending in a newline, every non-finite float written null
    (`nonfinite_to_null`): the numbers of a diverged run, which `json.dumps` would write as bare NaN.

    Raises:
        ValueError: a non-finite float that `nonfinite_to_null` does not reach (inside another type).
    """
    return json.dumps(nonfinite_to_null(value), indent=1, ensure_ascii=ensure_ascii, allow_nan=False) + "\n"
