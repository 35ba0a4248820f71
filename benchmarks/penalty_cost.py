"""What the repetition penalty costs each model on the reference texts: teacher-forced, with the history in
the prompt, the log-probability of every reference target token under the model's logits, and under the same
logits with the penalty applied as decoding applies it (`models.generate.repetition_penalty`, transformers'
RepetitionPenaltyLogitsProcessor: every token id already in the row, the prompt and the reference tokens
before this one, has its logit divided by the penalty where positive and multiplied where negative).

    python benchmarks/penalty_cost.py configs/study/smollm2_synthetic_96users_epochs_generate.yaml [--seed S]
        [--penalty 1.2] [--examples N] [--baseline NAME]
    python benchmarks/penalty_cost.py --across configs/study/A.yaml configs/study/A_seeds.yaml

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
its `compare.max_examples`); runs paired must hold the same examples in the same order (checked on their ids
and content, as compare pairs them).

`--across` reads every finished seed of one or more compare files whose runs differ in nothing but the seed,
as `study_report.py --across` does (imported from beside this file, with its checks and its table): per
variant and paired measure, each seed's mean difference to the baseline, their Student t interval over the
seeds, and the paired bootstrap interval over the examples of each example's values averaged over the seeds; a
verdict needs both to exclude 0. A variant some seed lacks (an untrained base model in one file only) is left
out, with a note.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nextquill_jax.argument_parser import ArgumentParser

if TYPE_CHECKING:
    from nextquill_jax.eval.bootstrap import PairedDifference


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
    row) and "roles" [L] str or None, over its L target tokens (EOS last), and "key" the example's
    `compare_table.ExampleKey` (what pairs it across runs); with-history prompts, one example per row laid
    out as the effect report lays them out."""
    import jax
    from flax import nnx

    from nextquill_jax.data.assemble import assemble_batch
    from nextquill_jax.data.prepared_split import PreparedSplit, rendered_rows
    from nextquill_jax.eval.compare_table import example_key
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
                "key": example_key(row),
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


def measures(costs: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """{measure: [N] float64} of each `PAIRED` measure (`per_example`) over the N examples of `costs`."""
    return {measure: np.asarray(per_example(costs, measure), np.float64) for measure in PAIRED}


def same_examples(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Checks that every run of `runs` (a name -> its `example_costs`) holds the first run's examples in the
    same order (their "key"), so that their per-example values pair by position.

    Raises:
        ValueError: a run holds other examples or another count, naming both runs and the first position.
    """
    names = list(runs)
    first = [c["key"] for c in runs[names[0]]]
    for name in names[1:]:
        keys = [c["key"] for c in runs[name]]
        if keys != first:
            shared = min(len(first), len(keys))
            at = next((i for i in range(shared) if first[i] != keys[i]), shared)
            raise ValueError(
                f"{name} does not hold the examples of {names[0]} ({len(keys)} and {len(first)} examples, "
                f"the first difference at example {at}), so their values cannot be paired. Fix: compare "
                f"runs whose data was prepared from the same records, with one --examples"
            )


def paired_differences(
    values: Mapping[str, Mapping[str, np.ndarray]], baseline: str, resamples: int
) -> dict[str, dict[str, PairedDifference]]:
    """{variant: {measure: its paired difference to `baseline`}} for every variant of `values` (a name -> its
    `measures`) but the baseline: `paired_bootstrap` over the examples where both values are finite (an
    example without preference tokens has none for "cost_preference"); a measure no example has is left
    out."""
    from nextquill_jax.eval.bootstrap import paired_bootstrap

    base = values[baseline]
    differences: dict[str, dict[str, PairedDifference]] = {}
    for name, own in values.items():
        if name == baseline:
            continue
        differences[name] = {}
        for measure in PAIRED:
            keep = np.isfinite(own[measure]) & np.isfinite(base[measure])
            if keep.any():
                differences[name][measure] = paired_bootstrap(
                    own[measure][keep], base[measure][keep], resamples=resamples
                )
    return differences


# `PAIRED` as `study_report.across_seeds` reads metrics: (key, label, higher_is_better). Less cost and fewer
# greedy picks lost read "better": the reference holds up under the penalty.
ACROSS_METRICS = tuple((measure, label, False) for measure, label in PAIRED.items())


def across_rows(
    per_seed: Sequence[tuple[int, Mapping[str, Mapping[str, np.ndarray]]]], baseline: str, resamples: int
) -> tuple[list[dict], list[tuple[int, dict]]]:
    """`study_report.across_seeds`' rows for `per_seed` ((seed, {variant: its `measures`}), every seed with
    `baseline` and the same examples in the same order) and the per-seed results they came from (compare's
    form: {"differences": {variant: {measure: {"mean", "low", "high", "examples", "level"}}}}). The interval
    over the examples pairs each example's values averaged over the seeds (an example NaN at any seed is
    left out), for the variants every seed has."""
    from study_report import across_seeds

    def as_result(differences: Mapping[str, Mapping[str, PairedDifference]]) -> dict:
        return {"differences": {v: {m: asdict(d) for m, d in by.items()} for v, by in differences.items()}}

    results = [
        (seed, as_result(paired_differences(values, baseline, resamples))) for seed, values in per_seed
    ]
    every = [name for name in per_seed[0][1] if all(name in values for _, values in per_seed)]
    averaged = {
        name: {m: np.mean([values[name][m] for _, values in per_seed], axis=0) for m in PAIRED}
        for name in every
    }
    pooled = as_result(paired_differences(averaged, baseline, resamples))
    return across_seeds(results, pooled, metrics=ACROSS_METRICS), results


def seed_costs(
    comparison: Any, seed: int, names: Sequence[str], count: int | None, penalty: float
) -> dict[str, list[dict[str, Any]]]:
    """`example_costs` of the runs of `names` (variants of `comparison`, a loaded compare file) with `seed`,
    on the first `count` examples of its split (None: all): a trained run's final model, an untrained
    variant's (`train: false`) initial one.

    Raises:
        ValueError: a run has not finished (no compare_done.json).
    """
    from nextquill_jax.data.prepare import load_fast_tokenizer
    from nextquill_jax.data.prepared_split import PreparedSplit
    from nextquill_jax.eval.compare_record import DONE_FILE
    from nextquill_jax.train.workdir import data_dir_of, initial_model, restore_model

    split = comparison.compare.split
    costs = {}
    for name in names:
        workdir = comparison.workdir(name, seed)
        if not (workdir / DONE_FILE).exists():
            raise ValueError(f"{name} (seed {seed}) has not finished in {workdir}")
        trained = comparison.trained_workdir(name, seed)
        loaded = restore_model(trained) if comparison.variants[name].train else initial_model(workdir)
        data_dir = data_dir_of(comparison.run_config(name, seed), trained)
        total = len(PreparedSplit(data_dir, split))
        indices = range(min(count or total, total))
        print(f"{name} (seed {seed}): {len(indices)} {split} examples, {loaded.source}", file=sys.stderr)
        tokenizer = load_fast_tokenizer(loaded.config.data.tokenizer)
        costs[name] = example_costs(loaded.model, tokenizer, data_dir, split, indices, penalty)
    return costs


def seed_report(costs: Mapping[str, Sequence[dict[str, Any]]], baseline: str, resamples: int) -> list[str]:
    """The per-seed report's table (`run_summary` of each run) and each variant's paired differences to
    `baseline`, as Markdown lines."""
    from nextquill_jax.eval.compare_table import difference_verdict

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
    lines = ["| variant | " + " | ".join(title for _, title, _ in columns) + " |"]
    lines.append("| --- |" + " ---: |" * len(columns))
    for name, run_costs in costs.items():
        summary = run_summary(run_costs)
        cells = ["-" if summary[key] is None else f"{summary[key]:{spec}}" for key, _, spec in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Difference to {baseline} (mean of the per-example differences [95% paired bootstrap interval]):",
    ]
    differences = paired_differences({name: measures(c) for name, c in costs.items()}, baseline, resamples)
    for measure, label in PAIRED.items():
        for name, by_measure in differences.items():
            if measure not in by_measure:
                continue
            d = by_measure[measure]
            word = difference_verdict(asdict(d), higher_is_better=True)
            verdict = {"better": "more", "worse": "less"}.get(word, word)
            lines.append(
                f"- {name} vs {baseline}, {label}: {verdict} ({d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}], "
                f"{d.examples} examples)"
            )
    return lines


def across_report(
    comparisons: Sequence[Any], baseline: str | None, count: int | None, penalty: float
) -> list[str]:
    """The `--across` report of `comparisons`' finished seeds (see the module docstring).

    Raises:
        ValueError: as `study_report.across_report` (a baseline that is no variant, different baselines,
            one seed twice, no seed with its baseline finished, a record without its settings, runs that
            differ in more than the seed), or runs on other examples (`same_examples`).
    """
    from study_report import (
        across_table,
        check_only_seeds_differ,
        left_out,
        records_of,
        seed_runs,
        table_baseline,
    )

    baseline = table_baseline(comparisons, baseline)
    notes: list[str] = []
    found = seed_runs(comparisons, baseline, notes)
    check_only_seeds_differ([record for _, _, runs in found for record in records_of(runs)])
    per_seed, every_run = [], {}
    for seed, comparison, runs in found:
        costs = seed_costs(comparison, seed, list(runs), count or comparison.compare.max_examples, penalty)
        every_run.update({f"{name} (seed {seed})": run_costs for name, run_costs in costs.items()})
        per_seed.append((seed, {name: measures(run_costs) for name, run_costs in costs.items()}))
    same_examples(every_run)
    resamples = max(c.compare.resamples for c in comparisons)
    rows, results = across_rows(per_seed, baseline, resamples)
    seeds = [seed for seed, _ in per_seed]
    examples = len(next(iter(every_run.values())))
    return [
        f"Repetition penalty {penalty} on the references, seeds {seeds}, {examples} examples: each seed's "
        f"mean per-example difference to {baseline} (nats per token for the cost; better: the penalty costs "
        f"less, or takes greedy decoding off the reference less often)",
        "",
        *across_table(seeds, baseline, rows, resamples),
        *(f"- {n}" for n in notes + left_out(results, rows, {s: list(v) for s, v in per_seed}, baseline)),
    ]


def main(argv: list[str] | None = None) -> int:
    from nextquill_jax.eval.compare_file import load_comparison

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "config", type=Path, nargs="+", help="a compare file whose runs have finished (several with --across)"
    )
    parser.add_argument("--seed", type=int, help="the seed's runs (default: the file's first)")
    parser.add_argument("--penalty", type=float, default=1.2, help="the repetition penalty (default: 1.2)")
    parser.add_argument("--examples", type=int, help="the split's first N (default: compare.max_examples)")
    parser.add_argument("--baseline", help="pair against this variant (default: compare.baseline)")
    parser.add_argument(
        "--across", action="store_true", help="the paired differences across every finished seed of the files"
    )
    args = parser.parse_args(argv)
    if args.across:
        if args.seed is not None:
            parser.error("--across reports every seed, as one table: leave out --seed")
        try:
            comparisons = [load_comparison(c) for c in args.config]
            print("\n".join(across_report(comparisons, args.baseline, args.examples, args.penalty)))
        except ValueError as e:
            parser.error(str(e))
        return 0
    if len(args.config) > 1:
        parser.error("several compare files are read together only with --across")
    try:
        comparison = load_comparison(args.config[0])
    except ValueError as e:  # ConfigError, naming the file and the fix
        parser.error(str(e))
    plan = comparison.compare
    seed = plan.seeds[0] if args.seed is None else args.seed
    baseline = args.baseline or plan.baseline
    if baseline not in comparison.variants:
        parser.error(f"baseline {baseline!r} is not a variant: {', '.join(comparison.variants)}")
    try:
        costs = seed_costs(
            comparison, seed, list(comparison.variants), args.examples or plan.max_examples, args.penalty
        )
        same_examples(costs)
    except ValueError as e:
        parser.error(str(e))
    print(
        f"Repetition penalty {args.penalty} on the {plan.split} references, seed {seed}, "
        f"{len(costs[baseline])} examples (nats per token; cost = log p - log p_penalised)\n"
    )
    print("\n".join(seed_report(costs, baseline, plan.resamples)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
