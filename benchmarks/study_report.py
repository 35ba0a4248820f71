"""The numbers of a finished `nextquill-jax compare` run as Markdown for benchmarks/STUDY.md, and its health
curves as a PNG.

    python benchmarks/study_report.py configs/study/smollm2_synthetic.yaml --png benchmarks/study_health.png

With several seeds in the compare file it reports one seed, `--seed` (default: the first), so that each seed's
paired intervals can be read apart; compare's own results.md averages over the seeds.

Prints: the comparison table with the paired intervals (`compare_table`, from the finished runs'
`compare_done.json`, so a comparison still running gives the table of what has finished), the teacher-forced
NLL per ground-truth
role with and without the history (each run's effect report), and the counterfactual health of every trained
run (the without-history CE and the preference-bearing fraction at its first and last logged step, from
`metrics.jsonl`), and the evaluations of the eval split during training (`metrics.jsonl`'s `eval/` rows: at
each epoch's end, so several per run in a multi-epoch comparison). The PNG plots the two health series against
the step, one line per variant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nextquill_jax.eval.compare import Comparison, load_comparison
from nextquill_jax.eval.compare_table import compare_runs, markdown

ROLES = ("preference", "context", "noise", "glue", "eos")
EVAL_COLUMNS = (("eval/ce_with", ".4f"), ("eval/ce_without", ".4f"), ("eval/pref_fraction", ".3f"))


def runs_of(comparison: Comparison, seed: int) -> dict[str, Path]:
    """variant -> its finished run directory with `seed`, in the compare file's order."""
    runs = {name: comparison.workdir(name, seed) for name in comparison.variants}
    return {name: run for name, run in runs.items() if (run / "compare_done.json").exists()}


def role_table(runs: dict[str, Path]) -> list[str]:
    lines = ["| variant | " + " | ".join(f"{r} (with / without)" for r in ROLES) + " |"]
    lines.append("| --- |" + " ---: |" * len(ROLES))
    for name, run in runs.items():
        nll = json.loads((run / "effects" / "summary.json").read_text())["ground_truth"]["nll"]
        nats = lambda v: "n/a" if v is None else f"{v:.3f}"  # null: not finite (a diverged run)
        cells = [f"{nats(nll[r]['with'])} / {nats(nll[r]['without'])}" if r in nll else "-" for r in ROLES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the compare file")
    parser.add_argument("--png", type=Path, help="write the health curves here")
    parser.add_argument("--seed", type=int, help="the seed to report (default: the compare file's first)")
    args = parser.parse_args(argv)
    comparison = load_comparison(args.config)
    seeds = comparison.compare.seeds
    if args.seed is not None and args.seed not in seeds:
        parser.error(f"--seed {args.seed}: {args.config} runs seeds {seeds}")
    runs = runs_of(comparison, seeds[0] if args.seed is None else args.seed)
    records = [json.loads((run / "compare_done.json").read_text()) for run in runs.values()]
    result = compare_runs(records, comparison.compare.baseline, comparison.compare.resamples)
    sections = [
        "### Table",
        "",
        markdown(result).rstrip(),
        "",
        "### Teacher-forced NLL per ground-truth role (nats per token; effect-report examples)",
        "",
        *role_table(runs),
        "",
        "### Counterfactual health during training",
        "",
        *health_table(runs),
        "",
        "### The eval split during training (nats per token)",
        "",
        *evaluation_table(runs),
    ]
    print("\n".join(sections))
    if args.png:
        plot(runs, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
