"""EM against document length from several eval.py reports in one figure: the study's length plot.

    python study/plot_em_vs_length.py --reports docs/results/study/length_twohop_llm_run4.json \
        docs/results/study/length_twohop_llm_16k_run4.json docs/results/study/length_lookalikes_llm_4k_run4.json \
        --labels "2 look-alikes" "2 look-alikes" "2.5 look-alikes per 1k tokens" --out em_vs_length.png

eval.py draws one report's lengths; a sweep run one length per command (so that each survives the next)
is several reports. Reports with the same label join into one line per policy (a length in two of them
is refused). Also prints every point, so the numbers quoted beside the figure come from it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from join_reports import by_length, read_report  # noqa: E402  (this folder is on sys.path when run as a script)
from eval import plot  # noqa: E402  (the figure eval.py draws for one report)


@dataclass
class Args:
    reports: tuple[str, ...]
    """eval.py JSON reports"""
    labels: list[str] = field(default_factory=list)
    """series label per report; reports with the same label are one line (default: the report's file name)"""
    out: str = "em_vs_length.png"
    """where the figure goes"""


def merge_reports(reports: list[Path], labels: list[str]) -> dict[str, dict[str, dict]]:
    """{"<label>: <policy>" (or the label alone for a one-policy report): {length cell: summary}}."""
    series: dict[str, dict[str, dict]] = {}
    for path, label in zip(reports, labels):
        cells = {policy: {cell: {"em": s["em"], "em_stderr": s["em_stderr"]} for cell, s in by_cell.items()}
                 for policy, by_cell in read_report(path)["results"].items()}
        for policy, by_cell in cells.items():
            line = series.setdefault(label if len(cells) == 1 else f"{label}: {policy}", {})
            twice = sorted(set(line) & set(by_cell))
            if twice:
                raise SystemExit(f"error: {path}: {label!r} already has a point at {twice}")
            line.update(by_cell)
    return series


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.labels and len(args.labels) != len(args.reports):
        raise SystemExit("error: give one --labels entry per report")
    paths = [Path(r) for r in args.reports]
    series = merge_reports(paths, args.labels or [p.stem for p in paths])
    for name, by_cell in series.items():
        points = by_length(by_cell)
        print(f"{name}: " + ", ".join(f"{cell} {s['em']:.3f} ± {s['em_stderr']:.3f}" for cell, s in points))
    plot(series, Path(args.out))
    print(f"wrote {args.out}")
