"""ModelConfig: Hugging Face config.json in both transformers spellings, export, presets, clear errors.
References: transformers' own config classes and RoPE initialisers, and published parameter counts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoConfig, LlamaConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from nextquill_jax.config import load_config
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.models import CausalLM, ModelConfig, model_preset
from nextquill_jax.models.config import remat_saved_names
from nextquill_jax.models.layers import rope_inv_freq

LEGACY_LLAMA31 = {  # transformers 4.x spelling, as in Llama 3.2 1B's config.json (layer sizes shrunk)
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def test_transformers_4x_and_5x_spellings_give_the_same_config():
    modern = LlamaConfig(**LEGACY_LLAMA31).to_dict()  # transformers 5 rewrites it as rope_parameters
    assert "rope_parameters" in modern and "rope_scaling" not in modern
    old, new = ModelConfig.from_hf_config(LEGACY_LLAMA31), ModelConfig.from_hf_config(modern)
    assert old == new
    assert (
        old.rope_theta == 500000.0 and old.rope_scaling.type == "llama3" and old.rope_scaling.factor == 32.0
    )
    assert old.eos_token_ids == (128001, 128008, 128009) and old.tie_word_embeddings


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_config_json_with_only_the_required_keys_gets_transformers_architecture_defaults(family):
    """The architecture fields a config.json leaves out are what transformers' config class fills in for
    that family (a wrong default, rms_norm_eps 1e-5 for 1e-6 say, moves logits by < 1e-4: no parity test
    would see it). Special ids are no architecture: transformers' LlamaConfig fills bos 1 / eos 2, which
    are not this vocabulary's; ours stay unset."""
    required = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    required["num_attention_heads"] = 32  # Qwen2 and Qwen3 default to 32 kv heads
    ours = ModelConfig.from_hf_config({"model_type": family, **required})
    theirs = AutoConfig.for_model(family, **required)
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.head_dim == (
        getattr(theirs, "head_dim", None) or required["hidden_size"] // required["num_attention_heads"]
    )
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings


@pytest.mark.parametrize(
    "preset", ["llama3.2-1b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen3-0.6b", "smollm2-135m"]
)
def test_to_hf_config_is_read_back_by_transformers_as_the_same_network(preset):
    cfg = model_preset(preset)
    hf = AutoConfig.for_model(**cfg.to_hf_config())
    assert type(hf) is {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[cfg.family]
    assert hf.num_hidden_layers == cfg.num_layers and hf.head_dim == cfg.head_dim
    assert hf.num_key_value_heads == cfg.num_kv_heads and hf.tie_word_embeddings == cfg.tie_word_embeddings
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert ModelConfig.from_hf_config(hf.to_dict()) == cfg


# Published totals / non-embedding counts in billions (model cards), as the strings they are printed as.
PUBLISHED = {
    "qwen2.5-0.5b": ("0.49", "0.36"),
    "qwen2.5-1.5b": ("1.54", "1.31"),
    "qwen2.5-3b": ("3.09", "2.77"),
    "qwen2.5-7b": ("7.61", "6.53"),
    "qwen3-0.6b": ("0.6", "0.44"),
    "qwen3-1.7b": ("1.7", "1.4"),
    "qwen3-4b": ("4.0", "3.6"),
    "llama3.2-1b": ("1.23", None),
    "llama3.2-3b": ("3.21", None),
    "smollm2-135m": ("0.135", None),
}


def _agrees(count: int, published: str) -> bool:
    """Within one unit of the last printed digit (cards round or truncate)."""
    unit = 10.0 ** -len(published.split(".")[1])
    return abs(count / 1e9 - float(published)) <= unit


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_presets_have_the_published_parameter_counts(preset):
    cfg = model_preset(preset)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    total = sum(
        int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    )
    embedding = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    published_total, published_non_embedding = PUBLISHED[preset]
    assert _agrees(total, published_total), total
    if published_non_embedding is not None:
        assert _agrees(total - embedding, published_non_embedding), total - embedding


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"qwen2\.5-0\.5b"):
        model_preset("qwen9-1t")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "gemma"}, "model_type 'gemma'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        (
            # transformers 5 reads rope_parameters only where rope_scaling is null or empty
            {
                "rope_scaling": None,
                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
            },
            "rope type 'dynamic'",
        ),
        (  # transformers 5 would take the null over the llama3 object's 8192 and fail computing RoPE
            {"original_max_position_embeddings": None},
            r"config\.json original_max_position_embeddings must be a whole number .* got None",
        ),
        (  # JSON true is a Python int (1): it read as a 1-token context (survived mutation audit 6a)
            {"rope_scaling": {**LEGACY_LLAMA31["rope_scaling"], "original_max_position_embeddings": True}},
            r"config\.json rope scaling original_max_position_embeddings must be a whole number .* got True",
        ),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        (
            {"model_type": "qwen3", "head_dim": None},
            r"config\.json head_dim is null, from which transformers builds no 'qwen3' model\. "
            r"Fix: .*\(128\)",
        ),
        ({"model_type": "qwen2", "head_dim": None}, r"\(hidden_size // num_attention_heads\)"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
        (
            {"model_type": "qwen3", "layer_types": ["sliding_attention", "full_attention"]},
            "sliding_attention",
        ),
        ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ],
)
def test_unsupported_options_are_errors_naming_them(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config({**LEGACY_LLAMA31, **change})


def test_special_ids_outside_the_vocabulary_are_errors_naming_the_fields_and_the_fix():
    # A preset's vocabulary shrunk but its ids kept: Qwen's <|endoftext|> (151643) lies past 704 ids.
    fix = r"Fix: set them to the tokenizer's ids \(in a config: model\.overrides\.bos_token_id, model\."
    with pytest.raises(
        ValueError, match=r"\(vocab_size 704\): bos_token_id \[151643\], eos_token_ids \[151643\]\. " + fix
    ):
        model_preset("qwen2.5-0.5b", vocab_size=704)
    with pytest.raises(ValueError, match=r": eos_token_ids \[704\]\. "):
        model_preset("qwen2.5-0.5b", vocab_size=704, bos_token_id=0, eos_token_ids=(0, 704))
    # A library caller's fix too (it named only a training config's keys).
    with pytest.raises(
        ValueError, match=r"in Python, the ModelConfig fields of those names, which load_pretrained"
    ):
        model_preset("qwen2.5-0.5b", vocab_size=704)
    with pytest.raises(
        ValueError, match=r"bos_token_id \[128000\], eos_token_ids \[128001, 128008, 128009\]"
    ):
        ModelConfig.from_hf_config({**LEGACY_LLAMA31, "vocab_size": 1000})
    with pytest.raises(ConfigError, match=r"invalid `model`: .*model\.overrides\.eos_token_ids"):
        load_config(None, base={"model": {"preset": "qwen2.5-0.5b", "overrides": {"vocab_size": 704}}})
    small = model_preset("qwen2.5-0.5b", vocab_size=704, bos_token_id=0, eos_token_ids=(0,))
    assert (small.bos_token_id, small.eos_token_ids) == (0, (0,))


def test_a_path_models_overrides_mend_its_special_ids_and_its_errors_name_the_path(tmp_path):
    """A config.json whose ids lie past its vocabulary: `model.overrides` is applied before the check (so the
    fix the error names works), and without it the error is a ConfigError naming `model.path` (the CLI
    prints it as a user error, not a traceback)."""
    import json
    import re

    from nextquill_jax.config import ModelRunConfig
    from nextquill_jax.train.model_setup import model_config

    (tmp_path / "config.json").write_text(json.dumps({**LEGACY_LLAMA31, "vocab_size": 1000}))
    at = rf"^model\.path {re.escape(str(tmp_path))}: "
    with pytest.raises(ConfigError, match=at + r".*bos_token_id \[128000\]"):
        model_config(ModelRunConfig(path=str(tmp_path)))
    mended = ModelRunConfig(path=str(tmp_path), overrides={"bos_token_id": 1, "eos_token_ids": [2, 3]})
    cfg = model_config(mended)
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_ids) == (1000, 1, (2, 3))
    (tmp_path / "config.json").write_text(json.dumps({**LEGACY_LLAMA31, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=at + r"config\.json model_type 'gpt2'"):
        model_config(ModelRunConfig(path=str(tmp_path)))


def test_runtime_fields_are_validated():
    with pytest.raises(ValueError, match="remat_policy 'sometimes'"):
        model_preset("smollm2-135m", remat_policy="sometimes")
    with pytest.raises(
        ValueError, match=r"'atention' is not a checkpoint name .*; allowed: qkv, attention, "
    ):
        model_preset("smollm2-135m", remat_policy="save:qkv,atention")
    with pytest.raises(ValueError, match=r"remat_policy 'save:' names nothing to save"):
        model_preset("smollm2-135m", remat_policy="save:")
    cfg = model_preset("smollm2-135m", remat_policy="save:qkv, attention")
    assert remat_saved_names(cfg.remat_policy) == ("qkv", "attention")
    assert remat_saved_names("full") is None
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        model_preset("smollm2-135m", attention_impl="flash")
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="cudnn_max_segments must be an int >= 1"):
            model_preset("smollm2-135m", attention_impl="cudnn", cudnn_max_segments=bad)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match=r"ModelConfig.scan_unroll must be an int >= 1, got .*\. Fix: "):
            model_preset("smollm2-135m", scan_unroll=bad)
    # Above the layer count (30) is accepted: jax.lax.scan then unrolls every layer.
    assert model_preset("smollm2-135m", scan_unroll=64).scan_unroll == 64
    with pytest.raises(ValueError, match=r"but attention_impl is 'xla'\. Fix: set attention_impl='cudnn'"):
        model_preset("smollm2-135m", cudnn_max_segments=4)
    assert model_preset("smollm2-135m", attention_impl="cudnn", cudnn_max_segments=4).cudnn_max_segments == 4


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_rope_frequencies_match_transformers(scaling):
    hf = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    rope_type = "default" if scaling is None else scaling["rope_type"]
    if rope_type == "default":
        expected = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf, device=None)
    ours = rope_inv_freq(ModelConfig.from_hf_config(hf.to_dict()))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=2e-6, atol=0)


TINY_LLAMA = dict(
    family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8,
)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"head_dim": 7}, r"head_dim must be even for RoPE, got 7"),  # RoPE rotates pairs of channels
        ({"num_layers": 0}, r"ModelConfig\.num_layers must be a positive int, got 0"),
        ({"vocab_size": 0}, r"ModelConfig\.vocab_size must be a positive int, got 0"),
        ({"rope_theta": 0.0}, r"rms_norm_eps and rope_theta must be > 0, got 1e-06 and 0\.0"),
        ({"rms_norm_eps": -1e-6}, r"rms_norm_eps and rope_theta must be > 0, got -1e-06 and 10000\.0"),
        ({"family": "qwen3"}, r"family 'qwen3' means qk_norm=True"),  # Qwen3Attention always has q/k norm
        ({"qkv_bias": True}, r"family 'llama' has biases on all of q/k/v/o or on none"),  # attention_bias
        ({"o_bias": True}, r"family 'llama' has biases on all of q/k/v/o or on none"),
        ({"qk_norm": True}, r"family 'llama' has no q/k norm"),
        ({"family": "qwen2"}, r"family 'qwen2' means qkv_bias=True, o_bias=False"),
        ({"eos_token_ids": [2]}, r"eos_token_ids must be a tuple, got list"),
    ],
)
def test_a_model_config_that_transformers_cannot_build_is_refused_naming_the_field(change, match):
    """Each change to a valid tiny Llama config asks for a network transformers' classes do not build (odd
    head_dim: RoPE rotates channel pairs; no layers or vocabulary; a non-positive ε or θ; Qwen3 without
    its q/k norm; Llama's one `attention_bias` covering only some projections); construction names it.
    Survived before (mutation audit 6a): dropping the even head_dim check, `value <= 0` as `value < 0`,
    `rms_norm_eps > 0 and rope_theta > 0` as `or`, dropping the qwen3 q/k norm check, and checking the
    all-or-none biases for qwen3 only."""
    ModelConfig(**TINY_LLAMA)  # valid as it is
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY_LLAMA, **change})


def test_hidden_act_swish_reads_as_silu():
    """transformers' ACT2FN runs "swish" as SiLU, so a config.json spelling it so is the same network.
    Reference: ACT2FN's two functions on the same inputs. Survived before: refusing "swish"."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-6.0, 6.0, 25, dtype=torch.float64)
    torch.testing.assert_close(ACT2FN["swish"](x), ACT2FN["silu"](x), rtol=0, atol=0)
    assert ModelConfig.from_hf_config(
        {**LEGACY_LLAMA31, "hidden_act": "swish"}
    ) == ModelConfig.from_hf_config(LEGACY_LLAMA31)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_head_and_kv_head_counts_are_read_as_transformers_reads_them(family):
    """64 query heads of width 2 (hidden 128): an explicit `head_dim` beats Qwen3's default of 128, and an
    absent `num_key_value_heads` is the family's default (32 for Qwen2 / Qwen3, which 64 heads group into;
    the head count for Llama), not the head count. Reference: transformers' config classes. Survived before:
    the family's head_dim default taking precedence over config.json's, and an absent kv head count read
    as the head count (the required-keys test has 32 heads, where the two agree)."""
    d = dict(
        vocab_size=96, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=64
    )
    theirs = AutoConfig.for_model(family, **d)
    ours = ModelConfig.from_hf_config({"model_type": family, **d})
    assert ours.num_kv_heads == theirs.num_key_value_heads == (64 if family == "llama" else 32)
    explicit = AutoConfig.for_model(family, **d, head_dim=2)
    assert explicit.head_dim == 2
    assert ModelConfig.from_hf_config({"model_type": family, **d, "head_dim": 2}).head_dim == 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    ("key", "field"), [("head_dim", "head_dim"), ("num_key_value_heads", "num_kv_heads")]
)
def test_a_zero_head_width_or_kv_head_count_in_config_json_is_refused_not_defaulted(family, key, field):
    """transformers keeps a 0 `head_dim` or `num_key_value_heads` as given (a network of no width); it was
    read here as absent (`x or default`) and replaced by the default, a model other than the file's. It is
    refused, naming the field."""
    d = dict(vocab_size=96, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    assert getattr(AutoConfig.for_model(family, **d, **{key: 0}), key) == 0
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a positive int, got 0"):
        ModelConfig.from_hf_config({"model_type": family, **d, key: 0})


def test_a_single_end_token_is_written_as_the_published_config_json_writes_it():
    """Qwen2.5-0.5B's published config.json has `"eos_token_id": 151643`, an int; Llama 3.1's lists three.
    `to_hf_config` writes one id as an int and several as a list. Survived before: always a list."""
    assert model_preset("qwen2.5-0.5b").to_hf_config()["eos_token_id"] == 151643
    assert ModelConfig.from_hf_config(LEGACY_LLAMA31).to_hf_config()["eos_token_id"] == [
        128001,
        128008,
        128009,
    ]
    assert model_preset("qwen2.5-0.5b", eos_token_ids=()).to_hf_config()["eos_token_id"] is None


def test_rope_theta_and_llama3_context_default_are_read_as_transformers_5_reads_them():
    """A `rope_theta` inside the RoPE object beats the top-level one, and a llama3 object without
    `original_max_position_embeddings` takes the model's `max_position_embeddings` (4096 here, not Llama
    3's 8192). Reference: transformers 5's LlamaConfig on the same dict, and its llama3 RoPE initialiser for
    the frequencies. Survived before: the top-level theta taking precedence, and a fixed 8192 default."""
    base = {k: v for k, v in LEGACY_LLAMA31.items() if k not in ("rope_scaling", "rope_theta")}
    d = {**base, "rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert LlamaConfig(**d).rope_parameters["rope_theta"] == 1e6
    assert ModelConfig.from_hf_config(d).rope_theta == 1e6
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    d = {**base, "max_position_embeddings": 4096, "rope_scaling": scaling}
    ours = ModelConfig.from_hf_config(d)
    hf = LlamaConfig(**copy.deepcopy(d))  # it writes the default into the RoPE object it is given
    assert hf.rope_parameters["original_max_position_embeddings"] == 4096
    assert ours.rope_scaling.original_max_position_embeddings == 4096
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, device=None)
    np.testing.assert_allclose(rope_inv_freq(ours), expected.numpy(), rtol=2e-6, atol=0)


def test_llama3_scaling_with_equal_frequency_factors_is_refused():
    """transformers' llama3 RoPE interpolates with (original / wavelength - low) / (high - low): equal
    factors divide by zero, so `high_freq_factor` must lie above `low_freq_factor`; just above is fine.
    Survived before: `>=` for `>` in the check."""
    from nextquill_jax.models.config import RopeScaling

    fields = dict(type="llama3", factor=8.0, low_freq_factor=2.0, original_max_position_embeddings=8192)
    with pytest.raises(ValueError, match=r"high_freq_factor > low_freq_factor, got 2\.0 <= 2\.0"):
        RopeScaling(**fields, high_freq_factor=2.0)
    assert RopeScaling(**fields, high_freq_factor=2.5).high_freq_factor == 2.5


# Values of each preset's published Hugging Face config.json (Qwen2.5 base, Qwen3 and Llama 3.2 released
# checkpoints, SmolLM2-135M-Instruct): (bos_token_id, eos_token_id, pad_token_id, max_position_embeddings,
# rope_theta, rms_norm_eps).
PUBLISHED_CONFIG = {
    "qwen2.5-0.5b": (151643, 151643, None, 32768, 1e6, 1e-6),
    "qwen2.5-1.5b": (151643, 151643, None, 131072, 1e6, 1e-6),
    "qwen2.5-3b": (151643, 151643, None, 32768, 1e6, 1e-6),
    "qwen2.5-7b": (151643, 151643, None, 131072, 1e6, 1e-6),
    "qwen3-0.6b": (151643, 151645, None, 40960, 1e6, 1e-6),
    "qwen3-1.7b": (151643, 151645, None, 40960, 1e6, 1e-6),
    "qwen3-4b": (151643, 151645, None, 40960, 1e6, 1e-6),
    "llama3.2-1b": (128000, 128001, None, 131072, 500000.0, 1e-5),
    "llama3.2-3b": (128000, 128001, None, 131072, 500000.0, 1e-5),
    "smollm2-135m": (1, 2, 2, 8192, 100000.0, 1e-5),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_CONFIG))
def test_presets_write_the_published_config_json_values(preset):
    """Special ids, context length, RoPE base and RMSNorm ε of each preset's exported config.json are those
    of the published checkpoint (parameter counts cannot see them); Llama 3.2's RoPE scaling is its
    published llama3 object. The export is case-blind in the name. Survived before (mutation audit 6a):
    Qwen's <|im_end|> id off by one, Qwen3's and Qwen2.5-1.5B / 7B's context lengths, Llama 3.2's
    low_freq_factor, original context and θ, SmolLM2's θ and pad id, Qwen2.5's ε and bos id, Llama's eos."""
    hf = model_preset(preset.upper()).to_hf_config()
    got = tuple(
        hf[k]
        for k in (
            "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "rope_theta",
            "rms_norm_eps",
        )
    )  # fmt: skip
    assert got == PUBLISHED_CONFIG[preset]
    if preset.startswith("llama"):
        assert hf["rope_scaling"] == {
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }  # fmt: skip
    else:
        assert hf["rope_scaling"] is None
