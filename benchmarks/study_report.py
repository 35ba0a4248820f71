"""The numbers of a finished `nextquill-jax compare` run as Markdown for benchmarks/STUDY.md, and its health
curves as a PNG.

    python benchmarks/study_report.py configs/study/smollm2_synthetic.yaml --png benchmarks/study_health.png
    python benchmarks/study_report.py --across configs/study/A.yaml configs/study/A_more_seeds.yaml

With several seeds in the compare file it reports one seed, `--seed` (default: the first), so that each seed's
paired intervals can be read apart; compare's own results.md averages over the seeds. `--baseline NAME` pairs
the differences against another finished variant than the file's `compare.baseline` (compare pairs every
variant against that one only), for the intervals between two variants that are not the baseline.

`--across` reads every finished seed of one or more compare files whose runs differ in nothing but the seed
(checked on the settings each run's compare_done.json records) and prints, per variant and metric, each
seed's paired mean difference to the baseline, their mean over the seeds with a Student t interval (n - 1
degrees of freedom; needs two seeds), and a paired bootstrap interval over the examples of each example's
difference averaged over the seeds (`compare_runs` on every seed's runs at once, as compare's own results.md
pools a file's seeds). The two intervals leave out different uncertainties: the t interval treats each
seed's difference as one draw, so it ignores the sampling of the evaluated examples, which every seed shares
(the same examples each time); the bootstrap resamples the examples with the seeds fixed. A verdict ("better",
"worse") needs both to exclude 0, and both to have a width: equal differences at every seed give a t interval
of none, and equal differences at every example (or a single example) a bootstrap interval of none, which
says nothing (`row_verdict`). Under `compare_table.FEW_EXAMPLES` paired examples the table warns, as
compare's results.md does, that the bootstrap intervals are too narrow to trust, and it counts in results.md's
words the pairs the interval over the examples leaves out: not finite, or in one run's data only.

Prints: the comparison table with the paired intervals (`compare_table`, from the finished runs'
`compare_done.json`, so a comparison still running gives the table of what has finished), the teacher-forced
NLL per ground-truth role with and without the history (each run's effect report), the generated text of the
runs that generated (stops at the token limit, length, preference recall, and the references' own recall),
the counterfactual health of every trained run (the without-history CE and the preference-bearing fraction at
its first and last logged step, from `metrics.jsonl`), and the evaluations of the eval split during training
(`metrics.jsonl`'s `eval/` rows: at each epoch's end, so several per run in a multi-epoch comparison); the
`metrics.jsonl` of a `trained_in` variant's run is the one where it trained. The PNG plots the two health
series against the step, one line per variant.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import scipy.stats  # a dependency of jax

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.eval.bootstrap import no_width
from nextquill_jax.eval.compare_file import Comparison, load_comparison
from nextquill_jax.eval.compare_record import settings_changes, trained_differently
from nextquill_jax.eval.compare_table import (
    METRICS,
    NO_WIDTH_VERDICT,
    compare_runs,
    few_examples_line,
    generated,
    left_out_counts,
    markdown,
    recorded_predictions,
    verdict,
)
from nextquill_jax.eval.preference_recall import preference_recall
from nextquill_jax.plural import counted
from nextquill_jax.train.resume import covered, listed_changes, normalised

ROLES = ("preference", "context", "noise", "glue", "eos")
EVAL_COLUMNS = (("eval/ce_with", ".4f"), ("eval/ce_without", ".4f"), ("eval/pref_fraction", ".3f"))
LEVEL = 0.95  # of the t interval across seeds, as of compare's bootstrap intervals
# The settings that tell two seeds' runs apart, and so may differ between the runs of an --across table: the
# seed and what compare derives from the file's compare.out (a run's workdir and its prepared data's path;
# the data's own settings are still compared).
SEED_KEYS = ("train.seed", "data.batching.seed", "train.workdir", "train.data_dir")


def runs_of(comparison: Comparison, seed: int) -> dict[str, Path]:
    """variant -> its finished run directory with `seed`, in the compare file's order."""
    runs = {name: comparison.workdir(name, seed) for name in comparison.variants}
    return {name: run for name, run in runs.items() if (run / "compare_done.json").exists()}


def role_table(runs: dict[str, Path]) -> list[str]:
    lines = ["| variant | " + " | ".join(f"{r} (with / without)" for r in ROLES) + " |"]
    lines.append("| --- |" + " ---: |" * len(ROLES))
    for name, run in runs.items():
        ground_truth = json.loads((run / "effects" / "summary.json").read_text())["ground_truth"]
        nll = {} if ground_truth is None else ground_truth["nll"]  # None: the data labels no roles
        nats = lambda v: "n/a" if v is None else f"{v:.3f}"  # null: not finite (a diverged run)
        cells = [f"{nats(nll[r]['with'])} / {nats(nll[r]['without'])}" if r in nll else "-" for r in ROLES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def generation_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One row per run of `records` (their compare_done.json, `records_of`) that generated
    (`compare_table.generated`): its generations, how many stopped at the token limit rather than at an
    end-of-sequence token (predictions.jsonl's `stopped_by`), their mean length in words (whitespace-split)
    and their preference recall; then the references' own preference recall, the ceiling of a model that
    wrote the user's review word for word. Empty where no run generated; recall "-" (and no ceiling line)
    where the split's rows carry no signature words.

    Raises:
        ValueError: a run's eval directory no longer holds its recorded evaluation (`recorded_predictions`).
    """
    lines, ceilings = [], set()
    for record in records:
        if not generated(record):
            continue
        path = recorded_predictions(record)
        predictions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        at_limit = sum(p["stopped_by"] == "max_new_tokens" for p in predictions)
        words = statistics.fmean(len(p["prediction"].split()) for p in predictions)
        try:
            recall = preference_recall(path, record["rendered_split"])
        except ValueError:  # the split's rows carry no signature words
            recall = None
        else:
            ceilings.add(round(recall["reference"], 12))
        recall_cell = "-" if recall is None else f"{recall['prediction']:.4f}"
        lines.append(
            f"| {record['variant']} | {len(predictions)} | {at_limit} | {words:.1f} | {recall_cell} |"
        )
    if not lines:
        return []
    header = [
        "| variant | generations | stopped at the token limit | mean words | pref. recall |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    ceiling = [f"The references' own preference recall: {c:.4f}." for c in sorted(ceilings)]
    return header + lines + (["", *ceiling] if ceiling else [])


def logged_rows(run: Path) -> list[dict]:
    """Every row of the run's `metrics.jsonl` (none if it has no log)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def health(run: Path) -> list[dict]:
    """The logged training rows that carry the without-history CE."""
    return [r for r in logged_rows(run) if r.get("ce_without") is not None and "loss" in r]


def health_table(runs: dict[str, Path]) -> list[str]:
    lines = [
        "| variant | CE without history: first → last (max) | preference-bearing: first → last |",
        "| --- | ---: | ---: |",
    ]
    for name, run in runs.items():
        rows = health(run)
        if not rows:
            continue
        ce = [r["ce_without"] for r in rows]
        pref = [r.get("pref_fraction") for r in rows]
        pref_text = "-" if pref[0] is None else f"{pref[0]:.3f} → {pref[-1]:.3f}"
        lines.append(f"| {name} | {ce[0]:.3f} → {ce[-1]:.3f} ({max(ce):.3f}) | {pref_text} |")
    return lines


def evaluations(run: Path) -> list[dict]:
    """The run's evaluations during training: `metrics.jsonl`'s rows with `eval/ce_with`, in step order."""
    return sorted((r for r in logged_rows(run) if r.get("eval/ce_with") is not None), key=lambda r: r["step"])


def evaluation_table(runs: dict[str, Path]) -> list[str]:
    """One row per evaluation during training: the eval split's target CE with and without the history
    (nats per token, token-weighted) and its preference-bearing fraction; "-" where the run's loss does not
    compute it (context_sft has no without-history pass)."""
    lines = [
        "| variant | step | CE with history | CE without history | preference-bearing |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, run in runs.items():
        for r in evaluations(run):
            cells = [f"{r[k]:{spec}}" if r.get(k) is not None else "-" for k, spec in EVAL_COLUMNS]
            lines.append(f"| {name} | {r['step']} | " + " | ".join(cells) + " |")
    return lines


def records_of(runs: dict[str, Path]) -> list[dict]:
    """The compare_done.json record of each run in `runs`, in its order."""
    return [json.loads((run / "compare_done.json").read_text()) for run in runs.values()]


def other_settings(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per run whose recorded settings differ, beyond `SEED_KEYS`, the variant's `trained_in`, the
    keys that change no number (logging, checkpointing, the mesh) and the non-finite policy where one of the
    two runs skipped no update (`compare_record.trained_differently`), from those of the first run of its
    variant in `records`: the run and each differing key, the first run's value first. Empty when the runs
    differ only in the seed.

    Raises:
        ValueError: a record without its settings (written before compare recorded them), with the fix.
    """
    first: dict[str, Mapping[str, Any]] = {}
    lines = []
    for record in records:
        if "settings" not in record:
            raise ValueError(
                f"{record['variant']} (seed {record.get('seed')}): its compare_done.json predates recorded "
                f"settings, so the seeds' runs cannot be checked to differ only in the seed. Fix: run its "
                f"compare file again, which records them"
            )
        reference = first.setdefault(record["variant"], record)
        current = {**record["settings"], "config": normalised(record["settings"]["config"])}
        training, evaluation = settings_changes(reference["settings"], current, record["variant"])
        # A run that skipped no update trained as under any non-finite policy, so it fits the other's.
        training = trained_differently(reference, trained_differently(record, training))
        # Where each seed's run trained (`trained_in`) tells the seeds apart as their workdirs do.
        trained_in = f"variants.{record['variant']}.trained_in"
        changes = [c for c in training + evaluation if not covered(c[0], SEED_KEYS) and c[0] != trained_in]
        if changes:
            lines.append(
                f"{record['variant']} (seed {record['seed']}) against seed {reference['seed']}: "
                f"{listed_changes(changes)}"
            )
    return lines


def t_quantile(n: int) -> float:
    """The Student t quantile of the two-sided `LEVEL` interval of a mean of `n` >= 2 values."""
    return float(scipy.stats.t.ppf(0.5 + LEVEL / 2, n - 1))


def across_seeds(
    results: Sequence[tuple[int, Mapping[str, Any]]],
    pooled: Mapping[str, Any] | None = None,
    metrics: Sequence[tuple[str, str, bool]] = METRICS,
) -> list[dict]:
    """Per variant and metric of `metrics` ((key, label, higher_is_better); `compare_table.METRICS` by
    default) with a paired difference in every seed's `compare_runs` result (`results`: (seed, result) pairs,
    one per seed, or another script's per-seed differences in that form): {"variant", "metric", "label",
    "higher_is_better", "per_seed": [each seed's mean difference], "mean": their mean, "low", "high": the
    Student t interval of that mean at `LEVEL` (`t_quantile` x sample std / sqrt(n); None with one seed),
    "examples_low", "examples_high", "examples": the paired bootstrap interval of `pooled` (`compare_runs` on
    every seed's records at once: each example's difference averaged over the seeds, resampled over the
    examples) and its example count, and "nonfinite", "unpaired", "other_content": the pairs that interval
    leaves out (`compare_runs`'s counts; each None without `pooled` or where it has no difference)}, in the
    first result's variant order and `metrics` order. Differences are in the metric's units (nats for NLL)."""
    pooled_differences = {} if pooled is None else pooled["differences"]
    rows = []
    first = results[0][1]["differences"]
    for variant in first:
        for metric, label, higher_is_better in metrics:
            per_seed = [r["differences"].get(variant, {}).get(metric) for _, r in results]
            if None in per_seed:
                continue
            values = [d["mean"] for d in per_seed]
            n, mean = len(values), statistics.fmean(values)
            half = None
            if n > 1:
                half = t_quantile(n) * statistics.stdev(values) / math.sqrt(n)
            over_examples = pooled_differences.get(variant, {}).get(metric, {})
            rows.append(
                {
                    "variant": variant,
                    "metric": metric,
                    "label": label,
                    "higher_is_better": higher_is_better,
                    "per_seed": values,
                    "mean": mean,
                    "low": None if half is None else mean - half,
                    "high": None if half is None else mean + half,
                    "examples_low": over_examples.get("low"),
                    "examples_high": over_examples.get("high"),
                    "examples": over_examples.get("examples"),
                    **{k: over_examples.get(k) for k in ("nonfinite", "unpaired", "other_content")},
                }
            )
    return rows


def row_verdict(row: Mapping[str, Any]) -> str:
    """The verdict on an `across_seeds` row: "better" or "worse" (in the metric's direction) where its t
    interval and its interval over the examples (where the row has one) both exclude 0, "no significant
    difference" where either holds 0, and "no interval" with one seed. "No verdict" where an interval has no
    width (`no_width`), which says nothing of the uncertainty: "the seeds agree exactly" where every seed's
    difference is the same number (the t statistic is infinite, which a metric of few discrete values, a
    recall over few words, reaches by coincidence, not by precision), and "the examples' differences agree
    exactly" where every paired example's seed-averaged difference is the same, as with a single example
    (every bootstrap resample draws the same mean)."""
    if row["low"] is None:
        return "no interval"
    if no_width(row["low"], row["high"]):
        return "no verdict: the seeds agree exactly"
    intervals = [(row["low"], row["high"])]
    if row["examples_low"] is not None:
        if no_width(row["examples_low"], row["examples_high"]):
            return NO_WIDTH_VERDICT
        intervals.append((row["examples_low"], row["examples_high"]))
    significant = not any(low <= 0.0 <= high for low, high in intervals)
    return verdict(row["mean"], significant, row["higher_is_better"])


def across_table(
    seeds: Sequence[int], baseline: str, rows: Sequence[Mapping[str, Any]], resamples: int | None = None
) -> list[str]:
    """`across_seeds` rows as Markdown: one column per seed, the mean with its t interval, the interval over
    the examples ("-" where the row has none) and the verdict (`row_verdict`); `resamples`, the bootstrap's,
    goes into the note below the table, then a line per row whose interval over the examples leaves pairs out
    (`left_out_counts`, as compare's results.md words it) and under `compare_table.FEW_EXAMPLES` paired
    examples its warning (`few_examples_line`)."""
    n = len(seeds)
    lines = [
        f"| difference to {baseline} | "
        + " | ".join(f"seed {s}" for s in seeds)
        + f" | mean over seeds [{LEVEL:.0%} t interval] | over the examples [{LEVEL:.0%} paired bootstrap] |"
        + " verdict |",
        "| --- |" + " ---: |" * (n + 2) + " --- |",
    ]
    for row in rows:
        interval = "" if row["low"] is None else f" [{row['low']:+.4f}, {row['high']:+.4f}]"
        over_examples = (
            "-"
            if row["examples_low"] is None
            else f"[{row['examples_low']:+.4f}, {row['examples_high']:+.4f}]"
        )
        cells = [f"{v:+.4f}" for v in row["per_seed"]]
        cells += [f"{row['mean']:+.4f}{interval}", over_examples, row_verdict(row)]
        lines.append(f"| {row['variant']}, {row['label']} | " + " | ".join(cells) + " |")
    if n > 1:
        t, freedom = t_quantile(n), f"{n - 1} degree{'s' if n > 2 else ''} of freedom"
        lines += ["", f"t = {t:.3f} ({freedom}) over seeds {list(seeds)}."]
    counts = sorted({row["examples"] for row in rows if row["examples"] is not None})
    if counts:
        examples = "/".join(f"{c:,}" for c in counts)
        drawn = "" if resamples is None else f", {resamples:,} resamples"
        lines += [
            "",
            f"Over the examples: each of the {examples} paired examples' difference averaged over the seeds, "
            f"resampled over the examples{drawn}. The t interval leaves out the sampling of the evaluated "
            "examples, which every seed shares; this one leaves out the seeds': a verdict needs both to "
            "exclude 0.",
        ]
    # The pairs the interval over the examples leaves out (not finite, in one run's data only) are counted,
    # as compare's results.md counts them, not left for the reader to find in each seed's results.
    left = [
        f"- {row['variant']}, {row['label']}, over the examples: {counted(row['examples'], 'example')}"
        f"{counts}"
        for row in rows
        if row["examples"] is not None and (counts := left_out_counts(row))
    ]
    if left:
        lines += ["", *left]
    few = few_examples_line(row["examples"] for row in rows if row["examples"] is not None)
    if few is not None:
        lines += ["", few]
    return lines


def seed_runs(
    comparisons: Sequence[Comparison], baseline: str, notes: list[str]
) -> list[tuple[int, Comparison, dict[str, Path]]]:
    """(seed, its comparison, its finished runs: `runs_of`) for every seed of `comparisons` whose `baseline`
    has finished, in file and seed order; appends to `notes` a line per seed with runs not finished.

    Raises:
        ValueError: one seed in two files (it would count one draw as two), or no seed with its baseline
            finished.
    """
    seen: dict[int, str] = {}
    found = []
    for comparison in comparisons:
        for seed in comparison.compare.seeds:
            if seed in seen:
                raise ValueError(
                    f"seed {seed} is in {seen[seed]} and {comparison.source}: the same seed twice would "
                    f"count one draw as two. Fix: give each file other seeds"
                )
            seen[seed] = comparison.source
            runs = runs_of(comparison, seed)
            missing = [name for name in comparison.variants if name not in runs]
            if missing:
                notes.append(f"seed {seed} ({comparison.source}): not finished: {', '.join(missing)}")
            if baseline in runs:
                found.append((seed, comparison, runs))
    if not found:
        raise ValueError("no seed of these files has its baseline finished: nothing to compare yet")
    return found


def check_only_seeds_differ(records: Sequence[Mapping[str, Any]]) -> None:
    """Raises ValueError, naming each run and key (`other_settings`), where the runs of `records` (their
    compare_done.json) differ in more than the seed: their differences would not be draws of one
    experiment."""
    differing = other_settings(records)
    if differing:
        raise ValueError(
            "the runs differ in more than the seed, so their differences are not draws of one "
            "experiment: " + "; ".join(differing)
        )


def across_report(comparisons: Sequence[Comparison], baseline: str | None = None) -> list[str]:
    """The `--across` report of `comparisons`' finished seeds (see the module docstring), paired against
    `baseline` (None: the files' `compare.baseline`).

    Raises:
        ValueError: `baseline` is no variant of the files, the files name different baselines (and
            `baseline` is None) or one seed twice, no seed has its baseline finished, a record lacks its
            settings, or runs differ in more than the seed (`other_settings`), each saying which.
    """
    baseline = table_baseline(comparisons, baseline)
    results, records, notes, finished = [], [], [], {}
    for seed, comparison, runs in seed_runs(comparisons, baseline, notes):
        seed_records = records_of(runs)
        records += seed_records
        results.append((seed, compare_runs(seed_records, baseline, comparison.compare.resamples)))
        finished[seed] = list(runs)
    check_only_seeds_differ(records)
    resamples = max(c.compare.resamples for c in comparisons)
    rows = across_seeds(results, compare_runs(records, baseline, resamples))
    table = across_table([seed for seed, _ in results], baseline, rows, resamples)
    return table + [f"- {n}" for n in notes + left_out(results, rows, finished, baseline)]


def table_baseline(comparisons: Sequence[Comparison], baseline: str | None) -> str:
    """`baseline`, or where None the `compare.baseline` that every file of `comparisons` names.

    Raises:
        ValueError: `baseline` is no variant of the files (naming theirs), or it is None and the files name
            different baselines (--baseline NAME picks one).
    """
    if baseline is not None:
        variants = dict.fromkeys(name for c in comparisons for name in c.variants)
        if baseline not in variants:
            raise ValueError(
                f"baseline {baseline!r} is not a variant of these files: {', '.join(variants)}. Fix: "
                f"--baseline one of them"
            )
        return baseline
    baselines = {c.compare.baseline for c in comparisons}
    if len(baselines) > 1:
        raise ValueError(
            f"the compare files name different baselines, {sorted(baselines)}: a table has one "
            f"(--baseline NAME picks it)"
        )
    return baselines.pop()


def left_out(
    results: Sequence[tuple[int, Mapping[str, Any]]],
    rows: Sequence[Mapping[str, Any]],
    finished: Mapping[int, Iterable[str]],
    baseline: str,
) -> list[str]:
    """A line per variant finished at some seed of `results` (`finished`: seed -> the variants finished
    there) but with no row in `rows` (`across_seeds` needs a paired difference at every seed): the seeds it
    finished in, where it lacks others, and those where it has no paired difference to `baseline` (no
    example shared with it, or no finite value)."""
    in_rows = {row["variant"] for row in rows}
    plural = lambda seeds: f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    lines = []
    for variant in dict.fromkeys(v for seed, _ in results for v in finished[seed]):
        if variant == baseline or variant in in_rows:
            continue
        present = [seed for seed, _ in results if variant in finished[seed]]
        unpaired = [
            seed for seed, result in results if seed in present and not result["differences"].get(variant)
        ]
        if not unpaired:
            lines.append(f"{variant}: left out, finished in {plural(present)} only")
            continue
        lacking = f" (finished in {plural(present)} only)" if len(present) < len(results) else ""
        lines.append(
            f"{variant}: left out, no paired difference to {baseline} at {plural(unpaired)}{lacking}"
        )
    return lines


def plot(runs: dict[str, Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for k, (name, run) in enumerate(runs.items()):
        rows = health(run)
        if rows:  # one colour per variant in both panels
            steps = [r["step"] for r in rows]
            axes[0].plot(steps, [r["ce_without"] for r in rows], label=name, color=f"C{k}")
            if rows[0].get("pref_fraction") is not None:
                axes[1].plot(steps, [r["pref_fraction"] for r in rows], label=name, color=f"C{k}")
    axes[0].set(xlabel="step", ylabel="target CE without history (nats)", title="without-history stream")
    axes[1].set(xlabel="step", ylabel="share of target tokens with DCE > δ", title="preference-bearing")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, nargs="+", help="the compare file (several with --across)")
    parser.add_argument("--png", type=Path, help="write the health curves here")
    parser.add_argument("--seed", type=int, help="the seed to report (default: the compare file's first)")
    parser.add_argument(
        "--across", action="store_true", help="the differences across every finished seed of the files"
    )
    parser.add_argument(
        "--baseline", help="pair the differences against this variant (default: the file's compare.baseline)"
    )
    args = parser.parse_args(argv)
    if args.across:
        if args.png or args.seed is not None:
            parser.error("--across reports every seed, as one table: leave out --png and --seed")
        try:
            print("\n".join(across_report([load_comparison(c) for c in args.config], args.baseline)))
        except ValueError as e:
            parser.error(str(e))
        return 0
    if len(args.config) > 1:
        parser.error("several compare files are read together only with --across")
    try:
        comparison = load_comparison(args.config[0])
    except ValueError as e:  # ConfigError, naming the file and the fix
        parser.error(str(e))
    seeds = comparison.compare.seeds
    if args.seed is not None and args.seed not in seeds:
        parser.error(f"--seed {args.seed}: {args.config[0]} runs seeds {seeds}")
    seed = seeds[0] if args.seed is None else args.seed
    runs = runs_of(comparison, seed)
    baseline = args.baseline or comparison.compare.baseline
    if baseline not in runs:
        parser.error(
            f"baseline {baseline!r} has no finished run with seed {seed} in {args.config[0]}; finished: "
            f"{', '.join(runs) or 'none'}"
        )
    records = records_of(runs)
    result = compare_runs(records, baseline, comparison.compare.resamples)
    # The training logs are where each run trained: under a `trained_in` variant's other comparison.
    trained = {name: comparison.trained_workdir(name, seed) for name in runs}
    sections = [
        "### Table",
        "",
        markdown(result).rstrip(),
        "",
        "### Teacher-forced NLL per ground-truth role (nats per token; effect-report examples)",
        "",
        *role_table(runs),
        "",
        "### Generated text (the first `compare.max_examples` examples)",
        "",
        *(generation_table(records) or ["No run generated text (max_new_tokens 0)."]),
        "",
        "### Counterfactual health during training",
        "",
        *health_table(trained),
        "",
        "### The eval split during training (nats per token)",
        "",
        *evaluation_table(trained),
    ]
    print("\n".join(sections))
    if args.png:
        plot(trained, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
