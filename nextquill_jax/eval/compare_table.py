"""A comparison's table: per-example metrics of every run, means (± std across seeds), and each variant's
difference to the baseline with a paired bootstrap interval (`bootstrap.paired_bootstrap`).

Which examples each column covers: ROUGE-1/L, METEOR, preference recall and BLEU the split's first
`compare.max_examples` (the evaluation); the NLL columns and the DCE AUROC its first `compare.effect_examples`
(the effect report). A column's mean is, per seed, the mean over examples of each example's value (an
example's NLL being the mean over its target tokens and the end-of-sequence token appended to them, cut
target or not; its preference NLL over the preference tokens alone), then the mean over seeds: a mean of
per-example means, which differs from effects/summary.json's `nll`, which pools every target token
(token-weighted). BLEU is the evaluation's corpus BLEU and the DCE AUROC the effect report's
(`ground_truth.auroc`), each averaged over seeds. "± std" is the sample standard deviation (n - 1) of the
per-seed means, shown with two seeds or more beside a finite mean (a seed's NaN mean makes both NaN: "n/a").

Per example (the pairs of the bootstrap): ROUGE-1, ROUGE-L and METEOR from the run's predictions.jsonl;
preference recall where the split's rows carry `meta.signature_words`; from the effect report, the target
NLL with and without the history and, where targets carry ground-truth roles, the NLL of the preference tokens
with the history. Each example's value is first averaged over the seeds; a metric's interval is over the
examples every run has, paired by example (`example_keys`: its id and a digest of its user and target text),
not by position, since variants whose data was prepared differently number the examples differently, and not
by id alone, since such a variant's data may hold another example under the same id (another synthetic seed).
BLEU (a corpus statistic) and the DCE AUROC (one statistic over the tokens of all examples) come without an
interval: results.md says so under the differences (`NO_INTERVAL`).

A run evaluated with `max_new_tokens` 0 generated nothing (`generated`): its ROUGE, METEOR, preference recall
and BLEU are absent (not 0), so its row has none and no difference is drawn for them. results.md leaves out a
column no run has, and says why (`left_out_line`): no run generated, rows without signature words, or
targets without ground-truth preference tokens; a "-" cell, a column only that variant's runs lack, gets a
line with its reason too (`not_measured_line`).

A run's predictions.jsonl is read from its `eval_dir`, which `nextquill-jax evaluate --workdir RUN` also
writes by default: before reading it, its metrics.json must hold the BLEU the run's record does, so that the
files of another evaluation are never paired with the record's numbers (`recorded_predictions`); its
effect report must be the one the record's digest names (`recorded_effects`). A DCE AUROC a report leaves
undefined (null: its scored tokens hold no preference token, or nothing else) is "n/a" too, and a line under
the table says so, since "n/a" otherwise marks a diverged run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from nextquill_jax.atomic_file import write_text_atomic
from nextquill_jax.data.checksums import file_digest
from nextquill_jax.eval.bootstrap import no_width, paired_bootstrap
from nextquill_jax.eval.preference_recall import preference_recall
from nextquill_jax.plural import counted

# (metric, column header, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("rouge1", "ROUGE-1", True),
    ("rougeL", "ROUGE-L", True),
    ("meteor", "METEOR", True),
    ("preference_recall", "pref. recall", True),
    ("preference_nll_with", "pref. NLL", False),
    ("nll_with", "NLL (with hist.)", False),
    ("nll_without", "NLL (without)", False),
)
# Why a column is empty in every row, as results.md says it. The text metrics are absent from every run that
# did not generate; preference recall where the split's rows lack signature words (`preference_recall`
# raises); the preference NLL and the DCE AUROC where the targets have no ground-truth preference tokens
# (the effect report's `ground_truth` is None without `meta.target_spans`).
_TEXT_METRICS = frozenset({"rouge1", "rougeL", "meteor", "preference_recall", "bleu"})
_NOT_GENERATED = "no run generated text: max_new_tokens 0"
_ROW_NOT_GENERATED = "generated no text: max_new_tokens 0"
_NO_ROLES = "no ground-truth preference tokens: meta.target_spans"
_LEFT_OUT_BECAUSE = {
    "preference_recall": "rows without meta.signature_words",
    "preference_nll_with": _NO_ROLES,
    "dce_auroc": _NO_ROLES,
}
# The columns without a difference to the baseline, and why: a paired bootstrap resamples per-example values,
# and these are each one statistic of the whole run.
NO_INTERVAL = (
    ("bleu", "BLEU", "a corpus statistic"),
    ("dce_auroc", "DCE AUROC", "one AUROC over the tokens of all examples"),
)
# Below this many paired examples results.md warns that its intervals are too narrow to trust (a rule of
# thumb for the percentile bootstrap, whose coverage falls short of 95% on small samples).
FEW_EXAMPLES = 30
# The verdict where an interval over the examples excludes 0 but has no width (`bootstrap.no_width`).
NO_WIDTH_VERDICT = "no verdict: the examples' differences agree exactly"


def read_number(value: float | None) -> float:
    """A number the effect report or compare_done.json wrote: null there is a non-finite value
    (`json_object.nonfinite_to_null`, as strict JSON must write it), read back as NaN."""
    return math.nan if value is None else value


class ExampleKey(NamedTuple):
    """An example as a comparison pairs it across runs: `id` (the row's `id`, or where a source gives none,
    its `source`) and `content` (`example_content`). Two runs' examples pair when both agree: a variant whose
    `data` overrides prepare other examples (another `synthetic_seed`) may hold another example under the
    same id."""

    id: str
    content: str


def example_content(row: Mapping[str, Any]) -> str:
    """A digest (16 hex digits of SHA-256) of what makes a prepared row the example it is: its user and its
    target text (the record's, before any cut). Not the prompts, nor `source`, nor `tokens`: a variant's data
    settings (template, chat template, history kept, tokenizer, cut lengths, the data's file names) change
    those for the same example, which its runs must still pair on."""
    identity = json.dumps([row.get("user_id"), row.get("target")], ensure_ascii=False)
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


def example_key(row: Mapping[str, Any]) -> ExampleKey:
    """The key of a prepared row (a line of `<split>.jsonl`): its `id`, or its `source`, and its
    `example_content`."""
    return ExampleKey(row.get("id") or row["source"], example_content(row))


def example_keys(rendered_split: str | Path) -> dict[int, ExampleKey]:
    """{row index: the example's key} of a prepared `<split>.jsonl` (`ExampleKey`: its `id`, or where a
    source gives none its `source`, the file:line its target came from; and `example_content`). Runs whose
    data was prepared differently (a variant's `data` overrides) number the same example differently; its key
    names it in all of them.

    Raises:
        ValueError: two rows with one id (naming the file and the id): their values could not be paired.
    """
    keys: dict[int, ExampleKey] = {}
    with open(rendered_split, encoding="utf-8") as f:
        for row in map(json.loads, filter(str.strip, f)):
            keys[row["index"]] = example_key(row)
    repeated = [k for k, n in Counter(key.id for key in keys.values()).items() if n > 1]
    if repeated:
        raise ValueError(
            f"{rendered_split}: examples share the id {repeated[0]!r}, so compare cannot pair them across "
            f"runs. Fix: give every record of the data a unique `id`."
        )
    return keys


def generated(record: Mapping[str, Any]) -> bool:
    """Whether the run of `record` (`compare.run_variant`'s) generated, so that it has text metrics: a run
    evaluated with `max_new_tokens` 0 records no BLEU and has no predictions.jsonl."""
    return "bleu" in record


def recorded_predictions(record: Mapping[str, Any]) -> Path:
    """The path of the run's predictions.jsonl, checked to belong to the evaluation `record`
    (`compare.run_variant`'s, of a run that generated) was made from: its metrics.json gives the record's
    BLEU.

    Raises:
        ValueError: the run's eval directory no longer holds that evaluation (its metrics.json is absent, or
            gives another BLEU than the record): another evaluation (`nextquill-jax evaluate` on the run's
            workdir, whose default --out it is) replaced or deleted it; naming the directory and the fix.
    """
    eval_dir = Path(record["eval_dir"])
    predictions, none = eval_dir / "predictions.jsonl", object()
    try:
        overall = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))["overall"]
        held = overall["bleu"]  # null: a diverged run's NaN, as the record writes it
    except (OSError, ValueError, KeyError, TypeError):  # absent (mid-evaluation), unreadable, or no text
        held = none
    present = predictions.is_file()
    if held is none or held != record["bleu"] or not present:
        done = eval_dir.parent.parent / "compare_done.json"
        there = "no BLEU" if held is none else f"BLEU {held}"
        raise ValueError(
            f"{eval_dir} no longer holds the evaluation {done} records (BLEU {record['bleu']}; there: "
            f"{there}, predictions.jsonl {'present' if present else 'absent'}): another evaluation wrote to "
            f"it since, such as `nextquill-jax evaluate` on the run without --out. Fix: delete {done} and "
            f"run compare again, which evaluates the run again without training it."
        )
    return predictions


def recorded_effects(record: Mapping[str, Any]) -> dict[str, Any]:
    """The run's effect report (its summary.json), checked to be the one `record` (`compare.run_variant`'s)
    was made with: the summary's BLAKE2b digest is the record's `effects_blake2b` (a record written before
    it held one is not checked).

    Raises:
        ValueError: the summary is absent, unreadable, or another report (`nextquill-jax effects` with
            `--out` the run's effects/ directory replaced it: another split, examples or step); naming the
            file and the fix.
    """
    path = Path(record["effects_summary"])
    done = path.parent.parent / "compare_done.json"
    fix = f"Fix: delete {done} and run compare again, which reports the run again without training it."
    try:
        digest = file_digest(path) if "effects_blake2b" in record else None
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        state = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e})"
        raise ValueError(f"{path}, the effect report {done} records, {state}. {fix}") from None
    if digest is not None and digest != record["effects_blake2b"]:
        raise ValueError(
            f"{path} is no longer the effect report {done} records (another content: another report was "
            f"written there since, such as `nextquill-jax effects --out` the run's effects directory). {fix}"
        )
    return summary


def per_example_metrics(
    record: Mapping[str, Any], report: Mapping[str, Any]
) -> dict[str, dict[ExampleKey, float]]:
    """{metric: {example key: value}} of one run (`compare.run_variant`'s record, and its effect report's
    summary, `recorded_effects`), in the split's order: each example keyed by `example_keys` of the run's
    prepared split, so that runs pair on the same example. A run that did not generate (`generated`) has no
    ROUGE, METEOR or preference recall: absent, not 0.

    Raises:
        ValueError: two examples share a key (`example_keys`), or the run's eval directory no longer holds
            the evaluation the record was made from (`recorded_predictions`).
    """
    keys = example_keys(record["rendered_split"])
    by_key = lambda values: {keys[i]: values[i] for i in sorted(values)}
    out: dict[str, dict[str, float]] = {}
    if generated(record):
        path = recorded_predictions(record)
        with open(path, encoding="utf-8") as f:
            predictions = [json.loads(line) for line in f if line.strip()]
        for m in ("rouge1", "rougeL", "meteor"):
            out[m] = by_key({p["index"]: p[m] for p in predictions})
        with contextlib.suppress(ValueError):  # raised where the data has no signature words
            recall = preference_recall(path, record["rendered_split"])
            out["preference_recall"] = by_key(recall["per_example"])
    for metric in ("nll_with", "nll_without", "preference_nll_with"):
        values = {e["index"]: read_number(e[metric]) for e in report["per_example"] if metric in e}
        if values:
            out[metric] = by_key(values)
    return out


def _seed_mean(runs: Sequence[dict[ExampleKey, float]]) -> dict[ExampleKey, float]:
    """Each example's value averaged over the seeds' runs, for the examples every run has, in the first
    run's order."""
    common = set.intersection(*(set(r) for r in runs))
    return {k: statistics.fmean(r[k] for r in runs) for k in runs[0] if k in common}


def _sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n - 1) of `values` (two or more seeds' means), NaN where one is not
    finite: a diverged run's NaN mean makes the std as unknown as the mean, and `statistics.stdev` raises on
    NaN and inf rather than returning it."""
    return statistics.stdev(values) if all(math.isfinite(v) for v in values) else math.nan


def compare_runs(
    records: Sequence[Mapping[str, Any]], baseline: str, resamples: int = 2000
) -> dict[str, Any]:
    """Rows (per variant: metric means, their sample std across seeds, BLEU, DCE AUROC), differences to
    `baseline` (per variant and metric: `PairedDifference` as a dict, with `nonfinite`, the pairs left out
    because a value is not finite, `unpaired`, the examples only one of the two runs evaluated, and
    `other_content`, the ids both runs hold for different examples (`ExampleKey`), each id's two examples
    among `unpaired`; no entry where no finite pair is left) and `not_paired` (per variant and metric whose
    runs share no example with the baseline's: {unpaired, other_content}) from run records. A metric some run
    of a variant lacks (the text metrics and BLEU of runs that did not generate, `generated`) is absent from
    its row and has no difference. A null number in a run's files (a non-finite value, `read_number`) makes
    its means NaN, and their std across seeds with them."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    examples = {r["variant"]: [] for r in records}
    ground_truth = {}  # (variant, seed) -> its effect report's `ground_truth`
    for r in records:
        report = recorded_effects(r)  # read and checked once per run
        ground_truth[r["variant"], r["seed"]] = report["ground_truth"]
        examples[r["variant"]].append((r, per_example_metrics(r, report)))
    rows, differences, not_paired = [], {}, {}
    for name in variants:
        runs = examples[name]
        row: dict[str, Any] = {"variant": name, "seeds": [r["seed"] for r, _ in runs]}
        for metric, _, _ in METRICS:
            per_seed = [m[metric] for _, m in runs if metric in m]
            if len(per_seed) != len(runs):
                continue
            seed_means = [statistics.fmean(v.values()) for v in per_seed]
            row[metric] = statistics.fmean(seed_means)
            row[f"{metric}_std"] = _sample_std(seed_means) if len(seed_means) > 1 else None
        if all(generated(r) for r, _ in runs):
            row["bleu"] = statistics.fmean(read_number(r["bleu"]) for r, _ in runs)
        aurocs = [ground_truth[name, r["seed"]] for r, _ in runs]
        row["dce_auroc"] = (
            None if None in aurocs else statistics.fmean(read_number(g["auroc"]) for g in aurocs)
        )
        if row["dce_auroc"] is not None:  # the tokens of a diverged model's NaN DCE are not in the AUROC
            row["dce_auroc_nonfinite"] = sum(g.get("nonfinite_tokens", 0) for g in aurocs)
            # A report's null AUROC: its scored tokens held no preference token, or nothing else (n/a, which
            # alone reads as a diverged run's).
            row["dce_auroc_undefined"] = sum(g["auroc"] is None for g in aurocs)
        rows.append(row)
    base_runs = examples[baseline]
    for name in variants:
        if name == baseline:
            continue
        differences[name] = {}
        for metric, _, _ in METRICS:
            ours = [m.get(metric) for _, m in examples[name]]
            theirs = [m.get(metric) for _, m in base_runs]
            if None in ours or None in theirs:
                continue
            a, b = _seed_mean(ours), _seed_mean(theirs)
            # Paired by example key (id and content), in the baseline's split order. A diverged run's NaN
            # (null in its files) has no difference: its pairs are left out, counted.
            paired = [k for k in b if k in a]
            unmatched = {
                # Examples only one of the two evaluated (their data was prepared differently) ...
                "unpaired": len(a.keys() | b.keys()) - len(paired),
                # ... among them those whose id the other run holds for another example.
                "other_content": len({k.id for k in a} & {k.id for k in b}) - len(paired),
            }
            if not paired:  # no example in common: results.md says so (`not_paired_lines`)
                not_paired.setdefault(name, {})[metric] = unmatched
                continue
            common = [k for k in paired if math.isfinite(a[k]) and math.isfinite(b[k])]
            if not common:  # nothing to compare: the table shows the run's mean as n/a
                continue
            diff = paired_bootstrap([a[i] for i in common], [b[i] for i in common], resamples=resamples)
            left_out = len(paired) - len(common)
            differences[name][metric] = {
                **diff.__dict__,
                # A verdict only where the interval has width (`bootstrap.no_width`): one example's, or
                # examples that all differ by the same amount, exclude 0 while saying nothing.
                "significant": diff.significant and diff.has_width,
                "nonfinite": left_out,
                **unmatched,
            }
    return {"baseline": baseline, "rows": rows, "differences": differences, "not_paired": not_paired}


def conclusions(result: Mapping[str, Any]) -> list[str]:
    """One sentence per variant and metric: better / worse than the baseline where the interval excludes 0,
    "no significant difference" where it covers 0, "no verdict" where it excludes 0 but has no width
    (`difference_verdict`)."""
    lines = []
    for name, metrics in result["differences"].items():
        for metric, header, higher_better in METRICS:
            if metric not in metrics:
                continue
            d = metrics[metric]
            examples = counted(d["examples"], "example")
            interval = f"{interval_text(d)}, {examples}{left_out_counts(d)}"
            word = difference_verdict(d, higher_better)
            lines.append(f"{name} vs {result['baseline']} on {header}: {word} ({interval})")
    return lines


def left_out_counts(d: Mapping[str, int]) -> str:
    """What a difference (`compare_runs`'s: `examples`, `nonfinite`, `unpaired`, `other_content`) leaves out
    of its interval, as results.md gives it after the count of examples: ", N left out: not finite" for the
    pairs with a value that is not finite, ", P paired of T: why" (`_unpaired_reason`) where some examples are
    in one run's data only; "" where it leaves out none."""
    text = f", {d['nonfinite']} left out: not finite" if d["nonfinite"] else ""
    if d["unpaired"]:
        paired = d["examples"] + d["nonfinite"]
        text += f", {paired} paired of {paired + d['unpaired']}: {_unpaired_reason(d)}"
    return text


def interval_text(d: Mapping[str, Any]) -> str:
    """ "mean [low, high]" of a paired difference (`compare_runs`' or a `PairedDifference`'s fields, in the
    metric's units), signed, to 4 decimals; to 3 significant digits in scientific notation where a mean or
    bound that is not 0 would print as 0.0000, so that an interval excluding 0 never reads as one at 0."""
    values = (d["mean"], d["low"], d["high"])
    spec = "+.2e" if any(0 < abs(x) < 5e-5 for x in values) else "+.4f"
    mean, low, high = (format(x, spec) for x in values)
    return f"{mean} [{low}, {high}]"


def difference_verdict(d: Mapping[str, Any], higher_is_better: bool) -> str:
    """The word for a paired difference (`mean`, `low`, `high`: `compare_runs`' or a `PairedDifference`'s
    fields): `NO_WIDTH_VERDICT` where its interval excludes 0 but has no width (`bootstrap.no_width`), else
    `verdict`'s (an interval of no width at 0, every pair equal, is "no significant difference")."""
    excludes_zero = not d["low"] <= 0.0 <= d["high"]
    if excludes_zero and no_width(d["low"], d["high"]):
        return NO_WIDTH_VERDICT
    return verdict(d["mean"], excludes_zero, higher_is_better)


def verdict(mean: float, significant: bool, higher_is_better: bool) -> str:
    """The word for a difference `mean` (variant - baseline, in the metric's units) whose interval excludes 0
    where `significant`: "better" or "worse" in the metric's direction (`higher_is_better`, as `METRICS`
    gives it), else "no significant difference"."""
    if not significant:
        return "no significant difference"
    return "better" if (mean > 0) == higher_is_better else "worse"


def _unpaired_reason(counts: Mapping[str, int]) -> str:
    """Why `counts["unpaired"]` examples (`compare_runs`'s) are not paired: each of the `other_content` ids
    names one example in each run (two of them), the rest are in one run's data only."""
    same_id = 2 * counts["other_content"]
    parts = [f"{same_id} share an id but not their content (user, target text)"] if same_id else []
    if counts["unpaired"] > same_id:
        parts.append(
            "the rest in one run's data only"
            if not same_id
            else f"{counts['unpaired'] - same_id} in one run's data only"
        )
    return ", ".join(parts)


def not_paired_lines(result: Mapping[str, Any]) -> list[str]:
    """results.md's lines for the metrics drawn no difference because their runs share no example with the
    baseline's (`compare_runs`'s `not_paired`): per variant, one line per group of metrics with the same
    counts."""
    headers = {metric: header for metric, header, _ in METRICS}
    lines = []
    for name, metrics in result["not_paired"].items():
        groups: dict[tuple[int, int], list[str]] = {}
        for metric, counts in metrics.items():
            groups.setdefault((counts["unpaired"], counts["other_content"]), []).append(headers[metric])
        for (unpaired, other), names in groups.items():
            reason = _unpaired_reason({"unpaired": unpaired, "other_content": other})
            lines.append(
                f"{name} vs {result['baseline']} on {', '.join(names)}: not compared, no example is in both "
                f"runs' data ({unpaired} examples: {reason})"
            )
    return lines


def _cell(value: float | None, spec: str) -> str:
    """A table cell: "-" where the metric is absent, "n/a" where it is not finite (a diverged run's NaN)."""
    if value is None:
        return "-"
    return format(value, spec) if math.isfinite(value) else "n/a"


def _with_reasons(missing: Sequence[tuple[str, str]], not_generated: str | None) -> list[str]:
    """`missing` columns ((metric, header) pairs in table order) grouped by why they were not measured, one
    "headers (reason)" part per reason: `not_generated` for every text metric (`_TEXT_METRICS`) where the
    runs generated nothing (None where they did), else the metric's own reason (`_LEFT_OUT_BECAUSE`)."""
    groups: dict[str | None, list[str]] = {}
    for metric, header in missing:
        text_unmeasured = not_generated is not None and metric in _TEXT_METRICS
        why = not_generated if text_unmeasured else _LEFT_OUT_BECAUSE.get(metric)
        groups.setdefault(why, []).append(header)
    return [", ".join(headers) + ("" if why is None else f" ({why})") for why, headers in groups.items()]


def left_out_line(left_out: Sequence[tuple[str, str]]) -> str | None:
    """The line of results.md naming the columns no row has (`left_out`: (metric, header) pairs in table
    order), grouped by their reason; None when there are none. Where no run generated (BLEU is among them),
    that is the reason for every text metric (`_TEXT_METRICS`), preference recall included."""
    if not left_out:
        return None
    no_text = any(metric == "bleu" for metric, _ in left_out)
    parts = _with_reasons(left_out, _NOT_GENERATED if no_text else None)
    return f"Left out, measured by no run: {'; '.join(parts)}."


def not_measured_line(rows: Sequence[Mapping[str, Any]], shown: Sequence[tuple[str, str]]) -> str | None:
    """The line of results.md that explains its "-" cells: per variant whose row lacks some of the `shown`
    columns ((metric, header) pairs, each measured by another row), those columns and why; None when no
    cell is "-". A row without BLEU is a variant whose runs did not all generate. Variants are separated by
    "; ", a variant's reasons by ", "."""
    parts = []
    for row in rows:
        missing = [(metric, header) for metric, header in shown if row.get(metric) is None]
        if missing:
            not_generated = _ROW_NOT_GENERATED if row.get("bleu") is None else None
            parts.append(f"{row['variant']}: {', '.join(_with_reasons(missing, not_generated))}")
    return f'"-": not measured by that variant\'s runs: {"; ".join(parts)}.' if parts else None


def markdown(result: Mapping[str, Any]) -> str:
    """The table of means (± sample std across seeds where there are several) and the differences with
    intervals. A column no row has is left out, and a line names it with its reason (`left_out_line`); one
    that only some rows have shows "-" in the others, and a line says why (`not_measured_line`)."""
    columns = [(metric, header, ".4f") for metric, header, _ in METRICS]
    columns += [("bleu", "BLEU", ".2f"), ("dce_auroc", "DCE AUROC", ".4f")]
    measured = {
        metric for metric, _, _ in columns if any(row.get(metric) is not None for row in result["rows"])
    }
    shown = [column for column in columns if column[0] in measured]
    headers = [header for _, header, _ in shown]
    lines = ["| variant | " + " | ".join(headers) + " |", "| --- |" + " ---: |" * len(headers)]
    for row in result["rows"]:
        cells = []
        for metric, _, spec in shown:
            value, std = row.get(metric), row.get(f"{metric}_std")
            # A mean that is not finite has no spread to give: its cell is "n/a", not "n/a ± n/a".
            spread = value is not None and std is not None and math.isfinite(value)
            cells.append(_cell(value, spec) + (f" ± {_cell(std, spec)}" if spread else ""))
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    left_out = left_out_line([(metric, header) for metric, header, _ in columns if metric not in measured])
    not_measured = not_measured_line(result["rows"], [(metric, header) for metric, header, _ in shown])
    nonfinite = [f"{row['variant']} {row['dce_auroc_nonfinite']}" for row in result["rows"]
                 if row.get("dce_auroc_nonfinite")]  # fmt: skip
    if nonfinite and "dce_auroc" in measured:
        nonfinite_line = (
            f"DCE AUROC leaves out the target tokens whose DCE is not finite (a diverged model): "
            f"{', '.join(nonfinite)} (over its seeds' effect reports)."
        )
    else:
        nonfinite_line = None
    undefined = [f"{row['variant']} ({counted(row['dce_auroc_undefined'], 'seed')} of {len(row['seeds'])})"
                 for row in result["rows"] if row.get("dce_auroc_undefined")]  # fmt: skip
    undefined_line = (
        f"DCE AUROC is n/a where an effect report's scored tokens hold no preference token or only "
        f"preference tokens, for which no AUROC is defined: {', '.join(undefined)}."
        if undefined
        else None
    )
    notes = [line for line in (left_out, not_measured, nonfinite_line, undefined_line) if line is not None]
    if notes:
        lines += ["", *notes]
    if not result["differences"]:
        lines += ["", f"Only one variant ({result['baseline']}): no other to compare with it."]
    else:
        lines += ["", f"Difference to {result['baseline']} (mean [95% paired bootstrap interval]):", ""]
        lines += [f"- {line}" for line in [*conclusions(result), *not_paired_lines(result)]]
        no_interval = [f"{header} ({why})" for metric, header, why in NO_INTERVAL if metric in measured]
        if no_interval:
            means = "their means" if len(no_interval) > 1 else "its mean"
            lines += [
                "",
                f"No difference or interval for {' or '.join(no_interval)}: a paired bootstrap resamples "
                f"per-example values; the table gives {means} only.",
            ]
    unmatched = [
        *(d for m in result["differences"].values() for d in m.values()),
        *(d for m in result["not_paired"].values() for d in m.values()),
    ]
    if any(d["unpaired"] for d in unmatched):
        lines += [
            "",
            "Some variants evaluated examples the baseline did not (their data was prepared differently): "
            "each difference pairs only the examples both evaluated, the same id with the same content "
            "(user and target text), and says how many.",
        ]
    if any(d["other_content"] for d in unmatched):
        lines += [
            "",
            "Some examples share an id with one of the baseline's but not its content: that variant's data "
            "holds another example under the id (its `data` overrides prepared other examples, such as "
            "another `data.synthetic_seed`), so they are not paired.",
        ]
    few = few_examples_line(d["examples"] for m in result["differences"].values() for d in m.values())
    if few is not None:
        lines += ["", few]
    return "\n".join(lines) + "\n"


def few_examples_line(examples: Iterable[int]) -> str | None:
    """The warning that the bootstrap intervals are too narrow to trust, naming the fewest of `examples`
    (each difference's count of paired examples) where it is under `FEW_EXAMPLES`; None where it is not, or
    where there is no difference."""
    fewest = min(examples, default=None)
    if fewest is None or fewest >= FEW_EXAMPLES:
        return None
    # A percentile bootstrap over a handful of pairs gives intervals narrower than the real uncertainty.
    return (
        f"Only {counted(fewest, 'paired example')}: at fewer than {FEW_EXAMPLES} the bootstrap intervals are "
        "too narrow to trust; evaluate more examples before reading a verdict."
    )


def write_results(comparison: Any, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`<out>/results.json` and `<out>/results.md` of a comparison's run records; returns the JSON."""
    from nextquill_jax.train.metrics_log import strict_json

    result = {
        "config": comparison.source,
        "split": comparison.compare.split,
        **compare_runs(records, comparison.compare.baseline, comparison.compare.resamples),
    }
    result["conclusions"] = conclusions(result)
    out = Path(comparison.compare.out)
    # Each replaced whole; the table goes first, so that a run stopped between the two leaves no earlier
    # table beside the new numbers.
    (out / "results.md").unlink(missing_ok=True)
    write_text_atomic(out / "results.json", strict_json(result))
    write_text_atomic(out / "results.md", markdown(result))
    return result
