"""A checkpoint as a Hugging Face directory (`nextquill-jax export`).

Writes config.json + safetensors (loadable by `transformers.AutoModelForCausalLM`) and the tokenizer of
`data.tokenizer`. The model is rebuilt from the config saved with that checkpoint; the parameters are gathered
on this process's first device, so the model must fit on one device (run it on one host).
"""

from __future__ import annotations

from pathlib import Path

from nextquill_jax.models import load_tokenizer, save_pretrained
from nextquill_jax.train.workdir import restore_model, single_device_mesh


def export(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Export checkpoint `step` (default: latest) of the run in `workdir` to `out`; returns `out`.

    Raises:
        FileNotFoundError: no checkpoint directory, no complete checkpoint, or no checkpoint at `step`.
    """
    restored = restore_model(workdir, step, single_device_mesh())
    model, cfg = restored.model, restored.config
    save_pretrained(model, out, tokenizer=load_tokenizer(cfg.data.tokenizer))
    return Path(out)
