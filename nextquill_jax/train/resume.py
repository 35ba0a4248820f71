"""What a resume may change: the config a checkpoint was saved with against the config of the run now.

A workdir's checkpoints continue one run. Resuming them with another model, loss, optimizer, data or length
would train a different run on top of them (a new `train.max_steps` recomputes the learning-rate schedule,
and metrics.jsonl would mix both runs), and a changed model shape would only fail deep inside Orbax. So a
resume is refused, before any state is restored, unless the two configs agree on every key but those of
`MAY_CHANGE`. Nor may the data change under the same config (a moved `train.data_dir`, sources prepared
again after an edit): each checkpoint records the content digests of the prepared splits it was trained and
validated on (`data_identity`), which must match, and the fixed-DCE reference model it was trained against,
which a `loss.reference_model` path can name another of later (`check_same_reference`, which `eval.evaluate`
runs too: a checkpoint's weighted loss terms are measured against its reference). The code behind a
`loss.weighting` name can change too:
each checkpoint records its module's digest, and a resume whose module differs goes on with a warning
(`loss.weighting_record`), since an edit of a comment changes the digest as well.

    check_resumable(ckpt.read_config(step), cfg, workdir, step)
    check_same_data(ckpt.read_progress(step).get("data"), data_identity(data_dir, splits), where)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from nextquill_jax.config import Config, config_to_dict, load_config
from nextquill_jax.config_paths import PATH_FIELDS, absolute_paths
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.prepared_split import PreparedSplit
from nextquill_jax.train.workdir import CHECKPOINT_DIR, CONFIG_FILE

# Dotted keys (a section or a field; a key covers everything below it) that a resume may change, because they
# do not change what is trained: where and how often the run logs, evaluates and saves, how it is laid out on
# the devices, and where it is. Paths that name content (`model.path`, `data.sources`,
# `loss.reference_model`, ...) are not here: a new path may hold another model or data (the data's input
# files may name where they moved to: `check_resumable`'s `data_reused`).
MAY_CHANGE = (
    "logging",  # metrics rows, TensorBoard, progress bar, health warnings, profiling
    "eval.every_steps",  # how often and how much of the split is validated, and the decoding of `evaluate`
    "eval.max_batches",
    "eval.generation",
    "checkpoint",  # when checkpoints are saved and which are kept
    "mesh",  # the device layout: Orbax reshards the state onto another slice
    "train.workdir",  # where the run is; config.yaml records the one it used
    # Where the prepared data is; its content must match what the checkpoint records (`check_same_data`).
    "train.data_dir",
    # Memory and speed settings documented to compute the same values (with LoRA dropout above 0, the
    # micro-batch split and the joint forward draw other dropout masks: the run goes on, not bitwise).
    "model.remat_policy",
    "model.scan_unroll",
    # cuDNN's packed attention over any bound its rows fit (set-up checks it, or `auto` chooses it again:
    # twice as many under `train.joint_forward`, which may change here too).
    "model.cudnn_max_segments",
    "train.joint_forward",
    "train.micro_batches",  # what a resume on fewer devices needs
    "loss.token_chunk",
    "loss.vocab_chunk",
    # Grain's threads and read-ahead: batches come in index order and the saved iterator state is the next
    # index alone, whatever these are (tests/data/test_pipeline.py resumes under others).
    "data.batching.read_threads",
    "data.batching.prefetch_batches",
    # What the run does at a non-finite update. A checkpoint holds only finite updates' results (a stop
    # is checked before each save), so resuming a diverged run with `skip` trains exactly what `skip`
    # from the start would have; a resume that tightens the policy only stops sooner.
    "train.nonfinite",
    "train.max_skips",
)
# The differing keys a refusal lists before it only counts the rest.
MAX_LISTED = 10
_ABSENT = "<absent>"


def covered(key: str, keys: Sequence[str]) -> bool:
    """True if the dotted config `key` is one of `keys` or below one (`model.lora.rank` is below
    `model.lora`)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


def may_change(key: str) -> bool:
    """True if the dotted config `key` is one `MAY_CHANGE` covers (itself or a key below one)."""
    return covered(key, MAY_CHANGE)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf of nested mappings (lists are leaves), e.g. `model.overrides.x`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(
    recorded: Mapping[str, Any], current: Mapping[str, Any], ignore: Callable[[str], bool] = may_change
) -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded value, current value) of every leaf that differs (a path setting only where it
    names other files: `_same`) and that `ignore` does not cover (default: the keys `MAY_CHANGE` covers), by
    key; a key only one side has gets `"<absent>"` on the other. Both are config dicts as `config_to_dict`
    writes them; values are compared as JSON stores them (a tuple equals its list)."""
    as_json = lambda d: flatten(json.loads(json.dumps(d)))
    before, after = as_json(recorded), as_json(current)
    keys = sorted((before.keys() | after.keys()), key=lambda k: k.split("."))
    return [
        (k, before.get(k, _ABSENT), after.get(k, _ABSENT))
        for k in keys
        if not ignore(k) and not _same(k, before.get(k, _ABSENT), after.get(k, _ABSENT))
    ]


def _same(key: str, before: Any, after: Any) -> bool:
    """Whether a config value is unchanged: equal, or for a field naming files (`PATH_FIELDS`) absolute
    paths (or lists of them) that name the same files (`cfgs/../data` and `data` from the same directory,
    which the OS reads through any symbolic link on the way, as `os.path.realpath` does)."""
    if before == after:
        return True
    if key not in PATH_FIELDS:
        return False
    spelt = lambda v: [v] if isinstance(v, str) else v if isinstance(v, list) else None
    paths_before, paths_after = spelt(before), spelt(after)
    if paths_before is None or paths_after is None or len(paths_before) != len(paths_after):
        return False
    return all(
        isinstance(a, str) and isinstance(b, str) and os.path.isabs(a) and os.path.isabs(b)
        and os.path.realpath(a) == os.path.realpath(b)
        for a, b in zip(paths_before, paths_after, strict=True)
    )  # fmt: skip


def listed_changes(changes: Sequence[tuple[str, Any, Any]]) -> str:
    """`changes` (as `config_changes` returns them) as `key: <recorded value> -> <current value>` items
    joined by "; ", the first `MAX_LISTED` of them, then how many more."""
    spell = lambda v: v if v == _ABSENT else json.dumps(v)
    listed = [f"{k}: {spell(old)} -> {spell(new)}" for k, old, new in changes[:MAX_LISTED]]
    more = f" and {len(changes) - MAX_LISTED} more" if len(changes) > MAX_LISTED else ""
    return "; ".join(listed) + more


def normalised(recorded: Mapping[str, Any]) -> Mapping[str, Any]:
    """A config dict saved earlier, as this version's schema reads it, so that it compares key by key with
    `config_to_dict` of a current config (whose paths `train` makes absolute): one saved before a field
    existed gets that field's default; a relative path (recorded by an earlier version, which ran from the
    directory it meant) is joined to the current directory (`config_paths.absolute_paths`); one the schema
    no longer reads is returned as it was saved (its extra keys then differ)."""
    try:
        return config_to_dict(absolute_paths(load_config(None, base=recorded), Path.cwd()))
    except ConfigError:
        return recorded


# The `data` keys naming the files a run's data is prepared from, whose content the prepared data's
# fingerprint holds (`data.prepare`): the record files, the template and the tokenizer.
DATA_INPUTS = ("data.sources", "data.meta", "data.template", "data.tokenizer")


def check_resumable(
    recorded: Mapping[str, Any], cfg: Config, workdir: Path, step: int, *, data_reused: bool = False
) -> None:
    """Return if `cfg` (resolved as set-up resolves it) may resume checkpoint `step` of `workdir`, whose saved
    config is `recorded`: the two agree on every key outside `MAY_CHANGE`, and outside `DATA_INPUTS` where
    `data_reused` (preparing reused the data from the files `cfg` names: the record files of the content,
    names and count it was prepared from, a template of the same text and a tokenizer of the same content,
    wherever they lie: `train.setup.PreparedData`; the data's content is checked against the checkpoint's
    apart, `check_same_data`).

    Raises:
        ConfigError: naming each differing key as `section.key: <checkpoint value> -> <new value>` (the first
            `MAX_LISTED`, then how many more), the workdir and the fix.
    """
    files = lambda key: data_reused and covered(key, DATA_INPUTS)
    changes = config_changes(normalised(recorded), config_to_dict(cfg), lambda k: may_change(k) or files(k))
    if not changes:
        return
    raise ConfigError(
        f"workdir {workdir} holds checkpoint {step} of a run with another config, so resuming would train a "
        f"different run on top of it; differing, the checkpoint's value first: {listed_changes(changes)}. "
        f"A resume may change only {', '.join(MAY_CHANGE)}, and {' / '.join(DATA_INPUTS)} where they name "
        f"the files the data was prepared from, moved (the same content). Fix: run the same config again "
        f"(`nextquill-jax train --config {workdir / CONFIG_FILE}` resumes it), or use a new --workdir for "
        f"the new config."
    )


def check_same_process_count(saved: int | None, current: int, where: str) -> None:
    """Return if the checkpoint at `where`, whose data positions `saved` processes saved
    (`Checkpointer.saved_process_count`; None: not known), may be resumed by `current` processes.

    Raises:
        ConfigError: the counts differ: each process saved the position of its own share of the data, which
            another number of processes cannot take up (the restore would fail on a missing file).
    """
    if saved is None or saved == current:
        return
    raise ConfigError(
        f"checkpoint {where} was saved by {saved} processes and this run has {current}: each process saved "
        f"the position of its own share of the data, which {current} processes cannot take up. Fix: resume "
        f"with {saved} processes (the same number of hosts; the mesh and its devices may change), or start "
        f"a new --workdir."
    )


def data_identity(data_dir: Path, splits: Mapping[str, PreparedSplit]) -> dict[str, Any]:
    """{"dir": `data_dir` as text, "splits": {split name: `PreparedSplit.content_digest`}}: what a checkpoint
    records of the prepared data its run trains and validates on (`splits`, opened from `data_dir`)."""
    return {"dir": str(data_dir), "splits": {name: split.content_digest for name, split in splits.items()}}


def check_same_data(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str) -> None:
    """Return if the checkpoint at `where`, whose recorded `data_identity` is `saved`, was trained on splits
    with the content of `current`'s, wherever they lie now; a checkpoint saved before checkpoints recorded
    it (`saved` None) is not checked.

    Raises:
        ConfigError: naming both directories, the splits whose content differs (or that only one side has)
            and the fix.
    """
    if saved is None:
        return
    before, after = saved["splits"], current["splits"]
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if not changed:
        return
    now = (
        f"the data in {current['dir']} has changed since"
        if saved["dir"] == current["dir"]
        else f"{current['dir']} holds other data than {saved['dir']}, which it was trained on"
    )
    raise ConfigError(
        f"{where} was trained on other prepared data: {now} (split{'s' if len(changed) > 1 else ''} "
        f"{', '.join(changed)}: other content, or present on one side only), so resuming would continue the "
        f"run on other examples. Fix: point train.data_dir at the data the run was trained on (or restore "
        f"the sources prepared into it), or use a new --workdir for the new data."
    )


class ReferenceUse(NamedTuple):
    """How `check_same_reference` words its note and refusal for the command that checks a checkpoint's
    reference: `command` (in the note: "this resume"), `then` (what reading on against another reference
    would do), `until` (how long the reference run's step must stay its newest verified one) and
    `elsewhere` (a fix beside putting the reference back; None: none)."""

    command: str
    then: str
    until: str
    elsewhere: str | None


RESUMING = ReferenceUse(
    "this resume",
    "resuming would train the rest of the run against another reference (other reference DCEs, so other "
    "token weights)",
    "this run has finished",
    "train in a new --workdir",
)
# `eval.evaluate` of a checkpoint: its weighted loss terms and DCE statistics come from the reference.
EVALUATING = ReferenceUse(
    "this evaluation",
    "evaluating it would weigh its loss terms and compute its DCE statistics against another reference "
    "(other reference DCEs, so other token weights) than the one it was trained against",
    "this evaluation has finished",
    None,
)


def check_same_reference(
    saved: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    where: str,
    use: ReferenceUse = RESUMING,
) -> str | None:
    """Check that the checkpoint at `where`, whose recorded reference identity
    (`reference_model.Reference.identity`) is `saved`, was trained against the fixed-DCE reference model that
    `current` identifies now (None: the run has none; under the same config, which `check_resumable` compares
    first, it had none either).
    `use` words the note and the refusal: `RESUMING` for a resume, `EVALUATING` for an evaluation of the
    checkpoint (`eval.evaluate`, which loads the reference of the config saved with it).

    A `loss.reference_model` path stays the same while what it holds changes: a training workdir's newest
    verified checkpoint (the one a start loads) moves on as that run saves, and a model directory can be
    overwritten. A checkpoint saved before checkpoints recorded the reference (`saved` None) cannot be
    checked: rather than refuse every such resume or evaluation, it is accepted and a note returned naming
    the reference to make sure of (none for `base`, which `adapters.check_same_base` checks as the base).
    Returns None when there is nothing to note.

    Raises:
        ConfigError: another reference model (another checkpoint of a workdir, or the same step with another
            manifest; a model whose content fingerprint differs), naming both and the fix; or a fingerprint
            scheme this version does not compute (a checkpoint from a newer version).
    """
    if current is None or saved == current:
        return None
    if saved is None:
        if current["source"] == "base":
            return None
        return (
            f"note: {where} was saved before checkpoints recorded their fixed-DCE reference model, so "
            f"{use.command} cannot check that loss.reference_model, now {_reference_text(current)}, is the "
            f"model it was trained against; make sure it is. Checkpoints saved from now on record it."
        )
    elsewhere = "" if use.elsewhere is None else f", or {use.elsewhere}"
    if "scheme" in saved and "scheme" in current and saved["scheme"] != current["scheme"]:
        raise ConfigError(
            f"{where} recorded its reference model {saved['source']} with the fingerprint scheme "
            f"{saved['scheme']!r}, which this version does not compute (it computes {current['scheme']!r}), "
            f"so it cannot check the reference. Fix: use the version of nextquill-jax that saved the "
            f"checkpoint{elsewhere}."
        )
    if "step" in saved:
        checkpoints = Path(saved["source"]).expanduser() / CHECKPOINT_DIR
        fix = (
            f"make checkpoint {saved['step']} the newest verified one in {checkpoints} again (move the newer "
            f"ones out of it until {use.until}, or restore that step from a backup)"
        )
    else:
        fix = f"put the model this run was trained against back at {saved['source']}"
    raise ConfigError(
        f"{where} was trained against the fixed-DCE reference model {_reference_text(saved)}, but "
        f"loss.reference_model now gives {_reference_text(current)}, so {use.then}. Fix: {fix}{elsewhere}."
    )


def _reference_text(identity: Mapping[str, Any]) -> str:
    """A recorded reference identity (`reference_model.Reference.identity`) in words."""
    if "step" in identity:
        manifest = identity["manifest"]
        digest = "no manifest.json" if manifest is None else f"manifest.json {manifest[:12]}"
        return f"checkpoint {identity['step']} of the run in {identity['source']} ({digest})"
    if "fingerprint" in identity:
        return f"{identity['source']} (fingerprint {identity['fingerprint'][:12]})"
    return repr(identity["source"])  # `base`: the LoRA base
