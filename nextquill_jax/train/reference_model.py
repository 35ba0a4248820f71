"""The frozen reference model of `dce: fixed` (`loss.reference_model`): its vocabulary checked against the
prepared data before its weights are read, then loaded, with the identity every checkpoint records so that a
resume checks it is still the same model (`resume.check_same_reference`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from nextquill_jax.config import Config, ModelRunConfig, load_config
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.checksums import IntegrityError, file_digest
from nextquill_jax.data.prepared_split import PreparedSplit
from nextquill_jax.train import adapters, model_setup
from nextquill_jax.train.checkpoint import MANIFEST
from nextquill_jax.train.workdir import CONFIG_FILE, is_workdir, restore_model


@dataclass(frozen=True)
class Reference:
    """The frozen `loss.reference_model` of `dce: fixed`: its `graphdef` and `params`, and its `identity`,
    which every checkpoint records (progress "reference") and a resume checks
    (`resume.check_same_reference`): {"source": "base"} for the LoRA base (checked as the base); for a
    training workdir {"source", "step", "manifest"}, the checkpoint loaded (its newest verified one when this
    run started) and the BLAKE2b-128 digest of that step's manifest.json (None for a step saved before
    manifests); else the model's `adapters.path_identity` (its content fingerprint)."""

    graphdef: Any
    params: dict
    identity: dict[str, Any]


def load_reference(cfg: Config, mesh: Mesh, base: tuple[Any, dict] | None = None) -> Reference | None:
    """The frozen `loss.reference_model` for `dce: fixed`, or None when not set.

    `base` under LoRA is the frozen base, (graphdef, params), which `reference_model: base` names (the same
    arrays, no copy; loaded here when not given). A training workdir (holding config.yaml and checkpoints/)
    gives its newest verified checkpoint's model (with the config saved with that checkpoint; a LoRA run's
    carries its adapters, `workdir.restore_model`); anything else is loaded like `model.path`, with the
    run's runtime fields (`model.param_dtype`, `compute_dtype`, `scan_unroll`, `attention_impl`, ...); in a
    LoRA run its weights are stored in the base's dtype (`adapters.frozen_runtime`), not the adapters'.

    Raises:
        ConfigError: the reference names nothing loadable, or a workdir without a complete checkpoint that
            verifies.
    """
    source = cfg.loss.reference_model
    if cfg.loss.dce != "fixed" or source is None:
        return None
    if source == "base":  # Config checks that model.lora is set
        if base is None:
            graphdef, params = model_setup.load_params(adapters.base_section(cfg.model), mesh, cfg.train.seed)
            base = graphdef, adapters.frozen_base(params, cfg.model.lora)
        return Reference(*base, {"source": "base"})
    if is_workdir(source):
        try:
            restored = restore_model(source, mesh=mesh)
        except (FileNotFoundError, IntegrityError) as e:
            raise ConfigError(f"loss.reference_model {source!r}: {e}") from None
        graphdef, state = nnx.split(restored.model)  # a LoRA run's adapters too, applied apart
        # A reference run that saves a newer step gives another model at the next start: the step loaded
        # and its manifest (every file's checksum) name this one.
        manifest = Path(restored.source) / MANIFEST
        digest = file_digest(manifest) if manifest.is_file() else None  # None: before manifests
        identity = {"source": source, "step": restored.step, "manifest": digest}
        return Reference(graphdef, nnx.to_pure_dict(state), identity)
    # Its forward runs inside the training step, on the same batches: it runs the layers as the run's model
    # does (dtypes, layer scan, attention implementation and packed-mode bound). Beside LoRA adapters it is
    # stored as the frozen base is (`model.param_dtype` is then the adapters').
    section = ModelRunConfig(path=source, **adapters.frozen_runtime(cfg.model))
    graphdef, params = model_setup.load_params(section, mesh, seed=0)
    return Reference(graphdef, params, adapters.path_identity(section))


def check_reference_token_ids(cfg: Config, splits: Sequence[PreparedSplit]) -> None:
    """Raise ConfigError if `splits` hold a token id outside the vocabulary of the `dce: fixed` reference
    model (`model_setup.check_token_ids`): it reads the same ids as the run's model.

    Its vocab_size is read from its config alone, before `load_reference` loads its weights (minutes for a
    large model): a path's config.json or GGUF header, a training workdir's config.yaml. `base` is the run's
    own model, checked as such; nothing is checked without a reference model.

    Raises:
        ConfigError: such an id (naming the split, the id, the reference's vocab_size and where it comes
            from, and the fix), or a reference path that names nothing loadable.
    """
    source = cfg.loss.reference_model
    if cfg.loss.dce != "fixed" or source in (None, "base"):
        return
    if is_workdir(source):
        config_file = Path(source).expanduser() / CONFIG_FILE
        section = load_config(config_file).model.resolved(1)  # the vocabulary does not depend on M
        origin = f"{model_setup.vocab_origin(section)} in {config_file} (loss.reference_model)"
    else:
        section = ModelRunConfig(path=source)
        model_setup.check_model_source(section, key="loss.reference_model")
        origin = f"the config.json or GGUF header of loss.reference_model {source!r}"
    vocab_size = model_setup.model_config(section).vocab_size
    for split in splits:
        model_setup.check_token_ids(split, vocab_size, origin)
