"""`nextquill-jax compare --config FILE`: named variants of one base config through train, evaluate and an
effect report, in one table, each metric's difference to a baseline variant with a paired bootstrap interval
(but BLEU's and the DCE AUROC's: statistics of a whole run, `compare_table.NO_INTERVAL`).

A compare file has three sections:

    compare:   {out, baseline, split: test, max_examples, eval_batch_size, effect_examples: 40,
                max_new_tokens, seeds: [0], resamples: 2000}
    variants:  {NAME: {overrides: [section.key=value, ...], train: true, trained_in: null}, ...}
               # train: false evaluates the model its config starts training from (the "not fine-tuned"
               # row); trained_in: OUT evaluates the run NAME another comparison (compare.out OUT) trained
    base:      a whole training config (the sections of configs/*.yaml)

Run `NAME` with seed S lives in `<out>/seed<S>/<NAME>` (its `train.seed` and `data.batching.seed` are S);
every run shares the prepared data `<out>/prepared` unless `base.train.data_dir` names one (a variant whose
`data` overrides change what is prepared has its own, in its workdir). A finished run
writes `compare_done.json`, which records what its numbers depend on (`run_settings`), so an interrupted
comparison resumes. Running the file again reuses a finished run whose settings are unchanged; evaluates it
again when only evaluation settings changed (`compare.*`, `eval.generation`; any setting of a `train: false`
variant, which trains nothing); and refuses, before any run starts, one trained under other training settings
(or an interrupted training that `train` would not resume under them), naming each key and the fix (a new
`compare.out`, or deleting that run's directory). A variant with `trained_in` trains nothing here: it
evaluates the finished run of the same name and seed in another comparison's `compare.out` (the same runs on
another split or with another decoding), which must have trained under the training settings this file gives
the variant, checked before any run starts (`check_trained_in`); its evaluation, effect report and
compare_done.json are written here, and nothing there changes. A run whose compare_done.json predates the
recorded settings is run again: `train` refuses a checkpoint of another config, or finds the run finished
and trains nothing; then it is evaluated again. The per-example numbers
(`compare_table.per_example_metrics`) of all runs become `<out>/results.json` and `<out>/results.md`
(`compare_table`).

SIGTERM or Ctrl-C during a run's training is `train`'s (it saves a checkpoint and stops:
`TrainingStoppedError`). Outside training (the checks, data preparation, evaluation, an effect report, the
table) `run_comparison` abandons the stage it is in and raises `ComparisonStoppedError` naming it: only
compare_done.json, written atomically after everything else, marks a run done, so an abandoned stage runs
again when the same command is run again. A second signal while it stops gets the handler there was before
(SIGTERM's default exit, Ctrl-C's KeyboardInterrupt).

One comparison at a time owns `compare.out`: `run_comparison` holds `<out>/compare.lock` (`LOCK`,
`train.workdir_lock`) from once its checks have passed (they only read) until it ends, before it deletes or
writes anything there (a run's compare_done.json, an untrained variant's data and config.yaml, the table), so
a second one on the same `compare.out` is refused at once with `WorkdirLockedError`. Each run's training
locks its own workdir below (`train.lock`, another file). As with `train`, only process 0 of a multi-process
run takes it (the runtime is started first, as the first run's training would start it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nextquill_jax import lost_signals
from nextquill_jax.config import Config, config_to_dict, load_config, save_config
from nextquill_jax.config_paths import absolute_paths, absolute_value
from nextquill_jax.config_schema import ConfigError, apply_override, build, key_lines, read_yaml, with_line
from nextquill_jax.train.resume import (
    DATA_INPUTS,
    config_changes,
    covered,
    listed_changes,
    may_change,
    normalised,
)
from nextquill_jax.train.workdir_lock import LockUse, WorkdirLock

DONE_FILE = "compare_done.json"
# A variant's name is a directory name under `compare.out` (and not `.` or `..`): no separators, no escape.
VARIANT_NAME = re.compile(r"[A-Za-z0-9_.-]+")
Echo = Callable[[str], None]
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


# The lock on `compare.out`. The runs below it take their own (`train.lock` in each run's workdir).
LOCK = LockUse(
    command="compare",
    file_name="compare.lock",
    clash=(
        "two comparisons in one compare.out would train, evaluate and record the same runs at once, and both "
        "write its table"
    ),
    on_stop="running the same command again resumes it",
    elsewhere="set another compare.out",
    unlocked="comparing without the compare.out lock",
)


# The `compare` counts' least values (checked when the file is loaded, not after a variant has trained):
# (least, what the least means where it is 0, what null means where it may be null).
_COUNTS = {
    "max_examples": (1, None, "all of the split's examples"),
    "eval_batch_size": (1, None, "evaluate's default"),
    "effect_examples": (1, None, None),
    "max_new_tokens": (
        0,
        "no generation, the losses only",
        "the base config's eval.generation.max_new_tokens",
    ),
}


@dataclass(frozen=True)
class CompareConfig:
    """The `compare` section: where the runs go, the baseline variant, what is evaluated and how the
    differences are bootstrapped.

    Fields:
        `out`: the comparison's directory: run NAME with seed S in `<out>/seed<S>/<NAME>`, the prepared data
            the runs share in `<out>/prepared` (unless `base.train.data_dir` names one; a variant whose `data`
            overrides change what is prepared has its own in its run's directory), the table in
            `<out>/results.json` and `<out>/results.md`. A relative path is from the current directory;
            `~` is the home directory.
        `baseline`: the variant every other one is compared to (a name under `variants`).
        `split`: the prepared split evaluated and reported on: `test`, `val` or `train` (the splits `data
            prepare` writes, `data.config.SPLITS`); another value is an error when the file is loaded.
        `max_examples`: evaluate the split's first this many examples (>= 1); null: all of them. ROUGE-1/L,
            METEOR, BLEU and preference recall cover these (`compare_table`).
        `eval_batch_size`: prompts decoded together (>= 1); null: `evaluate`'s default (the run's rows per
            global batch).
        `effect_examples`: the effect report covers the split's first this many examples (>= 1); the NLL
            columns (each example's mean over its target tokens, then the mean over examples, not the report's
            token-weighted `nll`) and the DCE AUROC cover these.
        `max_new_tokens`: the most tokens generated per prompt (>= 0); null: the base config's
            `eval.generation.max_new_tokens`. 0: no generation: each run's teacher-forced losses and effect
            report only, and the table has no ROUGE, METEOR, BLEU or preference recall (changing it
            evaluates finished runs again, as any evaluation setting).
        `seeds`: every variant runs once per seed (its `train.seed` and `data.batching.seed`); at least one,
            each listed once. With several, each mean is over the seeds, shown ± the sample std (n - 1) of the
            per-seed means.
            `--seeds` on the command line replaces them.
        `resamples`: paired bootstrap resamples behind each difference's 95% interval; at least 1000.
    """

    out: str
    baseline: str
    # The values of `data.config.SPLITS` (a test checks they agree).
    split: Literal["train", "val", "test"] = "test"
    max_examples: int | None = None
    eval_batch_size: int | None = None
    effect_examples: int = 40
    max_new_tokens: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    resamples: int = 2000

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds is empty")
        if negative := [s for s in self.seeds if s < 0]:
            # Each seed becomes the run's `train.seed` and `data.batching.seed`, which would otherwise be
            # refused on a variant's line of the file, not here.
            raise ValueError(
                f"`compare.seeds` must be integers >= 0, got {negative} ({self.seeds}). Fix: list seeds >= 0 "
                f"(in the file, or after --seeds)"
            )
        if len(set(self.seeds)) != len(self.seeds):
            repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            raise ValueError(
                f"`compare.seeds` lists seed{'s' if len(repeated) > 1 else ''} {repeated} more than once "
                f"({self.seeds}): a seed run again is the same run, which would count twice in the means and "
                f"give a std across seeds of 0. Fix: list each seed once (in the file, or after --seeds)"
            )
        for key, (least, least_means, null_means) in _COUNTS.items():
            value = getattr(self, key)
            if value is not None and value < least:
                meaning = "" if least_means is None else f" ({least}: {least_means})"
                null = "" if null_means is None else f", or null for {null_means}"
                fix = f"set a count >= {least}{meaning}{null}"
                raise ValueError(f"`compare.{key}` must be >= {least}, got {value}. Fix: {fix}")
        if self.resamples < 1000:
            raise ValueError(f"resamples must be >= 1000 for a 95% interval, got {self.resamples}")


@dataclass(frozen=True)
class VariantConfig:
    """One variant: overrides of the base config, and whether it trains.

    Fields:
        `overrides`: `section.key=value` items applied to `base` (as on the `nextquill-jax train` command
            line), e.g. `[loss.variant=sft]`; each must fit the base config, checked when the file is loaded.
            `train.seed`, `data.batching.seed` (each run's seed) and `train.workdir` are compare's to set:
            an override of them is refused.
        `train`: fine-tune, then evaluate the checkpoint; false: evaluate the model the variant's config
            starts training from (the "not fine-tuned" row): step 0, as `train` would initialise it (a
            `model.preset` with its overrides, random from `train.seed`; a `model.path` with its overrides;
            under LoRA the base carrying the initial adapters), so that it is the model the trained
            variants of the same base start from.
        `trained_in`: null: the run trains here. A path: the `compare.out` of another comparison whose run
            of this variant's name with each seed (`<trained_in>/seed<S>/<NAME>`) finished training there
            (its compare_done.json) under the training settings this file gives the variant, `train.data_dir`
            included (the data it trained on: `base.train.data_dir`, or the variant's own override); its
            final checkpoint is
            evaluated instead of training one here, and the evaluation, effect report and
            compare_done.json are written under this file's `compare.out` (nothing under `trained_in`
            changes): the same runs evaluated on another split or with another decoding. Checked for every
            seed before any run starts. A relative path is from the current directory (`~` the home
            directory); not with `train: false`, nor this file's own `compare.out`.
    """

    overrides: list[str] = field(default_factory=list)
    train: bool = True
    trained_in: str | None = None


@dataclass(frozen=True)
class Comparison:
    """A compare file, loaded: exactly the sections `compare`, `variants` and `base`, each required.

    Fields:
        `compare`: where the runs go, the baseline, the split evaluated, seeds and bootstrap resamples.
        `variants`: the variants compared, by name (at least one): each a mapping of `overrides` and `train`.
            A name is its runs' directory name: letters, digits, `_`, `.` and `-` only, not `.` or `..`.
        `base`: a whole training config, which every variant's overrides change.
        `source`: the path the file was read from (not a key of the file; errors name it).
    """

    compare: CompareConfig
    variants: dict[str, VariantConfig]
    base: dict[str, Any]
    source: str

    def run_config(self, name: str, seed: int) -> Config:
        """The training config of variant `name` with seed `seed` (its workdir set, and `train.data_dir` the
        shared `prepared_dir` unless the base names one or the variant prepares its data otherwise, which
        then goes in its own `<workdir>/prepared`), its relative paths joined to the current directory as
        `train` joins them (`config_paths.absolute_paths`), so that compare_done.json records what the run's
        config.yaml does.

        Raises:
            ConfigError: the `base` section is not a valid training config (naming `base.<key>` and its
                line), or an override that does not fit it (naming the variant, and the line of its
                overrides).
        """
        try:
            shared = build(Config, self.base, "base", self.source)
        except ConfigError as e:
            raise with_line(e, self.source) from None
        # Compare's own settings of each run are values of its base, not overrides: an error in the
        # variant's overrides lists only those the file gives it.
        base = copy.deepcopy(self.base)
        owned = {
            "train.seed": seed,
            "data.batching.seed": seed,
            "train.workdir": str(self.workdir(name, seed)),
        }
        for key, value in owned.items():
            apply_override(base, f"{key}={value}", value)
        try:
            cfg = load_config(
                None, self.variants[name].overrides, base=base, overrides_source=f"variant {name!r}"
            )
        except ConfigError as e:
            raise self._variant_error(name, e) from None
        got = {
            "train.seed": cfg.train.seed,
            "data.batching.seed": cfg.data.batching.seed,
            "train.workdir": cfg.train.workdir,
        }
        for key, value in owned.items():
            if got[key] != value:  # every seed would be the same run, or the run would train elsewhere
                raise self._variant_error(
                    name,
                    ConfigError(
                        f"variant {name!r}: `{key}` is compare's to set (each run's seed is one of "
                        f"compare.seeds, its workdir <compare.out>/seed<S>/<NAME>). Fix: remove the "
                        f"override; set compare.seeds or compare.out instead"
                    ),
                )
        if cfg.train.data_dir is None and cfg.data.fingerprint_fields() == shared.data.fingerprint_fields():
            cfg = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, data_dir=str(self.prepared_dir))
            )
        return absolute_paths(cfg, Path.cwd())

    def _variant_error(self, name: str, error: ConfigError) -> ConfigError:
        """`error` (from variant `name`'s overrides, its message beginning with the variant) blamed on the
        file at the line of the override its message names first in backticks (the item or its key; for a
        section's check, "`optim`: learning_rate ...", that key), else of the variant's `overrides`."""
        message = str(error)
        overrides = self.variants[name].overrides
        named = []
        for key, word in re.findall(r"`([^`\s]+)`(?:: ([A-Za-z_]\w*))?", message):
            for candidate in ([f"{key}.{word}"] if word else []) + [key]:
                named += [
                    f"variants.{name}.overrides[{i}]"
                    for i, item in enumerate(overrides)
                    if candidate in (item, item.partition("=")[0].strip())
                ]
        lines = key_lines(self.source)
        where = next(
            (lines[k] for k in [*named, f"variants.{name}.overrides", f"variants.{name}"] if k in lines), None
        )
        return ConfigError(f"{self.source}{'' if where is None else f', line {where}'}: {message}")

    def workdir(self, name: str, seed: int) -> Path:
        """Run (`name`, `seed`)'s own directory under `compare.out`: `seed<seed>/<name>`."""
        return Path(self.compare.out) / f"seed{seed}" / name

    def trained_workdir(self, name: str, seed: int) -> Path:
        """Where run (`name`, `seed`) trains, its checkpoints and training log: its `workdir`, or under the
        variant's `trained_in`."""
        source = self.variants[name].trained_in
        return self.workdir(name, seed) if source is None else Path(source) / f"seed{seed}" / name

    @property
    def prepared_dir(self) -> Path:
        """Where the comparison prepares its data: `<compare.out>/prepared`."""
        return Path(self.compare.out) / "prepared"


def load_comparison(path: str | Path, seeds: list[int] | None = None) -> Comparison:
    """Read a compare file; `seeds` replaces `compare.seeds`.

    Raises:
        ConfigError: a missing file, missing or unknown sections or keys, a baseline that is not a variant,
            a `base` that is not a valid training config, or a variant whose overrides do not fit it; naming
            the file and, where it can, the line (as `train` names a config's).
    """
    source = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict) or set(raw) != {"compare", "variants", "base"}:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        kind = None
        if isinstance(raw, dict) and "compare" not in raw:
            kind = "demo" if "demo" in raw else "train" if {"model", "data"} & set(raw) else None
        fix = (
            f"Fix: this is a {'demo file' if kind == 'demo' else 'training config'}; run `nextquill-jax "
            f"{kind} --config {source}`, or pass a compare file"
            if kind
            else "Fix: give it exactly those sections"
        )
        raise ConfigError(
            f"{source}: a compare file has exactly the sections compare, variants, base; found {found}. "
            f"{fix} (configs/study/smollm2_synthetic.yaml is one; its keys: configs/REFERENCE.md)."
        )
    try:
        return _comparison(raw, source, seeds)
    except ConfigError as e:  # a key of the file it names: at its line (`run_config`'s errors have theirs)
        raise with_line(e, path) from None


def _comparison(raw: dict[str, Any], source: str, seeds: list[int] | None) -> Comparison:
    """`load_comparison`'s compare file `raw` read from `source`, checked (its Raises, without lines)."""
    section = raw["compare"] or {}
    if seeds is not None and isinstance(section, dict):
        section = {**section, "seeds": list(seeds)}
    compare = build(CompareConfig, section, "compare", source)
    # Absolute (`~` expanded) from the directory it is run in, as a run's config: a record's paths then name
    # the same files from wherever the table is read (a relative eval_dir read another directory's).
    compare = dataclasses.replace(compare, out=absolute_value(compare.out, Path.cwd(), "path"))
    if not isinstance(raw["variants"], dict):
        raise ConfigError(f"{source}: `variants` must map names to {{overrides, train}}")
    if not raw["variants"]:
        raise ConfigError(
            f"{source}: `variants` is empty: a comparison needs its baseline and the variants compared with "
            f"it. Fix: name each under `variants`, e.g. `sft: {{overrides: [loss.variant=sft]}}`"
        )
    variants = {
        str(name): build(VariantConfig, value or {}, f"variants.{name}", source)
        for name, value in raw["variants"].items()
    }
    variants = {
        name: dataclasses.replace(variant, trained_in=absolute_value(variant.trained_in, Path.cwd(), "path"))
        for name, variant in variants.items()
    }
    for name in variants:
        if not VARIANT_NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(
                f"{source}: variant name {name!r} cannot name its runs' directories (<out>/seed<S>/<NAME>): "
                f"a name holds only letters, digits, '_', '.' and '-', and is not '.' or '..'. Fix: rename "
                f"the variant under `variants`."
            )
    for name, variant in variants.items():
        if variant.trained_in is None:
            continue
        where = f"`variants.{name}.trained_in`"
        if not variant.train:
            raise ConfigError(
                f"{source}: {where} names a comparison whose run to evaluate, but the variant has `train: "
                f"false`, which evaluates the model training starts from. Fix: drop one of the two."
            )
        # resolve(): a spelling with `..` or a symbolic link must not pass for another directory.
        if Path(variant.trained_in).resolve() == Path(compare.out).resolve():
            raise ConfigError(
                f"{source}: {where} is this file's own compare.out ({compare.out}), where the run would "
                f"train. Fix: name another comparison's compare.out, or drop `trained_in`."
            )
    if compare.baseline not in variants:
        raise ConfigError(
            f"{source}: `compare.baseline` {compare.baseline!r} is not a variant; variants: "
            f"{sorted(variants)}. Fix: name one of them."
        )
    comparison = Comparison(compare, variants, raw["base"] if raw["base"] is not None else {}, source)
    for name in variants:
        comparison.run_config(name, compare.seeds[0])  # every variant's overrides fit, before anything runs
    return comparison


def untrained_config(cfg: Config, workdir: Path, split: str, echo: Echo = print) -> Config:
    """The config a `train: false` variant is evaluated with, saved as `workdir`/config.yaml once its data is
    prepared: `cfg` with `model.cudnn_max_segments: auto` resolved from the rows of the evaluated `split`
    (`train.setup.resolve_packed_segments`; the set-up that resolves it for training does not run here).

    Raises:
        FileNotFoundError: with `auto`, the prepared data has no `split`.
        DataError / ConfigError: as `train.setup.prepared_data`.
    """
    from nextquill_jax.data.prepared_split import PreparedSplit
    from nextquill_jax.train.setup import evaluation_pipeline, prepared_data, resolve_packed_segments

    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = prepared_data(cfg, workdir, echo).dir
    if cfg.model.cudnn_max_segments == "auto":
        pipeline = evaluation_pipeline(cfg, PreparedSplit(data_dir, split))
        cfg = resolve_packed_segments(cfg, {split: pipeline}, echo)
    save_config(cfg, workdir / "config.yaml")
    return cfg


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
    record = json.loads(done.read_text()) if done.exists() else {}
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
    record = json.loads(done.read_text()) if done.is_file() else {}
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
    saved), made before any run starts. `model.cudnn_max_segments: auto` is left to `train`, which resolves
    it from the data, and so are the paths of the data's input files (`resume.DATA_INPUTS`), which `train`
    accepts where it finds the same files moved there.

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
    auto = lambda key: key == "model.cudnn_max_segments" and cfg.model.cudnn_max_segments == "auto"
    # The data's input files too: `train` resumes with files that moved, as it prepares their data
    # (`resume.check_resumable`'s `data_reused`), and refuses others there.
    left_to_train = lambda key: may_change(key) or auto(key) or covered(key, DATA_INPUTS)
    changes = config_changes(normalised(read_yaml(saved)), config_to_dict(cfg), ignore=left_to_train)
    if changes:
        raise ConfigError(
            f"{comparison.source}: variant {name!r} (seed {seed}) has an unfinished training in {workdir} "
            f"under other settings than the file now gives it, which `train` would refuse to resume; "
            f"differing, the saved run's value first: {listed_changes(changes)}. Fix: use a new compare.out "
            f"for the changed file, or delete {workdir} to train that variant afresh (the other runs are "
            f"kept)."
        )


class ComparisonStoppedError(RuntimeError):
    """SIGTERM or Ctrl-C stopped `run_comparison` outside training; the message names the signal, the run and
    stage it stopped in, the runs finished, and that running the same command again resumes."""


class _Signalled(BaseException):
    """Raised by `_StopOnSignal`'s handler wherever the main thread is: a BaseException, as KeyboardInterrupt,
    so that no `except Exception` on the way takes it for an error and goes on."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


def _distributed() -> bool:
    """Whether JAX's multi-process runtime has started (its preemption service then owns SIGTERM)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


class _StopOnSignal:
    """While entered: SIGTERM and SIGINT (Ctrl-C) raise `_Signalled` (once: the handler puts back the
    handlers there were before), and `where` names the stage the comparison is in (`at`). `suspended()`
    puts the earlier handlers back for a block, so that training's own (`loop._Preemption`) are what they
    would be under `train`. Left alone: an ignored signal (`nohup`, a background job), a handler set outside
    Python, SIGTERM once JAX's multi-process runtime has started, and every signal off the main thread
    (where `signal` cannot set handlers).

    A `_Signalled` raised where Python cannot propagate it (inside a garbage-collector callback, such as the
    one JAX runs at every collection) reaches `sys.unraisablehook`: while entered, that hook installs the
    handler for its signal again and delivers the signal again (`lost_signals`), so that the stop is not
    lost; `cli` does the same for a plain Ctrl-C."""

    def __init__(self) -> None:
        self.where = "the checks of every run's settings, before any run starts"
        self._previous: dict[int, Any] = {}
        self._unraisable: Callable[[Any], Any] | None = None

    def at(self, where: str) -> None:
        """Name the stage the comparison is in (a stop's message says it)."""
        self.where = where

    def __enter__(self) -> _StopOnSignal:
        self._install()
        self._unraisable, sys.unraisablehook = sys.unraisablehook, self._lost
        return self

    def __exit__(self, *exc: object) -> None:
        sys.unraisablehook = self._unraisable
        self._restore()

    def _lost(self, unraisable: Any) -> None:
        signalled = unraisable.exc_value
        # Under JAX's multi-process runtime SIGTERM is its service's (`_install` leaves it alone too).
        if not isinstance(signalled, _Signalled) or (signalled.signum == signal.SIGTERM and _distributed()):
            self._unraisable(unraisable)
            return
        self._previous[signalled.signum] = signal.signal(signalled.signum, self._handle)
        lost_signals.deliver_again(signalled.signum)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """A block in which the signal handlers are the previous ones (training installs its own)."""
        self._restore()
        try:
            yield
        finally:
            self._install()

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(signum) in (signal.SIG_IGN, None):
                continue
            if signum == signal.SIGTERM and _distributed():
                continue
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            if not (signum == signal.SIGTERM and _distributed()):  # JAX's service has set its own since
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self._restore()
        raise _Signalled(signum)


def run_variant(
    comparison: Comparison,
    name: str,
    seed: int,
    echo: Echo = print,
    *,
    stop: _StopOnSignal | None = None,
) -> dict[str, Any]:
    """Train (unless `train: false`, or `trained_in` another comparison, whose run is evaluated), evaluate and
    report the effects of one run; returns what `compare_done.json` holds: where its evaluation and effect
    report are, and the settings it ran with. A finished run with the same settings is not rerun, one whose
    evaluation settings changed is evaluated again (module docstring).

    Raises:
        ConfigError: the run finished training with other training settings (`finished_changes`), or the
            config cannot be used (as `train`).
        TrainingStoppedError: its training stopped on SIGTERM or Ctrl-C; nothing is evaluated or recorded.

    `stop` (`run_comparison`'s) is told each stage, and its handlers are suspended while the run trains.
    """
    from nextquill_jax.data.checksums import file_digest
    from nextquill_jax.data.prepare import load_fast_tokenizer
    from nextquill_jax.eval.effect_report import build_effect_report
    from nextquill_jax.eval.evaluate import evaluate
    from nextquill_jax.train import model_setup
    from nextquill_jax.train.loop import train_to_the_end
    from nextquill_jax.train.metrics_log import last_value
    from nextquill_jax.train.workdir import data_dir_of, initial_model, restore_model

    workdir, trained_run = comparison.workdir(name, seed), comparison.trained_workdir(name, seed)
    done, label = workdir / DONE_FILE, f"{name} (seed {seed})"
    at = (lambda stage: stop.at(f"{label}'s {stage}")) if stop else (lambda stage: None)
    at("settings check")
    cfg, variant, plan = comparison.run_config(name, seed), comparison.variants[name], comparison.compare
    settings = run_settings(comparison, name, cfg)
    changes = finished_changes(comparison, name, seed, cfg)
    trained = False  # whether the workdir holds this run's finished training, which need not run again
    if changes == []:
        echo(f"{label}: done already ({done})")
        record = json.loads(done.read_text())
        # Recorded relative before compare.out was made absolute: this run's evaluation, read from here.
        if not Path(record["eval_dir"]).is_absolute():
            record["eval_dir"] = str(workdir / "eval" / plan.split)
        return record
    if changes is None and done.exists():
        again = (
            "resuming its training (`train` refuses a checkpoint of another config and trains nothing when "
            "the run finished), then evaluating it again"
            if variant.train and variant.trained_in is None
            else "evaluating it again"
        )
        echo(f"{label}: {done} does not record the settings it ran with (an older version wrote it): {again}")
    elif changes is not None:
        recorded = json.loads(done.read_text())["settings"]
        trained = variant.train and recorded["train"] and recorded.get("trained_in") is None
        again = (
            "evaluating its checkpoint again"
            if trained or variant.trained_in is not None
            else ("training it, then evaluating it" if variant.train else "evaluating it again")
        )
        echo(f"{label}: {again}: settings changed since it finished: {listed_changes(changes)}")
    # Until this run finishes again, an interrupted one must not leave the old record to stand for it.
    done.unlink(missing_ok=True)
    if variant.trained_in is not None:
        echo(f"{label}: evaluating the run in {trained_run} (`trained_in`), which trained there")
        workdir.mkdir(parents=True, exist_ok=True)
    elif variant.train and not trained:
        at("training")
        with stop.suspended() if stop else contextlib.nullcontext():
            train_to_the_end(cfg, workdir, echo=echo)
            at("model loading")  # before a signal is ours again
    elif not variant.train:
        at("data preparation")
        cfg = untrained_config(cfg, workdir, plan.split, echo)
    at("model loading")
    # One model serves the evaluation and the effect report: its checkpoint is read and verified once.
    loaded = restore_model(trained_run) if variant.train else initial_model(workdir)
    # The decoding of this file's config: a checkpoint evaluated again would otherwise decode as saved.
    overrides = {} if plan.max_new_tokens is None else {"max_new_tokens": plan.max_new_tokens}
    generation = dataclasses.replace(cfg.eval.generation, **overrides)
    data_dir = data_dir_of(cfg, trained_run)  # the checkpoint's config may name where the data was
    at("evaluation")
    metrics = evaluate(
        trained_run, plan.split, out_dir=workdir / "eval" / plan.split, max_examples=plan.max_examples,
        generation=generation, batch_size=plan.eval_batch_size, loaded=loaded,
        max_new_tokens_setting="compare.max_new_tokens", batch_size_setting="compare.eval_batch_size",
        keep_hint=None, data_dir=data_dir, tokenizer_setting=None, echo=echo,
    )  # fmt: skip
    at("effect report")
    summary = build_effect_report(
        loaded.model,
        load_fast_tokenizer(cfg.data.tokenizer),
        data_dir,
        plan.split,
        workdir / "effects",
        cfg.loss.loss_config(),
        num_examples=plan.effect_examples,
        source=f"{name} ({loaded.source})",
        vocab_origin=model_setup.vocab_origin(cfg.model, saved_with=loaded.source),
    )
    record = {
        "variant": name,
        "seed": seed,
        "eval_dir": str(workdir / "eval" / plan.split),
        "effects_summary": summary["files"]["summary"],
        # `compare_table.recorded_effects` checks the table reads this report, not one written there since.
        "effects_blake2b": file_digest(summary["files"]["summary"]),
        "rendered_split": str(data_dir / f"{plan.split}.jsonl"),
        # Only where it generated (max_new_tokens >= 1): `compare_table` reads the text metrics of a record
        # that has a BLEU, and leaves them out of one that has none.
        **({"bleu": metrics["overall"]["bleu"]} if "overall" in metrics else {}),
        "settings": settings,
        # Updates its training skipped for a non-finite loss (None untrained): with none, the non-finite
        # policy does not matter to its numbers (`finished_changes`).
        "skipped_updates": last_value(trained_run, "skipped") if variant.train else None,
    }
    at(f"record ({DONE_FILE})")
    return write_done(done, record)


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


def run_comparison(
    comparison: Comparison, echo: Echo = print, *, on_locked: Callable[[], object] | None = None
) -> dict[str, Any]:
    """Every variant with every seed (`run_variant`), then the table (`compare_table.write_results`);
    returns results.json's contents.

    Holds `<out>/compare.lock` (`LOCK`; on process 0 of a multi-process run alone) from once the checks of
    every run have passed, before anything in `compare.out` is deleted or written, until it returns or raises.
    `on_locked` (the CLI's: it opens the third-party log in `compare.out`) is called once the lock is held, on
    every process, and not at all when it is refused.

    Raises:
        WorkdirLockedError: another `compare` is running in `compare.out` (nothing there is changed); on the
            other processes of a multi-process run, `parallel.Process0FailedError`.
        ConfigError: before any run starts, every finished run trained with other training settings than
            the file now gives it (`finished_changes`), every unfinished one whose checkpoints `train` would
            not resume under them (`check_interrupted_run`), every `trained_in` run that cannot stand for its
            variant (`check_trained_in`), every variant whose `checkpoint.best_metric` evaluation never
            reports (`loop.check_best_metric`) and every variant with a run to do whose `model.path` (or
            fixed-DCE `loss.reference_model`) names nothing loadable (`setup.check_model_sources`), one line
            each; as `run_variant`.
        ComparisonStoppedError: SIGTERM or Ctrl-C outside training (module docstring); the stage it arrived
            in is abandoned and not recorded as done.

    An error raised by one run (`run_variant`'s) carries a note naming that run and the runs finished before
    it (`add_note`; the CLI's `error:` line ends with it).
    """
    from nextquill_jax.eval.compare_table import write_results

    runs = [(name, seed) for seed in comparison.compare.seeds for name in comparison.variants]
    records: list[dict[str, Any]] = []
    lock = WorkdirLock(comparison.compare.out, LOCK)
    with _StopOnSignal() as stop:
        try:
            _check_runs(comparison, runs)
            _lock(comparison, runs[0], lock, echo)
            _check_eval_batch_size(comparison)  # needs the devices: once the multi-process runtime is up
            if on_locked is not None:
                on_locked()
            for name, seed in runs:
                try:
                    records.append(run_variant(comparison, name, seed, echo, stop=stop))
                except Exception as e:  # its message may name only what the runs share (their prepared data)
                    e.add_note(f"(run {name} (seed {seed}) of the comparison; {_finished(records)})")
                    raise
            stop.at("the table (results.json, results.md)")
            return write_results(comparison, records)
        except _Signalled as e:
            raise ComparisonStoppedError(
                f"{e.signal_name} during {stop.where} (outside training; nothing unfinished is recorded as "
                f"done); {_finished(records)}; run the same command again to resume (finished runs are not "
                f"run again)"
            ) from None
        finally:
            lock.release()


def _finished(records: list[dict[str, Any]]) -> str:
    """`runs finished: ` and the runs of `records` (`run_variant`'s), or `none`."""
    return "runs finished: " + (", ".join(f"{r['variant']} (seed {r['seed']})" for r in records) or "none")


def _lock(comparison: Comparison, first: tuple[str, int], lock: WorkdirLock, echo: Echo) -> None:
    """Take `run_comparison`'s `lock` on process 0 (its Raises: WorkdirLockedError, Process0FailedError).
    Which process is 0 is known only once the multi-process runtime has started, so it is started here, with
    the config of the `first` run, as that run's training or reading would start it."""
    import jax

    from nextquill_jax import parallel
    from nextquill_jax.train.workdir import start_distributed

    start_distributed(comparison.run_config(*first))
    parallel.process_0_result(lambda: int(lock.acquire(jax.process_index(), echo)), f"to lock {lock.path}")


def _check_eval_batch_size(comparison: Comparison) -> None:
    """Refuse a `compare.eval_batch_size` that some variant's mesh does not split, before any run starts:
    `evaluate` refuses it only after that variant's training.

    Raises:
        ConfigError: naming each such variant, its mesh and the fix.
    """
    from nextquill_jax import parallel
    from nextquill_jax.eval.evaluate import unsplit_batch_message

    plan = comparison.compare
    if plan.eval_batch_size is None or plan.max_new_tokens == 0:  # evaluate's default, or nothing decoded
        return
    refused = []
    for name in comparison.variants:
        cfg = comparison.run_config(name, plan.seeds[0])
        try:
            mesh = parallel.make_mesh(cfg.mesh.sizes())
        except ValueError:  # a mesh these devices cannot make: training (or reading) names it
            continue
        if plan.eval_batch_size % (shards := parallel.batch_shard_count(mesh)):
            message = unsplit_batch_message(
                plan.eval_batch_size, shards, dict(mesh.shape), "compare.eval_batch_size"
            )
            refused.append(f"{comparison.source}: variant {name!r}: {message}")
    if refused:
        raise ConfigError("\n".join(refused))


def _without_own_reference(cfg: Config, comparison: Comparison) -> Config:
    """`cfg` without its `loss.reference_model` where that is a path under `compare.out`: the workdir of a run
    of this comparison, which an earlier variant trains before this one reads it (and which `train` checks
    then)."""
    reference = cfg.loss.reference_model
    out = Path(comparison.compare.out).expanduser().resolve()
    if (
        reference is None
        or reference == "base"
        or not Path(reference).expanduser().resolve().is_relative_to(out)
    ):
        return cfg
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, reference_model=None))


def _check_runs(comparison: Comparison, runs: list[tuple[str, int]]) -> None:
    """`run_comparison`'s checks of every run before any starts (its Raises: ConfigError)."""
    from nextquill_jax.train.loop import check_best_metric
    from nextquill_jax.train.setup import check_model_sources

    refused, sources_checked = [], set()
    for name, seed in runs:  # all of them first: no run is evaluated again only for a later one to refuse
        trains_here = comparison.variants[name].train and comparison.variants[name].trained_in is None
        try:
            cfg = comparison.run_config(name, seed)
            check_trained_in(comparison, name, seed, cfg)
            changes = finished_changes(comparison, name, seed, cfg)
            if changes is None:
                check_interrupted_run(comparison, name, seed, cfg)
        except ConfigError as e:
            refused.append(str(e))
            continue
        if changes != [] and name not in sources_checked:  # it loads its model: to train or evaluate
            sources_checked.add(name)  # the same for every seed
            try:  # a path that names nothing would otherwise stop the comparison only when this run starts
                check_model_sources(_without_own_reference(cfg, comparison))
            except ConfigError as e:
                refused.append(f"{comparison.source}: variant {name!r}: {e}")
        if trains_here and seed == comparison.compare.seeds[0]:
            try:  # a misspelt metric would otherwise stop the comparison only when this variant starts
                check_best_metric(cfg)
            except ConfigError as e:
                refused.append(f"{comparison.source}: variant {name!r}: {e}")
    if refused:
        raise ConfigError("\n".join(refused))
