"""What the repetition penalty costs each model on the reference texts: teacher-forced, with the history in
the prompt, the log-probability of every reference target token under the model's logits, and under the same
logits with the penalty applied as decoding applies it (`models.generate.repetition_penalty`, transformers'
RepetitionPenaltyLogitsProcessor: every token id already in the row, the prompt and the reference tokens
before this one, has its logit divided by the penalty where positive and multiplied where negative).

    python benchmarks/penalty_cost.py configs/study/smollm2_synthetic_96users_epochs_generate.yaml [--seed S]
        [--penalty 1.2] [--examples N] [--baseline NAME]

The cost of a token is log p(y) - log p_penalised(y), in nats: positive where the penalty makes the reference
token less likely. A token the row already holds (a signature word the history spells out, a word the review
repeats) usually loses probability; one it does not never does (it keeps its logit while the row's fall). Per
run of the compare file's variants (with seed S; an untrained variant's model as its `train: false` row): the
mean cost over target tokens, over its preference-role tokens (the synthetic data's ground truth), and over
the tokens the row already holds and those it does not; the share of target tokens the row already holds; the
mean logit of the reference token where it is already in the row (transformers' penalty divides a positive
logit, so the higher it is the more it loses); the probability the model gives the tokens not in the row
(which the penalty leaves as they are while the row's fall); and the share of reference tokens greedy decoding
would pick (the argmax), without and with the penalty. Each run's per-example measures (`PAIRED`: the mean
cost over all target tokens and over preference tokens, and the share of tokens greedy decoding picks without
the penalty and not with it) are paired against the baseline's with compare's bootstrap interval
(`eval.bootstrap.paired_bootstrap`). The examples are the compare file's split's first `--examples` (default:
its `compare.max_examples`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def seen_in_row(prompt_ids: Sequence[int], target_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """[R, V] bool, R = len(target_ids): row k marks every token id the row holds before target token k (the
    prompt's and target_ids[:k]), the ids decoding's repetition penalty applies to when it predicts token k.

    Raises:
        ValueError: an id outside [0, vocab_size).
    """
    ids = np.asarray([*prompt_ids, *target_ids])
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    R = len(target_ids)
    seen = np.zeros((R, vocab_size), bool)
    seen[:, np.asarray(prompt_ids, np.int64)] = True
    # Target token j is in the row for every later position k > j.
    first = np.full(vocab_size, R, np.int64)
    for j in range(R - 1, -1, -1):
        first[target_ids[j]] = j
    seen |= first[None, :] < np.arange(R)[:, None]
    return seen


def token_statistics(logits: Any, seen: Any, targets: Any, penalty: float) -> dict[str, Any]:
    """Per target token y, from logits [..., R, V] float32, seen [..., R, V] bool (`seen_in_row`) and targets
    [..., R] int, each [..., R]: "plain" log p(y) and "penalised" log p(y) after the penalty (applied to the
    seen logits as `models.generate.repetition_penalty` applies it, then a log-softmax over V), float32;
    "logit" the logit of y; "top_plain" / "top_penalised" whether y is the argmax (greedy decoding's pick)
    without / with the penalty; "unseen_mass" the probability the model gives the tokens not in the row."""
    import jax
    import jax.numpy as jnp

    from nextquill_jax.models.generate import repetition_penalty

    logits, seen, targets = jnp.asarray(logits, jnp.float32), jnp.asarray(seen), jnp.asarray(targets)
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    penalised = repetition_penalty(flat, seen.reshape(flat.shape), penalty).reshape(shape)
    pick = lambda values: jnp.take_along_axis(values, targets[..., None], axis=-1)[..., 0]
    return {
        "plain": pick(jax.nn.log_softmax(logits, axis=-1)),
        "penalised": pick(jax.nn.log_softmax(penalised, axis=-1)),
        "logit": pick(logits),
        "top_plain": jnp.argmax(logits, axis=-1) == targets,
        "top_penalised": jnp.argmax(penalised, axis=-1) == targets,
        "unseen_mass": jnp.where(seen, 0.0, jax.nn.softmax(logits, axis=-1)).sum(axis=-1),
    }


def example_costs(
    model: Any, tokenizer: Any, prepared_dir: Path, split: str, indices: Sequence[int], penalty: float
) -> list[dict[str, np.ndarray]]:
    """Per example of `indices`: `token_statistics`' arrays, "seen" [L] bool (the token is already in the
    row) and "roles" [L] str or None, over its L target tokens (EOS last); with-history prompts, one example
    per row laid out as the effect report lays them out."""
    import jax
    from flax import nnx

    from nextquill_jax.data.assemble import assemble_batch
    from nextquill_jax.data.prepared_split import PreparedSplit, rendered_rows
    from nextquill_jax.eval.effect_scoring import EOS, target_offsets, token_roles
    from nextquill_jax.eval.effect_tokens import one_example_rows
    from nextquill_jax.train.step import response_hidden

    data = PreparedSplit(prepared_dir, split)
    arrays = [data[i] for i in indices]
    rows = rendered_rows(prepared_dir, split, list(indices))
    eos_id = int(data.meta.get("eos_token_id", tokenizer.eos_token_id))
    shape = one_example_rows(arrays)
    graphdef, state = nnx.split(model)

    @jax.jit
    def response_logits(state, batch):  # [1, R, V] float32
        merged = nnx.merge(graphdef, state)
        return merged.logits(response_hidden(merged, batch, "with"))

    out = []
    for a, row in zip(arrays, rows, strict=True):
        batch = assemble_batch([[a]], shape, with_reference_dce=False)
        logits = response_logits(state, batch)
        target = np.asarray(a["target"])
        L, (R, V) = len(target), logits.shape[1:]
        seen = np.zeros((1, R, V), bool)
        seen[0, :L] = seen_in_row(a["prompt_with"], target, V)
        padded = np.zeros((1, R), np.int64)
        padded[0, :L] = target
        stats = token_statistics(logits, seen, padded, penalty)
        spans = (row.get("meta") or {}).get("target_spans")
        offsets = target_offsets(tokenizer, row["target"], target, eos_id)
        out.append(
            {
                **{key: np.asarray(value)[0, :L] for key, value in stats.items()},
                "seen": seen[0, np.arange(L), target],
                "roles": None if spans is None else [*token_roles(offsets, spans), EOS],
            }
        )
    return out


def run_summary(costs: Sequence[dict[str, np.ndarray]]) -> dict[str, float | None]:
    """Token-weighted means over every example of `costs` (`example_costs`): "cost" (all target tokens),
    "cost_preference", "cost_seen", "cost_unseen", "seen_share", "seen_logit" (the mean logit of a reference
    token already in the row), "unseen_mass", and "top_plain" / "top_penalised" (the share of reference
    tokens greedy decoding would pick without / with the penalty); None where no token counts."""
    joined = lambda key: np.concatenate([c[key] for c in costs]).astype(np.float64)
    cost, seen = joined("plain") - joined("penalised"), np.concatenate([c["seen"] for c in costs])
    pref = np.concatenate([np.asarray(c["roles"] or [""] * len(c["seen"])) == "preference" for c in costs])
    mean = lambda values, where: float(values[where].mean()) if where.any() else None
    return {
        "cost": float(cost.mean()),
        "cost_preference": mean(cost, pref),
        "cost_seen": mean(cost, seen),
        "cost_unseen": mean(cost, ~seen),
        "seen_share": float(seen.mean()),
        "seen_logit": mean(joined("logit"), seen),
        "unseen_mass": float(joined("unseen_mass").mean()),
        "top_plain": float(joined("top_plain").mean()),
        "top_penalised": float(joined("top_penalised").mean()),
    }


# The per-example measures `main` pairs between runs, and what each is.
PAIRED = {
    "cost": "the cost, all target tokens",
    "cost_preference": "the cost, preference tokens",
    "greedy_lost": "the share of reference tokens greedy decoding picks without the penalty and not with it",
}


def per_example(costs: Sequence[dict[str, np.ndarray]], measure: str) -> list[float]:
    """Each example's `measure` (a key of `PAIRED`) over its target tokens: "cost" and "cost_preference" its
    mean cost (over its preference tokens only: NaN for an example without any), "greedy_lost" the share of
    its tokens that are the argmax without the penalty and not with it."""
    values = []
    for c in costs:
        cost = (c["plain"] - c["penalised"]).astype(np.float64)
        if measure == "greedy_lost":
            values.append(float((c["top_plain"] & ~c["top_penalised"]).mean()))
            continue
        where = np.ones(len(cost), bool)
        if measure == "cost_preference":
            where = np.asarray(c["roles"] or [""] * len(cost)) == "preference"
        values.append(float(cost[where].mean()) if where.any() else math.nan)
    return values


def main(argv: list[str] | None = None) -> int:
    from nextquill_jax.data.prepare import load_fast_tokenizer
    from nextquill_jax.data.prepared_split import PreparedSplit
    from nextquill_jax.eval.bootstrap import paired_bootstrap
    from nextquill_jax.eval.compare import DONE_FILE, load_comparison
    from nextquill_jax.train.workdir import data_dir_of, initial_model, restore_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a compare file whose runs have finished")
    parser.add_argument("--seed", type=int, help="the seed's runs (default: the file's first)")
    parser.add_argument("--penalty", type=float, default=1.2, help="the repetition penalty (default: 1.2)")
    parser.add_argument("--examples", type=int, help="the split's first N (default: compare.max_examples)")
    parser.add_argument("--baseline", help="pair against this variant (default: compare.baseline)")
    args = parser.parse_args(argv)
    comparison = load_comparison(args.config)
    plan = comparison.compare
    seed = plan.seeds[0] if args.seed is None else args.seed
    baseline = args.baseline or plan.baseline
    count = args.examples or plan.max_examples
    results: dict[str, list[dict[str, np.ndarray]]] = {}
    for name, variant in comparison.variants.items():
        workdir = comparison.workdir(name, seed)
        if not (workdir / DONE_FILE).exists():
            parser.error(f"{name} (seed {seed}) has not finished in {workdir}")
        trained = comparison.trained_workdir(name, seed)
        loaded = restore_model(trained) if variant.train else initial_model(workdir)
        cfg = loaded.config
        data_dir = data_dir_of(comparison.run_config(name, seed), trained)
        total = len(PreparedSplit(data_dir, plan.split))
        indices = range(min(count or total, total))
        print(f"{name}: {len(indices)} {plan.split} examples, {loaded.source}", file=sys.stderr)
        results[name] = example_costs(
            loaded.model, load_fast_tokenizer(cfg.data.tokenizer), data_dir, plan.split, indices, args.penalty
        )
    if baseline not in results:
        parser.error(f"baseline {baseline!r} is not a variant: {', '.join(results)}")
    print(
        f"Repetition penalty {args.penalty} on the {plan.split} references, seed {seed}, "
        f"{len(results[baseline])} examples (nats per token; cost = log p - log p_penalised)\n"
    )
    # (run_summary key, column, format)
    columns = [
        ("cost", "cost", ".4f"),
        ("cost_preference", "cost, pref. tokens", ".4f"),
        ("cost_seen", "cost, in the row", ".4f"),
        ("cost_unseen", "cost, others", ".4f"),
        ("seen_share", "in the row", ".3f"),
        ("seen_logit", "their logit", ".2f"),
        ("unseen_mass", "mass not in the row", ".3f"),
        ("top_plain", "greedy picks it", ".3f"),
        ("top_penalised", "with the penalty", ".3f"),
    ]
    print("| variant | " + " | ".join(title for _, title, _ in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, costs in results.items():
        summary = run_summary(costs)
        cells = ["-" if summary[key] is None else f"{summary[key]:{spec}}" for key, _, spec in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        f"\nDifference to {baseline} (mean of the per-example differences [95% paired bootstrap interval]):"
    )
    for measure, label in PAIRED.items():
        base = per_example(results[baseline], measure)
        for name, costs in results.items():
            if name == baseline:
                continue
            values = per_example(costs, measure)
            keep = [i for i in range(len(base)) if not (math.isnan(values[i]) or math.isnan(base[i]))]
            d = paired_bootstrap([values[i] for i in keep], [base[i] for i in keep], resamples=plan.resamples)
            verdict = "no significant difference" if not d.significant else ("more" if d.mean > 0 else "less")
            print(
                f"- {name} vs {baseline}, {label}: {verdict} ({d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}], "
                f"{len(keep)} examples)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
