"""Read a llama.cpp GGUF file as a Hugging Face config dict and float32 tensors under Hugging Face names,
each dequantized when it is read.

Supported architectures: `llama` (Llama 2/3, SmolLM2, Mistral-style), `qwen2` and `qwen3`, dense only, in
any quantisation that `gguf.quants.dequantize` implements (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, K-quants...).

llama.cpp's `llama` graph applies RoPE to adjacent pairs of each head's query/key rows (2i, 2i+1), while
Hugging Face's Llama rotates the two halves (i, i + head_dim/2). Its converter therefore permutes the rows of
`attn_q` and `attn_k` when writing a GGUF file; `read_gguf` applies the inverse, giving back the original
Hugging Face tensors. `qwen2` / `qwen3` use the half-rotation layout in llama.cpp too and are stored as is.
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nextquill_jax.models.gguf_file import GGUFContents, TensorEntry, gguf_version, read_gguf_file

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
_HF_ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# per-block GGUF suffix -> per-layer Hugging Face suffix
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def read_gguf(path: str | PathLike[str]) -> tuple[dict[str, Any], GGUFTensors]:
    """Parse a GGUF checkpoint into (Hugging Face `config.json` dict, {Hugging Face name: float32 array}).

    Tensors keep the Hugging Face layouts: projections are [out_features, in_features], the embedding is
    [vocab, hidden], norms and biases are 1-D. When the file has no `output.weight` the embeddings are tied
    (`tie_word_embeddings: true`) and no `lm_head.weight` is returned, as in a Hugging Face safetensors file.
    The tensors are a `GGUFTensors` mapping: each is dequantized when read, so the model is never held in
    float32 whole.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a file the GGUF layout reader refuses (`gguf_file.read_gguf_file`); an unsupported
            architecture, quantisation, RoPE scaling or mixture-of-experts model; per-layer values (an array)
            for the head counts, feed-forward length or block count; biases on some attention projections
            only; a tensor name with no Hugging Face counterpart; or a tensor whose shape disagrees with the
            metadata. The message names the file and
            the field or tensor.
    """
    contents, meta, arch = _open(path)
    path = Path(path)
    for tensor in contents.tensors:  # its first block: a quantisation that cannot be read, before any is
        _dequantize(tensor, path, first_block_only=True)
    shapes = _hf_shapes(contents, path)
    config = _hf_config(meta, arch, shapes, path)
    _check_shapes(shapes, config, path)
    return config, GGUFTensors(contents, config, arch, path)


class GGUFTensors(Mapping):
    """Read-only mapping {Hugging Face name: float32 array} over a GGUF file's tensors (`read_gguf`).

    A tensor is dequantized (and a llama q / k projection put back in Hugging Face row order) when it is
    asked for; the last `num_hidden_layers + 1` read are kept, as a sharded load reads each layer of a
    stacked parameter once per device slice. The arrays are read-only: they may be shared with that cache.
    """

    def __init__(self, contents: GGUFContents, config: dict[str, Any], arch: str, path: Path) -> None:
        """Over `contents` of the GGUF file `path`, with its `config` and `arch` as `read_gguf` read them
        (which has checked the tensors' names, shapes and quantisations)."""
        self._path = path
        self._entries = {_hf_tensor_name(t.name, path): t for t in contents.tensors}
        # q / k name -> its head count, for llama's row order alone (qwen2 / qwen3 are stored as is)
        self._rope_heads: dict[str, int] = {}
        if arch == "llama":
            heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
            for layer, proj, kind in itertools.product(
                range(config["num_hidden_layers"]), "qk", ("weight", "bias")
            ):
                self._rope_heads[f"model.layers.{layer}.self_attn.{proj}_proj.{kind}"] = heads[proj]
        self._head_dim = config["head_dim"]
        self._keep = config["num_hidden_layers"] + 1
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._recent:
            self._recent.move_to_end(name)
            return self._recent[name]
        value = _dequantize(self._entries[name], self._path)
        if name in self._rope_heads:
            value = _half_rotation_order(value, self._rope_heads[name], self._head_dim)
        value.setflags(write=False)
        self._recent[name] = value
        if len(self._recent) > self._keep:
            self._recent.popitem(last=False)
        return value

    def __contains__(self, name: object) -> bool:  # Mapping's would read (dequantize) the tensor
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor `name`'s shape, from the file's tensor table without reading it."""
        return self._entries[name].shape


def read_gguf_config(path: str | PathLike[str]) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of a GGUF checkpoint, as `read_gguf` gives it, from the metadata
    and the tensors' shapes only: no tensor is read or dequantized.

    Raises:
        FileNotFoundError / ValueError: as `read_gguf`, for the metadata and tensor names.
    """
    contents, meta, arch = _open(path)
    return _hf_config(meta, arch, _hf_shapes(contents, Path(path)), Path(path))


def read_gguf_shapes(path: str | PathLike[str]) -> dict[str, tuple[int, ...]]:
    """{Hugging Face name: shape} of a GGUF checkpoint's tensors, as `read_gguf` gives them, from the tensor
    table only: no tensor is read or dequantized.

    Raises:
        FileNotFoundError / ValueError: as `read_gguf_config`.
    """
    contents, _, _ = _open(path)
    return _hf_shapes(contents, Path(path))


def _hf_shapes(contents: GGUFContents, path: Path) -> dict[str, tuple[int, ...]]:
    return {_hf_tensor_name(t.name, path): t.shape for t in contents.tensors}


def _open(path: str | PathLike[str]) -> tuple[GGUFContents, _Metadata, str]:
    """(contents, metadata, architecture) of a GGUF file whose architecture we support."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    contents = read_gguf_file(path)
    meta = _Metadata(contents.metadata, path)
    arch = meta.required("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{list(SUPPORTED_ARCHITECTURES)}. Fix: use a model of one of them (its GGUF file or Hugging "
            "Face directory)"
        )
    return contents, meta, arch


class _Metadata:
    """Typed access to a GGUF file's key/value metadata with errors that name the file and key."""

    def __init__(self, metadata: dict[str, Any], path: Path) -> None:
        self.metadata = metadata
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        """The metadata value of `key`, else `default`."""
        return self.metadata.get(key, default)

    def required(self, key: str) -> Any:
        """The metadata value of `key`.

        Raises:
            ValueError: the file has no `key`, naming the file.
        """
        if key not in self.metadata:
            raise ValueError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.get(key)

    def one_for_all_layers(self, key: str, default: int | None = None) -> int:
        """`key` as an int (required when `default` is None). llama.cpp also reads some layer sizes as an
        array with one value per layer, which a Hugging Face config of these architectures cannot hold."""
        value = self._value(key, default)
        if isinstance(value, list):
            raise ValueError(
                f"{self.path}: GGUF metadata {key!r} is an array of {len(value)} values, one per layer: "
                "per-layer values are not supported (only one value for all layers)"
            )
        return self._integer(key, value)

    def integer(self, key: str, default: int | None = None) -> int:
        """`key` as an int: required when `default` is None, else `default` where the key is absent.

        Raises:
            ValueError: the key is missing and required, or its value is not an integer (an array, a
                string, a fraction), naming the file, the key and the value.
        """
        return self._integer(key, self._value(key, default))

    def number(self, key: str, default: float | None = None) -> float:
        """`key` as a float, as `integer` reads an int (an integer value is accepted too)."""
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{self.path}: GGUF metadata {key!r} is {_shown(value)}, not a number")
        return float(value)

    def _value(self, key: str, default: Any) -> Any:
        return self.required(key) if default is None else self.get(key, default)

    def _integer(self, key: str, value: Any) -> int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        raise ValueError(f"{self.path}: GGUF metadata {key!r} is {_shown(value)}, not an integer")


def _shown(value: Any) -> str:
    """A metadata value for an error line: an array by its length, not its (possibly 100k-item) contents."""
    return f"an array of {len(value)} values" if isinstance(value, list) else repr(value)


def _hf_tensor_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}"
    if gguf_name == "rope_freqs.weight":
        raise ValueError(
            f"{path}: tensor 'rope_freqs.weight' holds llama.cpp's per-frequency RoPE factors (Llama 3.1+ "
            f"'llama3' rope scaling), which cannot be turned back into a Hugging Face rope_scaling; load the "
            f"model from its Hugging Face directory instead"
        )
    raise ValueError(f"{path}: GGUF tensor {gguf_name!r} has no Hugging Face counterpart in this reader")


def _dequantize(tensor: TensorEntry, path: Path, *, first_block_only: bool = False) -> np.ndarray:
    """The tensor as a fresh float32 array, shaped outermost first; `first_block_only`: its first block of
    values alone, 1-D (to learn that its quantisation can be read, cheaply).

    Raises:
        ValueError: a quantisation `gguf.quants` cannot dequantize, naming the tensor and the fix.
    """
    import gguf

    ggml_type = gguf.GGMLQuantizationType(tensor.ggml_type)
    data = tensor.data.reshape(-1)[: gguf.GGML_QUANT_SIZES[ggml_type][1]] if first_block_only else tensor.data
    try:
        values = gguf.quants.dequantize(data, ggml_type)
    except NotImplementedError as err:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} is stored as {ggml_type.name}, which gguf "
            f"{gguf_version()} cannot dequantize ({err}). Fix: convert the model again to F16, BF16 or a "
            "quantization gguf dequantizes (Q8_0, Q4_K, ...), or load its Hugging Face directory"
        ) from err
    # a fresh float32 array: F32 tensors come back as read-only views of the memory-mapped file
    values = np.array(values, dtype=np.float32)
    return values.reshape(-1) if first_block_only else values.reshape(tensor.shape)


def _hf_config(meta: _Metadata, arch: str, shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    """config.json from the metadata and the tensors' Hugging Face names and shapes."""
    if meta.get(f"{arch}.expert_count"):
        raise ValueError(f"{path}: mixture-of-experts GGUF models ({arch}.expert_count) are not supported")
    rope_scaling = _rope_scaling(meta, arch, path)
    num_heads = meta.one_for_all_layers(f"{arch}.attention.head_count")
    num_kv_heads = meta.one_for_all_layers(f"{arch}.attention.head_count_kv", default=num_heads)
    hidden = meta.integer(f"{arch}.embedding_length")
    head_dim = _head_dim(meta, arch, hidden, num_heads, path)
    if "model.embed_tokens.weight" not in shapes:
        raise ValueError(f"{path}: GGUF file has no 'token_embd.weight' tensor")
    vocab_size = shapes["model.embed_tokens.weight"][0]
    declared_vocab = meta.integer(f"{arch}.vocab_size", default=vocab_size)
    if declared_vocab != vocab_size:
        raise ValueError(
            f"{path}: {arch}.vocab_size is {declared_vocab} but token_embd.weight has {vocab_size} rows"
        )
    config: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURE[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta.one_for_all_layers(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.one_for_all_layers(f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.integer(f"{arch}.context_length"),
        "rms_norm_eps": _decimal(meta.number(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _decimal(meta.number(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "lm_head.weight" not in shapes,
    }
    if arch != "qwen2":
        # `attention_bias` puts a bias on all four projections, or none: llama.cpp takes each alone.
        projections = [f"model.layers.0.self_attn.{p}_proj.bias" for p in ("q", "k", "v", "o")]
        biased = [name for name in projections if name in shapes]
        if biased and len(biased) < len(projections):
            named = ", ".join(name.split(".")[-2] for name in biased)
            raise ValueError(
                f"{path}: GGUF {arch} attention carries biases on {named} only; a Hugging Face config of "
                "this architecture gives biases to all four projections or none (attention_bias). Fix: load "
                "the model's Hugging Face directory"
            )
        config["attention_bias"] = bool(biased)
    if arch == "llama":
        config["mlp_bias"] = False
    for gguf_key, hf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        if f"tokenizer.ggml.{gguf_key}" in meta.metadata:
            config[hf_key] = meta.integer(f"tokenizer.ggml.{gguf_key}")
    return config


def _head_dim(meta: _Metadata, arch: str, hidden: int, num_heads: int, path: Path) -> int:
    """The head size as llama.cpp reads it (`attention.key_length`, else `embedding_length / head_count`),
    checked against the rotary width `rope.dimension_count`, which defaults to it.

    Raises:
        ValueError: `rope.dimension_count` differs from the head size (RoPE over part of each head).
    """
    key_length = meta.integer(f"{arch}.attention.key_length", default=0)
    head_dim, source = (
        (key_length, f"{arch}.attention.key_length")
        if key_length
        else (hidden // num_heads, f"{arch}.embedding_length / {arch}.attention.head_count")
    )
    rotary = meta.integer(f"{arch}.rope.dimension_count", default=head_dim)
    if rotary != head_dim:
        # the wording of config.json's partial_rotary_factor refusal (models/config.py `_parse_rope`)
        raise ValueError(
            f"{path}: {arch}.rope.dimension_count {rotary} is not the head size {head_dim} ({source}): "
            f"partial_rotary_factor {rotary / head_dim:g} is not supported (only 1.0)"
        )
    return head_dim


def _decimal(value: float) -> float:
    """The shortest decimal that a float32 metadata value rounds from: GGUF stores 1e-5 as 9.99999974e-06,
    and the config should read 1e-5 as the original config.json did."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: _Metadata, arch: str, path: Path) -> dict[str, Any] | None:
    """config.json `rope_scaling` as llama.cpp reads the metadata (llama-model.cpp `load_hparams`,
    llama-context.cpp): the type defaults to `linear`; the factor is `rope.scaling.factor`, else the older
    `rope.scale_linear`, else none; a factor of 0 (none) or 1, or the type `none`, leaves the frequencies
    unscaled."""
    kind = meta.get(f"{arch}.rope.scaling.type", "linear")
    if kind not in ("none", "linear"):
        raise ValueError(
            f"{path}: {arch}.rope.scaling.type {kind!r} is not supported (only 'none' and 'linear')"
        )
    factor = meta.number(
        f"{arch}.rope.scaling.factor"
        if f"{arch}.rope.scaling.factor" in meta.metadata
        else f"{arch}.rope.scale_linear",
        default=0.0,
    )
    if kind == "none" or factor in (0.0, 1.0):
        return None
    return {"rope_type": "linear", "factor": _decimal(factor)}


def _half_rotation_order(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """A llama q / k weight [heads * head_dim, in] or bias [heads * head_dim] in Hugging Face row order:
    the inverse of llama.cpp's converter's row permutation.

    Within each head llama.cpp stores row 2i + j (j in {0, 1}) where Hugging Face has row i + j * head_dim/2;
    viewing a head's rows as [j, i] in Hugging Face order and [i, j] in GGUF order, the inverse is a
    transpose.
    """
    per_head = w.reshape(heads, head_dim // 2, 2, *w.shape[1:])  # GGUF order [h, i, j, ...]
    return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(w.shape)  # [h, j, i, ...]


def _check_shapes(shapes: dict[str, tuple[int, ...]], config: dict[str, Any], path: Path) -> None:
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = (
        config["num_attention_heads"] * config["head_dim"],
        config["num_key_value_heads"] * config["head_dim"],
    )
    expected = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (v, d),
    }
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (d, q),
        "self_attn.o_proj.bias": (d,),
        "self_attn.q_norm.weight": (config["head_dim"],),
        "self_attn.k_norm.weight": (config["head_dim"],),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    for layer in range(config["num_hidden_layers"]):
        expected.update({f"model.layers.{layer}.{k}": s for k, s in per_layer.items()})
    for name, shape in shapes.items():
        if name not in expected:
            raise ValueError(
                f"{path}: tensor {name} is outside the {config['num_hidden_layers']} layers the metadata "
                f"declares"
            )
        if shape != expected[name]:
            raise ValueError(
                f"{path}: tensor {name} has shape {shape}, the metadata implies {expected[name]}"
            )
