"""LoRA adapters <-> a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

`peft.PeftModel.from_pretrained(base, DIR)` loads what `write_peft_adapter` writes onto the Hugging Face
base model. Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight` [r, in_features] and
`...lora_B.weight` [out_features, r], where <module> is the Hugging Face module of the kernel
(`hf.NAME_TABLES`) and features flatten our head axes in the same order as the kernels' own conversion.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from .config import ModelConfig
from .hf import NAME_TABLES

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
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_peft_adapter(
    directory: str | Path, cfg: ModelConfig, shapes: Mapping[str, Any], *, rank: int, alpha: float
) -> dict:
    """Adapters in our layout, shaped like `shapes` (`lora.adapter_shapes`), from a PEFT LoRA directory.

    Raises:
        FileNotFoundError: the directory lacks adapter_config.json or adapter_model.safetensors.
        ValueError: a different rank or alpha, rsLoRA or DoRA, or targets other than `shapes`' (naming both).
        KeyError: a tensor missing for some layer.
    """
    directory = Path(directory)
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / file).exists():
            raise FileNotFoundError(f"{directory / file} does not exist (not a PEFT adapter directory)")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("r") != rank or float(config.get("lora_alpha", 0)) != float(alpha):
        raise ValueError(
            f"the adapter has r={config.get('r')}, lora_alpha={config.get('lora_alpha')}; the config asks "
            f"for rank={rank}, alpha={alpha}. Fix: set model.lora.rank / alpha to the adapter's"
        )
    if config.get("use_rslora") or config.get("use_dora"):
        raise ValueError("rsLoRA and DoRA adapters are not supported (plain LoRA only)")
    tensors = load_file(directory / WEIGHTS_FILE)
    names = _module_names(cfg)
    wanted = {names[(m, k)].rsplit(".", 1)[1] for m, ks in shapes["layers"].items() for k in ks}
    present = {name.split(".lora_")[0].rsplit(".", 1)[1] for name in tensors}
    if wanted != present:
        raise ValueError(
            f"the adapter targets {sorted(present)}; model.lora.targets select {sorted(wanted)}. Fix: make "
            f"model.lora.targets match the adapter's modules"
        )
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
