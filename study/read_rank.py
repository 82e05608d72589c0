"""Where a per-hop Read ranks each hop's gold fact when memory holds what the `oracle-hops` teacher stores.

    python study/read_rank.py --context-tokens 16000 --env-kwargs \\
        '{"synthetic": {"hops": [2, 2], "distractors": 40, "volatility": 0}}'   # docs/study_log.md, item 2

Builds tasks 0..N-1 of a split (train by default: a diagnosis, not a result), writes every supporting fact and
every look-alike sentence into a `VectorMemory` with the env's embedder (the teacher's memory, and what its
students store: one entry per sentence), Reads with the teacher's per-hop queries (`hop_reads`: the question,
then each hop's subject) and prints, per hop, the share of tasks whose gold fact is among the top k entries for
each k, and the share of tasks where every hop's fact is. No model: it measures the retrieval, not the policy.
"""
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import tyro

import atommem_env
from agents.evaluation import make_env_kwargs, parse_env_kwargs
from agents.policies import hop_chain, hop_reads
from atommem_env.memory import VectorMemory


@dataclass
class Args:
    env_id: str = "AtomMem/Synthetic-v0"
    """a synthetic env id (its facts carry the subject keys the per-hop queries follow)"""
    split: str = "train"
    """task split (train: probes; eval is for reported numbers)"""
    context_tokens: int = 800
    """document length"""
    env_kwargs: str = "{}"
    """extra gym.make keyword arguments, as JSON (the synthetic knobs)"""
    embedder: str = "hashing"
    """memory embedder: hashing, minilm or st:<model>"""
    num_tasks: int = 64
    """tasks 0..N-1 of the split"""
    top_ks: list[int] = field(default_factory=lambda: [1, 2, 6, 10, 16, 26])
    """the k values to report"""


def gold_ranks(task, embedder) -> list[int]:
    """The rank (1-based) of each hop's gold fact in the teacher's Read for that hop (its query: `hop_reads`)."""
    memory = VectorMemory(embedder=embedder)
    stored = [f.text for f in task.questions[0].supporting_facts] + list(task.meta.get("look_alike_facts", ()))
    memory.create_many(list(dict.fromkeys(stored)))
    ranks = []
    for fact, (query, _) in zip(hop_chain(task), hop_reads(task)):
        texts = [entry.text for entry in memory.read(query, len(memory))]
        ranks.append(texts.index(fact.text) + 1)
    return ranks


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.env_id not in atommem_env.ENV_IDS or args.env_id in atommem_env.DATA_ENV_IDS:
        raise SystemExit(f"error: {args.env_id!r} is not a synthetic env id (their facts carry the subject keys the "
                         "per-hop queries follow)")
    if args.num_tasks <= 0 or not args.top_ks or min(args.top_ks) <= 0:
        raise SystemExit("error: --num-tasks and every --top-ks must be positive")
    try:
        extra = parse_env_kwargs(args.env_kwargs)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    try:
        env = gym.make(args.env_id, **make_env_kwargs(args.env_id, split=args.split, embedder=args.embedder,
                                                     context_tokens=args.context_tokens, extra=extra))
        source, embedder = env.unwrapped.task_source, env.unwrapped.memory.embedder
        env.close()
        tasks = [source.get(i) for i in range(args.num_tasks)]
    except (TypeError, ValueError, RuntimeError) as err:
        raise SystemExit(f"error: the env or its tasks cannot be built with these arguments: {err}")
    ranks = [gold_ranks(task, embedder) for task in tasks]
    hops = max(map(len, ranks))
    look_alikes = np.mean([len(t.meta.get("look_alike_facts", ())) for t in tasks])
    print(f"{args.env_id} {args.split} split, {args.context_tokens} tokens, {args.num_tasks} tasks, "
          f"{look_alikes:.1f} look-alike sentences a task, embedder {args.embedder}")
    print("hop  median rank  " + "  ".join(f"top-{k:<3d}" for k in args.top_ks))
    for hop in range(hops):
        column = [r[hop] for r in ranks if len(r) > hop]
        print(f"{hop + 1:<4d} {np.median(column):11.1f}  " +
              "  ".join(f"{np.mean([r <= k for r in column]):6.3f}" for k in args.top_ks))
    print("all  " + " " * 12 + "  ".join(
        f"{np.mean([all(r <= k for r in rank) for rank in ranks]):6.3f}" for k in args.top_ks))
