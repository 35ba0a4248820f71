"""`nextquill-jax evaluate --workdir DIR [--step N] --split test [--max-examples N] [--max-new-tokens N]`:
generate for a prepared split with a run's checkpoint (or `--model PATH` on the run's data), score the texts
and write `<workdir>/eval/<split>/{predictions.jsonl, metrics.json}` (see `nextquill_jax.evaluate`).

Decoding defaults to the public NextQuill code's: greedy with repetition penalty 1.2; flags change it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, type=Path, help="a training run's directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--split", default="test", help="prepared split to evaluate (default: test)")
    parser.add_argument("--max-examples", type=int, default=None, help="only the split's first N examples")
    parser.add_argument(
        "--model",
        default=None,
        help="evaluate this Hugging Face directory / .gguf / packaged name instead of a checkpoint "
        "(e.g. the base model); output goes to eval/<split>-<name>",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: <workdir>/eval/<split>, or eval/<split>-<name> with --model)",
    )
    parser.add_argument(
        "--prompt",
        choices=("auto", "with", "without"),
        default="auto",
        help="history in the prompt (auto: without for the sft variant, with otherwise)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="prompts decoded together")
    decoding = parser.add_argument_group("decoding (defaults: the run config's eval.generation)")
    decoding.add_argument("--max-new-tokens", type=int, default=None, help="default 512")
    decoding.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument("--temperature", type=float, default=None, help="sampling only; default 0.8")
    decoding.add_argument("--top-k", type=int, default=None, help="sampling only; 0 = off; default 50")
    decoding.add_argument("--top-p", type=float, default=None, help="sampling only; 1 = off; default 0.95")
    decoding.add_argument("--repetition-penalty", type=float, default=None, help="1 = off; default 1.2")
    decoding.add_argument("--seed", type=int, default=None, help="sampling seed; default 0")


def generation_overrides(args: argparse.Namespace) -> dict:
    """The decoding flags that were given, as `GenerationConfig` fields; the others keep the run config's
    `eval.generation` values."""
    flags = {
        "do_sample": True if args.do_sample else None,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    return {k: v for k, v in flags.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from nextquill_jax.config import ConfigError
    from nextquill_jax.evaluate import evaluate

    try:
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
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
