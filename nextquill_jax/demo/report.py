"""The demo's reading, the study's recorded table, and the training-curve plot.

The table itself is the comparison's (`eval.compare_table`): every number read from a run's files, each
difference to the baseline with its paired bootstrap interval. The reading states, for each variant against
the baseline, the verdict of those intervals on the headline metrics, never a bare difference of means.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nextquill_jax.eval.compare_table import METRICS, difference_verdict, interval_text
from nextquill_jax.train.metrics_log import read_rows

STUDY_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "STUDY.md"
STUDY_COMMAND = "nextquill-jax compare --config configs/study/smollm2_synthetic.yaml"
# the claim's metrics: text overlap, copying the user's signature words, and their likelihood
HEADLINE = ("rouge1", "preference_recall", "preference_nll_with")


def reading(result: Mapping[str, Any]) -> str:
    """One clause per variant and headline metric (`HEADLINE`): better / worse than the baseline where the
    paired interval excludes 0, "no significant difference" where it covers 0, "no verdict" where it excludes
    0 but has no width (`compare_table.difference_verdict`), with the interval."""
    headers = {metric: (header, higher) for metric, header, higher in METRICS}
    clauses = []
    for name, metrics in result["differences"].items():
        for metric in HEADLINE:
            if metric not in metrics:
                continue
            d, (header, higher) = metrics[metric], headers[metric]
            word, base = difference_verdict(d, higher), result["baseline"]
            clause = {
                "better": f"{name} better than {base} on {header}",
                "worse": f"{name} worse than {base} on {header}",
                "no significant difference": f"{name} no significant difference from {base} on {header}",
            }.get(word, f"{name} vs {base} on {header}: {word}")
            clauses.append(f"{clause} ({interval_text(d)})")
    return "; ".join(clauses) + "." if clauses else "no variant to compare with the baseline."


def study_table(path: Path = STUDY_FILE) -> str:
    """The real-model study's recorded table (the `### Table` section of benchmarks/STUDY.md) with the command
    that reproduces it, as Markdown; a pointer to the file where it is absent (an install without the
    repository's benchmarks/)."""
    if not path.exists():
        return f"The real-model study (SmolLM2-135M + LoRA): `{STUDY_COMMAND}`; see benchmarks/STUDY.md.\n"
    text = path.read_text(encoding="utf-8")
    start = text.find("### Table")
    if start < 0:
        return f"The real-model study: `{STUDY_COMMAND}`; see {path}.\n"
    end = text.find("\n### ", start + 1)
    section = text[start + len("### Table") : end if end >= 0 else len(text)].strip()
    return (
        f"## The real-model study, as recorded in {path.name} (SmolLM2-135M-Instruct + LoRA)\n\n"
        f"Reproduce: `{STUDY_COMMAND}`\n\n{section}\n"
    )


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
        rows = [r for r in read_rows(workdir) if "loss" in r]
        ce = "ce_without" if variant == "sft" else "ce_with"
        axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=variant)
        axes[1].plot([r["step"] for r in rows if ce in r], [r[ce] for r in rows if ce in r], label=variant)
    axes[0].set_title("training objective (each variant's own loss)")
    axes[1].set_title("cross-entropy on the evaluated prompt")
    if base is not None:
        rows = [r for r in read_rows(base) if "loss" in r]
        axes[2].plot([r["step"] for r in rows], [r["loss"] for r in rows], color="black")
        axes[2].set_title("shared base: language-model pre-training")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("nats per target token")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
