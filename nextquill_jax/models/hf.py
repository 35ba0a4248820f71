"""Hugging Face checkpoints <-> CausalLM: safetensors import / export, one name table per family.

`model_from_hf(config_dict, tensors, ...)` is the single path from "a config.json dict + tensors under Hugging
Face names" to a CausalLM; `load_pretrained` feeds it from a safetensors directory or from a GGUF file
(`gguf.read_gguf`). With a mesh, every parameter is created directly with its target sharding
(`jax.make_array_from_callback`: each device receives only its slice, read from memory-mapped files), so the
whole model never sits unsharded on one device.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..atomic_file import replaced_atomically, write_text_atomic
from ..json_object import read_json_object
from ..parallel import DEFAULT_RULES, LogicalRules, logical_to_sharding
from .causal_lm import CausalLM
from .config import ModelConfig
from .gguf import GGUFTensors, read_gguf

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Files that loaders read as a model's or an adapter's weights. One left from an earlier save would sit beside
# the new one and be loaded instead of it by some loader: ours prefers model.safetensors.index.json to
# model.safetensors, transformers the reverse, and an adapter_config.json makes transformers (with peft) load
# the directory as an adapter on its base model.
WEIGHT_FILES = ("model*.safetensors*", "pytorch_model*.bin*", "adapter_model.*", "adapter_config.json")
# Files transformers reads beside a saved model in preference to what a save here writes, and that a save
# here may not write: generation_config.json's token ids and decoding replace config.json's,
# special_tokens_map.json and added_tokens.json the saved tokenizer's special tokens, a chat template file
# the tokenizer's (a tokenizer without a template writes none). One left from another model is read as this
# one's.
READ_OVER_FILES = (
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Buffers some older checkpoints store that are not parameters (recomputed from the config here).
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_COPY_AGAIN = "copy or download the model's files again from their source"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one Hugging Face tensor maps onto our (per-layer) array: shapes and the conversion both ways."""

    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # our shape -> HF shape
    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (HF array, our shape) -> our array
    to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda s: s, lambda a, s: a, lambda a: a)
# torch Linear stores [out, in]; ours are [in, out].
TRANSPOSED = Layout(lambda s: s[::-1], lambda a, s: a.T, lambda a: a.T)
# [N*Hd, D] (torch q/k/v_proj.weight) <-> [D, N, Hd]
IN_HEADS = Layout(
    lambda s: (s[1] * s[2], s[0]), lambda a, s: a.T.reshape(s), lambda a: a.reshape(a.shape[0], -1).T
)
# [D, H*Hd] (torch o_proj.weight) <-> [H, Hd, D]
OUT_HEADS = Layout(
    lambda s: (s[2], s[0] * s[1]), lambda a, s: a.T.reshape(s), lambda a: a.reshape(-1, a.shape[-1]).T
)
# [N*Hd] (q/k/v_proj.bias) <-> [N, Hd]
HEAD_BIAS = Layout(lambda s: (s[0] * s[1],), lambda a, s: a.reshape(s), lambda a: a.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Rule:
    """Hugging Face name (with `{i}` = layer index for stacked parameters) <-> our parameter path."""

    hf: str
    path: tuple[str, ...]
    layout: Layout

    @property
    def stacked(self) -> bool:
        """Whether the rule names one tensor per layer (`{i}` in its Hugging Face name), stacked here on a
        leading layer axis."""
        return "{i}" in self.hf


_L = "model.layers.{i}."
_BASE = (
    Rule("model.embed_tokens.weight", ("embed",), SAME),
    Rule("model.norm.weight", ("final_norm", "scale"), SAME),
    Rule("lm_head.weight", ("lm_head",), TRANSPOSED),
    Rule(_L + "input_layernorm.weight", ("layers", "input_norm", "scale"), SAME),
    Rule(_L + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), SAME),
    Rule(_L + "self_attn.q_proj.weight", ("layers", "attn", "q_proj"), IN_HEADS),
    Rule(_L + "self_attn.k_proj.weight", ("layers", "attn", "k_proj"), IN_HEADS),
    Rule(_L + "self_attn.v_proj.weight", ("layers", "attn", "v_proj"), IN_HEADS),
    Rule(_L + "self_attn.o_proj.weight", ("layers", "attn", "o_proj"), OUT_HEADS),
    Rule(_L + "mlp.gate_proj.weight", ("layers", "mlp", "gate"), TRANSPOSED),
    Rule(_L + "mlp.up_proj.weight", ("layers", "mlp", "up"), TRANSPOSED),
    Rule(_L + "mlp.down_proj.weight", ("layers", "mlp", "down"), TRANSPOSED),
)
_QKV_BIAS = (
    Rule(_L + "self_attn.q_proj.bias", ("layers", "attn", "q_bias"), HEAD_BIAS),
    Rule(_L + "self_attn.k_proj.bias", ("layers", "attn", "k_bias"), HEAD_BIAS),
    Rule(_L + "self_attn.v_proj.bias", ("layers", "attn", "v_bias"), HEAD_BIAS),
)
_O_BIAS = (Rule(_L + "self_attn.o_proj.bias", ("layers", "attn", "o_bias"), SAME),)
_QK_NORM = (
    Rule(_L + "self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), SAME),
    Rule(_L + "self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), SAME),
)

# One table per family. A rule applies when the model has its parameter (biases only if the config has them).
NAME_TABLES: dict[str, tuple[Rule, ...]] = {
    "llama": _BASE + _QKV_BIAS + _O_BIAS,
    "qwen2": _BASE + _QKV_BIAS,
    "qwen3": _BASE + _QKV_BIAS + _O_BIAS + _QK_NORM,
}


class SafetensorsTensors(Mapping):
    """Read-only mapping HF name -> np.ndarray over `model.safetensors` or a sharded index (memory-mapped)."""

    def __init__(self, directory: str | Path) -> None:
        """Open the weight files of `directory` (nothing is read until a tensor is asked for).

        Raises:
            FileNotFoundError: neither model.safetensors nor its sharded index is there (naming PyTorch
                weight files it does hold, which are not read), or a file the index lists is missing.
            KeyError: a file does not hold what the index lists for it.
            ValueError: the index is no JSON object with a `weight_map`, or a weight file's header cannot be
                read (a truncated or damaged file); naming the file.
        """
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = _read_weight_map(index)
        elif (directory / SINGLE_FILE).exists():
            with _open_weights(directory / SINGLE_FILE) as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            torch_files = sorted(p.name for p in directory.glob("pytorch_model*.bin*"))
            fix = (
                f"it holds {', '.join(torch_files)}, which are not read: save the model as safetensors "
                "(transformers' save_pretrained does by default)"
                if torch_files
                else "put the model's weights there, or name the directory that holds them"
            )
            raise FileNotFoundError(
                f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} exists, so it has no weights to load. "
                f"Fix: {fix}."
            )
        self._files = {name: _open_weights(directory / name) for name in sorted(set(weight_map.values()))}
        for file, handle in self._files.items():
            listed = {tensor for tensor, f in weight_map.items() if f == file}
            held = set(handle.keys())
            if listed != held:
                raise KeyError(
                    f"{index}: {file} does not hold what the index lists: listed but absent "
                    f"{sorted(listed - held)[:10]}, present but not listed {sorted(held - listed)[:10]}. "
                    f"Fix: copy the index and its files again from one save of the model"
                )
        self._weight_map = weight_map

    def __getitem__(self, name: str) -> np.ndarray:
        return self._files[self._weight_map[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor `name`'s shape, read from the file's header without loading the tensor."""
        return tuple(self._files[self._weight_map[name]].get_slice(name).get_shape())


def _read_weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> file name) of the sharded index `index`.

    Raises:
        ValueError: `index` is not JSON, or holds no `weight_map` object (naming it).
    """
    weight_map = read_json_object(index, _COPY_AGAIN).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} holds no weight_map object, so it is no sharded index. Fix: {_COPY_AGAIN}")
    return weight_map


def _open_weights(file: Path) -> Any:
    """`safe_open` of weight file `file`.

    Raises:
        ValueError: `file`'s header cannot be read: it is truncated or not a safetensors file (naming it).
    """
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as e:
        raise ValueError(
            f"{file} is not a readable safetensors file ({e}): it is truncated or damaged. Fix: {_COPY_AGAIN}"
        ) from None


def _shape(tensors: Mapping[str, Any], name: str) -> tuple[int, ...]:
    """From the file's header where the mapping reads one (a tensor is not read for it), else the array's."""
    if isinstance(tensors, SafetensorsTensors | GGUFTensors):
        return tensors.shape(name)
    return tuple(np.shape(tensors[name]))


def model_from_hf(
    hf_config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    *,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    **config_overrides: Any,
) -> CausalLM:
    """Build a CausalLM from a HF config dict and tensors under HF names (numpy-convertible arrays).

    Parameters are stored in `dtype`. With `mesh`, each parameter is placed with the NamedSharding that
    `rules` give its logical axes. Tensor conversion happens on the host, one parameter (or one device slice
    of it) at a time.

    Raises:
        KeyError: missing or unexpected tensors (all of them named).
        ValueError: shape mismatches (named, with both shapes); config errors from ModelConfig.from_hf_config;
            a mesh axis that does not divide a dimension; a value too large for `dtype` (float16: 65504).
    """
    cfg = ModelConfig.from_hf_config(hf_config, param_dtype=dtype, **config_overrides)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    rules_by_path = _rules_for(cfg, [path for path, _ in flat])
    # A tied checkpoint may store the head too, which must then equal the embedding (`_check_tensors`).
    tied_head = cfg.tie_word_embeddings and {"lm_head.weight", "model.embed_tokens.weight"} <= set(tensors)
    if tied_head and not np.array_equal(
        np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["model.embed_tokens.weight"])
    ):
        raise ValueError(
            "config says tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight; "
            "fix: set tie_word_embeddings=false in config.json"
        )
    shapes = {name: _shape(tensors, name) for name in tensors}
    _check_tensors(cfg, shapes, rules_by_path, dict((p, v.get_value().shape) for p, v in flat))
    logical = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    param_dtype = cfg.param_jnp_dtype
    loaded = []
    for path, var in flat:
        rule = rules_by_path[path]
        shape = var.get_value().shape

        def host_slice(index: tuple[slice, ...], rule=rule, shape=shape) -> np.ndarray:
            return _cast(_convert(tensors, rule, shape, index, cfg.num_layers), param_dtype, rule.hf)

        if mesh is None:
            value = jnp.asarray(host_slice((slice(None),) * len(shape)))
        else:
            spec: PartitionSpec = logical[path].get_value()
            sharding = logical_to_sharding(spec, mesh, rules, shapes=jax.ShapeDtypeStruct(shape, param_dtype))
            value = jax.make_array_from_callback(shape, sharding, _memoized(host_slice))
        loaded.append((path, var.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _rules_for(cfg: ModelConfig, paths: list[tuple]) -> dict[tuple, Rule]:
    table = {rule.path: rule for rule in NAME_TABLES[cfg.family]}
    missing = [path for path in paths if path not in table]
    if missing:
        raise AssertionError(f"name table of family {cfg.family!r} has no rule for parameters {missing}")
    return {path: table[path] for path in paths}


def _hf_names(rule: Rule, num_layers: int) -> list[str]:
    return [rule.hf.format(i=i) for i in range(num_layers)] if rule.stacked else [rule.hf]


def check_tensor_shapes(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Check that `shapes` ({Hugging Face name: shape}: a checkpoint's tensors, say from its files' headers)
    are the tensors a `cfg` model loads, as `model_from_hf` does before it reads any, without a tensor: each
    present with the shape `cfg` implies, none left over but buffers recomputed from the config and an
    `lm_head.weight` beside tied embeddings (which `model_from_hf` compares with them).

    Raises:
        KeyError: missing or unexpected tensors (all of them counted, the first 20 named).
        ValueError: shape mismatches (named, with both shapes).
    """
    flat = list(nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))))
    rules_by_path = _rules_for(cfg, [path for path, _ in flat])
    _check_tensors(cfg, shapes, rules_by_path, {path: var.get_value().shape for path, var in flat})


def _check_tensors(
    cfg: ModelConfig, shapes: Mapping[str, tuple], rules_by_path: dict[tuple, Rule], ours: dict[tuple, tuple]
) -> None:
    """Every expected tensor in `shapes` (HF name -> shape) with the right shape, and no tensor left over."""
    missing, mismatched, expected = [], [], set()
    for path, rule in rules_by_path.items():
        own = ours[path][1:] if rule.stacked else ours[path]
        want = tuple(rule.layout.hf_shape(own))
        for name in _hf_names(rule, cfg.num_layers):
            expected.add(name)
            if name not in shapes:
                missing.append(name)
            elif tuple(shapes[name]) != want:
                mismatched.append(f"{name}: file has {tuple(shapes[name])}, config implies {want}")
    unexpected = sorted(n for n in shapes if n not in expected and not _IGNORED.match(n))
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected and "model.embed_tokens.weight" in shapes:
        unexpected.remove("lm_head.weight")  # a tied checkpoint that also stores the (identical) head
    if missing or unexpected:
        raise KeyError(
            f"checkpoint tensors do not match a {cfg.family!r} model with this config: "
            f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)} in all); "
            f"unexpected {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)} in all)"
        )
    if mismatched:
        raise ValueError("tensor shape mismatch: " + "; ".join(mismatched[:20]))


def _convert(
    tensors: Mapping[str, Any], rule: Rule, shape: tuple[int, ...], index: tuple[slice, ...], num_layers: int
) -> np.ndarray:
    """Our array (or its `index` slice) for `rule`, loading only the layers the slice covers."""
    if not rule.stacked:
        return rule.layout.to_ours(np.asarray(tensors[rule.hf]), shape)[index]
    layers = range(num_layers)[index[0]]
    per_layer = [rule.layout.to_ours(np.asarray(tensors[rule.hf.format(i=i)]), shape[1:]) for i in layers]
    return np.stack(per_layer)[(slice(None), *index[1:])]


def _cast(source: np.ndarray, dtype: Any, name: str) -> np.ndarray:
    """`source` in `dtype`.

    Raises:
        ValueError: `source` is not of a floating-point type (naming the tensor); a finite value is too large
            for `dtype` (float16's largest is 65504) and would load as inf, naming the tensor, how many values
            and the largest.
    """
    if not jnp.issubdtype(source.dtype, jnp.floating):
        raise ValueError(
            f"{name}: stored as {source.dtype}, not a floating-point type, so it is no weight of this model "
            f"(a quantized or damaged checkpoint?). Fix: {_COPY_AGAIN}, in float32, bfloat16 or float16"
        )
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
        value = source.astype(dtype, copy=False)  # the same dtype: no copy (the caller copies to the device)
    if jnp.finfo(dtype).max < jnp.finfo(source.dtype).max:
        overflow = np.isfinite(source) & ~np.isfinite(value)
        if overflow.any():
            largest = float(np.abs(source[overflow]).max())
            limit = float(jnp.finfo(dtype).max)
            raise ValueError(
                f"{name}: {int(overflow.sum())} values (largest magnitude {largest:g}) are too large for "
                f"{jnp.dtype(dtype).name} (largest {limit:g}) and would load as inf; fix: load the model in "
                f'a dtype of wider range (`dtype="bfloat16"` or `"float32"`)'
            )
    return value


def _memoized(fn: Callable[[tuple[slice, ...]], np.ndarray]) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Devices holding the same slice (replicas) share one conversion."""
    cache: dict[tuple, np.ndarray] = {}

    def wrapped(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            cache[key] = fn(index)
        return cache[key]

    return wrapped


def load_pretrained(
    path_or_name: str | Path,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    *,
    rules: LogicalRules = DEFAULT_RULES,
    **config_overrides: Any,
) -> CausalLM:
    """Load a CausalLM from a Hugging Face directory (config.json + model.safetensors or a sharded
    model.safetensors.index.json), a `.gguf` file, or a packaged name such as "smollm2-135m" (offline GGUF).

    dtype: parameter dtype ("float32", "bfloat16", "float16"). config_overrides: ModelConfig fields, e.g.
    compute_dtype="bfloat16", remat_policy="full", attention_impl="splash". mesh / rules: see `model_from_hf`.

    Raises:
        FileNotFoundError: not a directory with config.json, not a .gguf file, and not a packaged name; a
            directory without safetensors weights (`SafetensorsTensors`); a packaged model whose file is
            missing from its installed distribution (`packaged_model_path`).
        MissingPackageError: a packaged name whose pip distribution is not installed (the install command).
        ValueError: a GGUF file this reader refuses (`read_gguf`); a config.json that is not a JSON object
            (naming it); a safetensors index or weight file that cannot be read (`SafetensorsTensors`).
        KeyError: a sharded index that lists other tensors than its files hold (`SafetensorsTensors`).
        KeyError / ValueError: from `model_from_hf` (tensors that do not match the config).
    """
    path = Path(path_or_name)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(
                f"{config_file} does not exist, so {path} is no Hugging Face model directory. Fix: point at "
                f"the directory that holds the model's config.json and safetensors weights"
            )
        hf_config = read_json_object(config_file, _COPY_AGAIN)
        tensors: Mapping[str, Any] = SafetensorsTensors(path)
    else:
        from .packaged import packaged_model_names, packaged_model_path

        gguf_path = (
            path if path.is_file() and path.suffix == ".gguf" else packaged_model_path(str(path_or_name))
        )
        if gguf_path is None:
            raise FileNotFoundError(
                f"{str(path_or_name)!r} is neither a directory holding config.json, nor a .gguf file, nor a "
                f"packaged model name (known: {packaged_model_names()})"
            )
        hf_config, tensors = read_gguf(gguf_path)
    return model_from_hf(hf_config, tensors, dtype=dtype, mesh=mesh, rules=rules, **config_overrides)


def refuse_stale_files(out: str | Path, *, fix: str = "save to another directory") -> None:
    """Check that `out` holds no weight files (`WEIGHT_FILES`) and none of `READ_OVER_FILES` before a model or
    adapters are saved there. They are not removed: they may be a user's only copy.

    Raises:
        FileExistsError: naming the files and the fix (an empty directory, or `fix`).
    """
    out = Path(out)
    if not out.is_dir():
        return
    weights = sorted({p.name for pattern in WEIGHT_FILES for p in out.glob(pattern)})
    if weights:
        raise FileExistsError(
            f"{out} already holds weight files: {', '.join(weights)}. Writing beside them would leave "
            f"weights that disagree, which loaders choose between differently (a save stopped part-way "
            f"leaves some too). Fix: empty {out} or {fix}."
        )
    read_over = [name for name in READ_OVER_FILES if (out / name).exists()]
    if read_over:
        raise FileExistsError(
            f"{out} already holds {', '.join(read_over)}, which transformers reads in preference to what a "
            f"save writes (config.json's end-of-sequence ids and decoding, the tokenizer's special tokens "
            f"and chat template), so they would be read as this model's (a save stopped part-way leaves them "
            f"too). Fix: empty {out} or {fix}."
        )


def save_pretrained(
    model: CausalLM,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    eos_token_ids: Sequence[int] | None = None,
) -> Path:
    """Write `model` as a Hugging Face directory that transformers' `AutoModelForCausalLM` loads.

    config.json + model.safetensors, or model-0000k-of-0000n.safetensors files of at most `max_shard_bytes`
    each (one tensor may exceed it) with model.safetensors.index.json. Tensors keep the parameter dtype.
    `tokenizer` (anything with `save_pretrained(dir)`, e.g. a transformers tokenizer) is saved alongside.
    config.json's `eos_token_id` lists `eos_token_ids` (default: the model's own). Sharded parameters are
    gathered one at a time; in a multi-process run every process must call this and process 0 writes.
    Returns the output directory.

    The tokenizer and config.json are written first, then each weight file whole (renamed into place), the
    shard index last: a save stopped part-way (SIGKILL) leaves a directory no loader takes for a model (no
    weights, or shards without their index), never one that loads with half its files.

    `out_dir` may exist but must hold no weight files (`WEIGHT_FILES`): a new save beside an earlier one
    (say a sharded one, then a single file) would leave two sets of weights, and our loader and transformers
    would each load a different one; nor any of `READ_OVER_FILES`, which transformers would read as this
    model's. Nothing is removed; every process checks before any work.

    Raises:
        FileExistsError: `out_dir` already holds such files, naming them (`refuse_stale_files`).
        ValueError: `model` carries LoRA adapters (`CausalLM.attach_adapters`), which a Hugging Face
            directory cannot hold: its parameters alone would be the base.
    """
    if model.attached_adapters() is not None:
        raise ValueError(
            "save_pretrained: the model carries LoRA adapters, which a Hugging Face directory cannot hold. "
            "Fix: save `workdir.merged_model(model)` (the adapters merged into the kernels)"
        )
    out_dir = Path(out_dir)
    refuse_stale_files(out_dir)
    cfg = model.cfg
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    rules_by_path = _rules_for(cfg, [path for path, _ in flat])
    arrays = {path: var.get_value() for path, var in flat}
    entries = [  # (hf name, param path, layer or None, bytes)
        (name, path, layer, int(np.prod(_layer_shape(arrays[path], layer))) * arrays[path].dtype.itemsize)
        for path, rule in rules_by_path.items()
        for layer, name in _enumerate_names(rule, cfg.num_layers)
    ]
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[3] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
        hf_config = cfg.to_hf_config()
        if eos_token_ids is not None:
            hf_config["eos_token_id"] = list(eos_token_ids)
        write_text_atomic(out_dir / "config.json", json.dumps(hf_config, indent=2))
    host: dict[tuple, np.ndarray] = {}
    weight_map = {}
    for k, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        out = {}
        for name, path, layer, _ in shard:
            if path not in host:
                host.clear()  # entries of a parameter are consecutive: keep only the current one on the host
                host[path] = _to_host(arrays[path])
            value = host[path] if layer is None else host[path][layer]
            out[name] = np.ascontiguousarray(rules_by_path[path].layout.to_hf(value))
            weight_map[name] = file
        if writer:
            save_tensors(out, out_dir / file)
    if writer and len(shards) > 1:
        total = sum(e[3] for e in entries)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_text_atomic(out_dir / INDEX_FILE, json.dumps(index, indent=2))
    return out_dir


def save_tensors(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """A safetensors file `path` (metadata format "pt", as transformers writes), written whole
    (`atomic_file.replaced_atomically`), with the permissions an ordinary new file gets: safetensors 0.8
    makes it readable by its owner only, which left an export that another user or a serving process could
    not read."""
    with replaced_atomically(path) as tmp:
        tmp.touch()  # created as the umask says; the save replaces its contents
        mode = tmp.stat().st_mode & 0o777
        save_file(dict(tensors), tmp, metadata={"format": "pt"})
        tmp.chmod(mode)


def _enumerate_names(rule: Rule, num_layers: int) -> list[tuple[int | None, str]]:
    if rule.stacked:
        return [(i, rule.hf.format(i=i)) for i in range(num_layers)]
    return [(None, rule.hf)]


def _layer_shape(array: jax.Array, layer: int | None) -> tuple[int, ...]:
    return array.shape if layer is None else array.shape[1:]


def _to_host(array: jax.Array) -> np.ndarray:
    if not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))
