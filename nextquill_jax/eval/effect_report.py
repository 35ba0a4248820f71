"""The effect report: which target tokens does the user's history change? (`nextquill-jax effects`)

For the chosen examples of a prepared split, `effect_tokens.compute_example_effects` gives every target
token's p_h(y), p_∅(y), DCE and ω; this module summarises them and writes REPORT_DIR:

    index.html          tokens coloured by DCE, preference-bearing ones (DCE > δ) marked, both prompts
    dce_histogram.png   the DCE distribution (per ground-truth role on synthetic data), δ marked
    summary.json        counts, DCE quantiles and, where targets carry `meta.target_spans`, precision /
                        recall / AUROC against the ground truth (`effect_scoring`), overall and per role

A token whose DCE is not finite (NaN or inf: a diverged model) is left out of every DCE statistic, the
AUROC, precision, recall and the histogram, and counted instead (`nonfinite_tokens`); the page draws it
grey.

The Python entry point is `build_effect_report`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nextquill_jax.atomic_file import replaced_atomically, write_text_atomic
from nextquill_jax.eval.effect_scoring import ALL_ROLES, EOS, ROLES, score_roles
from nextquill_jax.eval.effect_tokens import ExampleEffects, compute_example_effects
from nextquill_jax.loss import LossConfig
from nextquill_jax.loss.weighting_record import weighting_sha256
from nextquill_jax.plural import counted
from nextquill_jax.train.metrics_log import strict_json

DEFAULT_NUM_EXAMPLES = 8
DEFAULT_MAX_SHOWN = 20


def finite_tokens(results: Sequence[ExampleEffects]) -> tuple[np.ndarray, list[str] | None, int]:
    """(the finite DCE values of the target tokens of `results`, [F] float64; their roles, [F], or None
    unless every example has roles; how many tokens were left out for a DCE that is not finite).

    A diverged model's NaN or inf has no place in a quantile, an AUROC or a histogram (the AUROC refuses
    it, and one NaN makes every quantile NaN), so the numbers cover the other tokens and count these.
    """
    keep = [np.isfinite(r.dce) for r in results]
    dce = np.concatenate([r.dce[k] for r, k in zip(results, keep, strict=True)]).astype(np.float64)
    roles = None
    if all(r.roles is not None for r in results):
        pairs = zip(results, keep, strict=True)
        roles = [role for r, k in pairs for role, kept in zip(r.roles, k, strict=True) if kept]
    return dce, roles, sum(int(k.size - k.sum()) for k in keep)


def _dce_statistics(dce: np.ndarray) -> dict[str, float | None]:
    """Mean, std, min, p10, p50, p90 and max of `dce` ([N] finite); each None when N is 0 (every token of a
    diverged model non-finite)."""
    if dce.size == 0:
        return dict.fromkeys(("mean", "std", "min", "p10", "p50", "p90", "max"))
    quantiles = {f"p{q}": float(np.quantile(dce, q / 100)) for q in (10, 50, 90)}
    return {
        "mean": float(dce.mean()),
        "std": float(dce.std()),
        "min": float(dce.min()),
        **quantiles,
        "max": float(dce.max()),
    }


def summarize(results: Sequence[ExampleEffects], loss_cfg: LossConfig) -> dict[str, Any]:
    """The numbers of `summary.json`: counts, DCE statistics, ground-truth scores, one entry per example.

    `tokens` counts every target token, `nonfinite_tokens` those whose DCE is not finite; the DCE statistics
    (`dce`: None each when no DCE is finite), `preference_bearing` (DCE > δ) and its fraction cover the finite
    ones (`finite_tokens`), as do the ground-truth scores and each example's `mean_dce` / `max_dce`.
    `ground_truth` (None when no example has `meta.target_spans`) is `effect_scoring.score_roles` over the
    finite tokens of the examples that have them, plus `examples`, their count, `nonfinite_tokens`, their
    tokens left out, and `nll`: the teacher-forced negative log-likelihood of the targets per role, with and
    without the history (`role_nll`). `nll` is the same over all tokens (data without roles too). Each
    example's entry holds its own `nll_with` / `nll_without` and, with roles, `preference_nll_with` /
    `preference_nll_without`. `loss` holds δ, λ, ε, `weighting` and `weighting_sha256`, the digest of its
    module's file as it is now (`weighting_sha256`). A non-finite NLL stays NaN (`write_report` writes null).
    """
    dce, _, nonfinite = finite_tokens(results)
    flagged = dce > loss_cfg.threshold
    with_roles = [r for r in results if r.roles is not None]
    ground_truth = None
    if with_roles:
        role_dce, roles, role_nonfinite = finite_tokens(with_roles)
        ground_truth = {
            "examples": len(with_roles),
            "nonfinite_tokens": role_nonfinite,
            **score_roles(role_dce, roles, loss_cfg.threshold),
            "nll": role_nll(with_roles),
        }
    per_example = []
    for r in results:
        own, own_roles, own_nonfinite = finite_tokens([r])
        entry = {
            "index": r.index,
            "user_id": r.row.get("user_id"),
            "category": r.row.get("category"),
            "tokens": int(r.dce.size),
            "nonfinite_tokens": own_nonfinite,
            "preference_bearing": int((own > loss_cfg.threshold).sum()),
            "mean_dce": float(own.mean()) if own.size else None,
            "max_dce": float(own.max()) if own.size else None,
            "nll_with": float(-r.logp_with.astype(np.float64).mean()),
            "nll_without": float(-r.logp_without.astype(np.float64).mean()),
        }
        if own_roles is not None:
            scores = score_roles(own, own_roles, loss_cfg.threshold)
            entry.update({k: scores[k] for k in ("precision", "recall", "auroc")})
            preference = role_nll([r]).get("preference")
            if preference is not None:
                entry["preference_nll_with"] = preference["with"]
                entry["preference_nll_without"] = preference["without"]
        per_example.append(entry)
    return {
        "examples": [r.index for r in results],
        # `weighting` (null: the paper's λ / ε) says which of the two gave the per-token ω of the page, and
        # `weighting_sha256` which code was behind that name (null: no weighting, or no source file).
        "loss": {
            "threshold": loss_cfg.threshold,
            "high": loss_cfg.high,
            "low": loss_cfg.low,
            "weighting": loss_cfg.weighting,
            "weighting_sha256": weighting_sha256(loss_cfg.weighting),
        },
        "tokens": int(dce.size) + nonfinite,
        "nonfinite_tokens": nonfinite,
        "preference_bearing": int(flagged.sum()),
        "preference_bearing_fraction": float(flagged.mean()) if dce.size else None,
        "dce": _dce_statistics(dce),
        "ground_truth": ground_truth,
        "nll": {
            "with": float(-np.concatenate([r.logp_with for r in results]).astype(np.float64).mean()),
            "without": float(-np.concatenate([r.logp_without for r in results]).astype(np.float64).mean()),
        },
        "per_example": per_example,
    }


def role_nll(results: Sequence[ExampleEffects]) -> dict[str, dict[str, float]]:
    """{role: {"with", "without": mean −log p(y) in nats, "tokens": count}} over the target tokens of
    `results` (which must have roles), for each role present (`effect_scoring.ALL_ROLES`)."""
    roles = np.array([role for r in results for role in r.roles], dtype=object)
    logp = {
        stream: np.concatenate([getattr(r, f"logp_{stream}") for r in results]).astype(np.float64)
        for stream in ("with", "without")
    }
    return {
        role: {"with": float(-logp["with"][roles == role].mean()),
               "without": float(-logp["without"][roles == role].mean()),
               "tokens": int((roles == role).sum())}
        for role in ALL_ROLES
        if (roles == role).any()
    }  # fmt: skip


def dce_histogram_png(results: Sequence[ExampleEffects], threshold: float) -> bytes:
    """A PNG histogram of the finite DCE values (one outline per ground-truth role when every example has
    roles), counts on a log scale, δ marked by a dashed line; the title counts the non-finite ones left out
    (`finite_tokens`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dce, roles_list, nonfinite = finite_tokens(results)
    lo, hi = dce.min(initial=threshold), dce.max(initial=threshold)
    pad = max(hi - lo, 1e-6) * 0.02
    bins = np.linspace(lo - pad, hi + pad, 61)
    fig = Figure(figsize=(7.5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if roles_list is not None:
        roles = np.array(roles_list, dtype=object)
        present = [role for role in (*ROLES, "glue", EOS) if (roles == role).any()]
        colors = {"preference": "#b2182b", "context": "#2166ac", "noise": "#33a02c", "glue": "#bdbdbd"}
        for role in present:  # outlines, not stacked: on a log scale stacking distorts the upper layers
            ax.hist(
                dce[roles == role], bins=bins, histtype="step", linewidth=1.6, label=role,
                color=colors.get(role, "#4d4d4d"),
            )  # fmt: skip
    else:
        ax.hist(dce, bins=bins, color="#4d4d4d", label="target tokens")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"δ = {threshold:g}")
    ax.set_xlabel("DCE = p(y | with history) − p(y | without history)")
    if dce.size:  # most effects are near 0; a log scale keeps the tails visible (and has no room for none)
        ax.set_yscale("log")
        ax.set_ylabel("tokens (log scale)")
    left_out = f" ({nonfinite} with a non-finite DCE left out)" if nonfinite else ""
    ax.set_title(f"Data-side effect of {dce.size} target tokens{left_out}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(
    results: Sequence[ExampleEffects],
    loss_cfg: LossConfig,
    out_dir: str | Path,
    *,
    split: str,
    source: str = "",
    max_shown: int = DEFAULT_MAX_SHOWN,
) -> dict[str, Any]:
    """Write index.html, dce_histogram.png and summary.json into `out_dir` (created) and return the summary
    (with `split`, `model` = `source`, `examples_shown` and `files`, absolute paths). Each file is replaced
    whole, and summary.json is written last, removed first in a single-process run: a report stopped
    part-way there has none."""
    from nextquill_jax.eval.effect_html import render_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"split": split, "model": source, **summarize(results, loss_cfg)}
    summary["examples_shown"] = min(max_shown, len(results))
    png = dce_histogram_png(results, loss_cfg.threshold)
    files = {
        "html": out / "index.html",
        "histogram": out / "dce_histogram.png",
        "summary": out / "summary.json",
    }
    summary["files"] = {k: str(v.absolute()) for k, v in files.items()}
    # summary.json, written last, stands for the report: an earlier one must not stand for the page and plot
    # a stopped run (SIGKILL) replaced (`compare` checks a run's record against it). Not in a multi-process
    # run, whose every process writes the same report: one would remove the summary another is reading.
    if jax.process_count() == 1:
        files["summary"].unlink(missing_ok=True)
    with replaced_atomically(files["histogram"]) as tmp:
        tmp.write_bytes(png)
    html = render_report(
        results[:max_shown], summary, threshold=loss_cfg.threshold, histogram_png_base64=base64.b64encode(png)
    )
    write_text_atomic(files["html"], html)
    # A diverged model's NaN is written null, which `compare_table.read_number` reads back as NaN.
    write_text_atomic(files["summary"], strict_json(summary, ensure_ascii=False))
    return summary


def build_effect_report(
    model: Any,
    tokenizer: Any,
    prepared_dir: str | Path,
    split: str,
    out_dir: str | Path,
    loss_cfg: LossConfig | None = None,
    *,
    examples: Sequence[int] | None = None,
    num_examples: int | None = DEFAULT_NUM_EXAMPLES,
    max_shown: int = DEFAULT_MAX_SHOWN,
    batch_rows: int = 4,
    source: str = "",
    vocab_origin: str | None = None,
) -> dict[str, Any]:
    """Compute the effects of a split's examples and write the report; returns the summary (summary.json).

    Args:
        model, tokenizer, prepared_dir, split: see `compute_example_effects`.
        out_dir: where index.html, dce_histogram.png and summary.json go.
        loss_cfg: δ, λ, ε (default `LossConfig()`, the public code's 0.05 / 0.9 / 0.1).
        examples: example indices; None takes the first `num_examples` (None: every example of the split).
        max_shown: examples drawn in the HTML (the first ones); the numbers cover all of them.
        source: what the model is, for the page and the summary.
        vocab_origin: where the model's vocab_size comes from, for the error of a split with a token id
            outside it (`model_setup.vocab_origin`; default: the model `source`).

    Returns:
        The summary; on synthetic data `summary["ground_truth"]["auroc"]` is the AUROC of DCE separating
        preference tokens from context and noise tokens (see `effect_scoring`).

    Raises:
        ValueError / FileNotFoundError: see `compute_example_effects`.
        ConfigError: the split holds a token id outside the model's vocabulary (`check_token_ids`), found
            before anything is compiled.
    """
    from nextquill_jax.data.prepared_split import PreparedSplit, check_finished
    from nextquill_jax.train.model_setup import check_token_ids

    loss_cfg = LossConfig() if loss_cfg is None else loss_cfg
    check_finished(prepared_dir)  # before its token ids are checked
    data = PreparedSplit(prepared_dir, split)
    check_token_ids(data, model.cfg.vocab_size, vocab_origin or f"the model {source or '(unnamed)'}")
    if examples is None:
        examples = range(len(data) if num_examples is None else min(num_examples, len(data)))
    results = compute_example_effects(
        model, tokenizer, prepared_dir, split, list(examples), loss_cfg, batch_rows=batch_rows
    )
    return write_report(results, loss_cfg, out_dir, split=split, source=source, max_shown=max_shown)


def describe(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: counts, the ground-truth scores when there are some, and the files."""
    median = summary["dce"]["p50"]
    nonfinite = summary["nonfinite_tokens"]
    lines = [
        f"{counted(len(summary['examples']), 'example')} of split {summary['split']}: "
        f"{counted(summary['tokens'], 'target token')}, "
        f"{summary['preference_bearing']} preference-bearing (DCE > {summary['loss']['threshold']:g}), "
        f"median DCE {'n/a' if median is None else f'{median:+.4f}'}"
        + (f", {nonfinite} with a non-finite DCE left out of the numbers" if nonfinite else "")
    ]
    gt = summary["ground_truth"]
    if gt is not None:
        lines.append(
            f"against the ground truth ({gt['tokens_scored']} role tokens): precision "
            f"{_fmt(gt['precision'])}, recall {_fmt(gt['recall'])}, DCE AUROC {_fmt(gt['auroc'])}"
        )
    lines.append(f"report: {summary['files']['html']}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
