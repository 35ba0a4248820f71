"""The demo's comparison table, its one-line reading and the training-curve plot.

Every number in the table is read from a file a run wrote, and the table's JSON names that file:
ROUGE-1, ROUGE-L, METEOR and BLEU from the variant's `eval/<split>/metrics.json` (`overall`), the
preference-token recall recomputed from its `eval/<split>/predictions.jsonl` joined by `index` with the
prepared `<split>.jsonl` (`meta.signature_words`), and the DCE AUROC from its effect report's `summary.json`
(`ground_truth.auroc`). Nothing is rounded before it is stored; the Markdown shows 4 decimals (BLEU 2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nextquill_jax.eval.preference_recall import preference_recall

# (key in a table row, column header)
COLUMNS = (
    ("rouge1", "ROUGE-1"),
    ("rougeL", "ROUGE-L"),
    ("meteor", "METEOR"),
    ("bleu", "BLEU"),
    ("preference_recall", "pref. recall"),
    ("dce_auroc", "DCE AUROC"),
)


def variant_row(
    variant: str, eval_dir: str | Path, rendered_split_path: str | Path, effects_summary: str | Path | None
) -> dict[str, Any]:
    """One table row from the files of one variant (module docstring); `dce_auroc` is None without an
    effect report or without ground truth, and `sources` names every file read."""
    eval_dir = Path(eval_dir)
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    recall = preference_recall(eval_dir / "predictions.jsonl", rendered_split_path)
    overall = metrics["overall"]
    auroc, sources = None, {"metrics": str(eval_dir / "metrics.json")}
    sources["predictions"] = str(eval_dir / "predictions.jsonl")
    if effects_summary is not None:
        summary = json.loads(Path(effects_summary).read_text(encoding="utf-8"))
        auroc = (summary.get("ground_truth") or {}).get("auroc")
        sources["effects"] = str(effects_summary)
    return {
        "variant": variant,
        "rouge1": overall["rouge1"],
        "rougeL": overall["rougeL"],
        "meteor": overall["meteor"],
        "bleu": overall["bleu"],
        "preference_recall": recall["prediction"],
        "reference_recall": recall["reference"],
        "dce_auroc": auroc,
        "examples": metrics["examples"],
        "prompt": metrics["prompt"],
        "meteor_wordnet": metrics["meteor_wordnet"],
        "sources": sources,
    }


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if key == "bleu" else f"{value:.4f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table (variant, then `COLUMNS`), "–" where a value is missing."""
    lines = [
        "| variant | " + " | ".join(h for _, h in COLUMNS) + " |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(_cell(k, r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _compare(a: float, b: float) -> str:
    return "ties" if a == b else ("beats" if a > b else "does not beat")


def reading(rows: Sequence[Mapping[str, Any]]) -> str:
    """One sentence computed from the numbers: NextQuill against ContextSFT on ROUGE-1 and preference
    recall, and whether the best history-aware variant beats `sft` (no history) on each of the two."""
    by = {r["variant"]: r for r in rows}
    parts = []
    if "nextquill" in by and "context_sft" in by:
        nq, cs = by["nextquill"], by["context_sft"]
        parts.append(
            f"NextQuill {_compare(nq['rouge1'], cs['rouge1'])} ContextSFT on ROUGE-1 "
            f"({nq['rouge1']:.4f} vs {cs['rouge1']:.4f}) and "
            f"{_compare(nq['preference_recall'], cs['preference_recall'])} it on preference recall "
            f"({nq['preference_recall']:.4f} vs {cs['preference_recall']:.4f})"
        )
    aware = [r for r in rows if r["variant"] != "sft"]
    if "sft" in by and aware:
        clauses = []
        for key, name in (("rouge1", "ROUGE-1"), ("preference_recall", "preference recall")):
            best, sft = max(aware, key=lambda r: r[key]), by["sft"][key]
            verb = "raises" if best[key] > sft else "does not raise"
            clauses.append(
                f"{verb} {name} (best history-aware {best[key]:.4f}, {best['variant']}, vs {sft:.4f} for sft)"
            )
        parts.append("the history " + " and ".join(clauses))
    return "; ".join(parts) + "." if parts else "no pair of variants to compare."


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(
    runs: Mapping[str, str | Path], path: str | Path, *, base: str | Path | None = None
) -> None:
    """A PNG of the training curves from each run's metrics.jsonl: each variant's own objective, and the
    cross-entropy on the prompt it is evaluated with (`ce_without` for sft, `ce_with` otherwise), against
    the step; with `base` (the shared pre-training run), a third panel with its loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 3 if base is not None else 2
    fig = Figure(figsize=(5.0 * panels, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    for variant, workdir in runs.items():
        rows = [r for r in read_metrics(Path(workdir) / "metrics.jsonl") if "loss" in r]
        ce = "ce_without" if variant == "sft" else "ce_with"
        axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=variant)
        axes[1].plot([r["step"] for r in rows if ce in r], [r[ce] for r in rows if ce in r], label=variant)
    axes[0].set_title("training objective (each variant's own loss)")
    axes[1].set_title("cross-entropy on the evaluated prompt")
    if base is not None:
        rows = [r for r in read_metrics(Path(base) / "metrics.jsonl") if "loss" in r]
        axes[2].plot([r["step"] for r in rows], [r["loss"] for r in rows], color="black")
        axes[2].set_title("shared base: language-model pre-training")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("nats per target token")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
