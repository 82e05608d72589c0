"""Paired EM difference between two eval.py reports on the same tasks: `after` − `before`, per length cell.

    python study/paired.py --before docs/results/branching/volbudget_grpo_episode.json \
        --after docs/results/branching/volbudget_grpo_branch.json

Episodes are matched by task id, so the difference is measured on the tasks both reports ran; its standard error
is that of the per-task differences (paired), smaller than the two reports' errors combined where the two
policies succeed on the same tasks. Also counted: tasks gained (wrong before, right after) and lost. A report
with two policies, a task id twice in one cell, or no shared task is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import tyro

from join_reports import read_eval_report


@dataclass
class Args:
    before: str
    """eval.py JSON report of the reference policy"""
    after: str
    """eval.py JSON report of the policy compared with it"""
    out: str | None = None
    """also write the differences as JSON here"""


def cells_by_task(path: Path) -> dict[str, dict[str, float]]:
    """{length cell: {task id: EM}} of a report's one policy."""
    report = read_eval_report(path)
    if len(report["results"]) != 1:
        raise SystemExit(f"error: {path} holds {sorted(report['results'])}: give one policy per report")
    (cells,) = report["results"].values()
    by_cell = {}
    for cell, summary in cells.items():
        ems = {}
        for record in summary.get("records", []):
            if record["task_id"] in ems:
                raise SystemExit(f"error: {path}: task {record['task_id']} ran twice at {cell}")
            ems[record["task_id"]] = float(record["em"])
        by_cell[cell] = ems
    return by_cell


def paired(before: dict[str, float], after: dict[str, float]) -> dict:
    shared = sorted(set(before) & set(after))
    if not shared:
        raise SystemExit("error: the reports share no task")
    diffs = [after[t] - before[t] for t in shared]
    n = len(diffs)
    mean = sum(diffs) / n
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return {"tasks": n, "em_before": sum(before[t] for t in shared) / n, "em_after": sum(after[t] for t in shared) / n,
            "difference": mean, "stderr": stderr, "gained": sum(d > 0 for d in diffs), "lost": sum(d < 0 for d in diffs)}


if __name__ == "__main__":
    args = tyro.cli(Args)
    before, after = cells_by_task(Path(args.before)), cells_by_task(Path(args.after))
    results = {cell: paired(before[cell], after[cell]) for cell in sorted(set(before) & set(after))}
    if not results:
        raise SystemExit(f"error: no length cell in both reports ({sorted(before)} and {sorted(after)})")
    for cell, r in results.items():
        print(f"{cell}: {r['tasks']} tasks, EM {r['em_before']:.3f} -> {r['em_after']:.3f}, paired "
              f"{r['difference']:+.3f} ± {r['stderr']:.3f} ({r['gained']} gained, {r['lost']} lost)")
    if args.out:
        Path(args.out).write_text(json.dumps({"before": args.before, "after": args.after, "cells": results}, indent=1)
                                  + "\n", encoding="utf-8")
