"""The scaling sweep's plot: tokens/s, memory and MFU against each swept variable."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_rows(rows: Sequence[Mapping[str, str]], png_path: Path, source: str) -> Path:
    """Plot tokens/s, memory and MFU (TFLOP/s where no MFU is known) against every variable that takes more
    than one value in the sweep's CSV `rows` (named `source` in the title), one line per combination of the
    others; returns `png_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (x column, the key column it varies, axis label)
    variables = [
        ("params", "model", "model parameters"),
        ("seq_len", "seq_len", "sequence length (with stream)"),
        ("history", "history", "history entries"),
        ("devices", "mesh", "devices"),
    ]
    swept = [v for v in variables if len({r[v[1]] for r in rows}) > 1] or variables[:1]
    metrics = [
        ("tokens_per_s", "tokens/s"),
        (
            "device_peak_mib" if any(r["device_peak_mib"] for r in rows) else "compiled_total_mib",
            "memory MiB",
        ),
        ("mfu", "MFU") if any(r["mfu"] for r in rows) else ("tflops_per_s", "TFLOP/s"),
    ]
    fig, axes = plt.subplots(len(swept), 3, figsize=(13, 3.6 * len(swept)), squeeze=False)
    for (x_col, key_col, label), ax_row in zip(swept, axes, strict=True):
        others = [k for _, k, _ in variables if k != key_col]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault(tuple(r[o] for o in others), []).append(r)
        for (metric, metric_label), ax in zip(metrics, ax_row, strict=True):
            for group_key, members in sorted(groups.items()):
                members = sorted((m for m in members if m[metric]), key=lambda m: float(m[x_col]))
                if members:
                    ax.plot(
                        [float(m[x_col]) for m in members],
                        [float(m[metric]) for m in members],
                        marker="o",
                        label=", ".join(f"{o}={g}" for o, g in zip(others, group_key, strict=True)),
                    )
            ax.set_xlabel(label)
            ax.set_ylabel(metric_label)
            ax.grid(alpha=0.3)
            if x_col in ("params", "seq_len"):
                ax.set_xscale("log")
        ax_row[0].legend(fontsize=7)
    kinds = sorted({r["device_kind"] for r in rows})
    fig.suptitle(f"NextQuill training step scaling ({', '.join(kinds)}; {source})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
