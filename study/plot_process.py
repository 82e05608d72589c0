"""Process metrics per chunk from an eval.py report: what memory holds of the gold and stale facts as a policy reads.

    python study/plot_process.py --reports reports/full.json reports/ablated.json --out process_by_chunk.png

For each report, policy and length cell: at the end of each chunk (the last step shown that chunk; the
answer phase counts as the chunk after the last), the mean over episodes of the gold facts held (as a share of
the episode's gold facts) and of the stale facts held (a count), against the chunk's position in the document.
Prints the points, so the numbers quoted beside the figure come from it. Reports made before eval.py recorded the
process metrics (no `by_step` in their records) are refused.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from join_reports import read_eval_report  # noqa: E402  (this folder is on sys.path when run as a script)


@dataclass
class Args:
    reports: tuple[str, ...]
    """eval.py JSON reports (each line is labelled with its report's file name)"""
    out: str = "process_by_chunk.png"
    """where the figure goes"""
    bins: int = 10
    """positions in the document are grouped into this many bins (documents differ in chunk count)"""


def by_position(records: list[dict], bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin centres, mean share of gold facts held, mean stale facts held) at the end of each chunk."""
    gold, stale = defaultdict(list), defaultdict(list)
    for record in records:
        if "by_step" not in record:
            raise SystemExit("error: the report's records have no by_step: it predates eval.py's process metrics")
        last_of_chunk = {chunk: (g, s) for chunk, g, s, _ in record["by_step"]}
        for chunk, (g, s) in last_of_chunk.items():
            where = min(int(chunk / (record["num_chunks"] + 1) * bins), bins - 1)
            gold[where].append(g / record["gold_facts"] if record["gold_facts"] else 0.0)
            stale[where].append(s)
    keys = sorted(gold)
    return ((np.array(keys) + 0.5) / bins, np.array([np.mean(gold[k]) for k in keys]),
            np.array([np.mean(stale[k]) for k in keys]))


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.bins <= 0:
        raise SystemExit("error: --bins must be positive")
    reports = {Path(path).stem: read_eval_report(Path(path)) for path in args.reports}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, report in reports.items():
        for policy, cells in report["results"].items():
            for cell, summary in cells.items():
                x, gold, stale = by_position(summary["records"], args.bins)
                label = f"{name}: {policy} {cell}"
                left.plot(x, gold, marker="o", label=label)
                right.plot(x, stale, marker="o", label=label)
                print(f"{label}: " + ", ".join(f"{p:.2f}: gold {g:.2f} stale {s:.2f}"
                                               for p, g, s in zip(x, gold, stale)))
    left.set(xlabel="position in the document (chunks read)", ylabel="share of gold facts held", ylim=(0, 1.05))
    right.set(xlabel="position in the document (chunks read)", ylabel="stale facts held")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
