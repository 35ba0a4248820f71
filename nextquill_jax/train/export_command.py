"""`nextquill-jax export --workdir DIR [--step N] --out HF_DIR`: a checkpoint as a Hugging Face directory.

Writes config.json + safetensors (loadable by `transformers.AutoModelForCausalLM`) and the tokenizer of
`data.tokenizer`. The model is rebuilt from the config saved with that checkpoint; the parameters are gathered
on this process's first device, so the model must fit on one device (run it on one host).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, type=Path, help="a training run's directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, type=Path, help="output Hugging Face directory")


def export(workdir: Path, out: Path, step: int | None = None) -> Path:
    """Export checkpoint `step` (default: latest) of the run in `workdir` to `out`; returns `out`.

    Raises:
        FileNotFoundError: no checkpoint directory, no complete checkpoint, or no checkpoint at `step`.
    """
    from nextquill_jax.models import load_tokenizer, save_pretrained
    from nextquill_jax.train.workdir import restore_model, single_device_mesh

    restored = restore_model(workdir, step, single_device_mesh())
    model, cfg = restored.model, restored.config
    save_pretrained(model, out, tokenizer=load_tokenizer(cfg.data.tokenizer))
    return Path(out)


def run(args: argparse.Namespace) -> int:
    from nextquill_jax.config import ConfigError

    try:
        out = export(args.workdir, args.out, args.step)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported to {out}")
    return 0
