"""`nextquill-jax evaluate` and `nextquill-jax effects`.

    nextquill-jax evaluate --workdir DIR [--step N] [--data PREPARED_DIR] --split test [--max-examples N]
                           [--max-new-tokens N]
    nextquill-jax effects --workdir DIR [--step N] [--data PREPARED_DIR] [--split val]
                          [--examples 0,3,7 | --num-examples N] --out REPORT_DIR
    nextquill-jax effects --model PATH_OR_NAME --data PREPARED_DIR ... --out REPORT_DIR
    nextquill-jax compare --config FILE [--seeds 0 1 2]

`evaluate` generates for a prepared split with a run's checkpoint (or `--model PATH` on the run's data),
scores the texts and writes `<workdir>/eval/<split>/{predictions.jsonl, metrics.json}` (`eval.evaluate`);
decoding is the run config's `eval.generation` (unless set, the public NextQuill code's: greedy, repetition
penalty 1.2), each decoding flag replacing one of its keys; `--max-new-tokens 0` skips decoding and measures
the losses only. `effects`
writes a per-token causal effect report (`eval.effect_report`); `compare` runs variants of one config and
tabulates them against a baseline with paired bootstrap intervals (`eval.compare`); a `compare.out` another
`compare` is running in is refused at once with one `error:` line and status 1 (`eval.compare.LOCK`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nextquill_jax import third_party_logs
from nextquill_jax.argument_parser import BooleanOnce
from nextquill_jax.data.config import SPLITS
from nextquill_jax.output_dir import check_output_dir
from nextquill_jax.subcommand import (
    Subcommand,
    dce_threshold,
    directory,
    error_line,
    logit_scale,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    sampling_seed,
)

if TYPE_CHECKING:  # the commands import JAX only when they run
    from nextquill_jax.config import Config
    from nextquill_jax.train.loop import TrainingDivergedError


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """`evaluate`'s flags: the run, the split and step or `--model`, generation and output."""
    parser.add_argument("--workdir", required=True, type=directory, help="a training run's directory")
    parser.add_argument(
        "--step",
        type=non_negative_int,
        default=None,
        help="checkpoint step (default: the newest verified; 0: the untrained model the run starts from)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="prepared data (default: the run's own, where the checkpoint's config says it is: "
        "train.data_dir, else <workdir>/prepared); the run's tokenizer decodes, with a note where the "
        "data was prepared with another",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer that decodes (default: the run's data.tokenizer, as the checkpoint's config "
        "names it); name the run's tokenizer where it moved",
    )
    parser.add_argument(
        "--split", default="test", choices=SPLITS, help="prepared split to evaluate (default: test)"
    )
    parser.add_argument(
        "--max-examples", type=positive_int, default=None, help="only the split's first N examples"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="evaluate this Hugging Face directory / .gguf / packaged name instead of a checkpoint "
        "(e.g. the base model); output goes to eval/<split>-<name>",
    )
    parser.add_argument(
        "--out",
        type=directory,
        default=None,
        help="output directory (default: <workdir>/eval/<split>, or eval/<split>-<name> with --model)",
    )
    parser.add_argument(
        "--prompt",
        choices=("auto", "with", "without"),
        default="auto",
        help="history in the prompt (auto: without for the sft variant, with otherwise)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=None, help="prompts decoded together")
    decoding = parser.add_argument_group(
        "decoding (each flag replaces one key of the run config's eval.generation; the others keep it)"
    )
    decoding.add_argument(
        "--max-new-tokens",
        type=non_negative_int,
        default=None,
        help="0: no generation, only the teacher-forced losses (no predictions, no text metrics); "
        + _run_default("max_new_tokens", 512),
    )
    decoding.add_argument(
        "--do-sample",
        action=BooleanOnce,
        default=None,
        help="sample, or (--no-do-sample) decode greedily, the argmax; " + _run_default("do_sample", "false"),
    )
    decoding.add_argument(
        "--temperature",
        type=_temperature,
        default=None,
        help="in [1e-6, 1e6]; sampling only; " + _run_default("temperature", 0.8),
    )
    decoding.add_argument(
        "--top-k",
        type=non_negative_int,
        default=None,
        help="sampling only; 0 = off; " + _run_default("top_k", 50),
    )
    decoding.add_argument(
        "--top-p",
        type=probability,
        default=None,
        help="in (0, 1]; sampling only; 1 = off; " + _run_default("top_p", 0.95),
    )
    decoding.add_argument(
        "--repetition-penalty",
        type=logit_scale,
        default=None,
        help="in [1e-6, 1e6]; 1 = off; applied in greedy decoding too; "
        + _run_default("repetition_penalty", 1.2),
    )
    decoding.add_argument(
        "--repetition-penalty-prompt",
        action=BooleanOnce,
        default=None,
        help="the penalty counts the prompt's tokens, or (--no-repetition-penalty-prompt) only the generated "
        "ones, so that copying from the prompt is not penalised; "
        + _run_default("repetition_penalty_prompt", "true"),
    )
    decoding.add_argument(
        "--seed",
        type=sampling_seed,
        default=None,
        help="sampling seed: an example's sample depends on it and the example's index in the split, not on "
        "--batch-size or --max-examples (up to rounding); " + _run_default("seed", 0),
    )


def _run_default(key: str, value: object) -> str:
    """The help's default of a decoding flag: the run config's key, and `GenerationConfig`'s own `value`
    (stated here, since this module does not import JAX; tests check them against GenerationConfig)."""
    return f"default: the run config's eval.generation.{key} ({value} unless set)"


def _temperature(text: str) -> float:
    """The argparse `type` of `evaluate --temperature`: a number in [1e-6, 1e6] (`logit_scale`); 0, which
    some tools read as greedy decoding, is refused with the flag that asks for it.

    Raises:
        argparse.ArgumentTypeError: `text` is not a number in [1e-6, 1e6].
    """
    try:
        return logit_scale(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; for greedy decoding pass --no-do-sample") from None


def generation_overrides(args: argparse.Namespace) -> dict:
    """The decoding flags that were given, as `GenerationConfig` fields; the others keep the run config's
    `eval.generation` values."""
    flags = {
        "do_sample": args.do_sample,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "repetition_penalty_prompt": args.repetition_penalty_prompt,
        "seed": args.seed,
    }
    return {k: v for k, v in flags.items() if v is not None}


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate; a ValueError (bad input) is one `error:` line and status 1, others reach `cli.main`."""
    from nextquill_jax.data.prepared_split import check_prepared
    from nextquill_jax.eval.evaluate import evaluate
    from nextquill_jax.output_dir import check_output_dir

    third_party_logs.log_to(args.workdir, named="--workdir")
    if args.out is not None:
        check_output_dir(args.out, "--out")
    try:
        if args.data is not None:  # before a model is loaded, which can take minutes
            check_prepared(args.data, args.split, "--data")
        evaluate(
            args.workdir,
            args.split,
            step=args.step,
            model_path=args.model,
            out_dir=args.out,
            max_examples=args.max_examples,
            generation_overrides=generation_overrides(args),
            batch_size=args.batch_size,
            prompt=args.prompt,
            data_dir=args.data,
            tokenizer=args.tokenizer,
        )
    except ValueError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    return 0


def add_effects_arguments(parser: argparse.ArgumentParser) -> None:
    """`effects`' flags: the model (a run or `--model`), the data, the loss settings and the report."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", type=directory, help="a training workdir (config.yaml + checkpoints/)")
    source.add_argument("--model", help="a Hugging Face directory, .gguf file or packaged model name")
    parser.add_argument(
        "--step",
        type=non_negative_int,
        default=None,
        help="checkpoint step (default: the newest verified; 0: the untrained model the run starts from)",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="prepared data (default with --workdir: the run's own)"
    )
    parser.add_argument(
        "--split", default="val", choices=SPLITS, help="split of the prepared data (default: val)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--examples", type=_example_indices, default=None, help="comma-separated example indices, e.g. 0,3,7"
    )
    which.add_argument(
        "--num-examples", type=positive_int, default=8, help="the first N examples (default: 8)"
    )
    parser.add_argument("--out", required=True, type=directory, help="report directory")
    parser.add_argument("--tokenizer", default=None, help="default: the one the data was prepared with")
    parser.add_argument(
        "--threshold",
        type=dce_threshold,
        default=None,
        help="DCE threshold δ, in [-1, 1); " + _loss_default("threshold", 0.05),
    )
    parser.add_argument(
        "--high",
        type=positive_float,
        default=None,
        help="weight λ of a preference-bearing token, > 0, >= --low; " + _loss_default("high", 0.9),
    )
    parser.add_argument(
        "--low",
        type=non_negative_float,
        default=None,
        help="weight ε of the other target tokens, >= 0; " + _loss_default("low", 0.1),
    )
    parser.add_argument(
        "--weighting",
        type=_weighting_name,
        default=None,
        help="target weights ω from a function of your own, package.module:function (README: Your own token "
        "weights), in place of λ / ε; `none`: the paper's λ / ε (a weighted run's report without its "
        "function); default: the run's loss.weighting; with --model none (λ / ε)",
    )
    parser.add_argument("--max-shown", type=positive_int, default=20, help="examples drawn in the HTML")


def _loss_default(key: str, value: float) -> str:
    """The help's default of an `effects` loss flag: the run's `loss.<key>`, or with --model `LossConfig`'s
    own `value` (stated here, since this module does not import JAX; tests check them against LossConfig)."""
    return f"default: the run's loss.{key}; with --model {value}"


# `effects --weighting none`: the paper's λ / ε, in place of a run's `loss.weighting`.
NO_WEIGHTING = "none"


def _weighting_name(text: str) -> str:
    """The argparse `type` of `effects --weighting`: `text` names an importable function, as
    `LossConfig.weighting` must (checked while parsing, so a misspelt name is refused before a model loads),
    or is `NO_WEIGHTING` ("none": the paper's λ / ε, `_with_loss_flags`).

    Raises:
        argparse.ArgumentTypeError: `text` is not `module:function`, its module does not import, or it names
            no function; with `loss.weighting`'s message and fix (`weighting_function`).
    """
    if text == NO_WEIGHTING:
        return text
    from nextquill_jax.loss.config import weighting_function  # JAX, only when the flag is given

    try:
        weighting_function(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _loss_overrides(args: argparse.Namespace) -> dict[str, float | str]:
    """The loss flags of `effects` that were given, as `LossConfig` fields. Each flag's value is checked while
    parsing; here, before a model is loaded, that --high is not below --low.

    Raises:
        ValueError: --high below --low, naming both and the fix.
    """
    given = {k: v for k in ("threshold", "high", "low", "weighting") if (v := getattr(args, k)) is not None}
    if given.get("high", math.inf) < given.get("low", -math.inf):
        raise ValueError(
            f"--high {given['high']} is below --low {given['low']}: preference-bearing tokens must not weigh "
            "less than the others. Fix: swap them"
        )
    return given


def _with_loss_flags(loss_cfg: Any, given: dict[str, float | str], origin: str) -> Any:
    """The report's weight settings: δ, λ, ε and `weighting` of `loss_cfg` (a `LossConfig`) with the `effects`
    loss flags `given` (`_loss_overrides`) applied, as a `LossConfig` of the default variant; `origin` says
    where `loss_cfg`'s values come from: "the run's loss." or "the default ".

    Raises:
        ValueError: one of --high / --low given, which leaves high below low, naming the flag, the value it
            meets and the fix.
    """
    high, low = given.get("high", loss_cfg.high), given.get("low", loss_cfg.low)
    if high < low:  # only one was given: `_loss_overrides` refused a pair
        if "high" in given:
            clash, fix = f"--high {high} is below {origin}low {low}", f"pass --low too, or a --high >= {low}"
        else:
            clash, fix = f"--low {low} is above {origin}high {high}", f"pass --high too, or a --low <= {high}"
        raise ValueError(
            f"{clash}: preference-bearing tokens must not weigh less than the others. Fix: {fix}"
        )
    from nextquill_jax.loss import LossConfig

    # The report reads these four alone. Its variant is not the run's: a run whose variant weights no token
    # by DCE (context_sft) takes a --weighting as it takes --threshold; its own variant would refuse one.
    weights = {k: given.get(k, getattr(loss_cfg, k)) for k in ("threshold", "high", "low", "weighting")}
    if weights["weighting"] == NO_WEIGHTING:
        weights["weighting"] = None
    return LossConfig(**weights)


def _check_loss_flags_against_run(workdir: Path, given: dict[str, float | str]) -> None:
    """Before the checkpoint is restored: the `effects` loss flags `given` (`_loss_overrides`) against the
    loss of the run's config.yaml in `workdir`, as `_with_loss_flags` checks them against the restored
    checkpoint's. A resume refuses a changed `loss` section (`train.resume.MAY_CHANGE`), so config.yaml's is
    every checkpoint's; without a config.yaml nothing is checked here, and the restore reports what it finds.

    Raises:
        ValueError: as `_with_loss_flags`; ConfigError: config.yaml cannot be read as a config.
    """
    from nextquill_jax.config import load_config
    from nextquill_jax.train.workdir import CONFIG_FILE

    config_file = Path(workdir).expanduser() / CONFIG_FILE
    if config_file.is_file():
        _with_loss_flags(load_config(config_file).loss.loss_config(), given, "the run's loss.")


def _tokenizer_name(data_dir: Path, tokenizer: str | None) -> str:
    """The tokenizer of an `effects` report on `data_dir`: --tokenizer (`tokenizer`), else the one its
    summary.json says the data was prepared with.

    Raises:
        ValueError: no --tokenizer, and the summary names none.
    """
    from nextquill_jax.data.prepare import read_summary

    name = tokenizer or (read_summary(data_dir) or {}).get("tokenizer")
    if name is None:
        raise ValueError(f"{data_dir}/summary.json names no tokenizer; pass --tokenizer")
    return name


def _example_indices(text: str) -> list[int]:
    """The argparse `type` of `effects --examples`: comma-separated example indices, each named once.

    Raises:
        argparse.ArgumentTypeError: no index, one that is not an integer >= 0, or one named twice (its
            tokens would be counted twice in the report's numbers).
    """
    parts = [part for part in text.split(",") if part.strip()]
    try:
        indices = [non_negative_int(part) for part in parts]
    except argparse.ArgumentTypeError:
        indices = []
    if not indices:
        raise argparse.ArgumentTypeError(f"expected comma-separated indices >= 0 such as 0,3,7, got {text!r}")
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(
            f"{text!r} names example {', '.join(map(str, repeated))} more than once. Fix: name each once"
        )
    return indices


def run_effects(args: argparse.Namespace) -> int:
    """Write an effect report; a ValueError (bad input) is one `error:` line and status 1."""
    from nextquill_jax.data.prepare import load_fast_tokenizer
    from nextquill_jax.data.prepared_split import check_prepared
    from nextquill_jax.eval.effect_report import build_effect_report, describe
    from nextquill_jax.loss import LossConfig
    from nextquill_jax.parallel import refuse_several_processes
    from nextquill_jax.train import model_setup

    third_party_logs.log_to(args.out, named="--out")
    try:
        refuse_several_processes("effects")
        if args.step is not None and args.workdir is None:
            raise ValueError("--step needs --workdir")
        loss_flags = _loss_overrides(args)
        if args.data is not None:  # before a model is loaded, which can take minutes
            check_prepared(args.data, args.split, "--data")
        if args.workdir is not None:
            from nextquill_jax.train.workdir import (
                checkpoints_dir,
                data_dir_of,
                restore_model,
                single_device_mesh,
            )

            if args.step != 0:  # a mistyped --workdir named before JAX starts; step 0 reads config.yaml only
                checkpoints_dir(args.workdir)
            if loss_flags:  # before the restore, which can take minutes: config.yaml's loss is the run's
                _check_loss_flags_against_run(args.workdir, loss_flags)
            if args.data is not None:  # (the run's own data is checked once the restore has read its config)
                _tokenizer_name(args.data, args.tokenizer)
            restored = restore_model(args.workdir, args.step, single_device_mesh())
            model, cfg, step = restored.model, restored.config, restored.step
            if restored.weighting_note and "weighting" not in loss_flags:  # the report's ω is the module's
                print(restored.weighting_note, file=sys.stderr)
            loss_cfg = _with_loss_flags(cfg.loss.loss_config(), loss_flags, "the run's loss.")
            data_dir = args.data or data_dir_of(cfg, args.workdir)
            if cfg.loss.dce == "fixed":
                print(_fixed_dce_note(cfg, data_dir), file=sys.stderr)
            if args.data is None:  # the run's own, known once its config is read
                check_prepared(data_dir, args.split, f"{args.workdir}'s data")
            source = f"{args.workdir} step {step}"
            vocab_origin = model_setup.vocab_origin(cfg.model, saved_with=restored.source)
        else:
            from nextquill_jax.models import load_pretrained

            if args.data is None:
                raise ValueError(
                    "--model needs --data PREPARED_DIR (the examples to report on). Fix: pass --data with a "
                    "directory that `nextquill-jax data prepare --config FILE --out DIR` wrote"
                )
            loss_cfg = _with_loss_flags(LossConfig(), loss_flags, "the default ")  # before the model loads
            _tokenizer_name(args.data, args.tokenizer)
            model = load_pretrained(args.model)
            data_dir, source = args.data, args.model
            vocab_origin = f"the config.json or GGUF header of --model {args.model!r}"
        tokenizer_name = _tokenizer_name(data_dir, args.tokenizer)
        summary = build_effect_report(
            model,
            load_fast_tokenizer(tokenizer_name, "--tokenizer" if args.tokenizer else "the data's tokenizer"),
            data_dir,
            args.split,
            args.out,
            loss_cfg,
            examples=args.examples,
            num_examples=args.num_examples,
            max_shown=args.max_shown,
            source=source,
            vocab_origin=vocab_origin,
        )
    except ValueError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    print(describe(summary))
    return 0


def _fixed_dce_note(cfg: Config, data_dir: Path) -> str:
    """The note of `effects` on a `loss.dce: fixed` run `cfg` (reported on the prepared data `data_dir`): the
    report's DCE is the reported model's own, not the effects that weighted its training, and how to report
    those."""
    reference_model = cfg.loss.reference_model
    if reference_model is None:
        source, how = "the data", "the prepared data's `reference_dce` holds them"
    elif reference_model == "base":
        source = "its reference model"
        init_from = cfg.model.lora.init_from if cfg.model.lora is not None else None
        if init_from is None:
            how = "`--step 0` reports the base's (its adapters off, as `loss.reference_model: base` is)"
        elif cfg.model.path is not None:
            # Step 0 is the base carrying the adapters it starts from, not the base alone.
            how = (
                f"`--model {cfg.model.path} --data {data_dir}` reports the base's; `--step 0` carries the "
                f"adapters of model.lora.init_from, which the base as reference has off"
            )
        else:
            how = (
                "no flag reports the base alone (a preset initialised from train.seed; `--step 0` carries "
                "the adapters of model.lora.init_from, which the base as reference has off)"
            )
    else:
        source = "its reference model"
        how = (
            f"report {reference_model} itself on this run's data for those: `--workdir` for a training "
            "workdir, else `--model ... --data`"
        )
    return (
        f"note: this run's loss.dce is fixed: its training weighted tokens by the effects of {source}, not "
        f"of the model it trains; this report's DCE, flags and ω are the reported model's own ({how})"
    )


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """`compare`'s flags: the compare file and the seeds."""
    parser.add_argument(
        "--config", required=True, type=Path, help="a compare file (its keys: configs/REFERENCE.md)"
    )
    parser.add_argument(
        "--seeds", type=non_negative_int, nargs="+", default=None, help="replace compare.seeds"
    )


def run_compare(args: argparse.Namespace) -> int:
    """Run a comparison and print its table; a resumable stop is status 0, bad input or a diverged run
    status 1 (one `error:` line)."""
    from nextquill_jax.eval.compare import ComparisonStoppedError, run_comparison
    from nextquill_jax.eval.compare_file import load_comparison
    from nextquill_jax.train.loop import TrainingDivergedError, TrainingStoppedError

    try:
        comparison = load_comparison(args.config, args.seeds)
        out, named = comparison.compare.out, f"{args.config}: compare.out"
        check_output_dir(out, named)
        # The log in compare.out is opened only under compare's lock: a comparison refused there (another
        # one is running in compare.out) appends nothing to the running one's log.
        run_comparison(comparison, on_locked=lambda: third_party_logs.log_to(out, named=named))
    except ValueError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    except TrainingDivergedError as e:  # its own fix is `train`'s, whose overrides compare does not take
        print(error_line(e, f"{e.diagnosis} Fix: {diverged_fix(e, args.config)}"), file=sys.stderr)
        return 1
    except (TrainingStoppedError, ComparisonStoppedError) as e:  # status 0, as `train` stopped this way:
        print(f"compare stopped: {e}")  # a resumable stop (SIGTERM or Ctrl-C, in training or outside it)
        return 0
    print((Path(comparison.compare.out) / "results.md").read_text(encoding="utf-8"))
    return 0


def diverged_fix(e: TrainingDivergedError, config: Path) -> str:
    """The fix of a run of the compare file `config` that stopped for a non-finite loss: the setting a resume
    may change, set in the file's `base` (compare takes no overrides), or a lower learning rate elsewhere."""
    return (
        f"set {e.resume_setting} in the `base` of {config} and run the same command again: the run "
        f"resumes from that checkpoint (a resume may change it) and finished runs are not run again; or, "
        f"with a lower optim.learning_rate, set another compare.out (a resume may not change it)."
    )


COMMANDS = {
    "evaluate": Subcommand(
        "generate for a split and score it",
        add_evaluate_arguments,
        run_evaluate,
        "nextquill-jax evaluate --workdir runs/tiny_synthetic --split test --max-examples 20",
    ),
    "effects": Subcommand(
        "per-token causal effect report (HTML + PNG)",
        add_effects_arguments,
        run_effects,
        "nextquill-jax effects --workdir runs/tiny_synthetic --out runs/tiny_synthetic/effects",
    ),
    "compare": Subcommand(
        "variants of one config: train, evaluate, effects, one table with paired CIs",
        add_compare_arguments,
        run_compare,
        "nextquill-jax compare --config configs/study/smollm2_synthetic.yaml --seeds 0 1 2",
    ),
}
