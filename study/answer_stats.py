"""How spread out a policy's answers are, from eval.py's JSON reports: does it read, or guess one name?

    python study/answer_stats.py reports/toy_sft.json reports/toy_grpo.json

Per report, policy and context length: EM, the number of distinct answers, the most common answer
(how often it is given, how often it is the gold, how often it is right), the share of the three
most common answers, the share of answers that are the gold of some episode (a name of the right
sort), and the EM of always giving the most frequent gold answer (a guess that reads nothing).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def first(values: list) -> str:
    return values[0] if values else ""


def answer_stats(records: list[dict]) -> dict:
    answers = Counter(first(r["answer"]) for r in records)
    golds = Counter(first(r["gold"][0]) if r["gold"] else "" for r in records)
    top, given = answers.most_common(1)[0]
    n = len(records)
    return {
        "em": sum(r["em"] for r in records) / n,
        "distinct_answers": len(answers),
        "top_answer": top, "top_given": given, "top_is_gold": golds[top],
        "top_right": sum(r["em"] for r in records if first(r["answer"]) == top),
        "top3_share": sum(c for _, c in answers.most_common(3)) / n,
        "gold_of_some_episode": sum(c for answer, c in answers.items() if answer in golds) / n,
        "constant_guess_em": golds.most_common(1)[0][1] / n,
    }


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for path in sys.argv[1:]:
        try:
            results = json.loads(Path(path).read_text())["results"]
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"error: {path} is not an eval.py JSON report ({err})")
        for policy, by_length in results.items():
            for length, result in by_length.items():
                s = answer_stats(result["records"])
                print(f"{path} {policy} {length}: {len(result['records'])} episodes, EM {s['em']:.3f}, "
                      f"{s['distinct_answers']} distinct answers; most common {s['top_answer']!r} given "
                      f"{s['top_given']}x, gold {s['top_is_gold']}x, right {s['top_right']:.0f}x; top 3 cover "
                      f"{s['top3_share']:.2f}; {s['gold_of_some_episode']:.2f} of answers are some episode's gold; "
                      f"constant best guess EM {s['constant_guess_em']:.3f}")
