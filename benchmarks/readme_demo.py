"""Regenerate the README's demo figures (its table, reading and times) from demo runs.

    python benchmarks/readme_demo.py            # runs `nextquill-jax demo` and `demo --quick`, then rewrites
    python benchmarks/readme_demo.py --reuse    # rewrites from demo_out/ and demo_quick_out/ as they are

Everything between the README's `<!-- demo:begin -->` and `<!-- demo:end -->` lines is replaced by the date,
seed and wall time of both runs (their results.json `seconds.total`), the full run's results.md table with its
paired intervals, and its reading. Any commit that changes those figures runs this script in the same commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nextquill_jax.argument_parser import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"


def run_demo(out: Path, quick: bool) -> None:
    """`nextquill-jax demo [--quick] --out OUT` in a subprocess, its output passed through."""
    cmd = [
        sys.executable,
        "-m",
        "nextquill_jax.cli",
        "demo",
        "--out",
        str(out),
        *(["--quick"] if quick else []),
    ]
    subprocess.run(cmd, check=True, cwd=REPO)


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def demo_block(full: dict, quick: dict, table: str) -> str:
    """The README block: the runs' provenance and times, the comparison table and the reading."""
    return "\n".join(
        [
            BEGIN,
            f"A real run ({full['date']}, seed {full['seed']}, `nextquill-jax demo`: "
            f"{_minutes(full['seconds']['total'])} on a {os.cpu_count()}-core machine, load average "
            f"{os.getloadavg()[0]:.1f} when this was written; `--quick` took "
            f"{_minutes(quick['seconds']['total'])}), its `results.md` table and reading (every difference "
            f"with its interval: `demo_out/results.md`):",
            "",
            table.strip(),
            "",
            f"> Reading: {full['reading']}",
            END,
        ]
    )


def comparison_table(results_md: str) -> str:
    """The table of a demo's results.md (the differences' intervals are in the reading and in results.md)."""
    start = results_md.index("| variant |")
    end = results_md.index("\n\n", start)
    return results_md[start:end]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_out")
    parser.add_argument("--quick-out", type=Path, default=REPO / "demo_quick_out")
    parser.add_argument(
        "--reuse", action="store_true", help="read the runs in --out / --quick-out, run nothing"
    )
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    if not args.reuse:
        run_demo(args.out, quick=False)
        run_demo(args.quick_out, quick=True)
    full = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
    quick = json.loads((args.quick_out / "results.json").read_text(encoding="utf-8"))
    table = comparison_table((args.out / "results.md").read_text(encoding="utf-8"))
    readme = args.readme.read_text(encoding="utf-8")
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise SystemExit(f"error: {args.readme} must hold one {BEGIN} line and one {END} line")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    args.readme.write_text(head + demo_block(full, quick, table) + tail, encoding="utf-8")
    print(f"{args.readme}: demo block rewritten from {args.out} and {args.quick_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
