"""The README's "check an export" snippet, run as written on the session's trained run's export: it must run
and print a logit difference as small as the README says (float32, about 1e-5)."""

from __future__ import annotations

import contextlib
import io

from tests.conftest import readme_python_block


def test_the_readme_export_check_runs_and_prints_a_small_difference(trained_run):
    code = readme_python_block("To check an export")
    assert code.count('"hf_out/"') == 2, code  # both loaders read the export the README names
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code.replace('"hf_out/"', repr(str(trained_run.exported))), {})
    difference = float(printed.getvalue())
    assert 0 <= difference < 1e-4, difference
