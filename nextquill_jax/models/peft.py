"""LoRA adapters <-> a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

`peft.PeftModel.from_pretrained(base, DIR)` loads what `write_peft_adapter` writes onto the Hugging Face
base model. Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight` [r, in_features] and
`...lora_B.weight` [out_features, r], where <module> is the Hugging Face module of the kernel
(`hf.NAME_TABLES`) and features flatten our head axes in the same order as the kernels' own conversion.

`read_peft_adapter` takes plain LoRA only: an adapter whose config sets anything that changes what it computes
(rsLoRA, DoRA, lora_bias, modules_to_save, per-module ranks, ...), or that holds any tensor other than those
A and B matrices, is refused by name (`check_peft_adapter`) rather than read in part.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from ..atomic_file import write_text_atomic
from ..json_object import read_json_object
from .config import ModelConfig
from .hf import NAME_TABLES, save_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _module_names(cfg: ModelConfig) -> dict[tuple[str, str], str]:
    """(module, kernel) -> Hugging Face module name, `{i}` for the layer (model.layers.{i}.mlp.up_proj)."""
    return {
        rule.path[1:]: rule.hf.removesuffix(".weight")
        for rule in NAME_TABLES[cfg.family]
        if len(rule.path) == 3 and rule.hf.endswith(".weight")
    }


def write_peft_adapter(
    weights: Mapping[str, Any],
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    base_model: str | None = None,
) -> Path:
    """Write adapters {"layers": {module: {kernel: {"a": [L, *in, r], "b": [L, r, *out]}}}} (host or device
    arrays) as a PEFT LoRA directory for a base model of config `cfg`; returns `out_dir`.

    `base_model` becomes `base_model_name_or_path`, which `AutoPeftModel*.from_pretrained(out_dir)` loads as
    the base: None writes null (PEFT's own default: no base named), for a base that no name or path loads.
    """
    names = _module_names(cfg)
    tensors, modules = {}, []
    for module, kernels in weights["layers"].items():
        for kernel, pair in kernels.items():
            hf = names[(module, kernel)]
            modules.append(hf.rsplit(".", 1)[1])
            a, b = np.asarray(pair["a"], np.float32), np.asarray(pair["b"], np.float32)
            for i in range(cfg.num_layers):
                name = _PREFIX + hf.format(i=i)
                tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
                tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(set(modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The weights last, whole (`save_tensors`): a write stopped part-way leaves no adapter that loads.
    write_text_atomic(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    save_tensors(tensors, out / WEIGHTS_FILE)
    return out


# init_lora_weights values under which peft rewrites the base weights as well (the adapter then fits that
# residual base, not the base model), unless the adapter was saved converted (`init_lora_weights` then true).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# adapter_config.json fields of settings that change what an adapter computes (or what its base must be),
# which `read_peft_adapter` does not apply: (field, whether a value sets it, what it does). Reading such an
# adapter as plain LoRA would start a run from another model than the adapter's, without a word.
_UNAPPLIED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("use_rslora", bool, "scales A·B by lora_alpha / sqrt(r), not lora_alpha / r"),
    ("use_dora", bool, "DoRA: a trained magnitude vector per module"),
    ("lora_bias", bool, "a trained bias on every lora_B, saved as lora_B.bias"),
    ("bias", lambda v: v not in (None, "none"), "the base model's biases trained too"),
    ("modules_to_save", bool, "full trained copies of these modules"),
    ("layers_to_transform", lambda v: v is not None, "adapters on these layers only"),
    ("layers_pattern", bool, "the layers of layers_to_transform named by this pattern"),
    ("rank_pattern", bool, "another rank r for the modules it names"),
    ("alpha_pattern", bool, "another lora_alpha for the modules it names"),
    ("trainable_token_indices", bool, "trained embeddings of these tokens"),
    ("layer_replication", bool, "layers of the base repeated"),
    ("target_parameters", bool, "adapters on parameters other than the projections' modules"),
    ("alora_invocation_tokens", bool, "aLoRA: adapters active only after these tokens"),
    ("use_qalora", bool, "QA-LoRA: the adapter's input pooled in groups"),
    ("use_bdlora", bool, "block-diagonal adapters"),
    ("arrow_config", bool, "Arrow routing among several adapters"),
    ("monteclora_config", bool, "MonteCLoRA: sampled adapters"),
    ("kasa_config", bool, "KaSA: adapters on the base's singular vectors"),
    (
        "init_lora_weights",
        lambda v: isinstance(v, str) and v.split("_niter_")[0] in _BASE_CHANGING_INITS,
        "an initialisation that also changed the base weights, which the adapter is only valid with",
    ),
)
# The other fields peft 0.21's LoraConfig writes: what the adapter is and was made from, how it was
# initialised or trained (a base-changing initialisation is refused above), and inert options (peft ignores
# fan_in_fan_out for Linear layers; exclude_modules only leaves layers without an adapter, which the tensor
# check refuses). A field in neither list is refused where it is set: a later peft's option may change what
# the adapter computes.
_INERT = frozenset(
    {
        "auto_mapping", "base_model_name_or_path", "corda_config", "ensure_weight_tying", "eva_config",
        "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "lora_alpha",
        "lora_dropout", "lora_ga_config", "loftq_config", "megatron_config", "megatron_core", "peft_type",
        "peft_version", "qalora_group_size", "r", "revision", "runtime_config", "target_modules", "task_type",
        "velora_config",
    }
)  # fmt: skip
_UNSET = (None, False, "", [], {})  # an unknown field's values that set nothing
_LORA_TENSOR = re.compile(r"(.+)\.lora_([AB])\.weight")


def _load_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json of `directory`, checked to describe plain LoRA that `read_peft_adapter` applies."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} does not exist. Fix: point it at a PEFT adapter directory (adapter_config.json + "
            f"{WEIGHTS_FILE}, as peft's save_pretrained or `nextquill-jax export --adapter` write)"
        )
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / file).is_file():
            raise FileNotFoundError(
                f"{directory / file} does not exist, so {directory} is not a PEFT adapter directory. Fix: "
                f"point it at one (adapter_config.json + {WEIGHTS_FILE}, as peft's save_pretrained or "
                f"`nextquill-jax export --adapter` write)"
            )
    config_file = directory / CONFIG_FILE
    config = read_json_object(config_file, "save the adapter anew")
    # `check_peft_adapter` compares these with model.lora.rank / alpha: a string r of "4" differed from 4
    # while both printed as 4, and a null lora_alpha failed float() with a TypeError.
    fields = (("r", "an integer", 8, int), ("lora_alpha", "a number", 16, (int, float)))
    for name, kind, example, types in fields:
        value = config.get(name)
        if not isinstance(value, types) or isinstance(value, bool):  # JSON's true would pass as the int 1
            found = f"is {value!r}" if name in config else "is missing"
            raise ValueError(
                f"{config_file}: {name} {found}, not {kind}. Fix: write {name} as {kind} (such as "
                f"{example}), or save the adapter anew"
            )
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise ValueError(
            f"{directory / CONFIG_FILE} has peft_type {kind!r}, not LORA. Fix: start from a LoRA adapter"
        )
    for name, is_set, what in _UNAPPLIED:
        if is_set(config.get(name)):
            raise ValueError(
                f"{directory / CONFIG_FILE} sets {name}: {json.dumps(config[name])} ({what}), which a LoRA "
                f"run here does not apply, so it would start from another model than the adapter's. Fix: "
                f"start from a plain LoRA adapter (trained without {name})"
            )
    known = _INERT | {name for name, _, _ in _UNAPPLIED}
    if unknown := [name for name, value in config.items() if name not in known and value not in _UNSET]:
        listed = ", ".join(f"{name}: {json.dumps(config[name])}" for name in unknown)
        raise ValueError(
            f"{directory / CONFIG_FILE} sets {listed}, which this package does not know (peft 0.21's LoRA "
            f"settings have no such field), so it cannot tell whether the adapter computes plain LoRA. "
            f"Fix: remove the field from {CONFIG_FILE} if it leaves the adapter plain LoRA, or start from "
            f"a plain LoRA adapter"
        )
    return config


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors in the safetensors `file`, from its header (no tensor read)."""
    try:
        with safe_open(file, framework="numpy") as f:
            # safe_open is not iterable: keys() is how it lists its tensors.
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise ValueError(f"{file} is not a safetensors file ({e}). Fix: save the adapter anew") from None


def check_peft_adapter(
    directory: str | Path, cfg: ModelConfig, shapes: Mapping[str, Any], *, rank: int, alpha: float
) -> None:
    """Return if the PEFT directory `directory` holds plain LoRA adapters of rank `rank` and `lora_alpha`
    `alpha` for exactly the kernels of `shapes` (`lora.adapter_shapes`) in every layer of a base of config
    `cfg`, and nothing else; reads adapter_config.json and the safetensors header only.

    Raises:
        FileNotFoundError: no such directory, or it lacks adapter_config.json or adapter_model.safetensors.
        ValueError: naming the field or tensor and the fix: an adapter_config.json that is no JSON object,
            or whose `r` is no integer or `lora_alpha` no number; a different rank or alpha, a setting this
            package does not apply (`_UNAPPLIED`: rsLoRA, DoRA, lora_bias, bias, modules_to_save,
            layers_to_transform, rank_pattern, ...), targets other than `shapes`', a layer without its
            adapter or one the base lacks, a tensor of another shape than the base's kernel needs (an
            adapter made for another base), or a tensor that is not a LoRA A or B matrix of those kernels.
    """
    directory = Path(directory)
    config = _load_config(directory)
    if config["r"] != rank or float(config["lora_alpha"]) != float(alpha):
        raise ValueError(
            f"the adapter has r={config['r']}, lora_alpha={config['lora_alpha']}; the config asks "
            f"for rank={rank}, alpha={alpha}. Fix: set model.lora.rank / alpha to the adapter's"
        )
    names = _module_names(cfg)
    modules = {  # the HF module pattern of every kernel that can take an adapter -> (module, kernel)
        re.compile(re.escape(_PREFIX + hf).replace(re.escape("{i}"), r"(\d+)")): kernel
        for kernel, hf in names.items()
    }

    def locate(module: str) -> tuple[tuple[str, str], int] | None:
        """(kernel, layer) of the Hugging Face module `module`, or None where no kernel is that module."""
        for pattern, kernel in modules.items():
            if hit := pattern.fullmatch(module):
                return kernel, int(hit[1])
        return None

    found: dict[tuple[str, str], dict[int, dict[str, tuple[int, ...]]]] = {}
    foreign = []
    for name, shape in _tensor_shapes(directory / WEIGHTS_FILE).items():
        match = _LORA_TENSOR.fullmatch(name)
        located = locate(match[1]) if match else None
        if located is None:
            foreign.append(name)
            continue
        kernel, layer = located
        found.setdefault(kernel, {}).setdefault(layer, {})[match[2]] = shape
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(
            f"{directory / WEIGHTS_FILE} holds tensors that are not LoRA A or B matrices of the base's "
            f"projections, which a LoRA run here does not apply: {listed}. Fix: start from an adapter with "
            f"plain LoRA on the projections only"
        )
    hf_kind = lambda kernel: names[kernel].rsplit(".", 1)[1]
    wanted = {(m, k) for m, kernels in shapes["layers"].items() for k in kernels}
    if set(found) != wanted:
        raise ValueError(
            f"the adapter targets {sorted(map(hf_kind, found))}; model.lora.targets select "
            f"{sorted(map(hf_kind, wanted))}. Fix: make model.lora.targets match the adapter's modules"
        )
    layers = range(cfg.num_layers)
    for (module, kernel), by_layer in sorted(found.items()):
        kind = hf_kind((module, kernel))
        extra = sorted(set(by_layer) - set(layers))
        if extra:
            raise ValueError(
                f"the adapter has {kind} adapters for layers up to {extra[-1]}, but the base has "
                f"{cfg.num_layers} layers: it was made for another base. Fix: start from an adapter trained "
                f"on this run's base"
            )
        missing = [i for i in layers if set(by_layer.get(i, {})) != {"A", "B"}]
        if missing:
            raise ValueError(
                f"the adapter has no {kind} lora_A and lora_B for layers {missing} of the base's "
                f"{cfg.num_layers}: it was made for another base, or for some layers only. Fix: start from "
                f"an adapter on every layer of this run's base"
            )
        pair = shapes["layers"][module][kernel]
        need = {
            "A": (rank, math.prod(pair["a"].shape[1:-1])),
            "B": (math.prod(pair["b"].shape[2:]), rank),
        }
        wrong = [
            (i, ab, shape) for i in layers for ab, shape in sorted(by_layer[i].items()) if shape != need[ab]
        ]
        if wrong:
            i, ab, shape = wrong[0]
            raise ValueError(
                f"tensor {_PREFIX}{names[(module, kernel)].format(i=i)}.lora_{ab}.weight has shape "
                f"{list(shape)}, but this base's {kind} needs {list(need[ab])} (r = {rank}): the adapter "
                f"was made for a base of other shapes, or with another rank for {kind}. Fix: start from an "
                f"adapter trained on this run's base, with r = model.lora.rank for every module"
            )


def read_peft_adapter(
    directory: str | Path, cfg: ModelConfig, shapes: Mapping[str, Any], *, rank: int, alpha: float
) -> dict:
    """Adapters in our layout, shaped like `shapes` (`lora.adapter_shapes`), from a PEFT LoRA directory that
    `check_peft_adapter` accepts: {"layers": {module: {kernel: {"a": [L, *in, r], "b": [L, r, *out]}}}} as
    NumPy arrays in `shapes`' dtypes.

    Raises:
        as `check_peft_adapter`.
    """
    check_peft_adapter(directory, cfg, shapes, rank=rank, alpha=alpha)
    tensors = load_file(Path(directory) / WEIGHTS_FILE)
    names = _module_names(cfg)
    out: dict = {"layers": {}}
    for module, kernels in shapes["layers"].items():
        for kernel, pair in kernels.items():
            hf = names[(module, kernel)]
            a, b = [], []
            for i in range(cfg.num_layers):
                name = _PREFIX + hf.format(i=i)
                a.append(tensors[f"{name}.lora_A.weight"].T.reshape(pair["a"].shape[1:]))
                b.append(tensors[f"{name}.lora_B.weight"].T.reshape(pair["b"].shape[1:]))
            out["layers"].setdefault(module, {})[kernel] = {
                "a": np.stack(a).astype(pair["a"].dtype),
                "b": np.stack(b).astype(pair["b"].dtype),
            }
    return out
