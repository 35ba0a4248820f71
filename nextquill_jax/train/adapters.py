"""LoRA runs: the adapters' shapes and shardings, their first values, and the identity of the frozen base.

Under `model.lora` the train state holds only the adapters (and their optimizer state); the base model is
loaded from `model.path` on every start and named in each checkpoint by its path and a content fingerprint,
which resume and evaluation check.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from nextquill_jax.config import LoraConfig, ModelRunConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.models import CausalLM, ModelConfig, lora
from nextquill_jax.parallel import DEFAULT_RULES, LogicalRules, logical_to_sharding

FINGERPRINT_BLOCKS = 16  # sampled blocks per weight file
FINGERPRINT_BLOCK_BYTES = 1 << 16


def adapter_layout(
    cfg: LoraConfig, model_cfg: ModelConfig, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> tuple[dict, dict]:
    """(abstract adapters, their NamedShardings) for the kernels `cfg.targets` names, in the model's
    parameter dtype, sharded like their kernels.

    Raises:
        ConfigError: a target that matches no parameter or one that takes no adapter (listing the paths).
    """
    state = nnx.state(nnx.eval_shape(lambda: CausalLM(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shapes = nnx.to_pure_dict(state)
    try:
        paths = lora.target_paths(shapes, cfg.targets)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    abstract = lora.adapter_shapes(shapes, paths, cfg.rank, model_cfg.param_jnp_dtype)
    logical = lora.adapter_logical_axes(nnx.to_pure_dict(nnx.get_partition_spec(state)), paths)
    return abstract, logical_to_sharding(logical, mesh, rules, shapes=abstract)


def initial_adapters(cfg: LoraConfig, model_cfg: ModelConfig, abstract: dict, shardings: dict, seed: int):
    """The adapters a run starts from, placed by `shardings`: read from the PEFT directory `cfg.init_from`,
    else fresh (A random from `seed`, B = 0).

    Raises:
        ConfigError: an `init_from` directory that does not hold an adapter of this rank on these targets.
    """
    if cfg.init_from is None:
        init = lambda: lora.init_adapters(jax.random.PRNGKey(seed), abstract)
        return jax.jit(init, out_shardings=shardings)()
    from nextquill_jax.models.peft import read_peft_adapter

    try:
        weights = read_peft_adapter(cfg.init_from, model_cfg, abstract, rank=cfg.rank, alpha=cfg.alpha)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConfigError(f"model.lora.init_from {cfg.init_from!r}: {e}") from None
    return jax.device_put(weights, shardings)


def base_section(model: ModelRunConfig) -> ModelRunConfig:
    """The `model` section of the frozen base: stored in `lora.base_dtype` where that is a float type."""
    assert model.lora is not None
    float_dtype = model.lora.base_dtype if model.lora.base_dtype in ("float32", "bfloat16") else "bfloat16"
    return ModelRunConfig(
        path=model.path,
        preset=model.preset,
        overrides=model.overrides,
        param_dtype=float_dtype,
        compute_dtype=model.compute_dtype,
        remat_policy=model.remat_policy,
        attention_impl=model.attention_impl,
        cudnn_max_segments=model.cudnn_max_segments,
    )


def frozen_base(params: dict, cfg: LoraConfig) -> dict:
    """The base parameters as training holds them: projection kernels quantized for `base_dtype` int8 / nf4
    (`models.quantize`), else unchanged."""
    if cfg.base_dtype not in ("int8", "nf4"):
        return params
    from nextquill_jax.models.quantize import quantize_base

    return jax.jit(lambda p: quantize_base(p, cfg.base_dtype))(params)


def base_as_trained(params: dict, cfg: LoraConfig) -> dict:
    """The base parameters as the adapters saw them, as plain arrays: dequantized after the same
    quantization (so evaluation and export see the base that training saw)."""
    if cfg.base_dtype not in ("int8", "nf4"):
        return params
    from nextquill_jax.models.quantize import dequantize

    return jax.jit(dequantize)(frozen_base(params, cfg))


def base_identity(model: ModelRunConfig, seed: int) -> dict[str, Any]:
    """{"source", "fingerprint"} of the frozen base: its path (or preset) and a digest of its content.

    A directory or .gguf file is fingerprinted from its weight files' names, sizes and FINGERPRINT_BLOCKS
    blocks spread over each (fast on multi-GB files; two different checkpoints differ in them); a preset
    from its name, architecture overrides and the seed of its random weights.
    """
    if model.preset is not None:
        text = json.dumps(
            {"preset": model.preset, "overrides": model.overrides, "seed": seed}, sort_keys=True
        )
        return {"source": f"preset {model.preset}", "fingerprint": hashlib.sha256(text.encode()).hexdigest()}
    from nextquill_jax.models.packaged import packaged_model_path

    path = Path(model.path).expanduser()
    if not path.exists():
        path = packaged_model_path(model.path)
    files = [*sorted(path.glob("*.safetensors")), path / "config.json"] if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        digest.update(_sampled_blocks(file))
    return {"source": str(model.path), "fingerprint": digest.hexdigest()}


def _sampled_blocks(file: Path) -> bytes:
    size = file.stat().st_size
    step = max(size // FINGERPRINT_BLOCKS, 1)
    out = []
    with file.open("rb") as f:
        for k in range(FINGERPRINT_BLOCKS):
            f.seek(min(k * step, max(size - FINGERPRINT_BLOCK_BYTES, 0)))
            out.append(f.read(FINGERPRINT_BLOCK_BYTES))
    return b"".join(out)


def check_same_base(saved: dict[str, Any] | None, current: dict[str, Any] | None, where: str) -> None:
    """Raise ConfigError unless the checkpoint at `where` was trained with the same kind of run (LoRA or
    full fine-tuning) and, under LoRA, the same base (by fingerprint)."""
    if (saved is None) != (current is None):
        kind = lambda identity: "LoRA adapters" if identity is not None else "full fine-tuning"
        raise ConfigError(
            f"{where} holds a {kind(saved)} checkpoint but the config asks for {kind(current)}. Fix: "
            f"{'restore model.lora as it was' if saved is not None else 'remove model.lora'}, or use a new "
            f"workdir"
        )
    if saved is not None and saved["fingerprint"] != current["fingerprint"]:
        raise ConfigError(
            f"{where} was trained on the base {saved['source']} (fingerprint {saved['fingerprint'][:12]}), "
            f"but the base is now {current['source']} (fingerprint {current['fingerprint'][:12]}): the "
            f"adapters only fit their own base. Fix: point model.path at that base again."
        )
