"""LoRA runs: the adapters' shapes and shardings, their first values, and the identity of the frozen base.

Under `model.lora` the train state holds only the adapters (and their optimizer state); the base model is
loaded from `model.path` on every start and named in each checkpoint by its path and a content fingerprint,
which resume and evaluation check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from nextquill_jax.config import LoraConfig, ModelRunConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data import checksums
from nextquill_jax.models import CausalLM, ModelConfig, lora
from nextquill_jax.parallel import DEFAULT_RULES, LogicalRules, logical_to_sharding
from nextquill_jax.train.model_setup import relative_to_cwd

# `content_fingerprint`: weight files hashed whole up to WHOLE_BYTES in all, else sampled SAMPLE_BYTES every
# SAMPLE_STRIDE, READ_THREADS threads reading READ_GROUP samples each at a time.
WHOLE_BYTES = 512 << 20
SAMPLE_STRIDE = 1 << 20
SAMPLE_BYTES = 4 << 10
READ_THREADS = 32
READ_GROUP = 16
PRESET_SCHEME = "preset sha256"  # name, overrides and seed of a random preset base: exact
# The fingerprint of identities saved without a "scheme" (`legacy_fingerprint`): blocks spread over each file.
LEGACY_BLOCKS = 16
LEGACY_BLOCK_BYTES = 1 << 16


def _abstract_params(model_cfg: ModelConfig) -> nnx.State:
    """The parameters of `model_cfg`'s model as shapes (no arrays made)."""
    return nnx.state(nnx.eval_shape(lambda: CausalLM(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _target_paths(cfg: LoraConfig, shapes: dict) -> list[tuple[str, str, str]]:
    """The parameter paths of `shapes` that `cfg.targets` names; a ConfigError for a target that is no valid
    regex, matches no parameter or matches one that takes no adapter."""
    try:
        return lora.target_paths(shapes, cfg.targets)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_lora(cfg: LoraConfig, model_cfg: ModelConfig, *, check_init_from: bool = True) -> dict:
    """The adapters' shapes (`lora.adapter_shapes`, in `model_cfg`'s parameter dtype), once every target of
    `cfg.targets` names parameters of `model_cfg`'s model that take adapters and `cfg.init_from`, if set and
    `check_init_from` (a run that resumes restores its adapters and reads no init_from file), holds adapters
    that fit them (its config and tensor shapes: no weights, no data needed), so that set-up refuses either
    before it creates the workdir.

    Raises:
        ConfigError: a target that is no valid regex, matches no parameter or one that takes no adapter
            (listing the paths), or an `init_from` that `initial_adapters` would refuse.
    """
    shapes = nnx.to_pure_dict(_abstract_params(model_cfg))
    abstract = lora.adapter_shapes(shapes, _target_paths(cfg, shapes), cfg.rank, model_cfg.param_jnp_dtype)
    if cfg.init_from is not None and check_init_from:
        from nextquill_jax.models.peft import check_peft_adapter

        with _init_from_errors(cfg):
            check_peft_adapter(cfg.init_from, model_cfg, abstract, rank=cfg.rank, alpha=cfg.alpha)
    return abstract


@contextlib.contextmanager
def _init_from_errors(cfg: LoraConfig) -> Iterator[None]:
    """Turn the errors `models.peft` raises for the directory `cfg.init_from` into ConfigErrors naming it."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"model.lora.init_from {cfg.init_from!r}: {e}") from None


def adapter_layout(
    cfg: LoraConfig, model_cfg: ModelConfig, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> tuple[dict, dict]:
    """(abstract adapters, their NamedShardings) for the kernels `cfg.targets` names, in the model's
    parameter dtype, sharded like their kernels.

    Raises:
        ConfigError: a target that is no valid regex, matches no parameter or one that takes no adapter
            (listing the paths).
    """
    state = _abstract_params(model_cfg)
    shapes = nnx.to_pure_dict(state)
    paths = _target_paths(cfg, shapes)
    abstract = lora.adapter_shapes(shapes, paths, cfg.rank, model_cfg.param_jnp_dtype)
    logical = lora.adapter_logical_axes(nnx.to_pure_dict(nnx.get_partition_spec(state)), paths)
    return abstract, logical_to_sharding(logical, mesh, rules, shapes=abstract)


def initial_adapters(
    cfg: LoraConfig, model_cfg: ModelConfig, abstract: dict, shardings: dict, seed: int
) -> dict:
    """The adapters a run starts from, placed by `shardings`: read from the PEFT directory `cfg.init_from`,
    else fresh (A random from `seed`, B = 0).

    Raises:
        ConfigError: an `init_from` directory that does not hold plain LoRA adapters of this rank and alpha
            for exactly these targets on every layer of this base (`peft.check_peft_adapter`; naming the
            setting or tensor and the fix).
    """
    if cfg.init_from is None:
        init = lambda: lora.init_adapters(jax.random.PRNGKey(seed), abstract)
        return jax.jit(init, out_shardings=shardings)()
    from nextquill_jax.models.peft import read_peft_adapter

    with _init_from_errors(cfg):
        weights = read_peft_adapter(cfg.init_from, model_cfg, abstract, rank=cfg.rank, alpha=cfg.alpha)
    return jax.device_put(weights, shardings)


def init_from_note(model: ModelRunConfig) -> str | None:
    """A note when the PEFT directory `model.lora.init_from` names another base model than this run's (its
    adapter_config.json's `base_model_name_or_path`), else None: adapters fit the base they were trained on,
    and neither this package nor peft can tell from the tensors' shapes alone."""
    if model.lora is None or model.lora.init_from is None:
        return None
    config = Path(model.lora.init_from) / "adapter_config.json"
    named = (
        json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if config.is_file()
        else None
    )
    if named is None:
        return None
    if (
        model.path is not None
        and Path(named).expanduser().resolve() == Path(model.path).expanduser().resolve()
    ):
        return None
    ours = (
        f"model.path {model.path!r}" if model.path is not None else f"a random model.preset {model.preset!r}"
    )
    return (
        f"note: model.lora.init_from {model.lora.init_from!r} holds adapters made for the base {named!r} "
        f"(its adapter_config.json's base_model_name_or_path); this run's base is {ours}"
    )


def frozen_runtime(model: ModelRunConfig) -> dict[str, Any]:
    """The runtime fields (`ModelRunConfig.runtime`) of a frozen model run beside the run's: the base, a path
    `dce: fixed` reference, or a path `evaluate --model` reads. Beside LoRA adapters (whose dtype is
    `model.param_dtype`) its weights are stored in `lora.base_dtype` where that is a float type, else (int8,
    nf4: quantized from it) bfloat16, the other fields the run's; without LoRA, the run's fields."""
    if model.lora is None:
        return model.runtime()
    float_dtype = model.lora.base_dtype if model.lora.base_dtype in ("float32", "bfloat16") else "bfloat16"
    return {**model.runtime(), "param_dtype": float_dtype}


def base_section(model: ModelRunConfig) -> ModelRunConfig:
    """The `model` section of the frozen base (`frozen_runtime`)."""
    return ModelRunConfig(
        path=model.path, preset=model.preset, overrides=model.overrides, **frozen_runtime(model)
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
    """{"source", "scheme", "fingerprint"} of the frozen base: its path (or preset), how its content was
    digested, and the digest; each checkpoint of a LoRA run records it (progress "base").

    A preset is fingerprinted from its name, architecture overrides and the seed of its random weights
    (PRESET_SCHEME: exact); a directory (its *.safetensors and config.json) or a .gguf file by
    `content_fingerprint`.

    Raises:
        ConfigError: `model.path` is neither a path that exists nor a packaged model name (naming it, the
            directory a relative one is read from, and the fix).
        MissingPackageError, FileNotFoundError: `model.path` names a packaged model that is not installed
            properly (`packaged_model_path`).
        OSError: a weight file cannot be read.
    """
    if model.preset is not None:
        return {
            "source": f"preset {model.preset}",
            "scheme": PRESET_SCHEME,
            "fingerprint": _preset_digest(model, seed),
        }
    return path_identity(model)


def path_identity(model: ModelRunConfig) -> dict[str, Any]:
    """{"source", "scheme", "fingerprint"} of the model at `model.path` (a directory's *.safetensors and
    config.json, or a .gguf file, a packaged model's included): the path, CONTENT_SCHEME and
    `content_fingerprint`. A LoRA base's (`base_identity`) and a fixed-DCE reference model's at a path.

    Raises:
        as `base_identity`.
    """
    weights, config = _base_files(model)
    scheme, fingerprint = content_fingerprint(weights, config)
    return {"source": str(model.path), "scheme": scheme, "fingerprint": fingerprint}


def content_fingerprint(
    weights: Sequence[Path],
    config: Sequence[Path] = (),
    *,
    whole_bytes: int = WHOLE_BYTES,
    stride: int = SAMPLE_STRIDE,
    block: int = SAMPLE_BYTES,
) -> tuple[str, str]:
    """(scheme, hex digest) of the names, sizes and content of the `weights` and `config` files.

    `config` files are hashed whole. `weights` are hashed whole (BLAKE2b, ~0.9 GB/s per core, a file per
    thread) while their total is at most `whole_bytes` (512 MiB: under a second); above it, each is digested
    from `block` bytes at every multiple of `stride` plus its last `block` bytes: with 4 KiB every 1 MiB,
    1/256 of the bytes in one read per MiB, READ_THREADS reads in flight. Qwen2.5-7B's 15 GB is ~14,500
    reads, 60 MB in all: 0.27 s of CPU on the loaded 2-core development machine when no read waits (a 15 GB
    sparse file), plus the storage's latency: well under a second more from a local SSD; over gcsfuse each
    read can be a ranged request to the bucket (tens of ms), so seconds to tens of seconds, a fraction of
    loading the base from there.

    What it catches: hashed whole, any changed byte. Sampled, any run of at least `stride` - `block` + 1
    changed bytes overlaps a sample, and every tensor of at least `stride` + `block` bytes holds a whole
    sample, so a tensor of >= 1 MiB + 4 KiB that changed throughout (a LoRA merge, a fine-tune, another
    model of the same shapes) is caught unless all 2,048 bf16 values of a 4 KiB sample kept their bytes.
    What it can miss, sampled: a change confined to fewer bytes that falls between samples (a few edited
    values, a norm or bias vector changed alone).

    Raises:
        OSError: a file cannot be read.
    """
    sampled = sum(file.stat().st_size for file in weights) > whole_bytes

    def describe(file: Path) -> dict[str, int | str]:
        if not sampled or file not in weights:
            return checksums.describe_file(file)
        size = file.stat().st_size
        return {"size": size, "blake2b": _sampled_digest(file, size, stride, block)}

    files = [*weights, *config]
    # Whole files hash a file per thread (hashlib releases the GIL); sampled ones spread their reads over
    # threads themselves, so they go one at a time.
    with ThreadPoolExecutor(max_workers=1 if sampled else min(8, os.cpu_count() or 1)) as pool:
        described = dict(zip((file.name for file in files), pool.map(describe, files), strict=True))
    scheme = _content_scheme(whole_bytes, stride, block)
    return scheme, hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _content_scheme(whole_bytes: int, stride: int, block: int) -> str:
    return f"{checksums.ALGORITHM} whole to {whole_bytes} bytes, else {block} every {stride}"


CONTENT_SCHEME = _content_scheme(WHOLE_BYTES, SAMPLE_STRIDE, SAMPLE_BYTES)  # what base_identity records


def _sampled_digest(file: Path, size: int, stride: int, block: int) -> str:
    """BLAKE2b-128 hex digest of the `block` bytes at every multiple of `stride` below `size` and of the last
    `block` bytes of `file`."""
    offsets = [*range(0, size, stride), max(size - block, 0)]
    digest = hashlib.blake2b(digest_size=16)
    fd = os.open(file, os.O_RDONLY)
    read = lambda group: b"".join(os.pread(fd, block, offset) for offset in group)
    # Many small reads in flight, which an SSD serves in parallel and gcsfuse overlaps the latencies of; in
    # groups of READ_GROUP a thread, since a task per read costs more in the pool than the read itself.
    groups = [offsets[i : i + READ_GROUP] for i in range(0, len(offsets), READ_GROUP)]
    try:
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            for data in pool.map(read, groups):
                digest.update(data)
    finally:
        os.close(fd)
    return digest.hexdigest()


def legacy_fingerprint(model: ModelRunConfig, seed: int) -> str:
    """The fingerprint that checkpoints saved before base identities had a "scheme" recorded for this base:
    the preset digest (unchanged since), or for files their names and sizes and LEGACY_BLOCKS blocks of
    LEGACY_BLOCK_BYTES spread over each weight file. Only to check those checkpoints (`check_same_base`).

    Raises:
        as `base_identity`.
    """
    if model.preset is not None:
        return _preset_digest(model, seed)
    weights, config = _base_files(model)
    digest = hashlib.sha256()
    for file in [*weights, *config]:
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        digest.update(_legacy_blocks(file))
    return digest.hexdigest()


def _legacy_blocks(file: Path) -> bytes:
    size = file.stat().st_size
    step = max(size // LEGACY_BLOCKS, 1)
    out = []
    with file.open("rb") as f:
        for k in range(LEGACY_BLOCKS):
            f.seek(min(k * step, max(size - LEGACY_BLOCK_BYTES, 0)))
            out.append(f.read(LEGACY_BLOCK_BYTES))
    return b"".join(out)


def _preset_digest(model: ModelRunConfig, seed: int) -> str:
    text = json.dumps({"preset": model.preset, "overrides": model.overrides, "seed": seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _base_files(model: ModelRunConfig) -> tuple[list[Path], list[Path]]:
    """(weight files, config files) of the base at `model.path`: a directory's *.safetensors (sorted) and
    config.json, or a .gguf file (a packaged model's included) and none.

    Raises:
        as `base_identity`.
    """
    from nextquill_jax.models.packaged import packaged_model_path

    path = Path(model.path).expanduser()
    if not path.exists():
        path = packaged_model_path(model.path)
    if path is None:  # moved or deleted since training, or a relative path read from another directory
        relative = relative_to_cwd(model.path)
        place = f"put the base at {Path(model.path).expanduser().absolute()}"
        raise ConfigError(
            f"the LoRA base model.path {model.path!r} does not exist{relative} and is not a packaged model "
            f"name, and the adapters only fit the base they were trained on. Fix: "
            + (f"run this command from the directory `train` ran in, or {place}" if relative else place)
        )
    if path.is_dir():
        return sorted(path.glob("*.safetensors")), [path / "config.json"]
    return [path], []


def check_same_base(
    saved: dict[str, Any] | None, current: dict[str, Any] | None, where: str, legacy: Callable[[], str]
) -> str | None:
    """Check that the checkpoint at `where`, whose recorded `base_identity` is `saved`, was trained with the
    same kind of run (LoRA or full fine-tuning) as `current` and, under LoRA, on the same base.

    A `saved` identity without a "scheme" comes from before the content fingerprint: it is compared with
    `legacy()` (`legacy_fingerprint` of the current base), which still refuses any base it tells apart;
    rather than refuse every such checkpoint (its fingerprint cannot be compared with the new one) or skip
    the check, a match is accepted and returned as a note saying that the old fingerprint could miss a
    changed tensor (None for presets, whose fingerprint was exact). Checkpoints saved afterwards record the
    current scheme. Returns None when there is nothing to note.

    Raises:
        ConfigError: LoRA added or removed, a base whose fingerprint differs, or a `saved` scheme this
            version does not know (a checkpoint from a newer version); each names the fix.
    """
    if (saved is None) != (current is None):
        kind = lambda identity: "LoRA adapters" if identity is not None else "full fine-tuning"
        raise ConfigError(
            f"{where} holds a {kind(saved)} checkpoint but the config asks for {kind(current)}. Fix: "
            f"{'restore model.lora as it was' if saved is not None else 'remove model.lora'}, or use a new "
            f"workdir"
        )
    if saved is None or current is None:
        return None
    scheme = saved.get("scheme")
    if scheme is not None and scheme not in (PRESET_SCHEME, CONTENT_SCHEME):
        raise ConfigError(
            f"{where} recorded its base {saved['source']} with the fingerprint scheme {scheme!r}, which this "
            f"version does not know (it computes {current['scheme']!r}), so it cannot check the base. "
            f"Fix: use the version of nextquill-jax that saved the checkpoint, or a new workdir"
        )
    # Known schemes digest different things (a preset's settings, files' content): across them, fingerprints
    # differ as their bases do.
    fingerprint = current["fingerprint"] if scheme is not None else legacy()
    if saved["fingerprint"] != fingerprint:
        raise ConfigError(
            f"{where} was trained on the base {saved['source']} (fingerprint {saved['fingerprint'][:12]}), "
            f"but the base is now {current['source']} (fingerprint {fingerprint[:12]}): the "
            f"adapters only fit their own base. Fix: point model.path at that base again."
        )
    if scheme is not None or current["scheme"] == PRESET_SCHEME:
        return None
    return (
        f"note: {where} recorded its base with the fingerprint of earlier versions ({LEGACY_BLOCKS} blocks "
        f"of each weight file), which matches {current['source']} but can miss a changed tensor (a LoRA "
        f"merge of q/v, say); make sure the base is the one it was trained on. Checkpoints saved from now "
        f"on record the full fingerprint."
    )
