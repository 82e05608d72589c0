"""Diagnosis of an LLM policy's failed episodes: its actions step by step, and where its answer came from.

    python study/diagnose_episodes.py --checkpoint runs/<sft run>/checkpoint \\
        --report docs/results/learning/sft_128ep.json                       # docs/train_sft.md, 128 episodes
    python study/diagnose_episodes.py --checkpoint runs/<grpo run>/checkpoint \\
        --report docs/results/learning/grpo_seed1.json --env-id AtomMem/Synthetic-v0 --context-tokens 800 \\
        --chunk-tokens 256 --only-unanswered --num-episodes 3                 # docs/train_grpo.md, round 2

Reruns, greedy with transformers, the first wrong eval-split episodes that an eval.py report records
(`--only-unanswered`: those that ended without an answer), prints each step's feedback, retrieved entries
and action, then whether the answer and the gold answer appear in the document and the sentence the answer
was taken from.
"""
import json
import re
from dataclasses import dataclass

import tyro

from agents import HFGenerator, LLMPolicy
from agents.evaluation import make_env_kwargs, make_vector_env, run_episodes


@dataclass
class Args:
    checkpoint: str
    """the policy's checkpoint directory (or any model eval.py loads)"""
    report: str
    """eval.py JSON report of that policy on the same env and length"""
    env_id: str = "AtomMem/SyntheticEasy-v0"
    """env id of the report"""
    context_tokens: int = 400
    """document length of the report's cell"""
    chunk_tokens: int | None = None
    """chunk size (default: the env id's registered one)"""
    num_episodes: int = 6
    """how many wrong episodes to rerun"""
    only_unanswered: bool = False
    """rerun only wrong episodes that gave no answer"""


def main(args: Args) -> None:
    try:
        records = json.load(open(args.report))["results"]["llm"][str(args.context_tokens)]["records"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: {args.report} has no llm records at {args.context_tokens} tokens ({err!r})")
    wrong = [r["task_index"] for r in records
             if r["em"] == 0 and (not args.only_unanswered or not any(r["answer"]))][:args.num_episodes]
    if not wrong:
        raise SystemExit("error: the report has no such episode")
    generator = HFGenerator.from_pretrained(args.checkpoint, device="cpu", dtype="float32", max_new_tokens=96,
                                            max_prompt_tokens=1024)
    env_kwargs = make_env_kwargs(args.env_id, split="eval", embedder="hashing", context_tokens=args.context_tokens,
                                 chunk_tokens=args.chunk_tokens)
    envs = make_vector_env(args.env_id, env_kwargs, len(wrong))
    episodes = run_episodes(envs, LLMPolicy(generator), [[t] for t in wrong], seed=0, keep_steps=True)
    for e in episodes:
        print("=== task", e["task_index"], "gold", e["gold"], "answer", e["answer"], "invalid ops", e["invalid_ops"])
        for obs, out in e["steps"]:
            print("  feedback:", obs["feedback"][:160].replace("\n", " / "), "| retrieved:",
                  obs["retrieved"][:150].replace("\n", " / "), "| ACTION:", repr(out.text[:220]))
    print("---")
    for e in episodes:
        document = " ".join(obs["chunk"] for obs, _ in e["steps"])
        answer = e["answer"][0] if e["answer"] else ""
        source = [s for s in re.split(r"(?<=\.)\s", document) if answer and answer in s][:1]
        print(repr(answer), "in document:", bool(answer) and answer in document, "| gold in document:",
              e["gold"][0][0] in document, "| sentence with the answer:", source)


if __name__ == "__main__":
    main(tyro.cli(Args))
