"""Joins eval.py reports of one setting into one report with a key per policy and length: the study's
`length_twohop.json` from a sweep run one length (or one policy) per command, so that each survived the next.

    python study/join_reports.py --reports docs/results/study/length_twohop_llm_run4.json \
        docs/results/study/length_twohop_llm_16k_run4.json docs/results/study/length_twohop_rag_base.json \
        --out docs/results/study/length_twohop.json

The commands behind the reports differ (model, number of episodes), so no one `args` stands for the joined
report: `joined_from` keeps each source's path and args, and every cell names the report it came from
(`source`), where its per-episode records stay (study/answer_sources.py reads those). The same policy at the
same length in two reports is refused, as is anything that is not an eval.py report.
study/plot_em_vs_length.py reads the joined report like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass
class Args:
    reports: tuple[str, ...]
    """eval.py JSON reports to join"""
    out: str
    """where the joined report goes (.json)"""


def read_report(path: Path) -> dict:
    """An eval.py JSON report (or a joined one): its "results" are {policy: {length cell: summary}}."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        for cells in report["results"].values():
            for summary in cells.values():
                summary["em"], summary["em_stderr"], summary["episodes"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise SystemExit(f"error: {path} is not an eval.py JSON report ({err!r})") from None
    return report


def read_eval_report(path: Path) -> dict:
    """An eval.py report itself, not a joined one: what ran (its "args") is needed."""
    report = read_report(path)
    if "args" not in report:
        raise SystemExit(f"error: {path} has no args: give the eval.py reports themselves, not a joined one")
    return report


def by_length(cells: dict[str, dict]) -> list[tuple[str, dict]]:
    """A policy's cells in the order of their length ("800" before "4000"); other cells ("400docs") first."""
    return sorted(cells.items(), key=lambda item: int(item[0]) if item[0].isdigit() else -1)


def join_reports(paths: list[Path]) -> dict:
    joined = {"joined_from": {}, "results": {}}
    for path in paths:
        report = read_eval_report(path)
        joined["joined_from"][str(path)] = report["args"]
        for policy, cells in report["results"].items():
            by_cell = joined["results"].setdefault(policy, {})
            twice = sorted(set(by_cell) & set(cells))
            if twice:
                raise SystemExit(f"error: {path}: {policy} at {twice} is already in "
                                 f"{by_cell[twice[0]]['source']}")
            by_cell.update({cell: {**{k: v for k, v in summary.items() if k != "records"}, "source": str(path)}
                            for cell, summary in cells.items()})
    return joined


if __name__ == "__main__":
    args = tyro.cli(Args)
    joined = join_reports([Path(r) for r in args.reports])
    Path(args.out).write_text(json.dumps(joined, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for policy, cells in joined["results"].items():
        print(f"{policy}: " + ", ".join(f"{cell} {s['em']:.3f} ± {s['em_stderr']:.3f} ({s['episodes']} episodes)"
                                        for cell, s in by_length(cells)))
    print(f"wrote {args.out}")
