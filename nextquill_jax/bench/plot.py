"""The scaling sweep's plot: tokens/s, memory and MFU against each swept variable."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

# A legend's entries per column: about as many as a row of panels is tall at font size 8, so that a long
# legend grows sideways, not into the next row's.
LEGEND_ROWS = 12

# (x column, the key column it varies, axis label); the x column is also the number that orders the key's
# values (a model by its parameter count, a mesh by its devices), so lines and colours follow size.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("params", "model", "model parameters"),
    ("seq_len", "seq_len", "sequence length (with stream)"),
    ("history", "history", "history entries"),
    ("devices", "mesh", "devices"),
)


def natural_key(text: str) -> tuple[str | int, ...]:
    """`text` split into text and whole numbers, so "tiny-32" sorts before "tiny-128"."""
    # re.split with a group puts the digit runs at the odd positions
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", text)))


def value_ranks(rows: Sequence[Mapping[str, str]], x_col: str, key_col: str) -> dict[str, int]:
    """Each value of `key_col` in `rows` -> its place in plotting order: by its rows' `x_col` number, ties
    (two meshes of as many devices, say) by the natural order of the value."""
    x_of = {r[key_col]: float(r[x_col]) for r in rows}
    ordered = sorted(x_of, key=lambda v: (x_of[v], natural_key(v)))
    return {v: i for i, v in enumerate(ordered)}


def count_label(n: float) -> str:
    """A parameter count for a tick: "90.4k", "1.02M", "7.62B", "1.5T" (3 significant digits), "512" below
    1000."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        # compared as rounded to the 3 digits shown: 999,999 is "1M", not "1e+03k"
        if float(f"{n:.3g}") >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def x_ticks(rows: Sequence[Mapping[str, str]], x_col: str) -> tuple[list[float], list[str]]:
    """The swept values of `x_col` in `rows` (ascending) and their tick labels: the CSV's own text ("256"),
    or for a parameter count its short form over the name(s) of its model(s)."""
    texts: dict[float, list[str]] = {}
    for r in rows:
        text = r["model"] if x_col == "params" else r[x_col]
        if text not in texts.setdefault(float(r[x_col]), []):
            texts[float(r[x_col])].append(text)
    xs = sorted(texts)
    if x_col != "params":
        return xs, [texts[x][0] for x in xs]
    return xs, [f"{count_label(x)}\n{', '.join(texts[x])}" for x in xs]


def scaling_figure(rows: Sequence[Mapping[str, str]], source: str) -> Figure:
    """The figure of tokens/s, memory and MFU (TFLOP/s where no MFU is known) against every variable that
    takes more than one value in the sweep's CSV `rows` (named `source` in the title): a row of three panels
    per variable, one line per combination of the other variables, in numeric order (models by parameter
    count). A line's label names only the variables that vary in the CSV; those that do not are named once,
    in the title. Each row's legend sits right of its panels, outside every axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    swept = [v for v in VARIABLES if len({r[v[1]] for r in rows}) > 1] or list(VARIABLES[:1])
    varying = {k for _, k, _ in VARIABLES if len({r[k] for r in rows}) > 1}
    ranks = {k: value_ranks(rows, x, k) for x, k, _ in VARIABLES}
    metrics = [
        ("tokens_per_s", "tokens/s"),
        (
            "device_peak_mib" if any(r["device_peak_mib"] for r in rows) else "compiled_total_mib",
            "memory MiB",
        ),
        ("mfu", "MFU") if any(r["mfu"] for r in rows) else ("tflops_per_s", "TFLOP/s"),
    ]
    # constrained layout makes room for the legends outside the axes and for the two-line title
    fig = Figure(figsize=(15, 3.6 * len(swept) + 0.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(swept), 3, squeeze=False)
    for (x_col, key_col, label), ax_row in zip(swept, axes, strict=True):
        others = [k for _, k, _ in VARIABLES if k != key_col]
        groups: dict[tuple[str, ...], list[Mapping[str, str]]] = {}
        for r in rows:
            groups.setdefault(tuple(r[o] for o in others), []).append(r)
        ordered = sorted(groups, key=lambda g: [ranks[o][v] for o, v in zip(others, g, strict=True)])
        legend: dict[str, Line2D] = {}
        for (metric, metric_label), ax in zip(metrics, ax_row, strict=True):
            # a colour per group, not per drawn line: a group without this metric keeps the others' colours
            for color, group_key in enumerate(ordered):
                members = sorted((m for m in groups[group_key] if m[metric]), key=lambda m: float(m[x_col]))
                name = ", ".join(f"{o}={g}" for o, g in zip(others, group_key, strict=True) if o in varying)
                if members:
                    (line,) = ax.plot(
                        [float(m[x_col]) for m in members],
                        [float(m[metric]) for m in members],
                        marker="o",
                        color=f"C{color % 10}",
                        label=name,
                    )
                    legend.setdefault(name, line)
            ax.set_xlabel(label)
            ax.set_ylabel(metric_label)
            ax.grid(alpha=0.3)
            if x_col in ("params", "seq_len"):
                ax.set_xscale("log")
            # ticks at the swept values only: a log axis over less than a decade otherwise labels 3×10², ...
            ax.set_xticks(*x_ticks(rows, x_col))
            ax.xaxis.set_minor_locator(NullLocator())
        if len(ordered) > 1:  # one line has nothing to tell apart
            ax_row[-1].legend(
                list(legend.values()),
                list(legend),
                loc="upper left",
                bbox_to_anchor=(1.03, 1.0),
                borderaxespad=0.0,
                fontsize=8,
                ncols=-(-len(legend) // LEGEND_ROWS),
            )
    kinds = sorted({r["device_kind"] for r in rows})
    title = f"NextQuill training step scaling ({', '.join(kinds)}; {source})"
    constant = [f"{k}={rows[0][k]}" for _, k, _ in VARIABLES if k not in varying]
    fig.suptitle(title + (f"\nthe same for every line: {', '.join(constant)}" if constant else ""))
    return fig


def plot_rows(rows: Sequence[Mapping[str, str]], png_path: Path, source: str) -> Path:
    """Draw `scaling_figure(rows, source)` to the PNG `png_path`; returns `png_path`."""
    # "tight" keeps what lies outside the axes (the legends) in the image
    scaling_figure(rows, source).savefig(png_path, bbox_inches="tight")
    return png_path
