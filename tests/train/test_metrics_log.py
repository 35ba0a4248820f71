"""metrics.jsonl: each row is written with the file closed afterwards (a Cloud Storage FUSE mount uploads a
file only when it is closed), and a resume drops the rows after the checkpointed step. TensorBoard events go
to `logging.tensorboard_dir`, and a resume's events, copied beside a preempted run's, show every step once.
Counts are JSON integers, the other numbers floats."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event, SessionLog

from nextquill_jax.config import LoggingConfig
from nextquill_jax.json_object import nonfinite_to_null
from nextquill_jax.train.metrics_log import INTEGER_FIELDS, METRICS_FILE, MetricsLog

QUIET = LoggingConfig(tensorboard=False, progress_bar=False)


def open_paths() -> set[Path]:
    """The files this process holds open (Linux's /proc/self/fd)."""
    fds = Path("/proc/self/fd")
    return {Path(os.readlink(fds / fd)) for fd in os.listdir(fds) if (fds / fd).is_symlink()}


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()]


def test_each_row_is_closed_into_the_file_and_resume_drops_later_rows(tmp_path):
    log = MetricsLog(tmp_path, QUIET, start_step=0, total_steps=30)
    for step in (10, 20, 30):
        log.write(step, {"loss": 1.0 / step})
        assert (tmp_path / METRICS_FILE).resolve() not in open_paths()
        assert rows(tmp_path)[-1] == {"step": step, "loss": 1.0 / step}
    log.close()

    resumed = MetricsLog(tmp_path, QUIET, start_step=20, total_steps=30)
    resumed.write(30, {"loss": float("nan")})
    assert rows(tmp_path) == [
        {"step": 10, "loss": 0.1},
        {"step": 20, "loss": 0.05},
        {"step": 30, "loss": None},
    ]
    resumed.close()


def test_counts_are_written_as_integers_other_numbers_as_floats_and_a_fractional_count_is_refused(tmp_path):
    log = MetricsLog(tmp_path, QUIET, start_step=0, total_steps=30)
    log.write(
        10, {"tokens": 154.0, "input_tokens": 602, "skipped": 0.0, "epoch": 1, "loss": 3, "grad_norm": 2.0}
    )
    # An int32 count from the device past 2**24, which float32 would round to 16777216.
    log.write(20, {"eval/tokens": np.asarray(2**24 + 1, np.int32), "eval/loss": 1.5})
    with pytest.raises(
        ValueError, match=r"metrics.jsonl: field 'eval/tokens' is written as an integer.*153.5"
    ):
        log.write(30, {"eval/tokens": 153.5})
    log.close()
    text = (tmp_path / METRICS_FILE).read_text()
    assert text == (
        '{"step": 10, "tokens": 154, "input_tokens": 602, "skipped": 0, "epoch": 1, "loss": 3.0, '
        '"grad_norm": 2.0}\n{"step": 20, "eval/tokens": 16777217, "eval/loss": 1.5}\n'
    )


def test_a_tiny_runs_counts_are_json_integers_that_add_up_to_its_prepared_examples(trained_run):
    """The tiny run's two steps are its first epoch, each train example once, so their `tokens` add up to the
    targets of the prepared train split and their `input_tokens` to its prompts and targets (a target is in
    both streams), counted with NumPy; the counts are JSON integers, the other numbers floats."""
    from nextquill_jax.data.prepared_split import PreparedSplit

    written = rows(trained_run.workdir)
    split = PreparedSplit(trained_run.workdir / "prepared", "train")
    examples = [split[i] for i in range(len(split))]
    assert [r["epoch"] for r in written] == [0, 0]
    assert sum(r["tokens"] for r in written) == sum(ex["target"].size for ex in examples)
    inputs = [ex["prompt_with"].size + ex["prompt_without"].size + 2 * ex["target"].size for ex in examples]
    assert sum(r["input_tokens"] for r in written) == sum(inputs)
    for row in written:
        assert {k: type(row[k]) for k in INTEGER_FIELDS} == dict.fromkeys(INTEGER_FIELDS, int), row
        others = {k for k in row if k not in (*INTEGER_FIELDS, "step")}
        assert {"loss", "ce_with", "learning_rate", "padding_efficiency", "tokens_per_second"} <= others
        assert {k: type(row[k]) for k in others} == dict.fromkeys(others, float), row


def test_a_resume_cut_short_while_dropping_later_rows_keeps_every_row(tmp_path, monkeypatch):
    """The resume rewrites metrics.jsonl; a kill or a full disk during that rewrite must not lose the rows of
    the steps before the checkpoint (an in-place rewrite truncates the file first)."""
    from nextquill_jax import atomic_file

    log = MetricsLog(tmp_path, QUIET, start_step=0, total_steps=30)
    for step in (10, 20, 30):
        log.write(step, {"loss": 1.0 / step})
    log.close()
    before = (tmp_path / METRICS_FILE).read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_file.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        MetricsLog(tmp_path, QUIET, start_step=20, total_steps=30)
    assert (tmp_path / METRICS_FILE).read_bytes() == before


def test_the_progress_bar_shows_each_step_with_its_own_numbers(tmp_path, capsys):
    log = MetricsLog(tmp_path, LoggingConfig(tensorboard=False), start_step=0, total_steps=30)
    log._bar.mininterval = 0  # draw on every update, as a slow step would
    for step in (10, 20, 30):
        log.progress(step, {"loss": float(step)})
    log.close()
    frames = [f for f in capsys.readouterr().err.split("\r") if re.search(r"\b[123]0/30\b", f)]
    shown = {int(m[1]): m[2] for f in frames if (m := re.search(r"\b(\d+)/30\b.*loss=([\d.]+)", f))}
    assert shown == {10: "10", 20: "20", 30: "30"}, frames


def test_a_resume_drops_and_reports_lines_cut_short_and_first_value_skips_them(tmp_path, capsys):
    log = MetricsLog(tmp_path, QUIET, start_step=0, total_steps=30)
    for step in (10, 20, 30):
        log.write(step, {"loss": 1.0 / step, "ce_without": float(step)})
    log.close()
    path = tmp_path / METRICS_FILE
    lines = path.read_text().splitlines()
    nul_and_bad_byte, torn = "\x00" * 7 + "\udcff", '{"step": 35, "loss": 3.7'
    garbled = [lines[0], nul_and_bad_byte, lines[1], '["not a row"]', lines[2], torn]
    path.write_bytes("\n".join(garbled).encode("utf-8", "surrogateescape"))

    resumed = MetricsLog(tmp_path, QUIET, start_step=20, total_steps=40)
    assert capsys.readouterr().out == (
        f"warning: {path}: dropped 3 line(s) that are not a JSON row with a step (line 2, 4, 6: a write cut "
        "short, e.g. by a full disk, a kill or a power loss)\n"
    )
    resumed.write(30, {"loss": 0.5})
    assert rows(tmp_path) == [
        {"step": 10, "loss": 0.1, "ce_without": 10.0},
        {"step": 20, "loss": 0.05, "ce_without": 20.0},
        {"step": 30, "loss": 0.5},
    ]
    path.write_text('{"step": 5, "loss": 1.0, "ce_with\n' + path.read_text())  # cut short before the rest
    assert resumed.first_value("ce_without") == 10.0
    # A row whose value is null (a skipped update's) has none: the health baseline is the first measured.
    path.write_text('{"step": 2, "loss": null, "ce_without": null}\n' + path.read_text())
    assert resumed.first_value("ce_without") == 10.0
    resumed.close()


def events(path: Path) -> list[Event]:
    """The records of a TensorBoard event file, read by the TFRecord framing (u64 length, u32 CRC, payload,
    u32 CRC), independently of the writer."""
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        out.append(Event.FromString(data[at + 12 : at + 12 + length]))
        at += 12 + length + 4
    return out


def tensorboard_view(folder: Path) -> dict[int, float]:
    """step -> `loss` as TensorBoard shows the folder: its files read in name order, a session-start event at
    step S dropping the values read before at steps >= S (tensorboard/backend/event_processing/
    event_accumulator.py, `_CheckForRestartAndMaybePurge`, which it applies to files that start with a
    version-2 header only)."""
    shown: dict[int, float] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        file_events = events(path)
        assert file_events[0].file_version == "brain.Event:2", path
        for event in file_events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = {step: v for step, v in shown.items() if step < event.step}
            for value in event.summary.value:
                if value.tag == "loss":
                    shown[event.step] = value.simple_value
    return shown


def logging_to(folder: Path, workdir: Path, start_step: int) -> MetricsLog:
    """A 40-step run's log whose TensorBoard events go to `folder`."""
    cfg = LoggingConfig(tensorboard_dir=str(folder), progress_bar=False)
    return MetricsLog(workdir, cfg, start_step=start_step, total_steps=40)


def test_nonfinite_numbers_become_null_at_any_depth_as_in_a_row(tmp_path):
    nested = {
        "loss": float("nan"),
        "terms": {"ce": float("inf"), "n": 3, "ok": 0.5},
        "l": [1.0, -float("inf")],
    }
    cleaned = nonfinite_to_null(nested)
    assert cleaned == {"loss": None, "terms": {"ce": None, "n": 3, "ok": 0.5}, "l": [1.0, None]}
    json.dumps(cleaned, allow_nan=False)  # valid JSON
    log = MetricsLog(tmp_path, QUIET, start_step=0, total_steps=1)
    log.write(1, {"loss": float("nan")})  # the rows' own rule, which nonfinite_to_null shares
    assert rows(tmp_path) == [{"step": 1, "loss": None}]


def test_nonfinite_numbers_in_a_tuple_become_null_too():
    """A tuple is a JSON array to `json.dumps` as a list is: its NaN and infinities become null as well
    (returned as a list). Mutation that survived before: `list | tuple` -> `list`."""
    cleaned = nonfinite_to_null({"pair": (float("nan"), 2.0), "deep": [(1.0, float("inf"))]})
    assert cleaned == {"pair": [None, 2.0], "deep": [[1.0, None]]}
    json.dumps(cleaned, allow_nan=False)


def test_events_go_to_the_configured_folder_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = LoggingConfig(tensorboard=True, tensorboard_dir="local/tb", progress_bar=False)
    log = MetricsLog(tmp_path / "work", cfg, start_step=0, total_steps=20)
    log.write(10, {"loss": 0.5})
    log.write(20, {"loss": 0.25})
    log.close()
    assert tensorboard_view(tmp_path / "local" / "tb") == {10: 0.5, 20: 0.25}
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [METRICS_FILE]  # no tensorboard/ there


def test_a_resume_adds_a_file_and_tensorboard_shows_every_step_once(tmp_path):
    """A preempted run's events, in the shared folder, are kept; the resumed run's file sorts after them and
    its purge hides the steps after the checkpoint that the first run logged."""
    shared = tmp_path / "bucket"
    first = logging_to(shared, tmp_path / "work", start_step=0)
    for step in (10, 20, 30, 35):  # 35: the row of a preemption save that did not finish
        first.write(step, {"loss": 1.0 / step})
    first.close()
    (earlier,) = shared.iterdir()
    earlier_bytes = earlier.read_bytes()
    # tensorboardX names a file by the whole second it was opened in: a new VM resumes minutes later.
    time.sleep(1 - time.time() % 1 + 0.01)

    local = tmp_path / "new-vm"
    resumed = logging_to(local, tmp_path / "work", start_step=20)
    resumed.write(30, {"loss": 3.0})
    resumed.write(40, {"loss": 4.0})
    resumed.close()
    for path in local.iterdir():
        shutil.copy(path, shared)  # what worker_train.sh does
    assert earlier.read_bytes() == earlier_bytes
    assert len(list(shared.iterdir())) == 2
    assert tensorboard_view(shared) == pytest.approx(
        {10: 0.1, 20: 0.05, 30: 3.0, 40: 4.0}, rel=1e-6
    )  # float32


def readme_metrics_fields() -> set[str]:
    """The field names in the first column of README.md's metrics.jsonl table (`eval/<field>` as is)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### metrics.jsonl") :].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split(" | ")[0])}


def test_every_field_a_run_writes_is_in_the_readme_table(trained_run):
    """The fields of a tiny run's metrics.jsonl, and the loss fields of every variant and switch
    (`loss.metric_names`: what the train and eval steps report; an eval row's are `eval/<field>`), are each a
    row of README.md's table."""
    from nextquill_jax.loss import LossConfig, metric_names
    from tests.train.test_step import METRIC_CONFIGS

    rows = [json.loads(line) for line in (trained_run.workdir / METRICS_FILE).read_text().splitlines()]
    written = {key for row in rows for key in row}
    assert {"loss", "grad_norm", "tokens_per_second", "epoch"} <= written
    fields = {key.removeprefix("eval/") for key in written}
    fields |= {name for kw in METRIC_CONFIGS for name in metric_names(LossConfig(**kw))}
    documented = readme_metrics_fields()
    assert "eval/<field>" in documented
    assert fields - documented == set(), "document these in README.md's metrics.jsonl table"


class _Console(io.StringIO):
    """A console stream whose reader can go away, as tee's does on the Ctrl-C that stops a run."""

    gone = False

    def write(self, text: str) -> int:
        if self.gone:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        return super().write(text)


@pytest.mark.parametrize("progress_bar", [True, False])
def test_a_console_whose_reader_is_gone_silences_the_messages_not_the_rows(
    tmp_path, monkeypatch, progress_bar
):
    """A BrokenPipeError from the bar or a message ended the stop's save (`train ... |& tee log`); the rows
    go on into metrics.jsonl."""
    console = _Console()
    monkeypatch.setattr("sys.stdout", console)
    monkeypatch.setattr("sys.stderr", console)
    cfg = LoggingConfig(tensorboard=False, progress_bar=progress_bar)
    log = MetricsLog(tmp_path, cfg, start_step=0, total_steps=3)
    log.message("before")
    console.gone = True
    for step in (1, 2):
        log.write(step, {"loss": 1.0 / step})
        log.progress(step, {"loss": 1.0 / step})
        log.message(f"step {step}")
    log.close()
    console.gone = False
    assert "before" in console.getvalue() and "step 1" not in console.getvalue()
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_a_reader_passes_over_a_line_cut_short_by_a_kill(tmp_path):
    """A run killed while writing a row leaves part of a line (a resume drops it); the rows around it are
    still read: the demo's training curves read through `read_rows` (a JSONDecodeError ended them)."""
    from nextquill_jax.demo.report import plot_training_curves
    from nextquill_jax.train.metrics_log import last_value, read_rows

    (tmp_path / METRICS_FILE).write_text(
        '{"step": 1, "loss": 2.0, "ce_with": 1.5}\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo'
    )
    assert read_rows(tmp_path) == [{"step": 1, "loss": 2.0, "ce_with": 1.5}, {"step": 2, "loss": 1.0}]
    assert last_value(tmp_path, "loss") == 1.0 and read_rows(tmp_path / "none") == []
    plot_training_curves({"nextquill": tmp_path}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resume_drops_and_counts_rows_without_an_integer_step(tmp_path, capsys):
    """A row is a JSON object with an integer `step`: one without a step, or with it as text, is no row of
    this writer's (a hand edit, another tool's line) and is dropped and counted, not a crash of the resume."""
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 10, "loss": 0.5}\n{"x": 1}\n{"step": "20", "loss": 0.4}\n{"step": 20.0}\n')
    resumed = MetricsLog(tmp_path, QUIET, start_step=20, total_steps=40)
    assert capsys.readouterr().out == (
        f"warning: {path}: dropped 3 line(s) that are not a JSON row with a step (line 2, 3, 4: a write cut "
        "short, e.g. by a full disk, a kill or a power loss)\n"
    )
    resumed.close()
    assert rows(tmp_path) == [{"step": 10, "loss": 0.5}]


@pytest.mark.parametrize(
    ("bad", "shown"), [(5, "line 2, 3, 4, 5, 6:"), (6, "line 2, 3, 4, 5, 6, ...:")], ids=["five", "six"]
)
def test_a_resume_names_the_first_five_dropped_lines_and_marks_more(tmp_path, capsys, bad, shown):
    """The warning names at most five dropped lines, with ", ..." only where more were dropped: five bad
    lines (2 to 6, after the row of line 1) are named whole, a sixth is left to the "...". Expected lines are
    counted by hand from the file written here."""
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 10, "loss": 0.5}\n' + "garbage\n" * bad)
    MetricsLog(tmp_path, QUIET, start_step=10, total_steps=20).close()
    out = capsys.readouterr().out
    assert f"dropped {bad} line(s) that are not a JSON row with a step ({shown} a write cut short" in out, out


def test_only_process_0_writes_or_drops_rows(tmp_path, monkeypatch):
    """The other processes of a multi-process run share process 0's workdir: they neither write rows nor
    rewrite the file on a resume (two writers would interleave or race on metrics.jsonl)."""
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 10, "loss": 0.5}\n{"step": 20, "loss": 0.25}\n')
    before = path.read_bytes()
    monkeypatch.setattr("jax.process_index", lambda: 1)
    log = MetricsLog(tmp_path, LoggingConfig(progress_bar=False), start_step=10, total_steps=30)
    log.write(30, {"loss": 0.1})
    log.close()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no tensorboard/ either
    # Nor do they read process 0's rows (on another host the workdir may be no shared folder).
    assert log.first_value("loss") is None


def test_a_resumed_bar_starts_at_the_checkpointed_step(tmp_path, capsys):
    """A run resumed from step 20 of 30 shows 20/30 before its first step, not 0/30 (a bar from 0 would also
    count the 20 earlier steps into this run's steps per second)."""
    log = MetricsLog(tmp_path, LoggingConfig(tensorboard=False), start_step=20, total_steps=30)
    log.close()
    err = capsys.readouterr().err
    assert re.search(r"\b20/30\b", err) and not re.search(r"\b0/30\b", err), err


def test_each_rows_events_are_in_the_file_when_write_returns(tmp_path):
    """A run killed (or preempted) before `close` keeps the events of every row it wrote, as metrics.jsonl
    does: each row's events are written and flushed before `write` returns (tensorboardX's own writer queues
    them to a thread and flushes the file every 2 minutes)."""
    log = logging_to(tmp_path / "tb", tmp_path / "work", start_step=0)
    try:
        for step in (1, 2, 3):
            log.write(step, {"loss": step / 40, "lr": 1e-3})
            assert tensorboard_view(tmp_path / "tb") == pytest.approx({s: s / 40 for s in range(1, step + 1)})
    finally:
        log.close()


def test_a_resume_passes_over_blank_lines_without_a_warning(tmp_path, capsys):
    """Blank lines (a hand edit, an editor's trailing newline) lose no row: the resume keeps the rows up to
    its step, drops them and warns of nothing."""
    path = tmp_path / METRICS_FILE
    path.write_text(
        '\n{"step": 10, "loss": 0.5}\n\n   \n{"step": 20, "loss": 0.25}\n{"step": 30, "loss": 0.1}\n\n'
    )
    MetricsLog(tmp_path, QUIET, start_step=20, total_steps=40).close()
    assert capsys.readouterr().out == ""
    assert rows(tmp_path) == [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25}]


def test_an_infinite_number_is_written_null_as_nan_is(tmp_path):
    """A diverged run's loss or gradient norm may be +-inf, not only NaN: JSON has no such number (json.dumps
    would write a bare Infinity, which strict readers refuse), so the row holds null."""
    log = MetricsLog(tmp_path, QUIET, start_step=0, total_steps=10)
    log.write(10, {"loss": float("inf"), "grad_norm": float("-inf"), "lr": 1e-3})
    log.close()
    text = (tmp_path / METRICS_FILE).read_text()
    assert "Infinity" not in text
    assert rows(tmp_path) == [{"step": 10, "loss": None, "grad_norm": None, "lr": 1e-3}]


def test_a_tensorboard_dir_under_home_is_expanded(tmp_path, monkeypatch):
    """`logging.tensorboard_dir: ~/tb` means the user's home, not a folder named `~` in the current one."""
    from nextquill_jax.train.metrics_log import tensorboard_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = LoggingConfig(tensorboard_dir="~/tb", progress_bar=False)
    assert tensorboard_dir(cfg, tmp_path / "work") == tmp_path / "home" / "tb"
    assert tensorboard_dir(LoggingConfig(), tmp_path / "work") == tmp_path / "work" / "tensorboard"


def test_close_ends_the_bars_line(tmp_path, capsys):
    """After `close` the bar's last frame ends its line (tqdm's close writes the newline), so what the run
    prints next (the final evaluation, the export) starts a line of its own, not after `30/30 ...`."""
    log = MetricsLog(tmp_path, LoggingConfig(tensorboard=False), start_step=0, total_steps=30)
    log.progress(30, {"loss": 1.0})
    log.close()
    err = capsys.readouterr().err
    assert re.search(r"\b30/30\b", err) and err.endswith("\n"), repr(err[-80:])


def test_strict_json_writes_non_ascii_text_as_is_where_asked():
    """`ensure_ascii=False` (evaluate's metrics.json, the effect summary) keeps "é" readable; the default
    escapes it as JSON's \\u00e9. Both are JSON for the same value."""
    from nextquill_jax.train.metrics_log import strict_json

    assert (
        strict_json({"name": "é", "x": float("nan")}, ensure_ascii=False)
        == '{\n "name": "é",\n "x": null\n}\n'
    )
    assert strict_json({"name": "é"}) == '{\n "name": "\\u00e9"\n}\n'
    assert json.loads(strict_json({"name": "é"})) == {"name": "é"}
