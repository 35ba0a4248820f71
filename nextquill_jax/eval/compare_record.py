"""What a finished `compare` run records (`<run>/compare_done.json`: where its evaluation and effect report
are, and the settings its numbers depend on, `run_settings`) and the checks of it made before any run starts.

Running a compare file again reuses a finished run whose settings are unchanged; evaluates it again when only
evaluation settings changed (`compare.*`, `eval.generation`; any setting of a `train: false` variant, which
trains nothing); and refuses, before any run starts, one trained under other training settings
(`finished_changes`), or an interrupted training that `train` would not resume under them
(`check_interrupted_run`), naming each key and the fix (a new `compare.out`, or deleting that run's
directory). A variant with `trained_in` evaluates the finished run of the same name and seed in another
comparison's `compare.out`, which must have trained under the training settings this file gives the variant
(`check_trained_in`). A run whose compare_done.json predates the recorded settings is run again: `train`
refuses a checkpoint of another config, or finds the run finished and trains nothing; then it is evaluated
again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nextquill_jax.config import Config, config_to_dict
from nextquill_jax.config_schema import ConfigError, read_yaml
from nextquill_jax.eval.compare_file import Comparison
from nextquill_jax.train.resume import (
    DATA_INPUTS,
    config_changes,
    covered,
    listed_changes,
    may_change,
    normalised,
)

DONE_FILE = "compare_done.json"
Change = tuple[str, Any, Any]  # (dotted key, recorded value, current value), as `resume.config_changes`
# The `compare` fields that change a run's numbers, recorded with it; `out`, `baseline`, `seeds` and
# `resamples` only decide where the runs are and how the table is built from them.
EVALUATION_FIELDS = ("split", "max_examples", "eval_batch_size", "effect_examples", "max_new_tokens")
# The non-finite policy: a resume may change it (a diverged run resumes skipping), and a finished run's
# numbers depend on it only once it skipped an update (`finished_changes`).
_NONFINITE_POLICY = ("train.nonfinite", "train.max_skips")
# Config keys a resume may change (`resume.MAY_CHANGE`) that still change a compare run's numbers: the
# decoding its evaluation uses, where its prepared data lies (the record holds the path, not the content), and
# the non-finite policy.
_RESULT_KEYS = ("eval.generation", "train.data_dir", *_NONFINITE_POLICY)


def run_settings(comparison: Comparison, name: str, cfg: Config) -> dict[str, Any]:
    """What the numbers of variant `name`'s run with config `cfg` (`Comparison.run_config`) depend on, as its
    compare_done.json records them: {"train": the variant's `train`, "config": `cfg` as `config_to_dict`
    writes it, "evaluation": the `EVALUATION_FIELDS` of the `compare` section, "trained_in": the variant's
    `trained_in` as an absolute path, or None}."""
    trained_in = comparison.variants[name].trained_in
    return {
        "train": comparison.variants[name].train,
        "config": config_to_dict(cfg),
        "evaluation": {f: getattr(comparison.compare, f) for f in EVALUATION_FIELDS},
        "trained_in": None if trained_in is None else str(Path(trained_in).absolute()),
    }


# Keys a resume may change that draw other LoRA dropout masks where `model.lora.dropout` is above 0 (README:
# such a resume is not bitwise the uninterrupted run), so that a run trained under other values of them has
# other numbers.
_DROPOUT_DRAW_KEYS = ("train.joint_forward", "train.micro_batches")


def _draws_dropout(config: Mapping[str, Any]) -> bool:
    """Whether a `config_to_dict` config trains LoRA adapters with dropout above 0."""
    lora = (config.get("model") or {}).get("lora") or {}
    return (lora.get("dropout") or 0) > 0


def settings_changes(
    recorded: Mapping[str, Any], current: Mapping[str, Any], name: str
) -> tuple[list[Change], list[Change]]:
    """(training changes, evaluation changes) from the `run_settings` a run of variant `name` recorded to
    `current`'s. Training: `variants.<name>.train` and every config key that changes what is trained;
    evaluation: `compare.<field>` of `EVALUATION_FIELDS`, `eval.generation.*` and `variants.<name>.trained_in`
    (which checkpoint is evaluated; a record without it trained in its own directory). Keys that change
    neither (`resume.MAY_CHANGE` but `_RESULT_KEYS`: logging, checkpointing, the mesh, ...) are left out; so
    are `_DROPOUT_DRAW_KEYS` unless either config trains LoRA adapters with dropout."""
    was = normalised(recorded["config"])
    result_keys = _RESULT_KEYS + (
        _DROPOUT_DRAW_KEYS if _draws_dropout(was) or _draws_dropout(current["config"]) else ()
    )
    config = config_changes(
        was, current["config"], ignore=lambda key: may_change(key) and not covered(key, result_keys)
    )
    evaluation = config_changes(
        {"compare": recorded["evaluation"]}, {"compare": current["evaluation"]}, ignore=lambda _: False
    )
    flag = (f"variants.{name}.train", recorded["train"], current["train"])
    decoding = lambda change: change[0].startswith("eval.generation.")
    training = ([flag] if flag[1] != flag[2] else []) + [c for c in config if not decoding(c)]
    source = (f"variants.{name}.trained_in", recorded.get("trained_in"), current.get("trained_in"))
    return training, [c for c in config if decoding(c)] + evaluation + (
        [source] if source[1] != source[2] else []
    )


def trained_differently(record: Mapping[str, Any], training: list[Change]) -> list[Change]:
    """`training` (`settings_changes`' first list, from the settings compare_done.json `record` holds) without
    the non-finite policy where the run skipped no update: it trained alike under any."""
    if record.get("skipped_updates") == 0:  # older records do not say
        return [change for change in training if not covered(change[0], _NONFINITE_POLICY)]
    return training


def _moved_data_hint(training: list[Change], elsewhere: str | None = None) -> str:
    """Where `training` changes include `train.data_dir` or the data's input files (`resume.DATA_INPUTS`):
    why the data's path differing refuses the run, and the fix, for a run of this comparison (a moved or
    copied one?) or, `elsewhere` (the variant's name), of the variant's `trained_in` run."""
    # Unlike `train`, which compares the data's content digests, a run's record holds its data's path.
    trained_on = [was for key, was, _ in training if key == "train.data_dir"]
    if not trained_on:
        if any(covered(key, DATA_INPUTS) for key, _, _ in training):
            return (
                " (moved record files, template or tokenizer? compare_done.json records their paths, not "
                "their content: to reuse the runs, put the files back, or a symbolic link to their new place "
                "at each old path)"
            )
        return ""
    why = "compare_done.json records the prepared data's path, not its content"
    if elsewhere is not None:
        data = trained_on[0]
        if data is None:  # it prepared its own data (its `data` overrides): base's data_dir would replace it
            return (
                f" ({why}: add `train.data_dir=null` to `variants.{elsewhere}.overrides`: it trained on data "
                f"prepared in its own directory)"
            )
        return (
            f" ({why}: add `train.data_dir={data}` to `variants.{elsewhere}.overrides`, or set "
            f"`base.train.data_dir: {data}` in this file, the data it trained on)"
        )
    return (
        f" (a moved or copied comparison? {why}, so a run whose data now lies elsewhere is not reused even "
        "where that data is the same: to reuse the runs, run the file with the compare.out they ran in, or "
        f"set `base.train.data_dir: {trained_on[0]}` in it, the data they trained on)"
    )


def finished_changes(comparison: Comparison, name: str, seed: int, cfg: Config) -> list[Change] | None:
    """The settings of run (`name`, `seed`), with config `cfg`, that differ from those its compare_done.json
    records, every one of which only needs the run evaluated again: [] when none differ; None when the run
    has not finished, or finished before compare_done.json recorded its settings.

    Raises:
        ConfigError: the run trained, and the file now gives it other training settings (or `train:
            false`): naming the run, each differing key (the recorded value first) and the fix.
    """
    workdir = comparison.workdir(name, seed)
    done = workdir / DONE_FILE
    record = json.loads(done.read_text(encoding="utf-8")) if done.exists() else {}
    recorded = record.get("settings")
    if recorded is None:
        return None
    training, evaluation = settings_changes(recorded, run_settings(comparison, name, cfg), name)
    training = trained_differently(record, training)
    # A run evaluated from another comparison's (`trained_in`) has no training here to keep; nor has one
    # that trained here once the variant is evaluated from another comparison's run (`check_trained_in`
    # checks that run's training settings instead).
    now_elsewhere = comparison.variants[name].trained_in is not None
    if training and recorded["train"] and recorded.get("trained_in") is None and not now_elsewhere:
        raise ConfigError(
            f"{comparison.source}: variant {name!r} (seed {seed}) finished training in {workdir} with other "
            f"settings than the file now gives it: its checkpoint cannot stand for the new ones (nor does "
            f"`train` continue a run under another config); differing, the finished run's value first: "
            f"{listed_changes(training + evaluation)}{_moved_data_hint(training)}. Fix: use a new "
            f"compare.out for the changed file, or delete {workdir} to run that variant again (the other "
            f"runs are kept)."
        )
    return training + evaluation


def check_trained_in(comparison: Comparison, name: str, seed: int, cfg: Config) -> None:
    """Return unless variant `name` has `trained_in` and its run there with `seed` cannot stand for this
    file's run with config `cfg`: it has not finished (no compare_done.json recording its settings), it did
    not train (`train: false`), it was itself evaluated from another comparison's run, or it trained under
    other training settings (`settings_changes`; evaluation settings may differ: that is the point).

    Raises:
        ConfigError: naming the variant, the seed, the run's directory, what is wrong (each differing key,
            the finished run's value first) and the fix.
    """
    if comparison.variants[name].trained_in is None:
        return
    run = comparison.trained_workdir(name, seed)
    done = run / DONE_FILE
    record = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else {}
    recorded = record.get("settings")
    head = f"{comparison.source}: variant {name!r} (seed {seed}) evaluates the run in {run} (`trained_in`)"
    if not run.is_dir():
        raise ConfigError(
            f"{head}, which does not exist. Fix: set `trained_in` to the compare.out of the comparison that "
            f"trained the variant (its runs lie in <compare.out>/seed<N>/<variant>), or drop `trained_in` to "
            f"train the variant here."
        )
    if recorded is None:
        what = "which has not finished" if not done.is_file() else "whose record predates recorded settings"
        raise ConfigError(
            f"{head}, {what}. Fix: run the comparison that trains it to the end first (or run that file "
            f"again, so that it records its settings), or drop `trained_in` to train the variant here."
        )
    if not recorded["train"]:
        raise ConfigError(
            f"{head}, which trained nothing (`train: false` there). Fix: name a comparison that trained the "
            f"variant, or drop `trained_in` to train it here."
        )
    if recorded.get("trained_in") is not None:
        raise ConfigError(
            f"{head}, which did not train there either: it was evaluated from the comparison in "
            f"{recorded['trained_in']}. Fix: set `trained_in: {recorded['trained_in']}`, where it trained."
        )
    training, _ = settings_changes(recorded, run_settings(comparison, name, cfg), name)
    training = trained_differently(record, training)
    if training:
        raise ConfigError(
            f"{head}, which trained under other settings than this file gives the variant, so its checkpoint "
            f"cannot stand for this variant; differing, the finished run's value first: "
            f"{listed_changes(training)}{_moved_data_hint(training, name)}. Fix: give the variant "
            f"the settings that run trained with, or drop `trained_in` to train it here."
        )


def check_interrupted_run(comparison: Comparison, name: str, seed: int, cfg: Config) -> None:
    """Return unless run (`name`, `seed`), with config `cfg`, trains here (no `trained_in`) and its workdir
    holds checkpoints of an unfinished run (no compare_done.json with settings) saved under another config:
    the check `train` makes when it resumes (`resume.check_resumable`, against the config.yaml the run
    saved), made before any run starts. The keys a resume may change (`resume.MAY_CHANGE`, which holds
    `model.cudnn_max_segments`: `auto` is resolved by `train` from the data) are left to `train`, and so are
    the paths of the data's input files (`resume.DATA_INPUTS`), which `train` accepts where it finds the same
    files moved there.

    Raises:
        ConfigError: naming the run, each differing key (the saved run's value first) and compare's fix.
    """
    from nextquill_jax.train.workdir import CHECKPOINT_DIR, CONFIG_FILE

    workdir = comparison.workdir(name, seed)
    checkpoints = workdir / CHECKPOINT_DIR
    saved = workdir / CONFIG_FILE
    variant = comparison.variants[name]
    if not variant.train or variant.trained_in is not None or not saved.is_file() or not checkpoints.is_dir():
        return
    if not any(p.name.isdigit() for p in checkpoints.iterdir()):
        return
    # The data's input files too: `train` resumes with files that moved, as it prepares their data
    # (`resume.check_resumable`'s `data_reused`), and refuses others there.
    left_to_train = lambda key: may_change(key) or covered(key, DATA_INPUTS)
    changes = config_changes(normalised(read_yaml(saved)), config_to_dict(cfg), ignore=left_to_train)
    if changes:
        raise ConfigError(
            f"{comparison.source}: variant {name!r} (seed {seed}) has an unfinished training in {workdir} "
            f"under other settings than the file now gives it, which `train` would refuse to resume; "
            f"differing, the saved run's value first: {listed_changes(changes)}. Fix: use a new compare.out "
            f"for the changed file, or delete {workdir} to train that variant afresh (the other runs are "
            f"kept)."
        )


def write_done(path: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """Write a run's compare_done.json `record` (`run_variant`) to `path` and return it as read back: a
    non-finite measured number (a diverged run's BLEU) is written null (`compare_table.read_number` reads it
    as NaN), since bare NaN is not JSON. `settings` is written as the config gives it, so that
    `finished_changes` compares it exactly (a config's `.inf` stays Infinity there)."""
    from nextquill_jax.atomic_file import write_text_atomic
    from nextquill_jax.json_object import nonfinite_to_null

    measured = nonfinite_to_null({k: v for k, v in record.items() if k != "settings"})
    written = {**measured, "settings": record["settings"]}
    write_text_atomic(path, json.dumps(written, indent=1) + "\n")
    return written
