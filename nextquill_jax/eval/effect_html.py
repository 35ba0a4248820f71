"""The effect report as one self-contained HTML page (inline CSS, the histogram inlined as a data URI, a
five-line script for one checkbox; nothing fetched).

Each target token is a `<span class="tok">` whose background is its DCE on a diverging scale (blue below 0,
white at 0, red above), symmetric around 0 and saturated from the 99th percentile of |DCE| over the drawn
tokens (at least |δ|) so that a few extreme tokens do not wash out the rest; its hover title gives DCE, ω,
both probabilities and the ground-truth role. Preference-bearing tokens (DCE > δ) also have the class `pref`
(a thick underline). A token whose DCE is not finite (a diverged model) is grey, `NONFINITE_COLOR`, off the
scale, with the class `nonfinite`, and left out of the scale's percentile. Both prompts sit in foldable
`<details>` blocks. All text is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from nextquill_jax.eval.effect_tokens import ExampleEffects

# ColorBrewer RdBu (7 classes), from DCE = -vmax to +vmax.
COLOR_STOPS: tuple[tuple[int, int, int], ...] = (
    (33, 102, 172),
    (103, 169, 207),
    (209, 229, 240),
    (247, 247, 247),
    (253, 219, 199),
    (239, 138, 98),
    (178, 24, 43),
)
# A non-finite DCE's background: a grey that no DCE on the scale takes (its middle, DCE 0, is near-white).
NONFINITE_COLOR = "#a6a6a6"

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;
  padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin:1.8em 0 .3em}
.meta{color:#555;margin:.2em 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}.l{text-align:left}
.legend{margin:.8em 0}.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.row img{width:560px}.col{max-width:500px}
.bar{position:relative;width:420px;height:16px;border:1px solid #888;
  background:linear-gradient(to right,GRADIENT)}
.bar .thr{position:absolute;top:-5px;bottom:-5px;width:2px;background:#000}
.scale{display:flex;justify-content:space-between;width:424px;font-size:.8em;color:#444}
.target{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:15px;line-height:2.1;
  padding:8px 10px;border:1px solid #ddd;border-radius:4px}
.tok{border-radius:2px}.tok.pref,.pref-sample{border-bottom:3px solid #111}.tok.special{font-style:italic}
.nonfinite-sample{background:NONFINITE;padding:0 3px;border-radius:2px}
.tok:empty::before{content:"\\00b7"}
body.show-roles .tok.gt-preference{outline:1.5px dashed #6a3d9a;outline-offset:1px}
details{margin:.25em 0}summary{cursor:pointer;color:#333}
pre{white-space:pre-wrap;background:#f7f7f7;border:1px solid #e3e3e3;padding:8px;font-size:12px;
  max-height:420px;overflow:auto}
img{max-width:100%}
"""

SCRIPT = """
document.getElementById("show-roles").addEventListener("change", function (e) {
  document.body.classList.toggle("show-roles", e.target.checked);
});
"""


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(c):02x}" for c in rgb)


def dce_color(value: float, vmax: float) -> str:
    """Background colour `#rrggbb` of a DCE on the diverging scale from -vmax to +vmax (clipped), vmax > 0."""
    t = float(np.clip(value / vmax, -1.0, 1.0))
    position = (t + 1.0) / 2.0 * (len(COLOR_STOPS) - 1)
    k = min(int(position), len(COLOR_STOPS) - 2)
    frac = position - k
    lo, hi = np.asarray(COLOR_STOPS[k], float), np.asarray(COLOR_STOPS[k + 1], float)
    return _hex(lo + frac * (hi - lo))


def _text_color(value: float, vmax: float) -> str:
    return "#fff" if abs(value) / vmax > 0.8 else "#111"


def _dce(value: float | None) -> str:
    """A signed DCE with 4 decimals, or 3 significant digits when that would print as 0; "–" for None (no
    finite DCE to summarise), `+nan` / `+inf` / `-inf` for a non-finite one."""
    if value is None:
        return "–"
    return f"{value:+.4f}" if value == 0 or abs(value) >= 1e-3 or not np.isfinite(value) else f"{value:+.2e}"


def _num(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """An HTML table; cells are already escaped. The first `left` columns are left-aligned."""

    def cells(values: Sequence[str], tag: str) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{v}</{tag}>" for i, v in enumerate(values))

    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f"<table><tr>{cells(header, 'th')}</tr>{body}</table>"


def _token_span(r: ExampleEffects, k: int, threshold: float, vmax: float) -> str:
    dce = float(r.dce[k])
    finite = bool(np.isfinite(dce))
    role = r.roles[k] if r.roles is not None else None
    classes = ["tok"]
    if not finite:
        classes.append("nonfinite")
    elif dce > threshold:
        classes.append("pref")
    if k == len(r.pieces) - 1:
        classes.append("special")
    if role is not None:
        classes.append(f"gt-{role}")
    title = (
        f"DCE {_dce(dce)} | ω {float(r.weight[k]):g} | p with history {float(r.p_with[k]):.4g} | "
        f"p without {float(r.p_without[k]):.4g} | token id {int(r.token_ids[k])}"
        + (f" | role {role}" if role is not None else "")
    )
    background, color = (
        (dce_color(dce, vmax), _text_color(dce, vmax)) if finite else (NONFINITE_COLOR, "#111")
    )
    style = f"background:{background};color:{color}"
    return (
        f'<span class="{" ".join(classes)}" style="{style}" title="{html.escape(title, quote=True)}">'
        f"{html.escape(r.pieces[k])}</span>"
    )


def _legend(threshold: float, vmax: float, nonfinite: int) -> str:
    """The colour scale and what the marks mean; with `nonfinite` > 0 tokens, also what their grey means."""
    left = (np.clip(threshold / vmax, -1, 1) + 1) / 2 * 100
    grey = (
        f' <span class="nonfinite-sample">Grey</span> tokens ({nonfinite}) have a DCE that is not finite '
        "(the model diverged); the numbers and the histogram leave them out."
        if nonfinite
        else ""
    )
    return (
        f'<div class="legend"><div class="bar"><div class="thr" style="left:{left:.2f}%"></div></div>'
        f'<div class="scale"><span>≤ {_dce(-vmax)}</span><span>0</span><span>≥ {_dce(vmax)}</span></div>'
        f'<p class="meta">Background: DCE = p(token | with history) − p(token | without history). '
        f'<span class="pref-sample">Underlined</span> tokens are preference-bearing (DCE &gt; δ = '
        f"{threshold:g}, the black tick).{grey} Hover a token for its numbers.</p></div>"
    )


def _weights_row(loss: dict[str, Any]) -> list[str]:
    """The overview's row of the weights ω: δ / λ / ε, or δ and the `loss.weighting` function that gave ω in
    place of λ / ε (their values would misstate the weights the tokens show)."""
    if loss["weighting"] is None:
        return ["δ / λ / ε", f"{loss['threshold']:g} / {loss['high']:g} / {loss['low']:g}"]
    return ["δ / ω", f"{loss['threshold']:g} / {html.escape(loss['weighting'])} (loss.weighting)"]


def _overview(summary: dict[str, Any]) -> str:
    d, loss = summary["dce"], summary["loss"]
    rows = [
        ["examples", str(len(summary["examples"]))],
        ["target tokens", str(summary["tokens"])],
        *(
            [["DCE not finite (left out)", str(summary["nonfinite_tokens"])]]
            if summary["nonfinite_tokens"]
            else []
        ),
        [
            "preference-bearing (DCE &gt; δ)",
            f"{summary['preference_bearing']} ({_num(summary['preference_bearing_fraction'], '.1%')})",
        ],
        ["DCE mean ± std", "–" if d["mean"] is None else f"{_dce(d['mean'])} ± {_dce(d['std'])[1:]}"],
        [
            "DCE min / p10 / p50 / p90 / max",
            " / ".join(_dce(d[k]) for k in ("min", "p10", "p50", "p90", "max")),
        ],
        _weights_row(loss),
    ]
    out = "<h2>Summary</h2>" + _table(["", "value"], rows)
    gt = summary["ground_truth"]
    if gt is not None:
        out += (
            f"<h2>Against the ground truth</h2><p class=meta>Over the {gt['tokens_scored']} tokens with a "
            f"role and a finite DCE in {gt['examples']} synthetic examples: a token is predicted "
            "preference-bearing when DCE &gt; δ; AUROC ranks preference tokens against context and noise "
            "tokens by DCE.</p>"
        )
        out += _table(
            ["precision", "recall", "F1", "DCE AUROC"],
            [[_num(gt[k]) for k in ("precision", "recall", "f1", "auroc")]],
            left=0,
        )
        role_rows = [
            [html.escape(role), str(v["tokens"]), str(v["flagged"]), _num(v["flagged_fraction"], ".1%"),
             "–" if v["mean_dce"] is None else _dce(v["mean_dce"])]
            for role, v in gt["per_role"].items()
        ]  # fmt: skip
        out += _table(["role", "tokens", "flagged", "flagged share", "mean DCE"], role_rows)
    return out


def _example_table(results: Sequence[ExampleEffects], summary: dict[str, Any]) -> str:
    shown = {r.index for r in results}
    has_gt = summary["ground_truth"] is not None
    header = ["example", "user", "category", "tokens", "pref.-bearing", "mean DCE", "max DCE"]
    header += ["precision", "recall", "AUROC"] if has_gt else []
    rows = []
    for e in summary["per_example"]:
        if e["index"] not in shown:
            continue
        row = [
            f'<a href="#ex-{e["index"]}">{e["index"]}</a>',
            html.escape(str(e["user_id"])),
            html.escape(str(e["category"] or "–")),
            str(e["tokens"]),
            str(e["preference_bearing"]),
            _dce(e["mean_dce"]),
            _dce(e["max_dce"]),
        ]
        if has_gt:
            row += [_num(e.get(k)) for k in ("precision", "recall", "auroc")]
        rows.append(row)
    return _table(header, rows, left=3)


def _example(r: ExampleEffects, threshold: float, vmax: float) -> str:
    row = r.row
    finite = r.dce[np.isfinite(r.dce)]
    n_pref = int((finite > threshold).sum())
    nonfinite = f" · {r.dce.size - finite.size} not finite" if finite.size < r.dce.size else ""
    tokens = row.get("tokens", {})
    cut = " · target cut to fit the length limit" if row.get("target_cut") else ""
    spans = "".join(_token_span(r, k, threshold, vmax) for k in range(len(r.pieces)))
    return (
        f'<section class="example" id="ex-{r.index}">'
        f"<h2>Example {r.index} · user {html.escape(str(row.get('user_id')))} · "
        f"{html.escape(str(row.get('category') or '–'))}</h2>"
        f'<p class="meta">{len(r.pieces)} target tokens · {n_pref} preference-bearing{nonfinite} · mean DCE '
        f"{_dce(float(finite.mean()) if finite.size else None)} · history entries used: "
        f"{html.escape(str(row.get('history_used', '–')))}"
        f"{cut}</p>"
        f"<details><summary>Prompt with history ({tokens.get('prompt_with', '?')} tokens)</summary>"
        f"<pre>{html.escape(row['prompt_with_history'])}</pre></details>"
        f"<details><summary>Prompt without history ({tokens.get('prompt_without', '?')} tokens)</summary>"
        f"<pre>{html.escape(row['prompt_without_history'])}</pre></details>"
        f'<div class="target">{spans}</div></section>'
    )


def render_report(
    results: Sequence[ExampleEffects],
    summary: dict[str, Any],
    *,
    threshold: float,
    histogram_png_base64: bytes,
) -> str:
    """The page for the examples `results` (the ones drawn) and the `summary` of all scored examples.

    Args:
        results: the examples to draw, each with [L] pieces, DCE, weights, probabilities (and roles).
        summary: `effect_report.summarize` output plus `split`, `model`, `examples_shown`.
        threshold: δ; tokens with DCE > δ are marked preference-bearing.
        histogram_png_base64: the DCE histogram, base64-encoded PNG, inlined as a data URI.

    Returns:
        The HTML document as a string.
    """
    drawn = np.abs(np.concatenate([r.dce for r in results]))
    drawn = drawn[np.isfinite(drawn)]  # a NaN would make the quantile NaN, an inf saturate every colour
    vmax = max(float(np.quantile(drawn, 0.99)) if drawn.size else 0.0, abs(threshold), 1e-6)
    title = f"NextQuill effect report · split {summary['split']}"
    css = CSS.replace("GRADIENT", ",".join(_hex(c) for c in COLOR_STOPS)).replace(
        "NONFINITE", NONFINITE_COLOR
    )
    has_roles = any(r.roles is not None for r in results)
    toggle = (
        '<p><label><input type="checkbox" id="show-roles"> outline the ground-truth preference tokens '
        "(dashed)</label></p>"
        if has_roles
        else ""
    )
    shown = (
        f"{len(results)} of {len(summary['examples'])} scored examples drawn below."
        if len(results) < len(summary["examples"])
        else f"All {len(results)} scored examples drawn below."
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{css}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Model: {html.escape(summary.get("model") or "–")} · {shown}</p>',
        _legend(threshold, vmax, summary["nonfinite_tokens"]),
        '<div class="row"><div class="col">',
        _overview(summary),
        '</div><div><img alt="Histogram of DCE values" src="data:image/png;base64,'
        f'{histogram_png_base64.decode("ascii")}"></div></div>',
        "<h2>Examples</h2>",
        _example_table(results, summary),
        toggle,
        *(_example(r, threshold, vmax) for r in results),
        f"<script>{SCRIPT}</script>" if has_roles else "",
        "</body></html>",
    ]
    return "\n".join(parts)
