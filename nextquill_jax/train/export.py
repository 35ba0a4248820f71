"""A checkpoint as a Hugging Face directory, or a LoRA run's adapters as a PEFT directory (`export`).

`export` writes config.json + safetensors (loadable by `transformers.AutoModelForCausalLM`; a LoRA run's
adapters merged into its base, the merged kernels in float32) and the tokenizer of `data.tokenizer`.
`export_adapter` writes a LoRA run's adapters alone as a PEFT directory that `peft.PeftModel.from_pretrained`
loads onto the base. The model is rebuilt from the config saved with that checkpoint; the parameters are
gathered on this process's first device, so the model must fit on one device (run it on one host).

Both refuse an output directory that already holds weights, or files transformers would read over theirs
(`refuse_stale_files`), before restoring.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nextquill_jax.config import LoraConfig, ModelRunConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.models import save_pretrained
from nextquill_jax.models.hf import refuse_stale_files
from nextquill_jax.models.packaged import packaged_model_names
from nextquill_jax.models.peft import write_peft_adapter
from nextquill_jax.train import adapters, model_setup
from nextquill_jax.train.workdir import (
    data_dir_of,
    load_given_tokenizer,
    load_run_tokenizer,
    merged_model,
    restore_model,
    restore_params,
    single_device_mesh,
)


def export(
    workdir: str | Path,
    out: str | Path,
    step: int | None = None,
    echo: Callable[[str], None] = print,
    *,
    tokenizer: str | None = None,
) -> int:
    """Export checkpoint `step` (default: the newest that verifies) of the run in `workdir` to `out`; returns
    the step exported. The tokenizer saved beside it is `tokenizer` (`export --tokenizer`: the run's where it
    moved; loaded before the checkpoint, with a note `echo`ed where it is not the one the run's data was
    prepared with: `other_tokenizer_note`), by default the run's `data.tokenizer`.

    config.json's `eos_token_id` also lists the token the run's targets end in (its prepared data's
    `eos_token_id`, the tokenizer's end token) when the model's own end tokens lack it, with a note `echo`ed:
    generation in transformers stops at those ids, and the model learnt to end with that one. A LoRA run's
    adapted kernels are written merged in float32 (`workdir.merged_model`); one whose base was stored in
    bfloat16, int8 or nf4 gets a note saying so (`merged_dtype_note`), and with int8 / nf4 that the merged
    weights are that quantized base plus the adapters.

    Raises:
        FileExistsError: `out` already holds weight files or a file transformers reads over the export's
            (`refuse_stale_files`).
        FileNotFoundError: no checkpoint directory, no complete checkpoint, or no checkpoint at `step`.
        ValueError: the tokenizer does not load (`tokenizer`: before the checkpoint is read; the run's
            `data.tokenizer` gone: the message names `--tokenizer`); nothing is written then.
    """
    refuse_stale_files(out, fix="pass another --out")
    given_tokenizer = load_given_tokenizer(tokenizer)  # a typo named before the restore
    # It writes weights and runs no attention and no loss: no note on reading a cuDNN / splash run with `xla`
    # here, and a `loss.weighting` module need not import.
    restored = restore_model(workdir, step, single_device_mesh(), runs_model=False)
    model, cfg = merged_model(restored.model), restored.config  # a LoRA run's adapters merged in
    data_dir = data_dir_of(cfg, workdir)
    ends = targets_end_token(data_dir)
    added = ends is not None and ends not in model.cfg.eos_token_ids
    eos_token_ids = [*model.cfg.eos_token_ids, ends] if added else None
    # config.json is written with them, before the weights (`save_pretrained`): a stopped export leaves no
    # directory that loads with the model's own end tokens alone.
    if given_tokenizer is None:
        saved_tokenizer = load_run_tokenizer(restored)
    else:
        saved_tokenizer = given_tokenizer
        if note := other_tokenizer_note(data_dir, given_tokenizer, tokenizer, ends):
            echo(note)
    save_pretrained(model, out, tokenizer=saved_tokenizer, eos_token_ids=eos_token_ids)
    if added:
        echo(
            f"note: the run's targets end in token {ends} (its tokenizer's end token), which the model's "
            f"eos_token_id {list(model.cfg.eos_token_ids)} lacks; {Path(out) / 'config.json'} lists "
            f"{eos_token_ids}, so that generation stops where the model learnt to end."
        )
    lora = cfg.model.lora
    if lora is not None and lora.base_dtype != "float32":
        echo(merged_dtype_note(lora.base_dtype))
    return restored.step


def merged_dtype_note(base_dtype: str) -> str:
    """The note `export` gives for a LoRA run whose base was stored as `base_dtype` (bfloat16, int8 or nf4):
    what the merged weights are, and why the adapted kernels are float32 (`lora.merge`)."""
    quantized = (
        "; the merged weights are that base dequantized plus the adapters: the model the run trained and "
        "evaluated, which differs from the original base weights by the quantization error in every layer "
        "(`export --adapter` writes the adapters alone, to load onto the original base)"
        if base_dtype in ("int8", "nf4")
        else ""
    )
    return (
        f"note: the base was stored as {base_dtype} (model.lora.base_dtype){quantized}. The adapted kernels "
        f"are written in float32, W + (alpha / r)·A·B unrounded (rounded to bfloat16, a small trained update "
        f"is partly lost), the other tensors in bfloat16, and config.json declares float32 so that "
        f"transformers loads them unrounded."
    )


def other_tokenizer_note(data_dir: Path, given: Any, name: str, ends: int | None) -> str | None:
    """The note `export` gives where `--tokenizer` (`given`, loaded from `name`) is not the one the run's data
    in `data_dir` was prepared with, or None: judged by content where its summary.json records the digest
    (`data.prepare.other_tokenizer_than_recorded`), else by the end token the targets end in (`ends`). The
    export ships that tokenizer as the model's: with another vocabulary its text means nothing. Not refused:
    the same vocabulary with another chat template, say, differs in content and is a fine choice."""
    from nextquill_jax.data.prepare import other_tokenizer_than_recorded, read_summary

    summary = read_summary(data_dir) or {}
    other = other_tokenizer_than_recorded(summary, given)
    if other is not None:
        if not other:
            return None
        differs = "holds other content than"
    elif ends is not None and ends != given.eos_token_id:
        differs = f"ends text with token {given.eos_token_id}, not token {ends} as"
    else:
        return None
    prepared = summary.get("tokenizer")
    prepared_with = f" ({prepared!r})" if prepared is not None else ""
    return (
        f"note: --tokenizer {name!r} {differs} the tokenizer the run's data ({data_dir}) was prepared "
        f"with{prepared_with}; it is saved as the model's tokenizer, and with another vocabulary the model's "
        "text decodes to nonsense. Fix, where that was not meant: pass the run's tokenizer (its new place)."
    )


def targets_end_token(data_dir: Path) -> int | None:
    """The token id the prepared targets in `data_dir` end in (its train split's `eos_token_id`), or None
    when that split or the record is not there (moved data, or data prepared without a tokenizer)."""
    meta = data_dir / "train" / "meta.json"
    if not meta.exists():
        return None
    ends = json.loads(meta.read_text(encoding="utf-8")).get("eos_token_id")
    return None if ends is None else int(ends)


# What `export --adapter` says of a run without a checkpoint, instead of `STEP_0_HINT`: the step 0 that hint
# names holds untrained adapters, which `export_adapter` refuses.
NO_ADAPTERS_HINT = (
    "No trained adapters exist until the run saves a checkpoint. Fix: train it (`nextquill-jax train`) until "
    "it saves one, then export its adapters; `--merged --step 0` exports the untrained model it starts from."
)


# `model.overrides` of these fields leave what the network computes as it was (token ids, the context limit).
_SAME_NETWORK = frozenset({"bos_token_id", "eos_token_ids", "pad_token_id", "max_position_embeddings"})


def base_note(section: ModelRunConfig, lora: LoraConfig, workdir: str | Path, out: str | Path) -> str | None:
    """What `export_adapter` says of the base `out`/adapter_config.json names (`section.path`: the run's
    base), or None where that name loads the base the adapters were trained on: one changed by
    `model.overrides` or quantized (`lora.base_dtype` int8 / nf4) is another network, and a packaged model's
    name is no name transformers loads. The base to load is `export --step 0`'s, except for a run started
    from `lora.init_from`, whose step 0 carries those adapters merged."""
    changed = {k: v for k, v in section.overrides.items() if k not in _SAME_NETWORK}
    base = (
        "a run started from model.lora.init_from has no such base on disk (its step 0 carries those "
        "adapters merged): use `export --merged` for the trained model"
        if lora.init_from is not None
        else f"load the base from `nextquill-jax export --workdir {workdir} --step 0 --out BASE_DIR` instead "
        "(the model the run started from)"
    )
    differences = []
    if section.path is not None and changed:
        differences.append(f"the run's base is model.path {section.path} with model.overrides {changed}")
    if lora.base_dtype in ("int8", "nf4"):
        differences.append(
            f"the adapters were trained on the base quantized to {lora.base_dtype} (model.lora.base_dtype)"
        )
    if differences:
        return (
            f"note: {' and '.join(differences)}, which {out}/adapter_config.json's "
            f"base_model_name_or_path cannot say: loaded from that path alone, the base computes otherwise "
            f"than the one trained; {base}."
        )
    if section.path is not None and section.path.strip().lower() in packaged_model_names():
        onto = f"`peft.PeftModel.from_pretrained(base, {str(out)!r})` loads the adapters onto it"
        return (
            f"note: {out}/adapter_config.json's base_model_name_or_path is the packaged model "
            f"{section.path}, a name transformers does not load (this package ships it as a GGUF file); "
            f"{base}" + ("." if lora.init_from is not None else f", and {onto}.")
        )
    return None


def export_adapter(
    workdir: str | Path, out: str | Path, step: int | None = None, echo: Callable[[str], None] = print
) -> int:
    """Write the LoRA adapters of checkpoint `step` (default: the newest that verifies) as a PEFT directory
    `out`; returns the step exported.

    Its `base_model_name_or_path` is the run's `model.path` as the run recorded it (a local directory or file
    absolute, a packaged name as written, which transformers does not load: a note says so, `base_note`); for
    a `model.preset` base it is
    null: that base is a random model built from the preset's architecture (with `model.overrides`) and
    `train.seed`, which no hub or packaged name loads, so naming the preset (e.g. smollm2-135m) would lead
    `AutoPeftModel` to pair the adapters with another model. A `model.path` base trained with
    `model.overrides` that change what it computes (`rope_theta`, say) is another network than the one the
    path loads: a note is `echo`ed, naming them and the base to load instead (`export --step 0`); so is a base
    quantized to int8 / nf4 (`model.lora.base_dtype`), which the adapters were trained on and the original
    base is not (step 0's export is that base dequantized).

    Raises:
        ConfigError: the run is not a LoRA run (`model.lora` unset).
        FileExistsError, FileNotFoundError: as `export` (a run without a checkpoint: `NO_ADAPTERS_HINT`).
        ValueError: `step` 0: the adapters a run starts from are untrained.
    """
    if step == 0:
        raise ValueError(
            "--adapter --step 0: the adapters a run starts from are untrained (B = 0, or the files of "
            "`model.lora.init_from`). Fix: --merged --step 0 exports the model the run starts from."
        )
    refuse_stale_files(out, fix="pass another --out")
    restored = restore_params(
        workdir, step, single_device_mesh(), runs_model=False, no_checkpoint_hint=NO_ADAPTERS_HINT
    )
    lora = restored.config.model.lora
    if lora is None:
        raise ConfigError(
            f"{restored.source} is a full fine-tuning checkpoint: it has no adapters. Fix: export it with "
            f"--merged (a Hugging Face directory)"
        )
    section = adapters.base_section(restored.config.model)
    note = base_note(section, lora, workdir, out)
    if note is not None:
        echo(note)
    write_peft_adapter(
        restored.params,
        model_setup.model_config(section),
        out,
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        base_model=section.path,
    )
    return restored.step
