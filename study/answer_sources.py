"""Where a policy's wrong answers come from on multi-hop synthetic tasks, from eval.py's JSON reports.

    python study/answer_sources.py docs/results/learning/grpo_start.json docs/results/learning/grpo_seed1.json

Each report's tasks are rebuilt from its own arguments (env id, split, lengths, --env-kwargs), and
every answer is put in one class:
- `right`: EM 1;
- `none`: no answer given;
- `earlier hop`: an entity of a supporting fact that is not the gold, e.g. the bridge entity of a
  two-hop question (the policy stopped one hop short);
- `look-alike`: an entity of a look-alike fact (a distractor one letter away from a chain entity);
- `other`: anything else (a name from elsewhere in the document, or none of its names).
Synthetic ids only: their tasks record the look-alike sentences.

A second line per cell splits the episodes by the Reads they took (and whether they answered), with how
many of each were right: which path through the memory a policy takes, and how often each path pays.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import gymnasium as gym

import atommem_env  # noqa: F401  (registers the ids)
from agents.evaluation import make_env_kwargs, parse_env_kwargs
from atommem_env.scoring import normalize_answer

CLASSES = ("right", "none", "earlier hop", "look-alike", "other")


def report_tasks(args: dict, context_tokens: int, task_indices: list[int]) -> dict:
    """The report's tasks by index, rebuilt with the arguments eval.py ran with."""
    if atommem_env.ENV_IDS.get(args["env_id"], {}).get("dataset") != "synthetic":
        raise ValueError(f"{args['env_id']}: answer sources need a synthetic env id "
                         "(its tasks list the look-alike facts)")
    kwargs = make_env_kwargs(args["env_id"], split=args["split"], embedder="hashing", context_tokens=context_tokens,
                             chunk_tokens=args.get("chunk_tokens"),
                             extra=parse_env_kwargs(args.get("env_kwargs") or "{}"))
    env = gym.make(args["env_id"], **kwargs)
    try:
        return {i: env.unwrapped.task_source.get(i) for i in sorted(set(task_indices))}
    finally:
        env.close()


def answer_source(record: dict, task) -> str:
    if record["em"]:
        return "right"
    answer = normalize_answer(record["answer"][0]) if record["answer"] else ""
    if not answer:
        return "none"
    supporting = [f.text for q in task.questions for f in q.supporting_facts]
    if any(answer in normalize_answer(text) for text in supporting):
        return "earlier hop"
    if any(answer in normalize_answer(text) for text in dict(task.metadata)["look_alike_facts"]):
        return "look-alike"
    return "other"


def answer_sources(report: dict) -> dict[str, dict[str, Counter]]:
    """{policy: {context length: Counter of CLASSES}} for one eval.py report."""
    sources: dict[str, dict[str, Counter]] = {}
    for policy, cells in report["results"].items():
        for length, cell in cells.items():
            records = cell["records"]
            tasks = report_tasks(report["args"], int(length), [r["task_index"] for r in records])
            counts = Counter({name: 0 for name in CLASSES})
            counts.update(answer_source(r, tasks[r["task_index"]]) for r in records)
            sources.setdefault(policy, {})[length] = counts
    return sources


def read_paths(records: list[dict]) -> dict[str, list]:
    """{"<n> Reads" or "<n> Reads, no answer": [episodes, right]}, by number of Reads."""
    paths: dict[str, list] = {}
    for record in sorted(records, key=lambda r: (r["ops"]["read"], not r["ops"]["answer"])):
        path = f"{record['ops']['read']} Reads" + ("" if record["ops"]["answer"] else ", no answer")
        counts = paths.setdefault(path, [0, 0])
        counts[0] += 1
        counts[1] += int(record["em"])
    return paths


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        try:
            report = json.loads(Path(path).read_text())
            report["args"], report["results"]
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"error: {path} is not an eval.py JSON report ({err})")
        try:
            sources = answer_sources(report)
        except ValueError as err:
            raise SystemExit(f"error: {path}: {err}")
        for policy, cells in sources.items():
            for length, counts in cells.items():
                shown = ", ".join(f"{name} {counts[name]}" for name in CLASSES)
                print(f"{path} {policy} {length}: {sum(counts.values())} episodes: {shown}")
                paths = read_paths(report["results"][policy][length]["records"])
                print(f"{path} {policy} {length}: by Reads (episodes, right): "
                      + "; ".join(f"{name}: {n} ({right})" for name, (n, right) in paths.items()))
