"""`nextquill-jax effects`: which target tokens does the user's history change? A per-token report.

    nextquill-jax effects --workdir DIR [--step N] [--data PREPARED_DIR] [--split val]
                          [--examples 0,3,7 | --num-examples N] --out REPORT_DIR
    nextquill-jax effects --model PATH_OR_NAME --data PREPARED_DIR ... --out REPORT_DIR

For the chosen examples of a prepared split, the model runs its two forward passes on a batch laid out by
the training pipeline's `assemble_batch` (one example per row, so the response index is training's), and every
target token gets p_h(y), p_∅(y), DCE = p_h(y) − p_∅(y) (`effects.data_effect`) and the weight ω
(`effects.target_weights` with the loss config's δ, λ, ε). REPORT_DIR receives

    index.html          tokens coloured by DCE, preference-bearing ones (DCE > δ) marked, both prompts
    dce_histogram.png   the DCE distribution (per ground-truth role on synthetic data), δ marked
    summary.json        counts, DCE quantiles and, where targets carry `meta.target_spans`, precision /
                        recall / AUROC against the ground truth (`effect_scoring`), overall and per role

The Python entry point is `build_effect_report`.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nextquill_jax.effect_scoring import EOS, ROLES, score_roles, target_offsets, token_pieces, token_roles
from nextquill_jax.losses import LossConfig

DEFAULT_NUM_EXAMPLES = 8
DEFAULT_MAX_SHOWN = 20
LENGTH_MULTIPLE = 64  # padded stream lengths are multiples of this, so one compiled shape serves all rows


@dataclass(frozen=True)
class ExampleEffects:
    """The effects of one example's L target tokens (the last one is EOS).

    `row` is the example's line of `<split>.jsonl` (user_id, both prompts, target, category, meta, ...);
    `pieces[k]` is the text token k adds to the target (the EOS token's own text for the last one);
    `roles` are the ground-truth roles (`effect_scoring.ALL_ROLES`) when the row has `meta.target_spans`.
    """

    index: int
    row: dict[str, Any]
    token_ids: np.ndarray  # [L] int32
    pieces: list[str]  # [L]
    p_with: np.ndarray  # [L] float32, p_h(y)
    p_without: np.ndarray  # [L] float32, p_∅(y)
    dce: np.ndarray  # [L] float32
    weight: np.ndarray  # [L] float32
    roles: list[str] | None  # [L]


def read_rows(prepared_dir: str | Path, split: str, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The lines `indices` of `<prepared_dir>/<split>.jsonl` (the rendered examples), in that order.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a line's `index` does not match its position (the file and the arrays disagree).
    """
    path = Path(prepared_dir) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: prepare the data with `nextquill-jax data prepare`")
    wanted = set(indices)
    rows: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if line_no in wanted:
                row = json.loads(line)
                if row.get("index") != line_no:
                    raise ValueError(f"{path}:{line_no + 1}: index {row.get('index')!r}, expected {line_no}")
                rows[line_no] = row
    return [rows[i] for i in indices]


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, math.ceil(x / multiple) * multiple)


@functools.lru_cache(maxsize=8)
def _effects_fn(graphdef: Any, threshold: float, high: float, low: float):
    """A jitted `(state, batch) -> (probs [2, B, R], dce [B, R], weight [B, R])` for the model `graphdef`.

    Cached, so reports on models of one architecture (e.g. every variant of a demo) compile once per shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nextquill_jax import effects
    from nextquill_jax.fused_head import head_token_stats
    from nextquill_jax.train.step import response_hidden

    def token_effects(state: Any, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        model = nnx.merge(graphdef, state)
        hidden = jnp.stack([response_hidden(model, batch, "with"), response_hidden(model, batch, "without")])
        lm_head, layout = model.lm_head_weight()
        stats = head_token_stats(hidden, lm_head, batch["labels"], head_layout=layout)
        logprob = stats.label_logit - stats.lse  # [2, B, R]
        mask = effects.target_mask(batch["labels"])
        dce = effects.data_effect(logprob[0], logprob[1], mask)
        weight = effects.target_weights(dce, mask, threshold=threshold, high=high, low=low)
        return jnp.where(mask, jnp.exp(logprob), 0.0), dce, weight

    return jax.jit(token_effects)


def compute_example_effects(
    model: Any,
    tokenizer: Any,
    prepared_dir: str | Path,
    split: str,
    indices: Sequence[int],
    loss_cfg: LossConfig,
    *,
    batch_rows: int = 4,
) -> list[ExampleEffects]:
    """Per-token effects of examples `indices` of a prepared split (module docstring).

    Args:
        model: a `CausalLM` (anything with `hidden_states` and `lm_head_weight`).
        tokenizer: the fast tokenizer the data was prepared with (for token texts and role offsets).
        prepared_dir: a `nextquill-jax data prepare` output; split: one of its splits.
        indices: example indices within the split.
        loss_cfg: supplies δ (threshold), λ (high) and ε (low) of the weights.
        batch_rows: examples per forward pass (all passes share one padded shape).

    Raises:
        ValueError: an index outside the split, no index, a tokenizer that does not reproduce the prepared
            target tokens, or malformed `meta.target_spans` (naming the example).
        FileNotFoundError: the split is not prepared.
    """
    from flax import nnx

    from nextquill_jax.data.assemble import RowShape, assemble_batch
    from nextquill_jax.data.prepared import PreparedSplit

    data = PreparedSplit(prepared_dir, split)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("no examples chosen")
    bad = [i for i in indices if not 0 <= i < len(data)]
    if bad:
        raise ValueError(
            f"example indices {bad} outside split {split!r} of {prepared_dir} (0..{len(data) - 1})"
        )
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    eos_id = int(data.meta.get("eos_token_id", tokenizer.eos_token_id))
    rows = read_rows(prepared_dir, split, indices)
    arrays = [data[i] for i in indices]
    shape = RowShape(
        _round_up(max(len(a["prompt_with"]) + len(a["target"]) for a in arrays), LENGTH_MULTIPLE),
        _round_up(max(len(a["prompt_without"]) + len(a["target"]) for a in arrays), LENGTH_MULTIPLE),
        _round_up(max(len(a["target"]) for a in arrays), LENGTH_MULTIPLE),
    )
    graphdef, state = nnx.split(model)
    run = _effects_fn(graphdef, loss_cfg.threshold, loss_cfg.high, loss_cfg.low)
    probs, dce, weight = [], [], []
    for start in range(0, len(arrays), batch_rows):
        chunk = [[a] for a in arrays[start : start + batch_rows]]
        chunk += [[] for _ in range(batch_rows - len(chunk))]  # empty rows: one compiled batch size
        p, d, w = run(state, assemble_batch(chunk, shape, with_reference_dce=False))
        probs.append(np.asarray(p))
        dce.append(np.asarray(d))
        weight.append(np.asarray(w))
    probs_all = np.concatenate(probs, axis=1)  # [2, N_padded, R]
    dce_all, weight_all = np.concatenate(dce), np.concatenate(weight)  # [N_padded, R]

    out = []
    eos_text = tokenizer.convert_ids_to_tokens(eos_id)
    for n, (index, row, arr) in enumerate(zip(indices, rows, arrays, strict=True)):
        ids = arr["target"]
        L = len(ids)
        where = f"{split}.jsonl example {index}"
        try:
            offsets = target_offsets(tokenizer, row["target"], ids, eos_id)
            spans = (row.get("meta") or {}).get("target_spans")
            roles = None if spans is None else [*token_roles(offsets, spans), EOS]
        except ValueError as e:
            raise ValueError(f"{Path(prepared_dir) / where}: {e}") from None
        out.append(
            ExampleEffects(
                index=index,
                row=row,
                token_ids=np.asarray(ids, np.int32),
                pieces=[*token_pieces(row["target"], offsets), eos_text],
                p_with=probs_all[0, n, :L],
                p_without=probs_all[1, n, :L],
                dce=dce_all[n, :L],
                weight=weight_all[n, :L],
                roles=roles,
            )
        )
    return out


def summarize(results: Sequence[ExampleEffects], loss_cfg: LossConfig) -> dict[str, Any]:
    """The numbers of `summary.json`: counts, DCE statistics, ground-truth scores, one entry per example.

    `ground_truth` (None when no example has `meta.target_spans`) is `effect_scoring.score_roles` over the
    tokens of the examples that have them, plus `examples`, their count.
    """
    dce = np.concatenate([r.dce for r in results]).astype(np.float64)
    flagged = dce > loss_cfg.threshold
    quantiles = {f"p{q}": float(np.quantile(dce, q / 100)) for q in (10, 50, 90)}
    with_roles = [r for r in results if r.roles is not None]
    ground_truth = None
    if with_roles:
        ground_truth = {
            "examples": len(with_roles),
            **score_roles(
                np.concatenate([r.dce for r in with_roles]),
                [role for r in with_roles for role in r.roles],
                loss_cfg.threshold,
            ),
        }
    per_example = []
    for r in results:
        entry = {
            "index": r.index,
            "user_id": r.row.get("user_id"),
            "category": r.row.get("category"),
            "tokens": int(r.dce.size),
            "preference_bearing": int((r.dce > loss_cfg.threshold).sum()),
            "mean_dce": float(r.dce.mean()),
            "max_dce": float(r.dce.max()),
        }
        if r.roles is not None:
            scores = score_roles(r.dce, r.roles, loss_cfg.threshold)
            entry.update({k: scores[k] for k in ("precision", "recall", "auroc")})
        per_example.append(entry)
    return {
        "examples": [r.index for r in results],
        "loss": {"threshold": loss_cfg.threshold, "high": loss_cfg.high, "low": loss_cfg.low},
        "tokens": int(dce.size),
        "preference_bearing": int(flagged.sum()),
        "preference_bearing_fraction": float(flagged.mean()),
        "dce": {
            "mean": float(dce.mean()),
            "std": float(dce.std()),
            "min": float(dce.min()),
            **quantiles,
            "max": float(dce.max()),
        },
        "ground_truth": ground_truth,
        "per_example": per_example,
    }


def dce_histogram_png(results: Sequence[ExampleEffects], threshold: float) -> bytes:
    """A PNG histogram of all DCE values (one outline per ground-truth role when every example has roles),
    counts on a log scale, δ marked by a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dce = np.concatenate([r.dce for r in results]).astype(np.float64)
    lo, hi = min(dce.min(), threshold), max(dce.max(), threshold)
    pad = max(hi - lo, 1e-6) * 0.02
    bins = np.linspace(lo - pad, hi + pad, 61)
    fig = Figure(figsize=(7.5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if all(r.roles is not None for r in results):
        roles = np.array([role for r in results for role in r.roles], dtype=object)
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
    ax.set_yscale("log")  # most effects are near 0; a log scale keeps the tails visible
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(f"Data-side effect of {dce.size} target tokens")
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
    (with `split`, `model` = `source`, `examples_shown` and `files`, absolute paths)."""
    from nextquill_jax.effect_html import render_report

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
    files["histogram"].write_bytes(png)
    html = render_report(
        results[:max_shown], summary, threshold=loss_cfg.threshold, histogram_png_base64=base64.b64encode(png)
    )
    files["html"].write_text(html, encoding="utf-8")
    files["summary"].write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
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
) -> dict[str, Any]:
    """Compute the effects of a split's examples and write the report; returns the summary (summary.json).

    Args:
        model, tokenizer, prepared_dir, split: see `compute_example_effects`.
        out_dir: where index.html, dce_histogram.png and summary.json go.
        loss_cfg: δ, λ, ε (default `LossConfig()`, the public code's 0.05 / 0.9 / 0.1).
        examples: example indices; None takes the first `num_examples` (None: every example of the split).
        max_shown: examples drawn in the HTML (the first ones); the numbers cover all of them.
        source: what the model is, for the page and the summary.

    Returns:
        The summary; on synthetic data `summary["ground_truth"]["auroc"]` is the AUROC of DCE separating
        preference tokens from context and noise tokens (see `effect_scoring`).

    Raises:
        ValueError / FileNotFoundError: see `compute_example_effects`.
    """
    from nextquill_jax.data.prepared import PreparedSplit

    loss_cfg = LossConfig() if loss_cfg is None else loss_cfg
    if examples is None:
        size = len(PreparedSplit(prepared_dir, split))
        examples = range(size if num_examples is None else min(num_examples, size))
    results = compute_example_effects(
        model, tokenizer, prepared_dir, split, list(examples), loss_cfg, batch_rows=batch_rows
    )
    return write_report(results, loss_cfg, out_dir, split=split, source=source, max_shown=max_shown)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", type=Path, help="a training workdir (config.yaml + checkpoints/)")
    source.add_argument("--model", help="a Hugging Face directory, .gguf file or packaged model name")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--data", type=Path, default=None, help="prepared data (default with --workdir: the run's own)"
    )
    parser.add_argument("--split", default="val", help="split of the prepared data (default: val)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--examples", default=None, help="comma-separated example indices, e.g. 0,3,7")
    which.add_argument(
        "--num-examples", type=int, default=DEFAULT_NUM_EXAMPLES, help="the first N examples (default: 8)"
    )
    parser.add_argument("--out", required=True, type=Path, help="report directory")
    parser.add_argument("--tokenizer", default=None, help="default: the one the data was prepared with")
    parser.add_argument("--threshold", type=float, default=None, help="δ (default: the run's loss config)")
    parser.add_argument("--high", type=float, default=None, help="λ (default: the run's loss config)")
    parser.add_argument("--low", type=float, default=None, help="ε (default: the run's loss config)")
    parser.add_argument("--max-shown", type=int, default=DEFAULT_MAX_SHOWN, help="examples drawn in the HTML")


def _parse_indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--examples {text!r}: expected comma-separated integers such as 0,3,7") from None


def run(args: argparse.Namespace) -> int:
    from nextquill_jax.data.prepare import load_fast_tokenizer, read_summary

    try:
        if args.step is not None and args.workdir is None:
            raise ValueError("--step needs --workdir")
        if args.workdir is not None:
            from nextquill_jax.train.workdir import data_dir_of, restore_model, single_device_mesh

            restored = restore_model(args.workdir, args.step, single_device_mesh())
            model, cfg, step = restored.model, restored.config, restored.step
            loss_cfg = cfg.loss.loss_config()
            data_dir = args.data or data_dir_of(cfg, args.workdir)
            source = f"{args.workdir} step {step}"
        else:
            from nextquill_jax.models import load_pretrained

            if args.data is None:
                raise ValueError("--model needs --data PREPARED_DIR")
            model, loss_cfg = load_pretrained(args.model), LossConfig()
            data_dir, source = args.data, args.model
        overrides = {k: v for k in ("threshold", "high", "low") if (v := getattr(args, k)) is not None}
        loss_cfg = dataclasses.replace(loss_cfg, **overrides)
        prepared = read_summary(data_dir)
        tokenizer_name = args.tokenizer or (prepared or {}).get("tokenizer")
        if tokenizer_name is None:
            raise ValueError(f"{data_dir}/summary.json names no tokenizer; pass --tokenizer")
        summary = build_effect_report(
            model,
            load_fast_tokenizer(tokenizer_name),
            data_dir,
            args.split,
            args.out,
            loss_cfg,
            examples=_parse_indices(args.examples) if args.examples is not None else None,
            num_examples=args.num_examples,
            max_shown=args.max_shown,
            source=source,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe(summary))
    return 0


def describe(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: counts, the ground-truth scores when there are some, and the files."""
    lines = [
        f"{len(summary['examples'])} examples of split {summary['split']}: {summary['tokens']} target "
        f"tokens, "
        f"{summary['preference_bearing']} preference-bearing (DCE > {summary['loss']['threshold']:g}), "
        f"median DCE {summary['dce']['p50']:+.4f}"
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
