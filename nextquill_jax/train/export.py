"""A checkpoint as a Hugging Face directory, or a LoRA run's adapters as a PEFT directory (`export`).

`export` writes config.json + safetensors (loadable by `transformers.AutoModelForCausalLM`; a LoRA run's
adapters merged into its base) and the tokenizer of `data.tokenizer`. `export_adapter` writes a LoRA run's
adapters alone as a PEFT directory that `peft.PeftModel.from_pretrained` loads onto the base. The model is
rebuilt from the config saved with that checkpoint; the parameters are gathered on this process's first
device, so the model must fit on one device (run it on one host).
"""

from __future__ import annotations

from pathlib import Path

from nextquill_jax.config_schema import ConfigError
from nextquill_jax.models import load_tokenizer, save_pretrained
from nextquill_jax.models.peft import write_peft_adapter
from nextquill_jax.train import adapters, model_setup
from nextquill_jax.train.workdir import restore_model, restore_params, single_device_mesh


def export(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Export checkpoint `step` (default: latest) of the run in `workdir` to `out`; returns `out`.

    Raises:
        FileNotFoundError: no checkpoint directory, no complete checkpoint, or no checkpoint at `step`.
    """
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
        FileNotFoundError: as `export`.
    """
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
