"""Third-party log lines (absl/Orbax, transformers, JAX, Python warnings) go to <dir>/logs/third_party.log,
not the console; `--verbose` shows them on the console too; the package's own lines stay on the console
(third_party_logs.py, wired in cli.main)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import jax
import pytest
from absl import logging as absl_logging
from transformers.utils import logging as hf_logging

from nextquill_jax import cli, third_party_logs
from nextquill_jax.data import prepare as prepare_module

CHATTER = [
    "INFO absl: an Orbax-style info line",
    "WARNING absl: an Orbax-style warning line",
    "WARNING transformers.tokenization_utils_base: a transformers line",
    "WARNING jax._src.xla_bridge: a JAX line",
    "WARNING py.warnings: ",  # then the file and line of the warning
    "UserWarning: a third-party warning",
]


def chatty_prepare(cfg, out_dir, **kwargs) -> None:
    """Stands in for data preparation: logs through each third-party route, makes its directory and prints
    a line of ours."""
    out_dir.mkdir()
    absl_logging.info("an Orbax-style info line")
    absl_logging.warning("an Orbax-style warning line")
    hf_logging.get_logger("transformers.tokenization_utils_base").warning("a transformers line")
    logging.getLogger("jax._src.xla_bridge").warning("a JAX line")
    warnings.warn("a third-party warning", UserWarning, stacklevel=1)
    print("our own line")


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_lines_go_to_the_workdir_log_and_to_the_console_only_with_verbose(
    verbose, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(prepare_module, "prepare", chatty_prepare)
    (tmp_path / "c.yaml").write_text("data: {format: generic}\n")
    argv = ["data", "prepare", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]
    handlers = list(logging.getLogger().handlers)
    absl_level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # Orbax's INFO lines reach the absl logger in a run
    try:
        assert cli.main([*argv, *(["--verbose"] if verbose else [])]) == 0
    finally:
        absl_logging.set_verbosity(absl_level)
    out, err = capsys.readouterr()
    assert out == "our own line\n"
    log = (tmp_path / "out" / "logs" / "third_party.log").read_text()
    for line in CHATTER:
        assert line in log, (line, log)
        assert (line in err) == verbose, (line, err)
    assert "our own line" not in log
    assert logging.getLogger().handlers == handlers  # the set-up is restored after the command


def test_verbose_is_accepted_before_and_after_the_subcommand_and_its_action():
    parser = cli.build_parser()
    for argv in (
        ["--verbose", "data", "show", "d", "--index", "0"],
        ["data", "show", "d", "--index", "0", "--verbose"],
    ):
        assert parser.parse_args(argv).verbose
    assert not parser.parse_args(["data", "show", "d", "--index", "0"]).verbose


# A fresh interpreter: transformers is imported in this process already. torch hidden as on an install
# without it (the `test` extra has it), so that importing transformers prints its advisory on stderr.
ADVISORY_RUN = """
import logging, sys
sys.modules["torch"] = None
from nextquill_jax import third_party_logs
with third_party_logs.captured(verbose=False):
    assert "transformers" not in sys.modules, "captured imported transformers"
    third_party_logs.log_to(sys.argv[1], named="--out")
    import transformers
    transformers.utils.logging.get_logger("transformers.models").warning("a later transformers line")
assert not [f for f in sys.meta_path if type(f).__module__ == third_party_logs.__name__], sys.meta_path
"""


def test_transformers_advisory_at_its_first_import_inside_captured_goes_to_the_log_not_the_console(tmp_path):
    run = subprocess.run([sys.executable, "-c", ADVISORY_RUN, str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    log = (tmp_path / "logs" / "third_party.log").read_text()
    assert "WARNING transformers: [transformers] PyTorch was not found." in log, log
    assert "WARNING transformers.models: a later transformers line" in log, log


def test_a_failed_transformers_import_still_shows_what_it_printed(capsys):
    """Inside `captured` transformers' import prints into a buffer that is routed once the import is done; an
    import that fails is not done, so what it printed (often the reason) goes to stderr, and the error
    propagates."""
    import types

    class Failing:
        def exec_module(self, module):
            print("transformers needs package X", file=sys.stderr)
            raise ImportError("no X")

    with pytest.raises(ImportError, match="no X"):
        third_party_logs._RoutingLoader(Failing()).exec_module(types.ModuleType("transformers"))
    assert capsys.readouterr().err == "transformers needs package X\n"


def test_the_log_goes_only_into_a_directory_the_command_made_and_unkept_warnings_reach_stderr(
    tmp_path, capsys
):
    """A command that names its directory and fails before making it (a misspelt `evaluate --workdir`)
    leaves nothing behind: its held INFO lines are dropped, its warnings shown; once the command has made
    the directory, the log file takes the held records first."""
    made, never = tmp_path / "made", tmp_path / "never"
    with third_party_logs.captured(verbose=False):
        logging.getLogger("absl").warning("held before the folder is named")
        assert third_party_logs.log_to(made, named="--out") == made / "logs" / "third_party.log"
        logging.getLogger("jax").info("held until the command makes its folder")
        assert not made.exists()
        made.mkdir()
        logging.getLogger("jax").info("a later record")
    log = (made / "logs" / "third_party.log").read_text()
    assert log.index("held before the folder") < log.index("held until the command") < log.index("a later")
    assert capsys.readouterr().err == ""
    with third_party_logs.captured(verbose=False):
        third_party_logs.log_to(never, named="--out")
        logging.getLogger("jax").info("backend chatter")
        logging.getLogger("absl").warning("a warning the user should see")
    assert not never.exists()
    err = capsys.readouterr().err
    assert "WARNING absl: a warning the user should see" in err and "backend chatter" not in err
    assert "not written" not in err  # an INFO line held for a directory never made is no lost line


FAILED_BEFORE_ITS_DIRECTORY = """
import logging, sys
sys.modules["torch"] = None
from nextquill_jax import third_party_logs
with third_party_logs.captured(verbose=False):
    third_party_logs.log_to(sys.argv[1], named="--out")
    import transformers
    logging.getLogger("absl").warning("a warning the user should see")
"""


def test_transformers_advice_without_pytorch_is_not_shown_for_a_command_that_failed_early(tmp_path):
    """A `data prepare` that failed on a record after loading its tokenizer ended with transformers'
    "PyTorch was not found" on the console, which read as the failure's cause; other held warnings still
    show."""
    never = tmp_path / "never"
    run = subprocess.run(
        [sys.executable, "-c", FAILED_BEFORE_ITS_DIRECTORY, str(never)], capture_output=True, text=True
    )
    assert run.returncode == 0 and not never.exists()
    assert "WARNING absl: a warning the user should see" in run.stderr, run.stderr
    assert "PyTorch" not in run.stderr, run.stderr


def test_a_command_that_logs_nothing_leaves_no_log_in_a_directory_it_found(tmp_path):
    """A `data prepare` refused before it writes, into a directory the user already had, once left an empty
    logs/third_party.log there (and `data show DIR` then read it as a preparation): the file is made at the
    first record only."""
    mine = tmp_path / "mine"
    mine.mkdir()
    with third_party_logs.captured(verbose=False):
        third_party_logs.log_to(mine, named="--out")
    assert list(mine.iterdir()) == []
    with third_party_logs.captured(verbose=False):
        third_party_logs.log_to(mine, named="--out")
        logging.getLogger("jax").info("a record")
    assert "INFO jax: a record" in (mine / "logs" / "third_party.log").read_text()


def _open_files() -> set[str]:
    return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}


def test_the_log_is_closed_after_each_write(tmp_path):
    """On a Cloud Storage FUSE workdir a file reaches the bucket only when closed: a log held open for the
    whole run was missing there until its end, and lost with a preempted VM."""
    with third_party_logs.captured(verbose=False):
        path = third_party_logs.log_to(tmp_path, named="--workdir")
        logging.getLogger("jax").info("first")
        assert path.read_text().endswith("INFO jax: first\n") and str(path) not in _open_files()
        logging.getLogger("jax").info("second")
        assert path.read_text().count("INFO jax:") == 2 and str(path) not in _open_files()


def test_each_process_of_a_multi_process_run_writes_a_log_of_its_own(tmp_path, monkeypatch):
    """Several processes appending to one file through their own FUSE mounts leave one writer's lines. The
    index: NEXTQUILL_PROCESS_ID where set (from the first record on), else JAX's runtime's record (a TPU
    pod; also where the variable is malformed, which start-up names), never `jax.process_index()` (the
    lock JAX starts its backend under, while logging). Process 0 alone writes `LOG_FILE`."""
    from jax._src import distributed

    monkeypatch.setattr(jax, "process_index", lambda: pytest.fail("took the backend's lock"))
    monkeypatch.delenv("NEXTQUILL_PROCESS_ID", raising=False)
    cases = [({}, 0, "third_party.log"), ({"NEXTQUILL_PROCESS_ID": "1"}, 0, "third_party.process1.log"),
             ({"NEXTQUILL_PROCESS_ID": "2"}, 0, "third_party.process2.log"),
             ({}, 3, "third_party.process3.log"),
             ({"NEXTQUILL_PROCESS_ID": "-1"}, 4, "third_party.process4.log")]  # fmt: skip
    for env, runtime_index, name in cases:
        monkeypatch.setattr(distributed.global_state, "process_id", runtime_index)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with third_party_logs.captured(verbose=False):
            third_party_logs.log_to(tmp_path, named="--workdir")
            logging.getLogger("jax").info(f"from {name}")
        monkeypatch.delenv("NEXTQUILL_PROCESS_ID", raising=False)
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == sorted(name for _, _, name in cases)
    for _, _, name in cases:
        assert (logs / name).read_text().endswith(f"INFO jax: from {name}\n")


@pytest.mark.parametrize(("verbose", "records"), [(False, 3), (True, 3), (False, 1)])
def test_a_log_that_cannot_be_written_is_said_once_on_stderr_not_raised_into_the_caller(
    tmp_path, capsys, verbose, records
):
    """The file is opened at each write: a read-only run directory (`export` reads one), a full disk or a
    stale mount there raised out of the third-party code that logged (Orbax's, mid-save); then logging's
    handler printed a "--- Logging error ---" traceback for every write (2,053 lines of stderr for one
    export of a read-only run). Now one note says so, warnings still reach stderr, and the lines the file
    would have held are counted."""
    (tmp_path / "logs").write_text("a file where the folder goes\n")
    with third_party_logs.captured(verbose=verbose):
        third_party_logs.log_to(tmp_path, named="--workdir")
        for n in range(records):
            logging.getLogger("jax").info(f"record {n}")  # raised FileExistsError
        logging.getLogger("absl").warning("a warning")
    err = capsys.readouterr().err
    path = tmp_path / "logs" / "third_party.log"
    assert "Logging error" not in err and err.count("note: cannot write") == 1
    assert f"note: cannot write the third-party log {path} (" in err
    assert err.count("WARNING absl: a warning\n") == 1
    if verbose:  # the console showed every line, so none is lost
        assert err.count(" INFO jax: record ") == records and "not written" not in err
    else:
        assert " INFO jax: record " not in err
        lines = "1 third-party log line" if records == 1 else f"{records} third-party log lines"
        assert err.endswith(f"note: {lines} not written to {path}\n")


def test_captured_puts_the_root_loggers_level_back(tmp_path):
    """`captured` lowers the root logger to INFO for the file; a caller's level (a library user's WARNING)
    must be back afterwards, or every later INFO line of any library reaches the caller's handlers."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        with third_party_logs.captured(verbose=False):
            assert root.level == logging.INFO
        assert root.level == logging.WARNING
    finally:
        root.setLevel(level)


# transformers imported before `captured` (a caller's own import), then one of its warnings logged inside.
IMPORTED_FIRST = """
import logging, sys
sys.modules["torch"] = None
import transformers
from transformers.utils import logging as hf_logging
from nextquill_jax import third_party_logs
with third_party_logs.captured(verbose=False):
    third_party_logs.log_to(sys.argv[1], named="--out")
    hf_logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
"""


def test_transformers_imported_before_captured_logs_to_the_file_not_its_own_stderr_handler(tmp_path):
    """In a fresh process (this one's transformers was routed by an earlier test, for good): its default
    stderr handler must be off, so its warning goes to the log only, not to the console as well."""
    run = subprocess.run(
        [sys.executable, "-c", IMPORTED_FIRST, str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "a transformers warning" not in run.stderr, run.stderr
    log = (tmp_path / "logs" / "third_party.log").read_text()
    assert "WARNING transformers.modeling_utils: a transformers warning\n" in log, log


def test_the_log_stays_in_the_directory_named_after_the_current_directory_changes(tmp_path, monkeypatch):
    """`log_to` takes a relative directory as the current directory made it when named: a later `chdir` (a
    library caller's) must not move the log."""
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    with third_party_logs.captured(verbose=False):
        third_party_logs.log_to("run", named="--workdir")
        monkeypatch.chdir(tmp_path / "elsewhere")
        logging.getLogger("jax").info("after the chdir")
    assert (tmp_path / "run" / "logs" / "third_party.log").read_text().endswith("INFO jax: after the chdir\n")
    assert not (tmp_path / "elsewhere" / "run").exists()
