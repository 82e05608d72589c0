"""What a policy did with the facts a volatile synthetic document supersedes, from an eval.py report and the
step-wise trajectories saved with it (`eval.py ... --save-trajectories FILE`).

    python study/update_steps.py --report docs/results/x.json --trajectories x.jsonl      # docs/study_log.md, item 3

Each task is rebuilt from the report's arguments (study/answer_sources.py). For every superseded fact of an
episode's task (the stale statement, `current=False`, and the later one with the same key), the episode's
handling of it is one of:
- `updated`: an Update rewrote an entry that its step's prompt showed with the stale value into the new value;
- `created beside`: the new value was Created (the stale entry, if stored, stays);
- `missed`: neither: the new value never reached memory.
Every Update the policy made is one of `stale -> new` (the case above), `stale -> other` (the stale entry
rewritten with other text), `other entry` (an entry shown with other text: a fact it may still need), `id not
shown` (no entry of that id in the step's prompt); and how many took the first entry the prompt showed (a
Read's best match). Statements match by their distinguishing words: the new
value's words that the stale one lacks, and the reverse, so a copy with other punctuation still counts.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import tyro

from agents.trajectories import read_trajectories
from answer_sources import report_tasks  # this folder is on sys.path when run as a script
from atommem_env.scoring import normalize_answer
from join_reports import read_eval_report

FACT_CLASSES = ("updated", "created beside", "missed")
UPDATE_CLASSES = ("stale -> new", "stale -> other", "other entry", "id not shown")
SHOWN_ENTRY = re.compile(r"^\[id (\d+)\] (.*)$", re.MULTILINE)


@dataclass
class Args:
    report: str
    """eval.py JSON report of the run (its args rebuild the tasks)"""
    trajectories: str
    """the --save-trajectories file of the same run"""


def words(text: str) -> set[str]:
    return set(normalize_answer(text).split())


def superseded_pairs(task) -> list[tuple[str, str]]:
    """(stale statement, the statement that replaces it) of every superseded fact of the task's questions."""
    facts = [f for q in task.questions for f in q.supporting_facts]
    return [(stale.text, new.text) for stale in facts if not stale.current
            for new in facts if new.key == stale.key and new.current]


def carries(text: str, statement: str, other: str) -> bool:
    """Whether `text` states `statement` rather than `other` (their distinguishing words)."""
    own = words(statement) - words(other)
    return bool(own) and own <= words(text)


def episode_classes(steps: list[dict], pairs: list[tuple[str, str]]) -> tuple[list[str], list[str], int]:
    """(a FACT_CLASSES entry per superseded pair, an UPDATE_CLASSES entry per Update op, Updates of the first
    entry shown) of one episode."""
    updates, facts = [], []
    updated_pairs, on_first = set(), 0
    for step in steps:
        shown_in_order = SHOWN_ENTRY.findall(step["messages"][-1]["content"])
        shown = dict(shown_in_order)
        for op in step["ops"]:
            if op["op"] != "update":
                continue
            on_first += bool(shown_in_order) and shown_in_order[0][0] == str(op["entry_id"])
            old = shown.get(str(op["entry_id"]))
            if old is None:
                updates.append("id not shown")
                continue
            hit = next((pair for pair in pairs if carries(old, *pair)), None)
            if hit is None:
                updates.append("other entry")
            elif carries(op["text"], hit[1], hit[0]):
                updates.append("stale -> new")
                updated_pairs.add(hit)
            else:
                updates.append("stale -> other")
    created = [op["text"] for step in steps for op in step["ops"] if op["op"] == "create"]
    for pair in pairs:
        if pair in updated_pairs:
            facts.append("updated")
        elif any(carries(text, pair[1], pair[0]) for text in created):
            facts.append("created beside")
        else:
            facts.append("missed")
    return facts, updates, on_first


def update_steps(report: dict, lines: list[dict]) -> dict[str, dict]:
    """{"<policy> <cell>": {"facts": {class: [episodes, right]}, "updates": Counter, "on_first": n,
    "episodes": n}}."""
    episodes: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        episodes[line["episode_id"]].append(line)
    by_cell: dict[tuple[str, str], list[list[dict]]] = defaultdict(list)
    for steps in episodes.values():
        by_cell[(steps[0].get("policy", "?"), steps[0].get("cell", "?"))].append(sorted(steps, key=lambda s: s["step"]))
    summary = {}
    for (policy, cell), cell_episodes in by_cell.items():
        if not cell.isdigit():
            raise SystemExit(f"error: cell {cell!r}: update steps need a synthetic env id's length cells")
        tasks = report_tasks(report["args"], int(cell), [steps[0]["task_index"] for steps in cell_episodes])
        facts = {name: [0, 0] for name in FACT_CLASSES}
        updates, on_first = Counter({name: 0 for name in UPDATE_CLASSES}), 0
        for steps in cell_episodes:
            fact_classes, update_classes, first = episode_classes(steps,
                                                                  superseded_pairs(tasks[steps[0]["task_index"]]))
            on_first += first
            for name in fact_classes:
                facts[name][0] += 1
                facts[name][1] += int(steps[-1]["em"])
            updates.update(update_classes)
        summary[f"{policy} {cell}"] = {"episodes": len(cell_episodes), "facts": facts, "updates": updates,
                                       "on_first": on_first}
    return summary


if __name__ == "__main__":
    args = tyro.cli(Args)
    report = read_eval_report(Path(args.report))
    try:
        lines = read_trajectories(args.trajectories)
        summary = update_steps(report, lines)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    if not summary:
        raise SystemExit(f"error: {args.trajectories} holds no steps")
    for name, cell in summary.items():
        facts = "; ".join(f"{k} {n} ({right} right)" for k, (n, right) in cell["facts"].items())
        updates = ", ".join(f"{k} {n}" for k, n in cell["updates"].items())
        print(f"{name}: {cell['episodes']} episodes; superseded facts: {facts}; Updates: {updates} "
              f"({cell['on_first']} of the first entry shown)")
