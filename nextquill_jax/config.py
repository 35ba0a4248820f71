"""The training config: typed sections loaded from YAML, overridable as `section.key=value`.

A config file has the sections `model`, `data`, `loss`, `optim`, `train`, `mesh`, `checkpoint`, `eval` and
`logging`. Every section is a frozen `*Config` dataclass; its type hints are the schema, which
`config_schema.build` reads (type conversion, errors naming the key and the fix, nearest-key hints).

    cfg = load_config("configs/tiny_synthetic.yaml", ["optim.learning_rate=1e-3", "train.workdir=/tmp/run"])
    save_config(cfg, workdir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nextquill_jax.atomic_file import write_text_atomic
from nextquill_jax.config_schema import (
    ConfigError,
    build_with_overrides,
    check_choices,
    check_not_command_file,
    convert,
    read_yaml,
    with_line,
)
from nextquill_jax.data.config import DataConfig
from nextquill_jax.loss.config import LossConfig
from nextquill_jax.mesh_sizes import checked_shape
from nextquill_jax.models.config import (
    ARCHITECTURE_FIELDS,
    RUNTIME_FIELDS,
    ModelConfig,
    check_scan_unroll,
    remat_saved_names,
)
from nextquill_jax.models.generate import GenerationConfig
from nextquill_jax.models.presets import model_preset


def checked_cudnn_max_segments(value: Any, attention_impl: str, prefix: str) -> int | Literal["auto"] | None:
    """`value` (a `cudnn_max_segments` setting: null, `auto` or an int >= 1) as the run uses it: `auto`
    (the default) is null unless `attention_impl` is `cudnn`, since only cuDNN has the packed mode.

    Raises ValueError for any other value, or for an int when `attention_impl` is not `cudnn`. The message
    names the keys as `{prefix}cudnn_max_segments` and `{prefix}attention_impl` (`model.` in a training
    config, empty in a sweep file), the value and the fix.
    """
    key, impl_key = f"{prefix}cudnn_max_segments", f"{prefix}attention_impl"
    if value is None:
        return None
    if value == "auto":
        return value if attention_impl == "cudnn" else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{key} must be an int >= 1, auto or null, got {value!r}. Fix: set it to the most examples a "
            f"packed row may hold, auto (chosen from the rows) or null (cuDNN's dense segment mask)"
        )
    if attention_impl != "cudnn":
        raise ValueError(
            f"{key}: {value} chooses cuDNN's packed attention, but {impl_key} is {attention_impl!r}. "
            f"Fix: set {impl_key}: cudnn, or {key}: auto or null"
        )
    return value


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the frozen base model (`model.lora`; absent: full fine-tuning).

    Only the adapters train; each target kernel's output gains (alpha / rank)·x·A·B. Fresh adapters start
    with A random (from `train.seed`) and B = 0, so the model starts as the base.

    Fields:
        `rank`: r, the inner size of each adapter pair A [in, r], B [r, out]; an int >= 1.
        `alpha`: α > 0; the adapters' product is scaled by alpha / rank.
        `dropout`: the probability of dropout on the adapters' input, in training only; in [0, 1).
        `targets`: regular expressions searched in parameter paths such as `layers/attn/q_proj`; every
            projection kernel whose path matches one gets an adapter (a pattern that matches nothing, or
            matches a parameter other than a projection kernel, is an error).
        `base_dtype`: how the frozen base weights are stored: `float32`, `bfloat16`, `int8`
            (per-output-channel absmax) or `nf4` (4-bit NormalFloat in blocks of 64, QLoRA's), these two
            quantized from the base in bfloat16 and read back as bfloat16; compute stays in
            `model.compute_dtype`.
        `init_from`: a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) to start
            from instead of fresh adapters: plain LoRA of this `rank` and `alpha` on exactly `targets` in
            every layer of this base (one that sets anything that changes what it computes, such as
            lora_bias, modules_to_save, layers_to_transform or rank_pattern, is refused, naming it); checked
            before the workdir is created. null: fresh adapters.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn/(q|v)_proj"])
    base_dtype: Literal["float32", "bfloat16", "int8", "nf4"] = "float32"
    init_from: str | None = None

    def __post_init__(self):
        check_choices(self)
        if self.rank <= 0:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:  # `not >`: NaN fails it too
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets is empty: name at least one projection kernel, e.g. 'attn/(q|v)_proj'")

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of A·B."""
        return self.alpha / self.rank


# The parameter and compute dtypes a run may choose, and the attention implementations (ModelConfig's own
# checks take float16 too, which no run config offers).
RunDtype = Literal["float32", "bfloat16"]
AttentionImpl = Literal["xla", "xla_dense", "cudnn", "splash"]


def typed_architecture_overrides(
    overrides: Mapping[str, Any], key_prefix: str, runtime_prefix: str
) -> dict[str, Any]:
    """`overrides` (architecture fields of `ModelConfig`) with each value converted to its field's type.

    `key_prefix` is how the file spells the mapping's keys (`model.overrides.` in a training config,
    `models[0].overrides.` in a sweep file); `runtime_prefix` how it spells a runtime field (`model.`, or ""
    where those are top-level keys).

    Raises:
        ConfigError: a key that is not one of `ARCHITECTURE_FIELDS` (naming the nearest one, or the key of its
            own for a runtime field), or a value not of its field's type; no source: `build` names the file
            when this runs as a section's check.
    """
    for key in overrides:
        if key not in ARCHITECTURE_FIELDS:
            close = difflib.get_close_matches(key, ARCHITECTURE_FIELDS, n=1, cutoff=0.5)
            hint = (
                f"did you mean `{key_prefix}{close[0]}`?"
                if close
                else f"valid: {', '.join(ARCHITECTURE_FIELDS)}"
            )
            runtime = f" (`{runtime_prefix}{key}` is a key of its own)" if key in RUNTIME_FIELDS else ""
            raise ConfigError(f"`{key_prefix}{key}` is not a ModelConfig architecture field{runtime}; {hint}")
    hints = typing.get_type_hints(ModelConfig)
    return {k: convert(v, hints[k], f"{key_prefix}{k}", "") for k, v in overrides.items()}


def _plain_overrides(written: Mapping[str, Any], typed: Mapping[str, Any]) -> dict[str, Any]:
    """`typed` (`typed_architecture_overrides` of `written`) as YAML and JSON write values: a tuple as a
    list, a `RopeScaling` as the mapping of the keys `written` gave it."""
    plain = {}
    for key, value in typed.items():
        if isinstance(value, tuple):
            value = list(value)
        elif dataclasses.is_dataclass(value):
            value = {field: getattr(value, field) for field in written[key]}
        plain[key] = value
    return plain


@dataclass(frozen=True)
class ModelRunConfig:
    """Which model to train and how to run it.

    Exactly one of `path` and `preset` is set. The tokenizer is `data.tokenizer`.

    Fields:
        `path`: the model to fine-tune: a Hugging Face directory (config.json + safetensors) of a Llama,
            Qwen2/2.5 or Qwen3 model, or a packaged name such as `smollm2-135m`; null with `preset`.
        `preset`: a `model_preset` name (`nextquill_jax/models/presets.py`) of a model randomly initialised
            from `train.seed`; null with `path`.
        `overrides`: architecture fields of `ModelConfig` (`nextquill_jax/models/config.py`) that replace the
            preset's or those read from `path`, e.g. `{hidden_size: 32, num_layers: 2}` for a tiny random
            model. A key that is not an architecture field, or a value not of its field's type, is an error
            when the config is loaded. The runtime fields are keys of their own (`model.param_dtype`,
            `model.compute_dtype`, `model.remat_policy`, `model.scan_unroll`, `model.attention_impl`,
            `model.cudnn_max_segments`), not overrides.
        `param_dtype`: the dtype the trained parameters (and so the optimizer's update) are stored in.
        `compute_dtype`: the dtype of activations and matmuls; parameters are cast to it where used (RMSNorm
            statistics and RoPE angles stay float32).
        `remat_policy`: what the scanned layers keep for the backward pass: `none` (everything), `full`
            (each layer's input only), `dots_saveable`, `dots_with_no_batch_dims_saveable` (the
            `jax.checkpoint_policies` of those names), or `save:NAME[,NAME...]` with names from `qkv` (q, k,
            v after RoPE), `attention` (the attention output before the out-projection), `attn_out` (the
            out-projection) and `mlp_gate_up` (the MLP's gate and up projections, before silu), e.g.
            `save:qkv,attention`: those are kept, the rest recomputed. What each costs in memory and saves
            in FLOPs at the Qwen2.5-1.5B shape: `benchmarks/RESULTS.md`.
        `scan_unroll`: an int >= 1: how many decoder layers each iteration of the `jax.lax.scan` over them
            runs (its `unroll`), in training, evaluation and generation alike. 1 (the default) is one layer
            per iteration; the layer count or more unrolls the whole stack (compile time grows with depth);
            a value that does not divide the layer count runs the remainder after the loop. It changes the
            compiled program (what XLA may fuse and overlap across layers), not the values beyond float
            rounding, so a resume may change it. What it costs and gains: `benchmarks/RESULTS.md`.
        `attention_impl`: `xla` (blockwise, memory O(T), every backend), `xla_dense` (the full [T, T] score
            tensor, every backend), `cudnn` (GPU only, with a bfloat16 `compute_dtype`) or `splash` (Pallas
            splash attention, TPU only); `nextquill_jax/models/attention.py`. Training refuses one the
            machine cannot run; `evaluate`, `effects`, `export` and a reference model read such a run with
            `xla` (the same attention), with a note.
        `cudnn_max_segments`: with `attention_impl: cudnn`: cuDNN's packed attention, segments passed as
            lengths and offsets instead of a [T, T] mask, for rows of at most this many examples (segments:
            twice as many with `train.joint_forward`, which joins a row's two streams); null: the dense mask.
            `auto` (the default; with another `attention_impl` it is null) chooses the number, see below.
            Checked against blockwise `xla` on one H200 (jax 0.11.2; several GPUs: not yet run), where the
            step took 0.85x the dense mask's time at the Qwen2.5-1.5B shape (`benchmarks/RESULTS.md`,
            2026-12-04). A row with more would make the step non-finite
            (`nextquill_jax/models/cudnn_packed.py`), so set-up refuses a value below the most segments a
            planned row holds, or, with `data.batching.num_epochs: null`, below the bound for every epoch
            that `auto` takes (`train.setup.check_packed_segments`). `auto`: the training set-up chooses it
            from the data (`train.setup.resolve_packed_segments`): the most examples a planned train or eval
            row holds, or, with `data.batching.num_epochs: null`, the most of the training examples that fit
            one row together (a bound for every epoch), twice that with `train.joint_forward`; it prints the
            value and saves it in the workdir's config.yaml. A smaller value saves memory: cuDNN keeps
            [rows × this, heads, T] float32 statistics per attention call.
        `lora`: train LoRA adapters on the frozen model instead of the model itself; null: full fine-tuning.
    """

    path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    param_dtype: RunDtype = "float32"
    compute_dtype: RunDtype = "bfloat16"
    # A string, not a Literal: `save:NAME,...` spells a set of names (checked in __post_init__).
    remat_policy: str = "none"
    scan_unroll: int = 1
    attention_impl: AttentionImpl = "xla"
    cudnn_max_segments: int | Literal["auto"] | None = "auto"
    lora: LoraConfig | None = None

    def __post_init__(self):
        remat_saved_names(self.remat_policy)
        check_scan_unroll(self.scan_unroll, "`model.scan_unroll`")
        # Kept as their fields' values, in JSON's types: YAML reads `1e4` as text, and a resume compares
        # config.yaml key by key, so `rope_theta: 1e4` and `10000.0` must record the same value.
        object.__setattr__(self, "overrides", _plain_overrides(self.overrides, self.architecture_overrides()))
        if (self.path is None) == (self.preset is None):
            # Both set is often a `model.path=...` override on a file that sets a preset: say how to unset.
            fix = (
                f"both are set (model.path={self.path!r}, model.preset={self.preset!r}). Fix: unset the one "
                "you do not want: delete its line from the file, or override it with `model.preset=null` "
                "(or `model.path=null`)."
                if self.path is not None
                else "neither is set. Fix: add one, such as `model.path=smollm2-135m`."
            )
            raise ValueError(
                "set exactly one of model.path (a Hugging Face directory or a packaged name such as "
                f"smollm2-135m) and model.preset (a ModelConfig preset name, randomly initialised): {fix}"
            )
        segments = checked_cudnn_max_segments(self.cudnn_max_segments, self.attention_impl, "model.")
        object.__setattr__(self, "cudnn_max_segments", segments)
        if self.preset is not None:
            # `auto` stands for an int >= 1 that set-up chooses; any such value checks the rest alike.
            self.resolved(1).model_config()

    def resolved(self, max_segments: int) -> ModelRunConfig:
        """This section with `cudnn_max_segments: auto` replaced by `max_segments` (itself otherwise)."""
        if self.cudnn_max_segments != "auto":
            return self
        return dataclasses.replace(self, cudnn_max_segments=max_segments)

    def runtime(self) -> dict[str, Any]:
        """The runtime `ModelConfig` fields chosen here."""
        return {name: getattr(self, name) for name in RUNTIME_FIELDS}

    def architecture_overrides(self) -> dict[str, Any]:
        """`overrides` with each value converted to its `ModelConfig` field's type (a `rope_scaling` mapping
        to a `RopeScaling`, an `eos_token_ids` list to a tuple), for a preset and a `path` model alike.

        Raises:
            ConfigError: as `typed_architecture_overrides`, naming `model.overrides.KEY`.
        """
        return typed_architecture_overrides(self.overrides, "model.overrides.", "model.")

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` of `preset` with `overrides` and the runtime fields (for `preset` models only;
        `cudnn_max_segments: auto` must be `resolved` first).

        Raises:
            ValueError: an unknown preset, an override that is not an architecture field (with the nearest
                one), or an invalid value (an unresolved `auto` included).
        """
        try:
            return model_preset(self.preset, **self.architecture_overrides(), **self.runtime())
        except KeyError as e:
            raise ValueError(e.args[0]) from None


@dataclass(frozen=True)
class LossRunConfig(LossConfig):
    """`LossConfig` (variant and hyper-parameters) plus how the loss is computed.

    Fields:
        `reference_model`: for `dce: fixed` when the data carries no `reference_dce`: a Hugging Face
            directory, packaged name or training workdir whose model (frozen, no gradient) gives the data-side
            effects (a directory or name runs with the model's runtime fields; with `model.lora` its weights
            are stored as the base's, `lora.base_dtype`, bfloat16 for int8 / nf4; a workdir gives its newest
            verified checkpoint when the run starts; a resume, or `evaluate` of a checkpoint, is refused
            once the model it gives has changed); or `base` with `model.lora`: the frozen base itself with the
            adapters off (the same weights, no second copy). null: none. Beside `dce: dynamic` it is not
            read (a compare file's base may set it for its fixed-DCE variants), which `train` notes.
        `token_chunk`: target tokens per tile of the fused LM head in `loss_from_hidden` (memory, not
            results).
        `vocab_chunk`: vocabulary entries per tile of the fused LM head (memory, not results).
        `operand_dtype`: the operands of the fused head's with/without logits products, `float32` (exact) or
            `bfloat16` (faster: the fused loss alone took 13% less time on an H200; it rounds the head's
            float32 weights as `CausalLM.logits` does under a bfloat16 compute dtype, so values move by
            bfloat16 rounding); the alignment logits and gradients stay float32.
    """

    reference_model: str | None = None
    token_chunk: int = 1024
    vocab_chunk: int = 8192
    operand_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self)
        for name in ("token_chunk", "vocab_chunk"):  # else an error while the first step is traced
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def loss_config(self) -> LossConfig:
        """The plain `LossConfig` of this section."""
        return LossConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossConfig)})


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up and decay; defaults are the public NextQuill code's (Hugging Face Trainer).

    The learning rate rises linearly from 0 over the warm-up, then follows `schedule` over the rest of the
    run's T optimizer steps (`nextquill_jax/train/optimizer.py`). Update k (0-based) uses lr(k), so the last
    update uses lr(T-1), one step short of the schedule's end value, as in the Hugging Face Trainer.

    Fields:
        `learning_rate`: the peak learning rate (> 0), reached at the end of the warm-up.
        `weight_decay`: AdamW's decoupled weight decay (`p -= learning_rate * weight_decay * p` per step);
            >= 0.
        `warmup_ratio`: the warm-up as a fraction of the run's optimizer steps, in [0, 1), rounded up to whole
            steps after rounding the product to 9 decimals (0.07 of 100 steps is 7 steps; float arithmetic,
            and so the Hugging Face Trainer, would give 8). The warm-up rises linearly from 0, so the first
            update of a run with a warm-up has learning rate 0 (a one-step run trains nothing; set
            `warmup_steps: 0`).
        `warmup_steps`: the warm-up in optimizer steps (>= 0); when set it replaces `warmup_ratio`. One
            longer than the run is kept (the run ends part-way up it, which set-up notes).
        `schedule`: after warm-up, `linear` decays toward `min_lr_ratio * learning_rate`, the value of
            lr(T) one step past the last update (that update uses lr(T-1)); `cosine` likewise on a cosine;
            `constant` stays at `learning_rate`.
        `min_lr_ratio`: the end value of `linear` and `cosine` (lr(T), one step past the last update), as a
            fraction of `learning_rate`, in [0, 1].
        `b1`: Adam's β1, the decay of the gradient's moving average, in [0, 1).
        `b2`: Adam's β2, the decay of the squared gradient's moving average, in [0, 1).
        `eps`: Adam's ε (> 0), added to the root of the second moment.
        `clip_norm`: clip the gradient to this global L2 norm before the update (> 0); null: no clipping.
        `no_decay`: regular expressions searched in parameter paths (e.g. `layers/attn/q_proj`); a
            matching parameter gets no weight decay (norm scales and biases, as the Trainer does). A pattern
            other than the defaults `norm` and `bias` that matches no parameter is refused at set-up.
        `trainable`: regular expressions over the same paths; when non-empty only matching parameters are
            updated and hold optimizer state (partial fine-tuning); empty: all. Each pattern must match a
            parameter (refused at set-up otherwise). Not with `model.lora`.
    """

    learning_rate: float = 5e-6
    weight_decay: float = 0.025
    warmup_ratio: float = 0.01
    warmup_steps: int | None = None
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias"])
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self):
        check_choices(self)
        # Each range written so that NaN fails it (every comparison with NaN is false).
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or null, got {self.clip_norm}")
        for name in ("no_decay", "trainable"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(
                        f"optim.{name} pattern {pattern!r} is not a regular expression ({e}). "
                        f"Fix: correct it (Python `re` syntax; a backslash escapes a literal character such "
                        f"as ( or [)."
                    ) from None


@dataclass(frozen=True)
class TrainConfig:
    """The run: where it writes, how long it runs, how a global batch is split.

    The run lasts `data.batching.num_epochs` passes over the training split, or stops at `max_steps` optimizer
    steps if that comes first.

    Fields:
        `workdir`: the run's directory: config.yaml, metrics.jsonl, TensorBoard events and checkpoints/
            (`--workdir` on the command line overrides it; null: `--workdir` is required); a run in a workdir
            with checkpoints resumes, and is refused when its config differs from theirs in a key that
            changes what is trained (all but those `train.resume.MAY_CHANGE` lists: logging, eval cadence,
            checkpoint, mesh, workdir, data_dir, memory-only settings, the non-finite policy; and
            `data.sources` / `data.meta` / `data.template` / `data.tokenizer` where they name the data's
            input files moved, as the data's fingerprint finds them: the record files' content and names,
            the template's text, the tokenizer's serialisation, EOS and chat template). config.yaml
            records the workdir the run used, absolute. A local path: mount an object store (gs://...) and
            give the mount.
        `data_dir`: the prepared (tokenised) data; null means `<workdir>/prepared`. With `data.sources` set
            (or the `synthetic` format) the `data` section is prepared into it, or reused while its
            fingerprint matches; data prepared otherwise is refused, not replaced, in a directory named here
            or one the workdir's checkpoints were trained on. With empty `data.sources` it must already hold
            prepared data. Each checkpoint records the prepared splits' content, which a resume must match.
        `seed`: the seed of a `model.preset` model's random weights, of fresh LoRA adapters and of the
            step's random key (LoRA dropout), in [0, 2**32); the data order has its own,
            `data.batching.seed`.
        `max_steps`: stop after this many optimizer steps (>= 1) if the epochs last longer; null: run the
            epochs out (required with `data.batching.num_epochs: null`).
        `micro_batches`: split every global batch into this many gradient-accumulation micro-batches (the
            update equals the one-pass update; memory falls). With `model.lora.dropout` above 0 the dropout
            masks are other draws of the same distribution (one key per micro-batch), so the update is not
            the one-pass update's, nor is a resume that changes this the uninterrupted run's.
        `nonfinite`: on a NaN/inf loss, `stop` the run, or `skip` the update and count it. A skipped update
            leaves the parameters and the optimizer state as they were, the schedule's count included: the
            learning-rate schedule does not advance at a skip (each skip delays the rest of the schedule by
            one step, so a run with skips ends short of its last rates), and the logged `learning_rate` is
            the rate of the optimizer's count. A resume may change it: a run stopped here resumes from its
            last checkpoint with `train.nonfinite=skip`.
        `max_skips`: with `nonfinite: skip`, the run stops once more than this many (>= 0) updates were
            skipped; checked whenever metrics are fetched: every `logging.every_steps` steps and before saves.
        `joint_forward`: run the with- and without-history passes as one forward call on a joined batch
            (`train.step.joint_response_hidden`: one read of the weights, larger matmuls; the same values,
            except that with `model.lora.dropout` above 0 the dropout masks are other draws); a loss that
            needs one stream (`sft`, `context_sft`) runs one pass, so there is nothing to join. On an H200
            at the Qwen2.5-1.5B shape it sped the step up with cuDNN's packed mode and slowed it under the
            dense segment mask (`benchmarks/RESULTS.md`, 2026-12-04).
    """

    workdir: str | None = None
    data_dir: str | None = None
    seed: int = 42
    max_steps: int | None = None
    micro_batches: int = 1
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skips: int = 20
    joint_forward: bool = False

    def __post_init__(self):
        check_choices(self)
        if self.workdir is not None and not self.workdir.strip():
            # `--workdir "$RUN"` with RUN unset: the current directory would become the run's workdir.
            raise ValueError(
                "workdir is empty. Fix: name a directory (an unset shell variable leaves it empty)"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if not 0 <= self.seed < 2**32:
            # JAX keeps a seed's low 32 bits: 2**32 would draw what 0 does, -1 what 2**32 - 1 does, and a
            # seed past 2**63 failed once the run had started, as an OverflowError.
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {self.max_skips}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes and multi-host start-up (`nextquill_jax/parallel.py`).

    The product of the three axis sizes is the number of devices; one of them may be `-1` to fill the
    devices left over. Batches are split over `data` and `fsdp`.

    Fields:
        `data`: devices along the data-parallel axis (parameters replicated).
        `fsdp`: devices along the FSDP axis: parameters and optimizer state sharded over them.
        `tensor`: devices along the tensor-parallel axis: attention heads, MLP and vocabulary split over them.
        `distributed`: `auto` starts a multi-process run when `coordinator`, `num_processes` and
            `process_id` are set (all three, here or as their environment variables), else on Cloud TPU VMs
            (libtpu installed), where the pod is discovered; `off` never starts one.
        `coordinator`: "host:port" of process 0, to start a multi-process run explicitly (or the environment
            variable NEXTQUILL_COORDINATOR); null: not set.
        `num_processes`: the number of processes of an explicit multi-process run (or
            NEXTQUILL_NUM_PROCESSES).
        `process_id`: this process's index in an explicit multi-process run, 0-based (or
            NEXTQUILL_PROCESS_ID).
        `peer_timeout_s`: in a multi-process run, when a process stops answering for this many seconds (> 0,
            at most 1e9; its host died, it was killed), every other process exits with status 4 and a message
            naming it, instead of waiting in a collective forever; the scheduler restarts the job, which
            resumes from its last complete checkpoint.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    distributed: Literal["auto", "off"] = "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    peer_timeout_s: float = 180.0

    def __post_init__(self):
        check_choices(self)
        checked_shape(self.sizes())  # the device count is checked when the mesh is made
        # At most 1e9: JAX's own heartbeat timeout, set to twice it, is an int32.
        if not 0 < self.peer_timeout_s <= 1e9:  # `not`: NaN fails it too
            raise ValueError(f"peer_timeout_s must be > 0 and <= 1e9 seconds, got {self.peer_timeout_s}")

    def sizes(self) -> dict[str, int]:
        """{"data": ..., "fsdp": ..., "tensor": ...} as configured (a -1 still unresolved)."""
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under `<workdir>/checkpoints`.

    A checkpoint is also saved at the end of the run, and after every evaluation while `best_metric` is set.
    Each step carries a manifest of its files' checksums; a resume skips steps that fail it (naming the
    files) for the newest that passes.

    Fields:
        `every_steps`: save every this many optimizer steps; 0: never on a schedule.
        `on_epoch_end`: save at the end of each epoch.
        `keep`: how many of the most recent checkpoints are kept (>= 1), besides the best one.
        `best_metric`: the evaluation metric whose best checkpoint is kept too: `eval/` and a metric the
            run's loss reports (`eval/loss`, `eval/ce_with`, ...: README.md's metrics.jsonl table); a name
            evaluation never reports under the `loss` section is refused before the run starts. null: no best
            kept. Each step records its metrics (its `metrics` item), so the best is still known after a
            resume; a step that has none (saved by an earlier version, or while this was null) is never
            deleted automatically, since whether it was the best is unknown: delete it by hand.
        `best_mode`: whether the best `best_metric` is the `min` or the `max`.
        `async_save`: write checkpoints in the background while training goes on; false: wait for each.
        `on_save_error`: a save that fails (a full disk) leaves earlier checkpoints intact and the failed
            step incomplete; `stop` ends the run (exit status 5), `continue` logs it and trains on.
    """

    every_steps: int = 500
    on_epoch_end: bool = True
    keep: int = 2
    best_metric: str | None = "eval/loss"
    best_mode: Literal["min", "max"] = "min"
    async_save: bool = True
    on_save_error: Literal["stop", "continue"] = "stop"

    def __post_init__(self):
        check_choices(self)
        if self.every_steps < 0 or self.keep < 1:
            raise ValueError(f"need every_steps >= 0 and keep >= 1, got {self.every_steps}, {self.keep}")


@dataclass(frozen=True)
class EvalConfig:
    """Validation during training, and the decoding of `nextquill-jax evaluate`.

    The validation loss is computed at the end of each epoch, at the end of the run, and every
    `every_steps` optimizer steps when that is set.

    Fields:
        `every_steps`: evaluate every this many optimizer steps too; 0: only at epoch ends and the end.
        `split`: the prepared split evaluated: `val`, `test` or `train` (the splits `data prepare` writes,
            `data.config.SPLITS`); another value is an error when the config is loaded. When the prepared data
            has no such split (`data prepare` writes only the splits that have examples), the run does not
            evaluate.
        `max_batches`: evaluate on the split's first this many batches (>= 1); null: the whole split.
        `generation`: the decoding `nextquill-jax evaluate` uses (default: the public code's, greedy with
            repetition penalty 1.2); its command-line flags override it. `max_new_tokens: 0` skips decoding:
            the evaluation measures the teacher-forced losses only.
    """

    every_steps: int = 0
    # The values of `data.config.SPLITS` (a test checks they agree).
    split: Literal["train", "val", "test"] = "val"
    max_batches: int | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        check_choices(self)
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {self.every_steps}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or null, got {self.max_batches}")


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics, progress and profiling.

    README.md's metrics.jsonl table lists every field of a metrics row. Besides the loss terms, each row has
    `tokens_per_second` and `data_wait_fraction`, both over the wall time since the previous row (compilation
    included in the first): the fraction of it the loop spent waiting for its next batch (the data iterator
    and placing the batch on the devices), the host-side gap a slow input pipeline leaves.

    Fields:
        `every_steps`: write a metrics row (metrics.jsonl, TensorBoard, progress bar) every this many
            optimizer steps (>= 1); rows are also written at saves and evaluations.
        `tensorboard`: also write the rows as TensorBoard events, into `tensorboard_dir`.
        `tensorboard_dir`: where the TensorBoard event files go; null: `<workdir>/tensorboard`. A relative
            path is relative to the current directory, as every other path in a config (`train.data_dir`,
            `model.path`), not to the workdir; `~` is expanded; config.yaml records it absolute. Point it at a
            local disk when the workdir is on a Cloud Storage FUSE mount, where a file open for the whole run
            reaches the bucket only when it is closed (tpu_scripts/launch.sh does, and copies the files into
            `<workdir>/tensorboard`).
        `progress_bar`: show a progress bar of the optimizer steps on the console.
        `health_ce_ratio`: counterfactual health (runs that compute the without-history stream,
            `train.health`): warn, once, when the without-history target CE passes this many times its
            first logged value (> 1).
        `health_pref_fraction`: warn, once, when the fraction of target tokens that are preference-bearing
            (DCE > `loss.threshold`) passes this, in (0, 1); null: not checked.
        `profile_steps`: `[first, last]` records a `jax.profiler` trace of optimizer steps first..last
            (1-based, inclusive) into `<workdir>/profile/` (view it with TensorBoard's profile plugin or
            XProf); the run prints where it is. null: no trace.
    """

    every_steps: int = 10
    tensorboard: bool = True
    tensorboard_dir: str | None = None
    progress_bar: bool = True
    health_ce_ratio: float = 1.5
    health_pref_fraction: float | None = 0.75
    profile_steps: list[int] | None = None

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {self.every_steps}")
        if self.profile_steps is not None and (
            len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]
        ):
            raise ValueError(
                f"profile_steps must be [first, last] with 1 <= first <= last (optimizer steps), got "
                f"{self.profile_steps}"
            )
        if not self.health_ce_ratio > 1:  # `not >`: NaN fails it too
            raise ValueError(f"health_ce_ratio must be > 1, got {self.health_ce_ratio}")
        if self.health_pref_fraction is not None and not 0 < self.health_pref_fraction < 1:
            raise ValueError(
                f"health_pref_fraction must be in (0, 1) or null, got {self.health_pref_fraction}"
            )


@dataclass(frozen=True)
class Config:
    """A whole training config: one field per YAML section.

    A path in any section is relative to the directory the command runs in; `train` joins each to it
    (`nextquill_jax/config_paths.py`: `PATH_FIELDS` lists them), so config.yaml and the checkpoints record
    them absolute.

    Fields:
        `model`: which model to train and how to run it (required).
        `data`: where the records come from, how they become examples and batches (required).
        `loss`: the loss variant, its hyper-parameters and how it is computed.
        `optim`: the optimizer and its learning-rate schedule.
        `train`: the run: workdir, length, seed, micro-batches, non-finite losses.
        `mesh`: the device mesh and multi-host start-up.
        `checkpoint`: when checkpoints are saved and which are kept.
        `eval`: validation during training and the decoding of `nextquill-jax evaluate`.
        `logging`: metrics rows, health warnings and profiling.
    """

    model: ModelRunConfig
    data: DataConfig
    loss: LossRunConfig = field(default_factory=LossRunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.data.batching.num_epochs is None and self.train.max_steps is None:
            raise ValueError(
                "data.batching.num_epochs is null (repeat forever) and train.max_steps is not set: the run "
                "would never end. Fix: set data.batching.num_epochs or train.max_steps."
            )
        if self.loss.reference_model == "base" and self.model.lora is None:
            raise ValueError(
                "loss.reference_model: base names the frozen base of a LoRA run, but model.lora is not set. "
                "Fix: set model.lora, or name a model directory or training workdir"
            )
        if self.model.lora is not None and self.optim.trainable:
            raise ValueError(
                "optim.trainable and model.lora both choose what trains; with model.lora only the adapters "
                "train. Fix: remove optim.trainable"
            )


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    base: Mapping | None = None,
    overrides_source: str = "command line",
    base_source: str = "<config>",
) -> Config:
    """Read a YAML config, apply `section.key=value` overrides and build a validated `Config`.

    `base` (a dict such as a saved config) is used instead of a file when `path` is None; `base_source` names
    it in error messages (a checkpoint's config can fail here, where its `loss.weighting` module does not
    import). `overrides_source` names where the overrides came from in error messages.

    Raises:
        ConfigError: a missing or unreadable file, a section or key that does not exist (with the nearest
            valid keys), a value of the wrong type, or a value that a section rejects; the message names the
            key and where it came from: the file and the key's line, or `overrides_source` for an override
            (also for a section's check that the file alone passes); a demo or compare file, naming the
            command that reads it.
    """
    source = str(path) if path is not None else base_source
    raw = read_yaml(path) if path is not None else dict(base or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    check_not_command_file(raw, source)
    try:
        return build_with_overrides(Config, raw, source, overrides, overrides_source)
    except ConfigError as e:
        raise (e if path is None else with_line(e, path)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML (every field, defaults included) so `load_config(path)` rebuilds it exactly.

    The file is replaced whole (`write_text_atomic`): a resume rewrites a workdir's config.yaml, and a crash
    during that write must leave the config a later resume reads, not a torn one.

    Raises:
        OSError: the write failed; `path` is then as it was.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_to_dict(cfg: Any) -> dict:
    """A dataclass config as plain dicts/lists/scalars (what YAML and JSON write)."""
    return dataclasses.asdict(cfg)
