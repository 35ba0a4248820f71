"""What a run records of the code behind its `loss.weighting` name, and what it says when that code changed.

`LossConfig.weighting` names a function (`package.module:function`, `loss.weighting`); the name can stay while
its module is edited. Each checkpoint records the module's fingerprint (`weighting_fingerprint`: its file and
the SHA-256 of its bytes), evaluation's metrics.json and the effect report's summary.json its digest
(`weighting_sha256`), and a resume or a command that reads a checkpoint warns when the module's digest is not
the checkpoint's (`weighting_note`). Warns, not refuses: any edit changes the digest, a comment's too. Free
of JAX.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nextquill_jax.loss.config import weighting_function


def weighting_fingerprint(name: str | None) -> dict | None:
    """What a run records of its `LossConfig.weighting` `name`, so that a resume, an evaluation or a report
    can tell when the code behind the name changed: None for None (the paper's weights), else
    `{"name": name, "module": <its module's name>, "file": <the module's source file, absolute, as text>,
    "sha256": <hex SHA-256 of that file's bytes as they are on disk now>}`; "file" and "sha256" are None where
    the module has no source file on disk (a built-in or compiled module, a zip import).

    The whole module is hashed, not the function alone: the function's parameters live in its module
    (`functools.partial` there, `weighting.py`), so any edit of it, a comment included, changes the digest.
    Modules it imports in turn are not hashed.

    Raises:
        ValueError: as `weighting_function`: `name` is not `module:function`, its module does not import, or
            it names no function; each message gives the fix.
    """
    if name is None:
        return None
    weighting_function(name)  # the name's checks and messages; imports the module
    module_name = name.partition(":")[0]
    try:
        source = inspect.getsourcefile(importlib.import_module(module_name))
    except TypeError:  # a built-in module
        source = None
    if source is None or not Path(source).is_file():  # none, or source from a loader, not a file (a zip)
        return {"name": name, "module": module_name, "file": None, "sha256": None}
    # Absolute: a module found through a relative sys.path entry (PYTHONPATH=.) is named where it is.
    path = Path(source).absolute()
    return {
        "name": name,
        "module": module_name,
        "file": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def weighting_sha256(name: str | None) -> str | None:
    """The "sha256" of `weighting_fingerprint(name)`: what evaluation and the effect report record beside
    `weighting`; None for None (the paper's weights) or a module without a source file.

    Raises:
        ValueError: as `weighting_function`.
    """
    fingerprint = weighting_fingerprint(name)
    return None if fingerprint is None else fingerprint["sha256"]


# What a changed `loss.weighting` module means (`weighting_note`): for a resumed run, and for a command that
# reads a checkpoint (evaluate, effects), with the fix of each.
RESUMED_WITH_OTHER_WEIGHTS = (
    "the rest of the run weights tokens with the current code",
    "restore the module's code to continue the same run, or use a new --workdir for the new weights",
)
READ_WITH_OTHER_WEIGHTS = (
    "this command's weighted loss terms and weights ω come from the current code, not the code the run "
    "trained with",
    "restore the module's code to measure with the run's own weights",
)


def weighting_note(
    saved: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    where: str,
    meaning: tuple[str, str] = RESUMED_WITH_OTHER_WEIGHTS,
) -> str | None:
    """The one-line warning that the module of the run's `loss.weighting` has changed since the checkpoint at
    `where` was saved, or None. `saved` is the checkpoint's recorded `weighting_fingerprint`, `current` the
    run's now; the warning names the function, the module file, both digests (shortened), then what that
    means and the fix: `meaning`, `RESUMED_WITH_OTHER_WEIGHTS` for a resume, `READ_WITH_OTHER_WEIGHTS` for a
    command that reads the checkpoint.

    A resume is not refused: any edit of the module changes its digest, a comment's too, and a changed
    function may be what the user meant. None when the digests agree, when either side has none (the paper's
    weights, a module without a source file) and for a checkpoint saved before checkpoints recorded it
    (`saved` None). A changed `loss.weighting` name is `train.resume.check_resumable`'s to refuse.
    """
    if saved is None or current is None or saved["sha256"] is None or current["sha256"] is None:
        return None
    if saved["sha256"] == current["sha256"]:
        return None
    then, fix = meaning
    return (
        f"warning: loss.weighting {current['name']}: its module {current['file']} has changed since "
        f"checkpoint {where} was saved (sha256 {saved['sha256'][:12]} -> {current['sha256'][:12]}), so "
        f"{then}. Fix: {fix}."
    )
