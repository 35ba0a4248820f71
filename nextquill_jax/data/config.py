"""`DataConfig`: where the records come from, how they become examples, and how they are batched.

The YAML section `data:` maps onto it key for key (`data.batching.*` onto `BatchingConfig`); the loader is
`nextquill_jax.config.build`. Source paths are relative to the working directory and may be glob patterns;
`train` and `data prepare` join them to it (`nextquill_jax/config_paths.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

FORMATS = ("amazon2023", "dpl", "lamp", "generic", "synthetic")
SPLITS = ("train", "val", "test")
# The split each word names in a split file's name (`sources/read.py`); a record's `split` is one of SPLITS.
SPLIT_WORDS = {
    "train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"
}  # fmt: skip
# DataConfig fields that do not change the prepared data, so a change to one does not prepare it again: how
# many records one tokenizer call takes (speed and memory) and how many invalid records an error lists. Data
# prepared before they left the fingerprint recorded one that holds them (`prepare.py` still accepts it).
RESULT_NEUTRAL_FIELDS = ("tokenize_batch_size", "max_errors_shown")


@dataclass(frozen=True)
class BatchingConfig:
    """How examples become batches (YAML section `data.batching`).

    Fields:
        `mode`: `pack` (several examples per fixed-length row), `bucket` (one example per row, padded to a
            length bucket; every batch from one bucket) or `random` (one example per row; every global batch
            is `rows_per_batch * process_count` consecutive examples of the epoch's random order, a uniform
            sample as the public code's sampler draws, padded to its own longest example in each of T_w, T_o
            and R, rounded up to `length_multiple`: each new shape compiles the step once, so a larger
            multiple means fewer programs and more padding).
        `seq_len_with`: T_w, tokens per row of the with-history stream (the largest bucket in bucket mode).
        `seq_len_without`: T_o, tokens per row of the without-history stream. null: derived from the data, a
            multiple of `length_multiple` (pack: T_w times the ratio of without- to with-stream tokens, and at
            least the longest without-history sequence; bucket: the longest without-history sequence).
        `response_slots`: R, target tokens per row. null: derived like `seq_len_without` from target
            lengths.
        `length_multiple`: derived lengths are rounded up to a multiple of this (128 suits TPU tiles).
        `rows_per_batch`: rows of one batch on ONE process; the global batch has rows_per_batch *
            process_count rows.
        `bucket_boundaries`: with-stream lengths of the buckets below `seq_len_with`, increasing (bucket mode;
            `seq_len_with` is always the last bucket). Empty: powers of two from `length_multiple` up.
        `open_rows`: rows the packer keeps open while filling (larger packs tighter, planning is O(open_rows)
            per example).
        `too_long`: `error` (refuse examples that do not fit a row) or `truncate` (cut the target, counted).
        `shuffle`: shuffle the examples every epoch (by `seed` and the epoch number).
        `seed`: the shuffle seed (>= 0).
        `num_epochs`: epochs to iterate; null repeats forever (then `train.max_steps` ends the run), epoch
            after epoch as with a number: the logged `epoch`, and evaluations and checkpoints at epoch ends.
        `drop_remainder`: drop an epoch's partly filled last batches (counted) instead of padding them with
            empty rows.
        `read_threads`: Grain threads building batches (0 builds them in the calling thread).
        `prefetch_batches`: batches Grain builds ahead.
    """

    mode: Literal["pack", "bucket", "random"] = "pack"
    seq_len_with: int = 2048
    seq_len_without: int | None = None
    response_slots: int | None = None
    length_multiple: int = 128
    rows_per_batch: int = 8
    bucket_boundaries: tuple[int, ...] = ()
    open_rows: int = 64
    too_long: Literal["error", "truncate"] = "error"
    shuffle: bool = True
    seed: int = 42
    num_epochs: int | None = 1
    drop_remainder: bool = False
    read_threads: int = 2
    prefetch_batches: int = 4

    def __post_init__(self):
        object.__setattr__(self, "bucket_boundaries", tuple(self.bucket_boundaries))
        for name in ("seq_len_with", "length_multiple", "rows_per_batch", "open_rows"):
            _check_int(f"batching.{name}", getattr(self, name), minimum=1)
        for name in ("seq_len_without", "response_slots"):
            if getattr(self, name) is not None:
                _check_int(f"batching.{name}", getattr(self, name), minimum=1)
        if self.num_epochs is not None:
            _check_int("batching.num_epochs", self.num_epochs, minimum=1)
        _check_int("batching.seed", self.seed, minimum=0)
        _check_int("batching.read_threads", self.read_threads, minimum=0)
        _check_int("batching.prefetch_batches", self.prefetch_batches, minimum=0)
        if self.mode not in ("pack", "bucket", "random"):
            raise ValueError(f"data.batching.mode: {self.mode!r} is not one of 'pack', 'bucket', 'random'")
        if self.too_long not in ("error", "truncate"):
            raise ValueError(f"data.batching.too_long: {self.too_long!r} is not one of 'error', 'truncate'")
        for name in ("shuffle", "drop_remainder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.batching.{name}: expected true or false, got {getattr(self, name)!r}")
        b = self.bucket_boundaries
        for v in b:
            _check_int("batching.bucket_boundaries", v, minimum=1)
        if any(x >= y for x, y in itertools.pairwise(b)):
            raise ValueError(f"data.batching.bucket_boundaries: {list(b)} must be strictly increasing")
        if b and b[-1] >= self.seq_len_with:
            raise ValueError(
                f"data.batching.bucket_boundaries: {b[-1]} >= seq_len_with {self.seq_len_with}; list only "
                f"the boundaries below seq_len_with (it is always the last bucket)"
            )

    def with_boundaries(self) -> tuple[int, ...]:
        """The with-stream length of every bucket, increasing, ending with `seq_len_with` (pack and random
        modes: that alone, the largest row)."""
        if self.mode != "bucket":
            return (self.seq_len_with,)
        lows = self.bucket_boundaries
        if not lows:
            lows = tuple(
                2**k
                for k in range(max(0, math.ceil(math.log2(self.length_multiple))), 32)
                if 2**k < self.seq_len_with
            )
        return (*lows, self.seq_len_with)


@dataclass(frozen=True)
class DataConfig:
    """Data settings; validated on construction (ValueError naming the `data.<field>`).

    `nextquill-jax data prepare` (or the first `train` start) reads the records of `sources` and `meta`,
    renders each target's prompt with and without the user's history, tokenises them and writes the prepared
    splits (`nextquill_jax/data/prepare.py`); `batching` then decides how training reads them. The `dpl_*`
    defaults are the public DPL protocol's.

    Fields:
        `format`: how `sources` and `meta` are read: `amazon2023` (raw Amazon Reviews 2023 files, turned into
            records by the DPL benchmark's protocol per category, `data/sources/amazon2023.py`, with the
            `dpl_*` thresholds), `dpl` (DPL-built rows), `lamp` (LaMP / LongLaMP), `generic` (one record per
            JSON line, `.json` array element or Parquet row; README, "Your own data") or `synthetic` (the
            synthetic benchmark, generated in-process).
        `sources`: the record files, paths or glob patterns relative to the working directory (`**` matches
            any depth of directories; a file matched twice, by two patterns or two spellings of its path, is
            read once). amazon2023: review files `<Category>.jsonl[.gz]|.parquet`; dpl: built rows
            (`user_id`, `profile`, `data`), one file per split, the split read from the file name (train; val,
            valid, validation or dev; test); lamp: question files (`id`, `input`, `profile`, optional inline
            `output`), split from the file name; generic: `.jsonl[.gz]|.json|.parquet`, each record's split
            its `split`, else `default_split`; synthetic: none.
        `meta`: the metadata files, paths or glob patterns (as in `sources`). amazon2023: `meta_<Category>.*`,
            one per review file; dpl: item rows (`asin`, `title`, `description`); lamp: the outputs files
            (`golds`: `id`, `output`) of the same splits; generic and synthetic: none.
        `on_error`: an invalid record: `fail` lists them all (the first `max_errors_shown`) and prepares
            nothing; `skip` skips and counts them by reason in the prepared data's `summary.json`, which
            names the first 10 of each reason (file:line, field and message: `skipped`).
        `max_errors_shown`: with `on_error: fail`, how many invalid records the error lists (all are
            counted; not part of the prepared data's fingerprint).
        `default_split`: the split (`train`, `val` or `test`) of a generic or synthetic record that names
            none.
        `template`: the prompt template: a built-in name (`review`, `review_short`, `lamp_topic_writing`,
            `lamp_abstract`, `plain`; `nextquill_jax/data/templates/`) or the path of a YAML file with the
            same keys.
        `chat_template`: wrap the template's system and user messages with the tokenizer's own chat template
            instead of the template's frame.
        `tokenizer`: a local Hugging Face tokenizer directory, a `.gguf` file, or a packaged name (`qwen2.5`,
            `qwen3`, `smollm2-135m`; `nextquill_jax/models/tokenizers.py`).
        `max_history`: the most recent history entries a prompt may hold (>= 0; 0: none, and training
            notes that a loss of the history's effects then measures nothing).
        `history_fit`: while the with-history prompt has more than `max_prompt_tokens` tokens, its oldest
            entry is dropped: `drop` down to none (an example that still does not fit is dropped as
            `prompt_too_long`, one that fits only with none of its entries as `no_history_fits`: its two
            prompts would differ by the placeholder alone), or `public` (the public code) down to one, after
            which a prompt still too long is cut from the right (counted as `prompts_cut`);
            `nextquill_jax/data/examples.py`.
        `max_prompt_tokens`: the most tokens a prompt (with or without history) may have.
        `max_target_tokens`: targets are cut to this many tokens (counted) before the tokenizer's EOS is
            appended.
        `tokenize_batch_size`: records rendered and tokenised per call of the fast tokenizer (speed and
            memory, not results: not part of the prepared data's fingerprint, so data prepared with another
            value is reused).
        `dpl_min_description_chars`: amazon2023: an item is kept only if its description has at least this
            many characters.
        `dpl_max_description_chars`: amazon2023: an item is kept only if its description has at most this
            many characters.
        `dpl_min_review_chars`: amazon2023: a review is kept only if its text has at least this many
            characters.
        `dpl_min_item_users`: amazon2023: items need reviews by at least this many distinct users; applied
            with `dpl_min_user_reviews` and `dpl_max_user_reviews` until the number of reviews stops
            changing.
        `dpl_min_user_reviews`: amazon2023: users need at least this many reviews, counted after removing
            repeated items and identical texts.
        `dpl_max_user_reviews`: amazon2023: users need at most this many reviews, counted likewise.
        `dpl_num_targets`: amazon2023: each user's last this many reviews are targets (>= 3): the last tests,
            the one before validates, the rest train; the earlier reviews are the profile.
        `dpl_min_profile_item_users`: amazon2023: profile reviews of items with fewer profile users than this
            are removed; applied with `dpl_min_profile_reviews` until the number of users stops changing.
        `dpl_min_profile_reviews`: amazon2023: users left with fewer profile reviews than this are dropped.
        `synthetic_users`: synthetic: how many users are generated (>= 1).
        `synthetic_seed`: synthetic: the generator's seed (`nextquill-jax data synth --users N --seed S`
            writes the same records to a file).
        `batching`: how examples become batches.
    """

    format: Literal["amazon2023", "dpl", "lamp", "generic", "synthetic"] = "generic"
    sources: list[str] = field(default_factory=list)
    meta: list[str] = field(default_factory=list)
    on_error: Literal["fail", "skip"] = "fail"
    max_errors_shown: int = 20
    default_split: str = "train"
    template: str = "review"
    chat_template: bool = False
    tokenizer: str = "qwen2.5"
    max_history: int = 8
    history_fit: Literal["public", "drop"] = "drop"
    max_prompt_tokens: int = 2048
    max_target_tokens: int = 2048
    tokenize_batch_size: int = 512
    dpl_min_description_chars: int = 100
    dpl_max_description_chars: int = 2000
    dpl_min_review_chars: int = 200
    dpl_min_item_users: int = 8
    dpl_min_user_reviews: int = 18
    dpl_max_user_reviews: int = 500
    dpl_num_targets: int = 10
    dpl_min_profile_item_users: int = 5
    dpl_min_profile_reviews: int = 8
    synthetic_users: int = 40
    synthetic_seed: int = 0
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    def __post_init__(self) -> None:
        _check_choice("format", self.format, FORMATS)
        _check_choice("on_error", self.on_error, ("fail", "skip"))
        _check_choice("default_split", self.default_split, SPLITS)
        _check_choice("history_fit", self.history_fit, ("public", "drop"))
        for name in ("sources", "meta"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"data.{name} must be a list of paths or glob patterns, got {value!r}")
        for name in ("template", "tokenizer"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"data.{name} must be a non-empty string")
        if not isinstance(self.chat_template, bool):
            raise ValueError(f"data.chat_template must be true or false, got {self.chat_template!r}")
        positive = (
            "max_errors_shown",
            "max_prompt_tokens",
            "max_target_tokens",
            "tokenize_batch_size",
            "dpl_max_description_chars",
            "dpl_max_user_reviews",
        )
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        non_negative = (
            "max_history",
            "dpl_min_description_chars",
            "dpl_min_review_chars",
            "dpl_min_item_users",
            "dpl_min_user_reviews",
            "dpl_min_profile_item_users",
            "dpl_min_profile_reviews",
        )
        for name in non_negative:
            _check_int(name, getattr(self, name), minimum=0)
        _check_int("synthetic_users", self.synthetic_users, minimum=1)
        _check_int("synthetic_seed", self.synthetic_seed, minimum=0)
        if self.format == "synthetic" and (self.sources or self.meta):
            raise ValueError(
                "data.sources / data.meta: the synthetic format generates its records; remove both"
            )
        # The last two targets are validation and test; at least one more trains.
        _check_int("dpl_num_targets", self.dpl_num_targets, minimum=3)
        if self.dpl_min_description_chars > self.dpl_max_description_chars:
            raise ValueError("data.dpl_min_description_chars must not exceed data.dpl_max_description_chars")
        if self.dpl_min_user_reviews > self.dpl_max_user_reviews:
            raise ValueError("data.dpl_min_user_reviews must not exceed data.dpl_max_user_reviews")
        if not isinstance(self.batching, BatchingConfig):
            raise ValueError(f"data.batching must be a BatchingConfig, got {type(self.batching).__name__}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that decide the prepared data (all but `batching` and `RESULT_NEUTRAL_FIELDS`), as
        plain JSON values."""
        left_out = {"batching", *RESULT_NEUTRAL_FIELDS}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in left_out}


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"data.{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
