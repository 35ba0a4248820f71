"""ModelConfig: the architecture of a Llama / Qwen2 / Qwen3 causal LM plus the runtime choices for running it.

Built from a Hugging Face `config.json` (transformers 4.x spelling `rope_theta` + `rope_scaling`, or 5.x
spelling `rope_parameters`) and written back with `to_hf_config()`. Anything in a config.json that would
change the network and that this package does not implement is an error naming the key, never silently
ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp

Family = Literal["llama", "qwen2", "qwen3"]

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
# transformers 5's defaults (LlamaConfig, Qwen2Config, Qwen3Config) for the config.json keys whose default
# differs by family, which `from_hf_config` takes where a config.json has no such key. A family without
# `head_dim` here defaults it to hidden_size // num_attention_heads, one without `num_key_value_heads` to
# num_attention_heads.
FAMILY_DEFAULTS: dict[str, dict[str, int]] = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
}
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
# The decoder layer's values named with `jax.ad_checkpoint.checkpoint_name` (causal_lm.py, layers.py), in
# layer order: q, k, v after RoPE; the attention output before the out-projection; the out-projection; the
# MLP's gate and up projections. A remat policy `save:NAME[,NAME...]` keeps those and recomputes the rest.
# Not named, because keeping them would save no matmul: the MLP's silu(gate) * up (its backward needs gate
# and up, so they would be recomputed anyway) and the MLP's output (the layer's output is the next layer's
# input, which the scan keeps under every policy).
REMAT_NAMES = ("qkv", "attention", "attn_out", "mlp_gate_up")
SAVE_PREFIX = "save:"
ATTENTION_IMPLS = ("xla", "xla_dense", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")
# ModelConfig's fields that choose how to run the network, not what it is: a checkpoint's config.json has
# none of them, and a training config sets each as a `model.*` key of its own.
RUNTIME_FIELDS = (
    "param_dtype",
    "compute_dtype",
    "remat_policy",
    "scan_unroll",
    "attention_impl",
    "cudnn_max_segments",
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`nextquill_jax/models/layers.py` `rope_inv_freq`, transformers' formulas).
    Its config.json keys are those of the `rope_scaling` object (transformers 4) or the `rope_parameters`
    object (transformers 5).

    Fields:
        `type`: `linear` divides every frequency by `factor`; `llama3` is Llama 3.1's wavelength-dependent
            scaling (needs the other three fields). config.json `rope_type` (or `type`).
        `factor`: > 0; how much the frequencies are slowed (all of them for `linear`, the long wavelengths
            for `llama3`). config.json `factor`.
        `low_freq_factor`: `llama3` only: wavelengths longer than `original_max_position_embeddings /
            low_freq_factor` are divided by `factor`. config.json `low_freq_factor`.
        `high_freq_factor`: `llama3` only, > `low_freq_factor`: wavelengths shorter than
            `original_max_position_embeddings / high_freq_factor` are kept; those between are interpolated.
            config.json `high_freq_factor`.
        `original_max_position_embeddings`: `llama3` only: the context length the frequencies were trained
            for. config.json `original_max_position_embeddings`: the top-level key where present (transformers
            5 lets it overwrite the RoPE object's), else the RoPE object's; absent: the model's
            `max_position_embeddings`.

    Raises:
        ValueError: (on construction) an unknown `type`, a `factor` not > 0, or for `llama3` a field
            missing or `high_freq_factor` not above `low_freq_factor`.
    """

    type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.type not in ("linear", "llama3"):
            raise ValueError(f"rope scaling type {self.type!r} is not implemented; supported: {ROPE_TYPES}")
        if not self.factor > 0:  # `not >`: NaN fails it too, as in the checks below
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.type == "llama3":
            missing = [
                name
                for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"rope scaling type 'llama3' needs {missing}")
            if not self.high_freq_factor > self.low_freq_factor:
                raise ValueError(
                    f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                    f"{self.high_freq_factor} <= {self.low_freq_factor}"
                )


class SpecialIdsOutsideVocabError(ValueError):
    """A `ModelConfig` whose BOS / EOS ids lie outside its vocabulary: `outside` maps each field
    (`bos_token_id`, `eos_token_ids`) to its ids outside [0, `vocab_size`). Its message names the fix in a
    training config's keys (`model.overrides.`); `message` names it in another file's (a sweep's
    `models[2].overrides.`)."""

    def __init__(self, vocab_size: int, outside: dict[str, list[int]]) -> None:
        super().__init__(vocab_size, outside)  # as its args, so that it pickles
        self.vocab_size, self.outside = vocab_size, outside

    def __str__(self) -> str:
        return self.message("model.overrides.")

    def message(self, key_prefix: str) -> str:
        """The error and its fix, which names the fields as `key_prefix` + field (`model.overrides.`)."""
        named = ", ".join(f"{name} {value}" for name, value in self.outside.items())
        keys = ", ".join(f"{key_prefix}{name}" for name in self.outside)
        return (
            f"ModelConfig special token ids outside the vocabulary (vocab_size {self.vocab_size}): {named}. "
            f"Fix: set them to the tokenizer's ids (in a config: {keys}; e.g. eos_token_ids: [the "
            "tokenizer's eos_token_id]; in Python, the ModelConfig fields of those names, which "
            "load_pretrained and model_preset take as keywords): a preset whose vocab_size is overridden "
            "keeps its own ids. Or use a larger vocab_size"
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + runtime settings of a causal LM. Frozen and hashable (usable as a static jit argument).

    Family constraints (so that every config can be exported to transformers): `qwen2` has q/k/v biases and no
    output bias; `qwen3` has per-head q/k RMSNorm; `llama` has neither norm and biases on all four projections
    or none (`attention_bias`).

    The architecture fields are what `from_hf_config` reads from a Hugging Face config.json and `to_hf_config`
    writes back (each entry names its config.json key); the `RUNTIME_FIELDS` choose how to run the network
    and are no part of a checkpoint.

    Fields:
        `family`: the model family, which fixes the checkpoint's tensor names (`models/hf.py` `NAME_TABLES`),
            the transformers class of an export (`ARCHITECTURES`) and the constraints above. config.json
            `model_type`.
        `vocab_size`: V, the rows of the embedding and the columns of the LM head. config.json `vocab_size`.
        `hidden_size`: D, the width of the residual stream. config.json `hidden_size`.
        `intermediate_size`: F, the inner width of the SwiGLU MLP (gate and up [D, F], down [F, D]).
            config.json `intermediate_size`.
        `num_layers`: L, the number of decoder layers. config.json `num_hidden_layers`.
        `num_heads`: H, the query heads. config.json `num_attention_heads`.
        `num_kv_heads`: K, the key/value heads (grouped-query attention), a divisor of `num_heads`.
            config.json `num_key_value_heads` (null: `num_heads`; absent: transformers' default for the
            family, 32 for `qwen2` and `qwen3` (`FAMILY_DEFAULTS`), `num_heads` for `llama`).
        `head_dim`: Hd, the width of one head (even, for RoPE); need not be D / H. config.json `head_dim`
            (absent: transformers' default for the family, 128 for `qwen3` (`FAMILY_DEFAULTS`), else
            `hidden_size // num_heads`; null: `hidden_size // num_heads` for `llama`, an error for `qwen2`
            and `qwen3`, from which transformers builds no model).
        `rms_norm_eps`: ε > 0 of every RMSNorm. config.json `rms_norm_eps` (absent: 1e-6).
        `rope_theta`: the RoPE base θ > 0 (frequencies θ^(-2i/Hd)). `rope_theta` inside the RoPE object
            that `rope_scaling` reads, else config.json `rope_theta`; absent: 10000.
        `rope_scaling`: RoPE frequency scaling (`RopeScaling`); null: none. As transformers 5 reads it:
            config.json `rope_scaling` (transformers 4) when it is a non-empty object, which then replaces
            config.json `rope_parameters` (transformers 5) whole; else `rope_parameters`. Null where that
            object's `rope_type` is `default`.
        `max_position_embeddings`: the context length the checkpoint declares; carried to the exported
            config.json (nothing here limits a sequence to it). config.json `max_position_embeddings`
            (absent: transformers' default for the family, `FAMILY_DEFAULTS`: 2048 for `llama`, 32768 for
            `qwen2` and `qwen3`).
        `tie_word_embeddings`: the LM head is the embedding matrix (no `lm_head` parameter). config.json
            `tie_word_embeddings` (absent: false).
        `qkv_bias`: the q, k and v projections have biases. config.json `attention_bias` (`qwen2`: always
            true).
        `o_bias`: the output projection has a bias. config.json `attention_bias` (`qwen2`: always false).
        `qk_norm`: q and k are RMS-normalised per head before RoPE; true exactly for `qwen3`. No config.json
            key of its own: config.json `model_type` `qwen3` implies it.
        `bos_token_id`: the beginning-of-sequence token id, or null; carried to the exported config.json.
            config.json `bos_token_id`.
        `eos_token_ids`: the end-of-sequence token ids (a list in YAML); carried to the exported config.json
            (training evaluation stops generation at the tokenizer's own end-of-sequence token). config.json
            `eos_token_id` (an int or a list).
        `pad_token_id`: the padding token id, or null; carried to the exported config.json. config.json
            `pad_token_id`.
        `param_dtype`: runtime (`model.param_dtype` in a training config): the dtype parameters are stored
            in, one of `DTYPES`.
        `compute_dtype`: runtime (`model.compute_dtype`): the dtype of activations and matmuls, one of
            `DTYPES`.
        `remat_policy`: runtime (`model.remat_policy`): what the scanned decoder layers keep for the backward
            pass. `none` keeps everything; `full` keeps only each layer's input and recomputes the layer;
            `dots_saveable` and `dots_with_no_batch_dims_saveable` are `jax.checkpoint_policies` of those
            names; `save:NAME[,NAME...]` keeps only the named values of `REMAT_NAMES` (e.g.
            `save:qkv,attention`) and recomputes the rest.
        `scan_unroll`: runtime (`model.scan_unroll`): an int >= 1, the decoder layers the `jax.lax.scan`
            over them runs per loop iteration (its `unroll`): 1 is one layer per iteration; a value >=
            `num_layers` unrolls the whole stack into straight-line code (compile time then grows with
            depth). A value that does not divide `num_layers` is allowed: the remaining layers run after the
            loop. Changes the compiled program only, never the values beyond float rounding.
        `attention_impl`: runtime (`model.attention_impl`): one of `ATTENTION_IMPLS`
            (`nextquill_jax/models/attention.py`).
        `cudnn_max_segments`: runtime (`model.cudnn_max_segments`): cuDNN's packed mode (segment lengths and
            offsets instead of a [T, T] mask) for rows of at most this many segments; only with
            `attention_impl` `cudnn`. None: the dense mask. See `nextquill_jax/models/cudnn_packed.py`.

    Raises:
        ValueError: (on construction, and after `replace`) a field out of its range or against the family's
            constraints above, heads that do not group (`num_heads` not a multiple of `num_kv_heads`);
            `SpecialIdsOutsideVocabError` for BOS / EOS ids outside the vocabulary.
    """

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"
    scan_unroll: int = 1
    attention_impl: str = "xla"
    cudnn_max_segments: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family {self.family!r} is not supported; supported: {FAMILIES}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):  # `not >`: NaN (a config.json's) fails it too
            raise ValueError(
                f"ModelConfig.rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps} and "
                f"{self.rope_theta}"
            )
        remat_saved_names(self.remat_policy)
        check_scan_unroll(self.scan_unroll, "ModelConfig.scan_unroll")
        for name, allowed in (
            ("param_dtype", DTYPES),
            ("compute_dtype", DTYPES),
            ("attention_impl", ATTENTION_IMPLS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} {getattr(self, name)!r} is not one of {allowed}")
        if self.cudnn_max_segments is not None:
            m = self.cudnn_max_segments
            if not isinstance(m, int) or isinstance(m, bool) or m < 1:
                raise ValueError(f"ModelConfig.cudnn_max_segments must be an int >= 1 or None, got {m!r}")
            if self.attention_impl != "cudnn":
                raise ValueError(
                    f"ModelConfig.cudnn_max_segments={m} chooses cuDNN's packed attention, but "
                    f"attention_impl is {self.attention_impl!r}. Fix: set attention_impl='cudnn', or "
                    f"cudnn_max_segments=None"
                )
        if self.family == "qwen2" and (not self.qkv_bias or self.o_bias or self.qk_norm):
            raise ValueError("family 'qwen2' means qkv_bias=True, o_bias=False, qk_norm=False")
        if self.family == "qwen3" and not self.qk_norm:
            raise ValueError("family 'qwen3' means qk_norm=True")
        if self.family in ("llama", "qwen3") and self.qkv_bias != self.o_bias:
            raise ValueError(
                f"family {self.family!r} has biases on all of q/k/v/o or on none (attention_bias)"
            )
        if self.family == "llama" and self.qk_norm:
            raise ValueError("family 'llama' has no q/k norm; use family 'qwen3'")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(
                f"ModelConfig.eos_token_ids must be a tuple, got {type(self.eos_token_ids).__name__}"
            )
        self._check_special_ids()

    def _check_special_ids(self) -> None:
        # An EOS id past the embedding can never be generated, so a generation would never end on it, and
        # transformers warns about such ids in an exported config.json: typically a preset's ids kept when
        # `vocab_size` was made small. `pad_token_id` is not checked: Hub configs write -1 for "none".
        ids = {
            "bos_token_id": [] if self.bos_token_id is None else [self.bos_token_id],
            "eos_token_ids": list(self.eos_token_ids),
        }
        outside = {
            name: found
            for name, values in ids.items()
            if (found := [i for i in values if not 0 <= i < self.vocab_size])
        }
        if outside:
            raise SpecialIdsOutsideVocabError(self.vocab_size, outside)

    @property
    def param_jnp_dtype(self) -> jnp.dtype:
        """`param_dtype` as a jnp dtype (the parameters' storage)."""
        return jnp.dtype(self.param_dtype)

    @property
    def compute_jnp_dtype(self) -> jnp.dtype:
        """`compute_dtype` as a jnp dtype (the activations' and matmul operands')."""
        return jnp.dtype(self.compute_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (validated again).

        Raises:
            ValueError: as the constructor. TypeError: a name that is not a field.
        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Read a Hugging Face `config.json` dict (transformers 4.x or 5.x spelling).

        `overrides` replace fields read from `d` before the config is validated (typically the runtime ones:
        param_dtype, compute_dtype, remat_policy, scan_unroll, attention_impl, cudnn_max_segments; or
        architecture fields from `model.overrides`).

        Raises:
            ValueError: unknown `model_type`, or an option that changes the network and is not implemented
                here (rope type, partial rotary, MLP bias, sliding-window layers, activation other than silu).
            KeyError: a required key is missing.
            Also the constructor's ValueErrors, for the fields read or `overrides`.
        """
        family = d.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"config.json model_type {family!r} is not supported; supported: {FAMILIES}")
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in d:
                raise KeyError(f"config.json (model_type {family!r}) has no {key!r}")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' ACT2FN runs "swish" as SiLU
            raise ValueError(f"config.json hidden_act {act!r} is not supported; only 'silu' (or 'swish')")
        if d.get("mlp_bias", False):
            raise ValueError("config.json mlp_bias=true is not supported")
        if family in ("qwen2", "qwen3"):
            _reject_sliding_window(d)
        defaults = FAMILY_DEFAULTS[family]
        max_position_embeddings = int(d.get("max_position_embeddings", defaults["max_position_embeddings"]))
        rope_theta, rope_scaling = _parse_rope(d, max_position_embeddings)
        num_heads = int(d["num_attention_heads"])
        if "head_dim" in d and d["head_dim"] is None and family != "llama":
            # LlamaConfig reads null as absent; Qwen3Config refuses it and Qwen2's attention fails on it.
            raise ValueError(
                f"config.json head_dim is null, from which transformers builds no {family!r} model. Fix: set "
                f"it to the width of one attention head, or remove the key for transformers' default "
                f"({defaults.get('head_dim', 'hidden_size // num_attention_heads')})"
            )
        # `is None`, not falsiness: a 0 in config.json is refused by the validation below, as transformers
        # reads 0 as given (a model of no width), not as absent.
        head_dim = d.get("head_dim")
        if head_dim is None:
            head_dim = defaults.get("head_dim") or int(d["hidden_size"]) // num_heads
        num_kv_heads = d.get("num_key_value_heads", defaults.get("num_key_value_heads"))
        attention_bias = bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        eos_ids = (
            () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
        )
        fields = dict(
            family=family,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            # null is num_heads in every family (the configs' __post_init__), absent only in llama
            num_kv_heads=num_heads if num_kv_heads is None else int(num_kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            qk_norm=family == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
        )
        # Overrides join before the one validation, so an override can mend what config.json gets wrong for
        # this use (e.g. special ids past a shrunk vocabulary).
        return cls(**{**fields, **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4.x and 5.x) loads as the same network.

        Both rope spellings are written: 5.x reads `rope_parameters`, 4.x reads `rope_theta` / `rope_scaling`.
        """
        rope_scaling = None
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": self.rope_scaling.type, "factor": self.rope_scaling.factor}
            if self.rope_scaling.type == "llama3":
                rope_scaling.update(
                    low_freq_factor=self.rope_scaling.low_freq_factor,
                    high_freq_factor=self.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
                )
            rope_parameters = {**rope_scaling, "rope_theta": self.rope_theta}
        eos: int | list[int] | None = None
        if self.eos_token_ids:
            eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": rope_parameters,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.family != "qwen2":
            out["attention_bias"] = self.qkv_bias
        if self.family == "llama":
            out["mlp_bias"] = False
        else:
            out["use_sliding_window"] = False
        return out


# The fields `from_hf_config` reads from a config.json (and a training config's `model.overrides` may set).
ARCHITECTURE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(ModelConfig) if f.name not in RUNTIME_FIELDS
)


def remat_saved_names(policy: str) -> tuple[str, ...] | None:
    """The checkpoint names a `save:NAME[,NAME...]` remat policy keeps (in the order written; spaces around
    names ignored), or None for one of the named policies (`REMAT_POLICIES`).

    Raises:
        ValueError: `policy` is neither a named policy nor `save:` followed by one or more of `REMAT_NAMES`;
            the message names the offending name and the allowed ones.
    """
    if not policy.startswith(SAVE_PREFIX):
        if policy in REMAT_POLICIES:
            return None
        raise ValueError(
            f"remat_policy {policy!r} is not one of {REMAT_POLICIES} or '{SAVE_PREFIX}NAME[,NAME...]' with "
            f"NAME from {REMAT_NAMES}"
        )
    names = tuple(name.strip() for name in policy[len(SAVE_PREFIX) :].split(","))
    if names == ("",):
        raise ValueError(
            f"remat_policy {policy!r} names nothing to save: write '{SAVE_PREFIX}NAME[,NAME...]' with NAME "
            f"from {REMAT_NAMES} (or 'full' to save nothing)"
        )
    for name in names:
        if name not in REMAT_NAMES:
            raise ValueError(
                f"remat_policy {policy!r}: {name!r} is not a checkpoint name of the decoder layer; allowed: "
                f"{', '.join(REMAT_NAMES)}"
            )
    return names


def check_scan_unroll(value: Any, key: str) -> None:
    """Raise ValueError unless `value` (a `scan_unroll` setting) is an int >= 1; the message names it as
    `key` (`ModelConfig.scan_unroll`; in a training config "`model.scan_unroll`", in backticks so that a
    file's error gives its line) with the fix. A value above the layer count is accepted: `jax.lax.scan`
    then unrolls every layer, as it does at the layer count."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{key} must be an int >= 1, got {value!r}. Fix: 1 runs one decoder layer per scan iteration "
            f"(the default); N > 1 runs N per iteration; the layer count unrolls them all"
        )


def _reject_sliding_window(d: Mapping[str, Any]) -> None:
    if d.get("use_sliding_window", False):
        raise ValueError("config.json use_sliding_window=true is not supported (full attention only)")
    other = sorted({t for t in d.get("layer_types") or () if t != "full_attention"})
    if other:
        raise ValueError(f"config.json layer_types {other} are not supported (full attention only)")


def _parse_rope(d: Mapping[str, Any], max_position_embeddings: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`, `rope_scaling` (4.x),
    chosen as transformers 5 does (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`): a non-empty
    `rope_scaling` replaces `rope_parameters` whole; θ is the chosen object's `rope_theta`, else the
    top-level `rope_theta`, else 10000. `max_position_embeddings` (the model's, defaults applied) is llama3's
    `original_max_position_embeddings` where config.json gives none."""
    for key in ("rope_scaling", "rope_parameters"):
        value = d.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"config.json {key} must be an object, got {value!r}")
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    scaling = d.get(key) or {}
    if any(isinstance(v, Mapping) for v in scaling.values()):
        raise ValueError(f"config.json {key} nested per layer type are not supported")
    theta = scaling.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json rope type {rope_type!r} is not implemented; supported: {ROPE_TYPES}")
    partial = scaling.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"config.json partial_rotary_factor {partial} is not supported (only 1.0)")
    if rope_type == "default":
        return float(theta), None
    if "factor" not in scaling:
        raise KeyError(f"config.json rope scaling of type {rope_type!r} has no 'factor'")
    extra = {}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in scaling:
                raise KeyError(f"config.json rope scaling of type 'llama3' has no {key!r}")
            extra[key] = float(scaling[key])
        # transformers 5 (`standardize_rope_params`, for llama3, yarn and longrope) lets a top-level
        # original_max_position_embeddings (Phi-3's spelling) overwrite the RoPE object's.
        if "original_max_position_embeddings" in d:
            where, original = "config.json", d["original_max_position_embeddings"]
        else:
            where = "config.json rope scaling"
            original = scaling.get("original_max_position_embeddings", max_position_embeddings)
        if isinstance(original, bool) or not (
            isinstance(original, int | float) and float(original).is_integer()
        ):
            raise ValueError(
                f"{where} original_max_position_embeddings must be a whole number (the context length the "
                f"llama3 frequencies were trained for), got {original!r}"
            )
        extra["original_max_position_embeddings"] = int(original)
    return float(theta), RopeScaling(type=rope_type, factor=float(scaling["factor"]), **extra)
