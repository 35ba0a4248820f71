"""metrics.jsonl: each row is written with the file closed afterwards (a Cloud Storage FUSE mount uploads a
file only when it is closed), and a resume drops the rows after the checkpointed step."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nextquill_jax.config import LoggingConfig
from nextquill_jax.train.metrics_log import METRICS_FILE, MetricsLog

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
