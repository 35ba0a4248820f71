"""The evaluation job: generate for a prepared split, score the texts, and measure the split's loss terms
(the teacher-forced losses alone with `max_new_tokens: 0`).

    metrics = evaluate("runs/tiny_synthetic", split="test")

Writes `<out>/predictions.jsonl` (one object per example, in the split's order: `index`, `id`, `user_id`,
`category`, `prompt`, `prediction`, `reference`, `stopped_by`, and its own `rouge1`, `rougeL`, `meteor`) and
`<out>/metrics.json`, where `<out>` is `<workdir>/eval/<split>` (a checkpoint) or
`<workdir>/eval/<split>-<model name>` (`model_path`, e.g. the base model before fine-tuning). metrics.json
holds `text_metrics.score_predictions`' dict (ROUGE-1/L, METEOR, BLEU overall and per category, METEOR's
WordNet source) and, beside it: what was evaluated (`model`, `step`, `split`, `examples`, `prompt`,
`generation`, `eos_token_id`, `stop_token_ids`, `stopped_at_max_new_tokens`) and `loss`, the loss terms on
the same examples (see `split_losses`); a number that is not finite (the loss of a diverged checkpoint) is
written null, as metrics.jsonl writes it. An earlier evaluation's files in `<out>` are replaced, with a line
saying what they held.

`max_new_tokens: 0` (`eval.generation`, `--max-new-tokens 0`, `compare.max_new_tokens: 0`) decodes nothing:
the loss pass alone runs, no predictions.jsonl is written (an earlier one in `<out>` is deleted, and the
line about the results replaced says so), and metrics.json holds neither the text metrics nor
`stopped_at_max_new_tokens`, only what was evaluated (its `generation` says `max_new_tokens: 0`) and `loss`:
the absent keys mean "not measured", not 0.

The model sees the prompt its variant was trained on: the without-history prompt for `sft`, the with-history
prompt otherwise (`prompt="with"` / `"without"` chooses). Prompts are the prepared token ids (`<split>/`), so
they are exactly what training saw; texts and references come from the rendered `<split>.jsonl` beside them.
Decoding defaults to the public NextQuill code's (greedy, repetition penalty 1.2; `GenerationConfig`). A
generation stops at the token the prepared targets end in (`eos_token_id`, the tokenizer's end token) or at
any end token of the model's own config (`stop_token_ids` lists them all), as the exported model stops in
transformers (`train.export`).
In a multi-process run every process runs the same calls; process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
from flax import nnx
from jax.sharding import Mesh

from nextquill_jax.atomic_file import write_text_atomic
from nextquill_jax.config import Config, ModelRunConfig
from nextquill_jax.config_paths import absolute_value
from nextquill_jax.data.global_batch import to_global_batch
from nextquill_jax.data.pipeline import BatchPipeline
from nextquill_jax.data.prepared_split import (
    PreparedSplit,
    TokenizedExample,
    check_finished,
    check_prepared,
    rendered_rows,
    write_split,
)
from nextquill_jax.eval.text_metrics import score_predictions
from nextquill_jax.loss import LossConfig, metrics_from_aux, variant_losses
from nextquill_jax.loss.weighting_record import weighting_sha256
from nextquill_jax.models.generate import GenerationConfig, generate
from nextquill_jax.parallel import batch_shard_count
from nextquill_jax.plural import counted
from nextquill_jax.train import adapters, model_setup
from nextquill_jax.train.dispatch_queue import summed_eval_aux
from nextquill_jax.train.metrics_log import strict_json
from nextquill_jax.train.reference_model import check_reference_token_ids, load_reference
from nextquill_jax.train.resume import EVALUATING, check_same_reference
from nextquill_jax.train.setup import (
    evaluation_pipeline,
    jit_eval_step,
    planned_examples_per_row,
    segments_per_row,
    step_settings,
)
from nextquill_jax.train.workdir import (
    LoadedModel,
    data_dir_of,
    load_given_tokenizer,
    load_run_tokenizer,
    reading_mesh,
    restore_model,
    saved_config,
)

PromptChoice = Literal["auto", "with", "without"]
_STREAM_FIELD = {"with": "prompt_with", "without": "prompt_without"}
_STREAM_TEXT = {"with": "prompt_with_history", "without": "prompt_without_history"}


def load_model_path(workdir: str | Path, model_path: str, mesh: Mesh | None = None) -> LoadedModel:
    """A `load_pretrained` path or packaged name, run with the runtime settings (dtypes, attention) of the
    run's `config.yaml` in `workdir`, whose data it is evaluated on (`workdir.saved_config`: an attention
    this backend cannot run replaced by `xla`); a LoRA run's weights dtype is its base's
    (`adapters.frozen_runtime`: `lora.base_dtype`, bfloat16 for int8 / nf4), not the adapters'. A directory
    whose config.json declares float32 (`export --merged` of a LoRA run on a bfloat16, int8 or nf4 base) is
    read in float32 all the same: rounded to bfloat16, its adapted kernels lose most of a small update.

    Raises:
        FileNotFoundError: `workdir` has no config.yaml.
        ConfigError: `model_path` names nothing loadable.
    """
    cfg = saved_config(workdir)
    mesh = reading_mesh(cfg) if mesh is None else mesh
    # Beside a LoRA run's adapters `model.param_dtype` is the adapters' dtype: the path (the base, or a merged
    # export) is stored as the run's frozen base is, as the `dce: fixed` reference path is.
    section = ModelRunConfig(path=model_path, **adapters.frozen_runtime(cfg.model))
    model_setup.check_model_source(section, key="--model")  # named as the command line gave it
    if model_setup.declared_dtype(section) == "float32":
        section = dataclasses.replace(section, param_dtype="float32")
    graphdef, params = model_setup.load_params(section, mesh, cfg.train.seed)
    return LoadedModel(nnx.merge(graphdef, params), cfg, mesh, None, model_path)


def read_split(
    data_dir: Path, split: str, max_examples: int | None = None
) -> tuple[list[dict], PreparedSplit]:
    """The rendered rows of `<split>.jsonl` (the first `max_examples`) and the split's token arrays.

    Raises:
        FileNotFoundError: the split was not prepared, or its preparation did not finish (`check_finished`),
            naming the command that prepares it.
        ValueError: the rendered file and the token arrays disagree in length (a stale or partial copy).
    """
    check_finished(data_dir)
    tokens = PreparedSplit(data_dir, split)
    rows = rendered_rows(data_dir, split)
    if len(rows) != len(tokens):
        raise ValueError(
            f"{data_dir / split}.jsonl has {len(rows)} examples but {tokens.dir} has {len(tokens)}: the "
            f"directory is stale or partly written; prepare the data again"
        )
    if max_examples is not None:
        rows = rows[:max_examples]
    return rows, tokens


def choose_stream(cfg: Config, prompt: PromptChoice) -> str:
    """ "with" or "without": the prompt the model is evaluated on (`auto`: the one its variant trained on)."""
    if prompt == "auto":
        return "without" if cfg.loss.variant == "sft" else "with"
    if prompt not in _STREAM_FIELD:
        raise ValueError(f"prompt must be 'auto', 'with' or 'without', got {prompt!r}")
    return prompt


def generation_hint(
    generated: Sequence[Sequence[int]],
    max_new_tokens: int,
    longest_reference: int | None = None,
    setting: str = "--max-new-tokens",
) -> str | None:
    """A hint when most generations ran to `max_new_tokens` or repeat one token: the signs of an
    undertrained model (or of a too small `max_new_tokens`, unless it already exceeds `longest_reference`,
    the longest reference target in tokens: raise `setting`, the option or key that sets it); None
    otherwise."""
    n = len(generated)
    at_limit = sum(len(ids) == max_new_tokens for ids in generated)
    repeating = sum(len(ids) > 4 and max(Counter(ids).values()) > 0.8 * len(ids) for ids in generated)
    if n == 0 or (at_limit <= n // 2 and repeating <= n // 2):
        return None
    if longest_reference is not None and max_new_tokens > longest_reference:
        length = f"max_new_tokens already exceeds the longest reference ({longest_reference} tokens)"
    else:
        length = f"or the texts are longer than max_new_tokens (raise {setting})"
    return (
        f"hint: {at_limit}/{n} generations stopped at max_new_tokens ({max_new_tokens}) and {repeating}/{n} "
        f"repeat one token for over 80% of their length: the model may be undertrained (train longer or "
        f"check the loss curve), {length}"
    )


def rows_splitting_over(cfg: Config, mesh: Mesh) -> Config:
    """`cfg` with `data.batching.rows_per_batch` raised, where needed, to the next count whose batches split
    over `mesh`'s batch shards from every process (`to_global_batch`): a run is read on the devices here
    (`workdir.reading_mesh`), whose shards its own rows need not split (4 rows a batch, trained on 4 devices,
    read on 8). The rows added are padding, which no loss term counts."""
    shards, processes = batch_shard_count(mesh), jax.process_count()
    step = shards // math.gcd(shards, processes)  # the rows per process that the global batch splits
    rows = cfg.data.batching.rows_per_batch
    if rows % step == 0:
        return cfg
    batching = dataclasses.replace(cfg.data.batching, rows_per_batch=-(-rows // step) * step)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batching=batching))


def split_losses(
    loaded: LoadedModel, split: PreparedSplit, count: int, reference: tuple[Any, dict] | None = None
) -> dict[str, Any]:
    """The loss terms of the first `count` examples of `split` under the model (forward passes only);
    `reference`: (graphdef, params) of the run's frozen reference model for `dce: fixed`
    (`reference_model.load_reference`).

    Returns `{"tokens", "variant", "alpha", "threshold", "high", "low", "weighting", "weighting_sha256",
    "loss", "terms", "variants", "effects"}`: the run's loss settings behind the terms (α, δ, λ, ε, and
    `weighting`: its `loss.weighting`, None for the paper's λ / ε, which gave the weighted terms' ω, with
    `weighting_sha256` the digest of its module's file as evaluated, `weighting_record.weighting_sha256`,
    None without a weighting or a source file); `loss` the run's own loss (its `loss` section, as training's
    eval/loss); `terms` the mean CE with and without the history
    (`ce_with`, `ce_without`), the preference-weighted `loss_n` and the alignment loss `loss_p`, all in nats
    per target token; `variants` the loss every variant would have on these examples (sft = ce_without,
    context_sft = ce_with, mce = ce_with + alpha loss_p, dce = loss_n, nextquill = loss_n + alpha loss_p, with
    the run's alpha / threshold / weights or `weighting`; a `js` run's loss is only in `loss`); `effects` the
    DCE statistics (preference-token share, mean, ...).

    A model run with cuDNN's packed attention (`cudnn_max_segments` M) whose M is below the most examples a
    row of the split holds (twice that under `train.joint_forward`, whose one attention row holds both
    streams for the terms' loss, even for a run that trained on one stream) is run with M raised to that
    (`model_setup.covering_graphdef`): training checked M against its own pipelines only, and its losses would
    be NaN otherwise; so is the reference model (a workdir's keeps the M saved with it).
    """
    cfg, mesh = loaded.config, loaded.mesh
    run_loss = cfg.loss.loss_config()
    terms_loss = LossConfig(
        variant="nextquill",
        alpha=run_loss.alpha,
        threshold=run_loss.threshold,
        high=run_loss.high,
        low=run_loss.low,
        weight_alignment=run_loss.weight_alignment,
        dce=run_loss.dce,
        weighting=run_loss.weighting,
    )
    _, params = nnx.split(loaded.model)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    ref_shardings = None if reference is None else jax.tree.map(lambda x: x.sharding, reference[1])
    ref = None if reference is None else reference[1]

    def aux_of(loss_cfg: LossConfig, pipeline: BatchPipeline, graphdef: Any, ref_graphdef: Any) -> dict:
        settings = dataclasses.replace(  # a LoRA run's model carries its adapters (`attach_adapters`)
            step_settings(cfg, ref_graphdef), loss=loss_cfg, lora_scale=None
        )
        step = jit_eval_step(graphdef, settings, mesh, param_shardings, ref_shardings)
        return summed_eval_aux(
            lambda local: step(params, to_global_batch(local, mesh), ref, None), pipeline.dataset()
        )

    with tempfile.TemporaryDirectory() as tmp:
        if count < len(split):  # a split of exactly the evaluated examples
            write_split(tmp, "subset", (TokenizedExample(**split[i]) for i in range(count)))
            split = PreparedSplit(tmp, "subset")
        pipeline = evaluation_pipeline(rows_splitting_over(cfg, mesh), split)
        most = planned_examples_per_row(pipeline)[0]
        # The terms' loss needs both streams: under `train.joint_forward` one attention row holds both.
        graphdef = model_setup.covering_graphdef(
            loaded.model, segments_per_row(cfg.train.joint_forward, terms_loss, most)
        )
        # The reference's DCE pass runs the two streams apart (`train.step.reference_dce`).
        ref_graphdef = (
            None if reference is None else model_setup.covering_graphdef(nnx.merge(*reference), most)
        )
        terms = metrics_from_aux(aux_of(terms_loss, pipeline, graphdef, ref_graphdef), terms_loss)
        if run_loss == terms_loss:
            own = terms
        else:
            own = metrics_from_aux(aux_of(run_loss, pipeline, graphdef, ref_graphdef), run_loss)
    alpha = run_loss.alpha
    effects = {k: v for k, v in terms.items() if k.startswith("dce_") or k == "pref_fraction"}
    return {
        "tokens": terms["tokens"],
        "variant": run_loss.variant,
        # metrics.json's record of what its weighted and alignment terms were computed with
        **{k: getattr(run_loss, k) for k in ("alpha", "threshold", "high", "low", "weighting")},
        "weighting_sha256": weighting_sha256(run_loss.weighting),
        "loss": own["loss"],
        "terms": {k: terms[k] for k in ("ce_with", "ce_without", "loss_n", "loss_p")},
        "variants": variant_losses(terms, alpha),
        "effects": effects,
    }


KEEP_BOTH = "pass --out DIR to keep both"


def replacing_line(out_dir: Path, metrics: Mapping[str, Any], keep: str | None = KEEP_BOTH) -> str | None:
    """The line that says an evaluation with `metrics` is about to replace the results already in `out_dir`
    (what they held, from their metrics.json), or None when it holds none: a default `out_dir` is shared by
    every evaluation of a split, so a quick one would otherwise silently overwrite a full one. An evaluation
    that generates nothing (`metrics["generation"]["max_new_tokens"]` 0) deletes an earlier predictions.jsonl
    and writes none: the line says so. `keep`, where not None, ends the line: how to keep both (`evaluate`'s
    `keep_hint`)."""
    old = next((out_dir / n for n in ("metrics.json", "predictions.jsonl") if (out_dir / n).is_file()), None)
    if old is None:
        return None
    new = _results_of(metrics)
    end = "" if keep is None else f"; {keep}"
    predictions = out_dir / "predictions.jsonl"
    deleted = predictions.is_file() and metrics.get("generation", {}).get("max_new_tokens") == 0
    if deleted and old == predictions:  # no metrics.json: nothing of the old evaluation is replaced in kind
        return f"deleting {predictions}: this evaluation ({new}) has max_new_tokens 0 and writes none{end}"
    try:
        held = f" ({_results_of(json.loads((out_dir / 'metrics.json').read_text(encoding='utf-8')))})"
    except (OSError, ValueError, AttributeError):  # absent, unreadable or not an object: name the file only
        held = ""
    also = f" and deleting {predictions} (max_new_tokens 0 writes no predictions)" if deleted else ""
    return f"replacing {old}{held} with {new}{also}{end}"


def _results_of(metrics: Mapping[str, Any]) -> str:
    """ "step 6, 4 examples" (or the model's name for a model that is not a checkpoint)."""
    source = f"step {metrics['step']}" if metrics.get("step") is not None else metrics.get("model")
    return f"{source}, {counted(metrics.get('examples'), 'example')}"


def evaluate(
    workdir: str | Path,
    split: str = "test",
    *,
    step: int | None = None,
    model_path: str | None = None,
    out_dir: str | Path | None = None,
    max_examples: int | None = None,
    generation: GenerationConfig | None = None,
    generation_overrides: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    prompt: PromptChoice = "auto",
    loaded: LoadedModel | None = None,
    max_new_tokens_setting: str = "--max-new-tokens",
    batch_size_setting: str = "--batch-size",
    keep_hint: str | None = KEEP_BOTH,
    data_dir: str | Path | None = None,
    tokenizer: str | None = None,
    tokenizer_setting: str | None = "--tokenizer",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate checkpoint `step` (default: the newest that verifies) of the run in `workdir`, or `model_path`
    on that run's data, or `loaded`, on prepared split `split`; write predictions.jsonl and metrics.json
    (module docstring; with `max_new_tokens` 0 no predictions.jsonl and no text metrics) and return the
    metrics.

    Args:
        max_examples: only the split's first N examples (generation and loss alike).
        generation: the decoding settings; default: the run config's `eval.generation` (itself defaulting to
            the public code's decoding: greedy, repetition penalty 1.2) with `generation_overrides` applied.
            Its `max_new_tokens` 0: no decoding, the losses only.
        generation_overrides: `GenerationConfig` fields that replace those of `eval.generation`; not with
            `generation`.
        batch_size: prompts decoded together (default: the run's rows per global batch, rounded up to a
            multiple of the mesh's batch shards); unused with `max_new_tokens` 0.
        prompt: "auto" (without history for sft, with otherwise), "with" or "without".
        loaded: a model already loaded from this run (`restore_model`, its checkpoint verified then, or
            `load_model_path`), evaluated instead of loading one, so that a caller that goes on to use it
            reads and verifies the checkpoint once; not with `step` or `model_path`.
        max_new_tokens_setting: what the hint on generations cut at max_new_tokens tells the user to raise
            (`compare` names its `compare.max_new_tokens`).
        batch_size_setting: what set `batch_size`, which a batch size the mesh does not split names
            (`compare` names its `compare.eval_batch_size`).
        keep_hint: how to keep the results already in `out_dir` as well, which the line saying this
            evaluation replaces them ends with (`replacing_line`); None: no advice (`compare`, which has no
            `--out` and replaces a run's evaluation on purpose, when its evaluation settings changed).
        data_dir: the prepared data holding `split` (`evaluate --data`); default: the run's (`train.data_dir`
            of the config the model was saved with, else `<workdir>/prepared`). `compare` passes its file's,
            which `train` has just checked against the checkpoint's data digests: a comparison moved after
            training still evaluates, where the saved config names the old place. Its summary.json names
            the tokenizer it was prepared with: a note says when that is not the one that decodes.
        tokenizer: what decodes the generations (`evaluate --tokenizer`: a directory, .gguf file or
            packaged name), recorded in metrics.json (a path absolute); default: the run's `data.tokenizer`
            (in the config the model was read with). Name the run's tokenizer where it moved: the model reads
            every id as its own tokenizer's, so another vocabulary decodes meaningless text.
        tokenizer_setting: what names `tokenizer`, which the error for a run's tokenizer that is gone tells
            the user to pass; None for a caller without one (`compare`: the error says to put it back).
        echo: progress messages, the warning that the run's `loss.weighting` module has changed since the
            checkpoint was saved (`LoadedModel.weighting_note`), and the note that a checkpoint saved before
            checkpoints recorded their fixed-DCE reference model cannot be checked against it.

    Raises:
        FileNotFoundError: no checkpoint / config / prepared split (naming what to run).
        ValueError: a bad argument (a `generation_overrides` field that `GenerationConfig` lacks or a value
            out of range, `generation_overrides` with `generation`, both `step` and `model_path`: before a
            model is loaded), prepared files that disagree, or a tokenizer that does not load (`tokenizer`:
            before a model is loaded; the run's `data.tokenizer` gone: the message names `--tokenizer`).
        ConfigError: the run's config cannot be used here (mesh, model source), the split holds a token
            id outside the vocabulary of the model or of its reference model (`model_setup.check_token_ids`),
            or the checkpoint was trained against another fixed-DCE reference model than its
            `loss.reference_model` gives now (a reference run that has saved a newer checkpoint since, an
            overwritten model: `resume.check_same_reference`, naming both and the fix; before the loss pass).
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    if batch_size is not None and batch_size < 1:  # before the loss pass, which would be wasted
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if loaded is not None and (step is not None or model_path is not None):
        raise ValueError("evaluate: pass `loaded`, or `step` / `model_path` to load a model, not both")
    if step is not None and model_path is not None:  # the step would be ignored without a word
        raise ValueError(
            f"both a checkpoint step ({step}) of the run and another model ({model_path!r}) to evaluate on "
            f"its data were given. Fix: pass one of them (--step or --model)"
        )
    if generation_overrides:
        if generation is not None:  # they would be ignored without a word
            raise ValueError(
                "evaluate: pass `generation` (the whole decoding) or `generation_overrides` (fields "
                "replacing the run's eval.generation), not both"
            )
        fields = [f.name for f in dataclasses.fields(GenerationConfig)]
        unknown = sorted(set(generation_overrides) - set(fields))
        if unknown:
            raise ValueError(
                f"generation_overrides: no GenerationConfig field {', '.join(unknown)}; its fields: "
                f"{', '.join(fields)}"
            )
        # GenerationConfig checks each field alone: a bad value is refused before the restore.
        dataclasses.replace(GenerationConfig(), **generation_overrides)
    given_tokenizer = load_given_tokenizer(tokenizer, tokenizer_setting)  # a typo named before the restore
    if loaded is None:
        loaded = restore_model(workdir, step) if model_path is None else load_model_path(workdir, model_path)
    cfg = loaded.config
    if generation is None:
        generation = dataclasses.replace(cfg.eval.generation, **(generation_overrides or {}))
    stream = choose_stream(cfg, prompt)
    mesh = loaded.mesh
    if data_dir is None:  # the run's own, where the config it was saved with says
        data_dir = data_dir_of(cfg, workdir)
        check_prepared(data_dir, split, f"{workdir}'s data")
    data_dir = Path(data_dir)
    rows, tokens = read_split(data_dir, split, max_examples)
    if model_path is None:
        origin = model_setup.vocab_origin(cfg.model, saved_with=loaded.source)
    else:
        origin = f"the config.json or GGUF header of {model_path!r}"
    model_setup.check_token_ids(tokens, loaded.model.cfg.vocab_size, origin)  # before anything compiles
    check_reference_token_ids(cfg, [tokens])
    if out_dir is None:
        name = split if model_path is None else f"{split}-{Path(model_path).name}"
        out_dir = Path(workdir) / "eval" / name
    out_dir = Path(out_dir)
    shards = batch_shard_count(mesh)
    if batch_size is None:
        batch_size = cfg.data.batching.rows_per_batch * jax.process_count()
        batch_size = -(-batch_size // shards) * shards
    elif batch_size % shards and generation.max_new_tokens > 0:
        # Generation would refuse it, but only after the loss pass; with nothing to generate it is unused.
        raise ValueError(unsplit_batch_message(batch_size, shards, dict(mesh.shape), batch_size_setting))

    if loaded.weighting_note:  # the weighted loss terms below use the module as it is now
        echo(loaded.weighting_note)
    echo(f"evaluating {loaded.source} on {counted(len(rows), f'{split} example')} ({stream}-history prompts)")
    loaded_reference = load_reference(cfg, mesh)  # outside set_mesh: model set-up reads abstract shapes
    reference = None
    if loaded_reference is not None:
        # A workdir as loss.reference_model gives its newest verified step now, and a model directory may
        # have been overwritten: the checkpoint's weighted terms and DCEs are those of the reference it was
        # trained against (its progress records it; a model path or step 0 has no record to check).
        if loaded.progress is not None:
            recorded = loaded.progress.get("reference")
            if note := check_same_reference(recorded, loaded_reference.identity, loaded.source, EVALUATING):
                echo(note)
        reference = loaded_reference.graphdef, loaded_reference.params

    from nextquill_jax.data.prepare import other_tokenizer_than_recorded, read_summary

    # The run's tokenizer decodes, as the model reads every id as its tokenizer's; data prepared with another
    # (`evaluate --data`) gets a note: by content where the data's summary records it, else by path.
    decoding = cfg.data.tokenizer if tokenizer is None else tokenizer
    decoder_tokenizer = (
        given_tokenizer if given_tokenizer is not None else load_run_tokenizer(loaded, tokenizer_setting)
    )
    summary = read_summary(data_dir) or {}
    prepared_with = summary.get("tokenizer")
    other = other_tokenizer_than_recorded(summary, decoder_tokenizer)
    if other is None:  # data prepared before summaries recorded the digest
        other = prepared_with is not None and _other_tokenizer(prepared_with, decoding)
    if other:
        decoder = f"the run's data with {decoding!r}" if tokenizer is None else f"--tokenizer is {decoding!r}"
        echo(
            f"note: {data_dir} was prepared with the tokenizer {prepared_with!r}, {decoder}: the model reads "
            f"these ids as its own tokenizer's, which decodes them (the same vocabulary at another path is "
            f"fine; another vocabulary gives meaningless results)"
        )
    eos = int(tokens.meta.get("eos_token_id", decoder_tokenizer.eos_token_id))
    pad = decoder_tokenizer.pad_token_id if decoder_tokenizer.pad_token_id is not None else eos
    # The model may end with its own end token (an instruct model's end of text beside its end of turn).
    stop = list(dict.fromkeys([eos, *loaded.model.cfg.eos_token_ids]))
    generating = generation.max_new_tokens > 0
    with jax.set_mesh(mesh):
        losses = split_losses(loaded, tokens, len(rows), reference)
        echo(
            f"{split} loss {losses['loss']:.4f} ({losses['variant']}), {int(losses['tokens'])} target tokens"
        )
        if generating:
            prompts = [tokens[i][_STREAM_FIELD[stream]].tolist() for i in range(len(rows))]
            generated = _generate(loaded, prompts, generation, stop, pad, batch_size, mesh, echo)
    scores, lines, stopped = {}, [], {}
    if generating:
        predictions = [decoder_tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
        scores, lines = _scored(rows, predictions, generated, stream, generation.max_new_tokens)
        stopped = {
            "stopped_at_max_new_tokens": sum(len(ids) == generation.max_new_tokens for ids in generated)
        }
        longest = max((row["tokens"]["target"] for row in rows if "tokens" in row), default=None)
        hint = generation_hint(generated, generation.max_new_tokens, longest, max_new_tokens_setting)
        if hint is not None:
            echo(hint)
    metrics = {
        **scores,
        "model": loaded.source,
        "step": loaded.step,
        "split": split,
        "data": str(data_dir),
        "tokenizer": absolute_value(decoding, Path.cwd(), "tokenizer"),  # a name as given
        "examples": len(rows),
        "prompt": _STREAM_TEXT[stream],
        "generation": dataclasses.asdict(generation),
        "eos_token_id": eos,
        "stop_token_ids": stop,
        **stopped,
        "loss": losses,
    }
    if jax.process_index() == 0:
        replacing = replacing_line(out_dir, metrics, keep_hint)
        if replacing is not None:
            echo(replacing)
        out_dir.mkdir(parents=True, exist_ok=True)
        # metrics.json is written last and marks a finished evaluation: a kill in between must not leave an
        # earlier run's metrics beside these predictions.
        (out_dir / "metrics.json").unlink(missing_ok=True)
        if generating:
            write_text_atomic(out_dir / "predictions.jsonl", "".join(lines))
        else:  # an earlier evaluation's would stand beside metrics that measured no text
            (out_dir / "predictions.jsonl").unlink(missing_ok=True)
        write_text_atomic(out_dir / "metrics.json", strict_json(metrics, ensure_ascii=False))
    if generating:
        overall = scores["overall"]
        echo(
            f"{split}: ROUGE-1 {overall['rouge1']:.4f}  ROUGE-L {overall['rougeL']:.4f}  "
            f"METEOR {overall['meteor']:.4f}  BLEU {overall['bleu']:.2f}  "
            f"({stopped['stopped_at_max_new_tokens']}/{len(rows)} stopped at max_new_tokens) -> {out_dir}"
        )
    else:
        echo(f"{split}: generation skipped (max_new_tokens 0): losses only, no text metrics -> {out_dir}")
    return metrics


def unsplit_batch_message(batch_size: int, shards: int, mesh_shape: Mapping[str, int], setting: str) -> str:
    """The error of a prompt batch size (`setting`: "--batch-size", or compare's
    "compare.eval_batch_size") that the mesh of shape `mesh_shape`, splitting batches `shards` ways, does
    not split, with the fix."""
    fitting = -(-batch_size // shards) * shards
    flag = setting.startswith("--")  # else a config key
    unset = f"leave {setting} out" if flag else "null"
    action = "pass" if flag else f"set {setting} to"
    return (
        f"{setting} {batch_size} is not a multiple of the {shards} batch shards of the mesh "
        f"{dict(mesh_shape)}, over which each batch of prompts is split. Fix: {action} a multiple of "
        f"{shards}, such as {fitting}, or {unset}."
    )


def _other_tokenizer(prepared_with: str, run_tokenizer: str) -> bool:
    """Whether the tokenizer a summary.json names (`prepared_with`) is known to be another than the run's
    `data.tokenizer` (`run_tokenizer`, absolute as `train` records it): a path to another file or directory,
    or another packaged name. A path relative to a directory unknown here (data an earlier version prepared)
    cannot be told apart: not reported."""
    from nextquill_jax.models.tokenizers import tokenizer_names

    if prepared_with == run_tokenizer:
        return False
    path = Path(prepared_with).expanduser()
    if not path.is_absolute() and not path.exists():
        return prepared_with in tokenizer_names()
    try:
        return not path.samefile(Path(run_tokenizer).expanduser())
    except OSError:  # either names no file here (a path gone, or the run's a packaged name): not one file
        return True


def _generate(
    loaded: LoadedModel,
    prompts: list[list[int]],
    generation: GenerationConfig,
    stop: list[int],
    pad: int,
    batch_size: int,
    mesh: Mesh,
    echo: Callable[[str], None],
) -> list[list[int]]:
    """`evaluate`'s decoding of `prompts` (`generate`, ending at any token of `stop`), with about ten
    progress lines."""
    reports = max(1, math.ceil(len(prompts) / batch_size / 10))
    progress = lambda done, total: (
        echo(f"generated {done}/{total}") if done == total or (done // batch_size) % reports == 0 else None
    )
    return generate(
        loaded.model,
        prompts,
        generation,
        eos_token_ids=stop,
        pad_token_id=pad,
        batch_size=batch_size,
        mesh=mesh,
        on_batch=progress,
    )


def _scored(
    rows: list[dict],
    predictions: list[str],
    generated: list[list[int]],
    stream: str,
    max_new_tokens: int,
) -> tuple[dict[str, Any], list[str]]:
    """(`score_predictions`' dict without its `per_example`, predictions.jsonl's lines) of the decoded
    `predictions` of `rows` (`generated`: their token ids, to say which stopped at `max_new_tokens`)."""
    references = [row["target"] for row in rows]
    categories = [row.get("category") for row in rows]
    labelled = [c if c is not None else "(none)" for c in categories]
    scores = score_predictions(
        predictions, references, None if all(c is None for c in categories) else labelled
    )
    per_example = scores.pop("per_example")
    lines = []
    for k, (row, text, ids) in enumerate(zip(rows, predictions, generated, strict=True)):
        record = {
            "index": row["index"],
            "id": row.get("id"),
            "user_id": row["user_id"],
            "category": row.get("category"),
            "prompt": row[_STREAM_TEXT[stream]],
            "prediction": text,
            "reference": row["target"],
            "stopped_by": "max_new_tokens" if len(ids) == max_new_tokens else "eos",
            **{name: values[k] for name, values in per_example.items()},
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return scores, lines
