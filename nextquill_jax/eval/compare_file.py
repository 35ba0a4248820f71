"""A `nextquill-jax compare --config FILE` file, read and checked: named variants of one base config
(`load_comparison`, giving a `Comparison`). What runs it and how is `eval.compare`'s.

A compare file has three sections:

    compare:   {out, baseline, split: test, max_examples, eval_batch_size, effect_examples: 40,
                max_new_tokens, seeds: [0], resamples: 2000}
    variants:  {NAME: {overrides: [section.key=value, ...], train: true, trained_in: null}, ...}
               # train: false evaluates the model its config starts training from (the "not fine-tuned"
               # row); trained_in: OUT evaluates the run NAME another comparison (compare.out OUT) trained
    base:      a whole training config (the sections of configs/*.yaml)

Run `NAME` with seed S lives in `<out>/seed<S>/<NAME>` (its `train.seed` and `data.batching.seed` are S);
every run shares the prepared data `<out>/prepared` unless `base.train.data_dir` names one (a variant whose
`data` overrides change what is prepared has its own, in its workdir).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nextquill_jax.config import Config, load_config
from nextquill_jax.config_paths import absolute_paths, absolute_value
from nextquill_jax.config_schema import (
    ConfigError,
    apply_override,
    build,
    check_choices,
    key_lines,
    read_yaml,
    with_line,
)

# A variant's name is a directory name under `compare.out` (and not `.` or `..`): no separators, no escape.
VARIANT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


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
        check_choices(self)
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
