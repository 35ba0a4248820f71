"""From the config's `model` section to a model graph, its parameter shardings and its initial parameters.

Parameters travel through the train state as a plain nested dict (`nnx.to_pure_dict`); the graph definition
(`nnx.split`) is static and `nnx.merge(graphdef, params)` rebuilds the module inside the step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from nextquill_jax.config import ModelRunConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.prepared_split import PreparedSplit
from nextquill_jax.json_object import read_json_object
from nextquill_jax.models import CausalLM, ModelConfig, attention, load_pretrained
from nextquill_jax.parallel import DEFAULT_RULES, LogicalRules, logical_to_sharding


def check_model_source(section: ModelRunConfig, key: str = "model.path") -> None:
    """Raise ConfigError, before anything is loaded or compiled, if `model.path` names nothing loadable;
    the messages name the setting as `key` (`loss.reference_model` where that key gave the path, `--model`
    where a command's flag did)."""
    if section.path is None:
        return
    from nextquill_jax.models.packaged import packaged_model_names, packaged_model_path

    in_config = not key.startswith("--")  # else a command's flag, which takes no other config key
    setting = lambda value: f"{key}={value!r}" if in_config else f"{key} {value}"
    path = Path(section.path).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").exists():
            merged = "give a merged export (`nextquill-jax export --merged`)"
            fix = {
                "model.path": "point model.path at the base model they were trained on, and "
                "model.lora.init_from at this directory",
                "loss.reference_model": f"{merged}, or the training workdir the adapters come from",
            }.get(key, f"leave out {key} to read the run's own checkpoint, or {merged}")
            raise ConfigError(
                f"{key} {section.path!r} is a PEFT adapter directory (adapter_config.json), not a model. "
                f"Fix: {fix}."
            )
        if not (path / "config.json").exists():
            raise ConfigError(
                f"{key} {section.path!r} is a directory without config.json. Fix: point {key} at a Hugging "
                f"Face model directory (config.json + *.safetensors)."
            )
        return
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_file():  # such as a model directory's config.json or model.safetensors
        holder = path.parent
        fix = (
            f"pass the directory holding it ({setting(str(holder))})"
            if (holder / "config.json").is_file()
            else "pass a Hugging Face model directory (config.json + *.safetensors)"
        )
        raise ConfigError(
            f"{key} {section.path!r} is a file, not a model directory (only a .gguf file is a model by"
            f" itself). Fix: {fix}, or a .gguf file."
        )
    if packaged_model_path(section.path) is None:
        preset = {
            "model.path": "; or use model.preset for a randomly initialised model",
            "loss.reference_model": "; or a training workdir (config.yaml and checkpoints/), or `base` with "
            "model.lora",
        }.get(key, "")
        raise ConfigError(
            f"{key} {section.path!r} does not exist{relative_to_cwd(section.path)} and is not a "
            f"packaged model name. Fix: give a Hugging Face model directory, a .gguf file or one of "
            f"{packaged_model_names()}{preset}."
        )


def relative_to_cwd(path: str) -> str:
    """For a relative `path`, " (relative to the current directory, CWD)", else "": what a message about a
    path that is not there says, since the same relative path names another place from another directory."""
    if Path(path).expanduser().is_absolute():
        return ""
    return f" (relative to the current directory, {Path.cwd()})"


def check_attention(section: ModelRunConfig) -> None:
    """Raise ConfigError, before anything is compiled, if `model.attention_impl` cannot run on JAX's backend
    (`cudnn` needs an NVIDIA GPU, `splash` a TPU), or is `cudnn` with a float32 `model.compute_dtype` (cuDNN's
    flash attention has no float32 kernel): the forward pass raises either only while the first step is
    traced. The backend check is looked up in the `attention` module when called, so that tests that emulate
    cuDNN on CPU lift it by replacing `attention.check_attention_backend`.
    """
    try:
        attention.check_attention_backend(section.attention_impl, key="model.attention_impl")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if section.attention_impl == "cudnn" and section.compute_dtype != "bfloat16":
        raise ConfigError(
            f"model.attention_impl='cudnn' needs model.compute_dtype='bfloat16', got "
            f"{section.compute_dtype!r} (cuDNN's flash attention has no float32 kernel). Fix: set "
            f"model.compute_dtype='bfloat16', or model.attention_impl='xla'."
        )


def model_config(section: ModelRunConfig) -> ModelConfig:
    """The `ModelConfig` the section describes (for a `path`, read from its config.json / GGUF header, with
    `model.overrides` and the runtime fields applied).

    Raises:
        ConfigError: the path's config describes a network this package does not implement, lacks a required
            key, or is invalid even with the overrides (naming `model.path` and the problem's own fix); or it
            cannot be read (`_read_hf_config`).
    """
    if section.preset is not None:
        return section.model_config()
    hf_config = _read_hf_config(section)
    overrides = section.architecture_overrides()
    try:
        return ModelConfig.from_hf_config(hf_config, **overrides, **section.runtime())
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model.path {section.path}: {_message(e)}") from None


def declared_dtype(section: ModelRunConfig) -> str | None:
    """The weights dtype the config.json of a `model.path` directory declares (`dtype`, transformers 4's
    `torch_dtype`), or None: a .gguf file, a packaged name or a preset, or no such key.

    Raises:
        ConfigError: as `_read_hf_config`.
    """
    if section.path is None or not (Path(section.path).expanduser() / "config.json").is_file():
        return None
    hf_config = _read_hf_config(section)
    return hf_config.get("dtype") or hf_config.get("torch_dtype")


def _read_hf_config(section: ModelRunConfig) -> dict[str, Any]:
    """The config.json dict of `section.path`: a directory's config.json, else its GGUF file's header.

    Raises:
        ConfigError: config.json is not a JSON object, or the GGUF file is one this package does not read
            (naming `model.path` and the fix).
    """
    path = Path(section.path).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        try:
            return read_json_object(config_file, _RESTORE_CONFIG)
        except ValueError as e:
            raise ConfigError(f"model.path {section.path!r}: {e}") from None
    from nextquill_jax.models.gguf import read_gguf_config

    try:
        return read_gguf_config(_gguf_file(section))
    except ValueError as e:
        raise ConfigError(f"model.path {section.path!r}: {e}. Fix: {_GGUF_FIX}") from None


_RESTORE_CONFIG = (
    "restore config.json from the model's source (the download or export that wrote its weights)"
)
_GGUF_FIX = (
    "give a GGUF file of a Llama, Qwen2 or Qwen3 model as llama.cpp's tools write it, or the model's Hugging "
    "Face directory"
)


def _gguf_file(section: ModelRunConfig) -> Path:
    """The GGUF file `section.path` names: the file itself, else the packaged model's (`check_model_source`
    has refused any other path)."""
    from nextquill_jax.models.packaged import packaged_model_path

    path = Path(section.path).expanduser()
    return path if path.is_file() else packaged_model_path(section.path)


def _message(e: Exception) -> str:
    """`e`'s message; a KeyError's without the quotes its str() adds."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def check_weights(section: ModelRunConfig, cfg: ModelConfig) -> None:
    """Raise ConfigError if the weights at `section.path` would not load into the `cfg` model (its
    `model_config`): a weight file that cannot be read (truncated, not safetensors, a sharded index that
    disagrees with its files), or tensors other than those `cfg` implies (missing, left over, or of another
    shape: a config.json from another model, or `model.overrides` that change the architecture). Reads the
    files' headers only, so `train` refuses them before its workdir is created and its data prepared; a
    preset has no weights to check.

    Raises:
        ConfigError: naming `model.path` (and `model.overrides` when they cause it), the problem and the fix.
    """
    if section.preset is not None:
        return
    from nextquill_jax.models.gguf import read_gguf_shapes
    from nextquill_jax.models.hf import SafetensorsTensors, check_tensor_shapes

    path = Path(section.path).expanduser()
    try:
        if path.is_dir():
            tensors = SafetensorsTensors(path)
            shapes = {name: tensors.shape(name) for name in tensors}
        else:
            shapes = read_gguf_shapes(_gguf_file(section))
    except (FileNotFoundError, KeyError, ValueError) as e:  # their messages name the file and the fix
        raise ConfigError(f"model.path {section.path!r}: {_message(e)}") from None
    try:
        check_tensor_shapes(cfg, shapes)
    except (KeyError, ValueError) as e:
        mismatch = _message(e)
    else:
        return
    source = "config.json" if path.is_dir() else "GGUF header"
    if section.overrides and _fits(dataclasses.replace(section, overrides={}), shapes):
        raise ConfigError(
            f"model.path {section.path!r} with model.overrides {section.overrides}: {mismatch}. The weights "
            f"fit the model its {source} describes, so model.overrides change the architecture they were "
            f"trained with. Fix: remove from model.overrides the keys that change the layer count or a "
            f"tensor's shape (for a smaller model, use model.preset, which starts from random weights)."
        )
    overridden = f" (with model.overrides {section.overrides})" if section.overrides else ""
    raise ConfigError(
        f"model.path {section.path!r}: its weights do not fit the model its {source}{overridden} describes: "
        f"{mismatch}. Fix: {_RESTORE_CONFIG}."
    )


def _fits(section: ModelRunConfig, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether tensors of `shapes` load into the model `section` describes."""
    from nextquill_jax.models.hf import check_tensor_shapes

    try:  # `cudnn_max_segments: auto` resolved to any value: it shapes no tensor
        check_tensor_shapes(model_config(section.resolved(1)), shapes)
    except (KeyError, ValueError):  # ConfigError included
        return False
    return True


def vocab_origin(section: ModelRunConfig, key: str = "model", saved_with: str | None = None) -> str:
    """Where the `vocab_size` of the model `section` describes comes from, for messages: its
    `<key>.overrides.vocab_size`, else its preset, else the config of its path. `key` is how the file spells
    the section (`model`, or the reference model's `loss.reference_model`); `saved_with`, a checkpoint or
    run whose saved config holds `section` (named after the origin)."""
    if "vocab_size" in section.overrides:
        origin = f"{key}.overrides.vocab_size"
    elif section.preset is not None:
        origin = f"{key}.preset {section.preset!r}"
    else:
        origin = f"the config.json or GGUF header of {key}.path {section.path!r}"
    return origin if saved_with is None else f"{origin} in the config of {saved_with}"


def check_token_ids(split: PreparedSplit, vocab_size: int, origin: str) -> None:
    """Raise ConfigError if prepared `split` holds a token id the model cannot embed (< 0 or >= `vocab_size`).

    Such an id indexes outside the embedding and the LM head: JAX's gather returns NaN there instead of
    failing (a negative one wraps around to another token's row), so the loss turns non-finite or wrong
    (training would stop as if diverged, evaluation report a NaN loss). Every command that feeds prepared ids
    to a model checks them first. `origin` says where `vocab_size` comes from (`vocab_origin`, or a command's
    flag).

    Raises:
        ConfigError: naming the split's directory, its smallest / largest id and tokenizer, the model's
            vocab_size and `origin`, and the fix.
    """
    if split.token_id_range is None:
        return
    smallest, largest = split.token_id_range
    tokenizer = split.meta.get("tokenizer")
    prepared_with = f" (prepared with tokenizer {tokenizer!r})" if tokenizer else ""
    if smallest < 0:
        raise ConfigError(
            f"prepared split {split.dir}{prepared_with} holds token id {smallest}: token ids are >= 0, and a "
            f"negative one would index another token's embedding. Fix: prepare the data again with "
            f"data.tokenizer set to the model's own tokenizer (a tokenizer or file that yields negative ids "
            f"is not one the model can read)."
        )
    if largest < vocab_size:
        return
    raise ConfigError(
        f"prepared split {split.dir}{prepared_with} holds token id {largest}, but the model's vocab_size is "
        f"{vocab_size} (from {origin}): ids >= {vocab_size} have no embedding and would make the loss NaN. "
        f"Fix: set data.tokenizer to the model's own tokenizer (for a Hugging Face directory, usually the "
        f"directory itself) and prepare the data again, or use a model whose vocabulary covers the "
        f"tokenizer's ids (vocab_size > {largest})."
    )


def abstract_model(cfg: ModelConfig) -> tuple[Any, dict]:
    """(graphdef, abstract params): the module's graph and a pure dict of `jax.ShapeDtypeStruct`."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def covering_graphdef(model: CausalLM, examples_per_row: int) -> Any:
    """The graphdef `model`'s parameters run with on rows of up to `examples_per_row` examples: `model`'s own,
    except that a set `cudnn_max_segments` (M) below `examples_per_row` is raised to it.

    cuDNN's packed attention takes at most M examples per row and makes a row with more NaN under jit; M is
    only the static bound of that call, not part of the parameters, so a model whose M was chosen for other
    rows (a checkpoint evaluated on another split, a workdir serving as the reference model) runs its same
    parameters with the larger bound.
    """
    limit = model.cfg.cudnn_max_segments
    if limit is None or examples_per_row <= limit:
        return nnx.graphdef(model)
    cfg = model.cfg.replace(cudnn_max_segments=examples_per_row)
    with jax.set_mesh(None):  # eval_shape would read the logical axes as axes of a mesh in context
        abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    attached = model.attached_adapters()  # a LoRA run's adapters, which the graphdef then carries too
    if attached is not None:
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), attached.weights)
        abstract.attach_adapters(shapes, attached.scale)
    return nnx.graphdef(abstract)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> dict:
    """NamedShardings of the parameters (a pure dict) from their logical axes and `rules`.

    Raises:
        ValueError: a mesh axis does not divide a parameter dimension (naming the parameter and the fix).
    """
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shapes = nnx.to_pure_dict(state)
    return logical_to_sharding(logical, mesh, rules, shapes=shapes)


def random_params(cfg: ModelConfig, shardings: dict, seed: int) -> dict:
    """Randomly initialised parameters (from `seed`), created in place with `shardings` (never gathered)."""

    def init() -> dict:
        return nnx.to_pure_dict(nnx.state(CausalLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param))

    return jax.jit(init, out_shardings=shardings)()


def initial_params(
    section: ModelRunConfig, cfg: ModelConfig, shardings: dict, mesh: Mesh, seed: int, rules: LogicalRules
) -> dict:
    """The starting parameters, placed by `shardings`: random (from `seed`) for a preset, else loaded. The
    caller has run `check_weights` (`train`'s set-up before it makes the workdir, `load_params` otherwise).

    Raises:
        ConfigError: the weights at `section.path` do not load into the `cfg` model, or fail as they are
            read (tied embeddings that differ from the head, a GGUF tensor that cannot be dequantized);
            naming `model.path` and the fix.
    """
    if section.preset is not None:
        return random_params(cfg, shardings, seed)
    try:
        model = load_pretrained(
            section.path,
            dtype=section.param_dtype,
            mesh=mesh,
            rules=rules,
            **section.architecture_overrides(),
            compute_dtype=section.compute_dtype,
            remat_policy=section.remat_policy,
            scan_unroll=section.scan_unroll,
            attention_impl=section.attention_impl,
            cudnn_max_segments=section.cudnn_max_segments,
        )
    except (KeyError, ValueError) as e:
        # A directory's messages name their fix; a GGUF reader's name only the tensor.
        fix = "" if Path(section.path).expanduser().is_dir() else f". Fix: {_GGUF_FIX}"
        raise ConfigError(f"model.path {section.path!r}: {_message(e)}{fix}") from None
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params(
    section: ModelRunConfig, mesh: Mesh, seed: int, rules: LogicalRules = DEFAULT_RULES
) -> tuple[Any, dict]:
    """(graphdef, params) of the model `section` names, placed on `mesh` by `rules`: random from `seed` for
    a preset, else loaded.

    Raises:
        ConfigError: `section.path` names nothing loadable, or weights that do not load (`check_weights`,
            `initial_params`).
        ValueError: a mesh axis does not divide a parameter dimension.
    """
    check_model_source(section)
    cfg = model_config(section)
    check_weights(section, cfg)
    graphdef, _ = abstract_model(cfg)
    shardings = param_shardings(cfg, mesh, rules)
    return graphdef, initial_params(section, cfg, shardings, mesh, seed, rules)
