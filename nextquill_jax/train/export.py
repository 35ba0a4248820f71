"""A checkpoint as a Hugging Face directory, or a LoRA run's adapters as a PEFT directory (`export`).

`export` writes config.json + safetensors (loadable by `transformers.AutoModelForCausalLM`; a LoRA run's
adapters merged into its base) and the tokenizer of `data.tokenizer`. `export_adapter` writes a LoRA run's
adapters alone as a PEFT directory that `peft.PeftModel.from_pretrained` loads onto the base. The model is
rebuilt from the config saved with that checkpoint; the parameters are gathered on this process's first
device, so the model must fit on one device (run it on one host).

Both refuse an output directory that already holds weights (`refuse_existing_weights`), before restoring.
"""

from __future__ import annotations

from pathlib import Path

from nextquill_jax.config_schema import ConfigError
from nextquill_jax.models import load_tokenizer, save_pretrained
from nextquill_jax.models.peft import write_peft_adapter
from nextquill_jax.train import adapters, model_setup
from nextquill_jax.train.workdir import restore_model, restore_params, single_device_mesh

# Files that loaders read as a model's or an adapter's weights. One left from an earlier export would sit
# beside the new one and be loaded instead of it by some loader: ours prefers model.safetensors.index.json to
# model.safetensors, transformers the reverse, and an adapter_config.json makes transformers (with peft) load
# the directory as an adapter on its base model.
WEIGHT_FILES = ("model*.safetensors*", "pytorch_model*.bin*", "adapter_model.*", "adapter_config.json")


def refuse_existing_weights(out: str | Path) -> None:
    """Check that `out` holds no weight files (`WEIGHT_FILES`) before an export writes there. They are not
    removed: they may be a user's only copy.

    Raises:
        FileExistsError: naming the files and the fix (an empty or new directory).
    """
    out = Path(out)
    found = sorted({p.name for pattern in WEIGHT_FILES for p in out.glob(pattern)}) if out.is_dir() else []
    if found:
        raise FileExistsError(
            f"{out} already holds weight files: {', '.join(found)}. An export beside them would leave "
            f"weights that disagree, which loaders choose between differently. Fix: empty {out} or pass "
            "another --out."
        )


def export(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Export checkpoint `step` (default: latest) of the run in `workdir` to `out`; returns `out`.

    Raises:
        FileExistsError: `out` already holds weight files (`refuse_existing_weights`).
        FileNotFoundError: no checkpoint directory, no complete checkpoint, or no checkpoint at `step`.
    """
    refuse_existing_weights(out)
    restored = restore_model(workdir, step, single_device_mesh())
    model, cfg = restored.model, restored.config
    save_pretrained(model, out, tokenizer=load_tokenizer(cfg.data.tokenizer))
    return Path(out)


def export_adapter(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write the LoRA adapters of checkpoint `step` (default: latest) as a PEFT directory `out`.

    Its `base_model_name_or_path` is the run's `model.path` as configured; for a `model.preset` base it is
    null: that base is a random model built from the preset's architecture (with `model.overrides`) and
    `train.seed`, which no hub or packaged name loads, so naming the preset (e.g. smollm2-135m) would lead
    `AutoPeftModel` to pair the adapters with another model.

    Raises:
        ConfigError: the run is not a LoRA run (`model.lora` unset).
        FileExistsError, FileNotFoundError: as `export`.
    """
    refuse_existing_weights(out)
    restored = restore_params(workdir, step, single_device_mesh())
    lora = restored.config.model.lora
    if lora is None:
        raise ConfigError(
            f"{restored.source} is a full fine-tuning checkpoint: it has no adapters. Fix: export it with "
            f"--merged (a Hugging Face directory)"
        )
    section = adapters.base_section(restored.config.model)
    return write_peft_adapter(
        restored.params,
        model_setup.model_config(section),
        out,
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        base_model=section.path,
    )
