"""Does an SFT student take its teacher's decision on the teacher's own states? Step kinds, teacher against student.

    python study/teacher_forced.py --checkpoint runs/<sft run>/checkpoint --teacher oracle-scan \\
        --env-id AtomMem/SyntheticVolatileBudget-v0 --num-tasks 4              # docs/study_log.md, section 8

The teacher plays train tasks 0..N-1 (the student's own training tasks: a fit check, not an evaluation); at each
of its steps the student gets the prompt the teacher's state gives (the prompt an `llm` policy would see there)
and answers greedily with transformers. A step's kind is its first op (create, read, update, delete, scratchpad,
query, answer), `none` for an action with neither op nor error (writes nothing) and `invalid` for one the env
would refuse to parse. A student that fails here has not learned the decision at all; one that passes here and
fails in eval.py drifts off its teacher's states.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tyro

from agents import POLICIES, build_messages, make_generator, make_policy
from agents.evaluation import episode_schedules, make_env_kwargs, make_vector_env, parse_env_kwargs, protocol_of, \
    run_episodes
from atommem_env.protocols import OP_NAMES, parse_action


@dataclass
class Args:
    checkpoint: str
    """the student: a train_sft.py checkpoint (or any model eval.py loads)"""
    teacher: str = "oracle-scan"
    """the policy whose states the student is put in"""
    env_id: str = "AtomMem/SyntheticVolatileBudget-v0"
    """the env id (train split)"""
    env_kwargs: str = "{}"
    """extra gym.make arguments as a JSON object"""
    embedder: str = "hashing"
    """memory embedder of the envs"""
    num_tasks: int = 4
    """train tasks 0..N-1"""
    num_envs: int = 4
    """vector envs for the teacher's episodes"""
    max_prompt_tokens: int = 1024
    """prompt budget (train_sft.py's default)"""
    max_new_tokens: int = 96
    """generation budget per step"""
    dtype: str = "auto"
    """weights of the student as loaded"""
    seed: int = 1
    """reset seed of the teacher's episodes"""
    out: str | None = None
    """also write the counts as JSON here"""


def step_kind(action: str, protocol: str) -> str:
    parsed = parse_action(action, protocol)
    if parsed.ops:
        return OP_NAMES[type(parsed.ops[0])]
    return "invalid" if parsed.errors else "none"


def agreement(pairs: list[tuple[str, str]]) -> dict[str, dict]:
    """{teacher's kind: {"steps", "same", "student": {kind: count}}} over (teacher kind, student kind) pairs."""
    table: dict[str, dict] = {}
    for teacher_kind, student_kind in pairs:
        row = table.setdefault(teacher_kind, {"steps": 0, "same": 0, "student": Counter()})
        row["steps"] += 1
        row["same"] += teacher_kind == student_kind
        row["student"][student_kind] += 1
    return {kind: {**row, "student": dict(row["student"])} for kind, row in sorted(table.items())}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.teacher not in POLICIES:
        raise SystemExit(f"error: --teacher {args.teacher}: unknown policy; choose from {list(POLICIES)}")
    if min(args.num_tasks, args.num_envs, args.max_prompt_tokens, args.max_new_tokens) <= 0:
        raise SystemExit("error: sizes and counts must be positive")
    try:  # make_env_kwargs refuses an unknown id before protocol_of looks it up
        env_kwargs = make_env_kwargs(args.env_id, split="train", embedder=args.embedder,
                                     extra=parse_env_kwargs(args.env_kwargs))
        protocol = protocol_of(args.env_id, args.env_kwargs)
        envs = make_vector_env(args.env_id, env_kwargs, args.num_envs)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    teacher = make_policy(args.teacher, protocol=protocol, enabled_ops=env_kwargs.get("enabled_ops"))
    episodes = run_episodes(envs, teacher, episode_schedules(args.num_tasks, args.num_envs), seed=args.seed,
                            keep_steps=True)
    envs.close()
    try:
        student = make_generator(args.checkpoint, max_new_tokens=args.max_new_tokens,
                                 max_prompt_tokens=args.max_prompt_tokens, dtype=args.dtype)
    except ValueError as err:
        raise SystemExit(f"error: --checkpoint: {err}") from None
    pairs = []
    for episode in sorted(episodes, key=lambda e: e["task_index"]):
        steps = episode["steps"]
        actions = student.generate([output.messages or build_messages(obs, protocol) for obs, output in steps])
        pairs += [(step_kind(output.text, protocol), step_kind(action.text, protocol))
                  for (_, output), action in zip(steps, actions)]
    table = agreement(pairs)
    print(f"{args.checkpoint} on {args.teacher}'s states, train tasks 0-{args.num_tasks - 1} of {args.env_id}:")
    for kind, row in table.items():
        others = ", ".join(f"{k} {v}" for k, v in sorted(row["student"].items()) if k != kind)
        print(f"  {kind:<10} {row['same']:>4} of {row['steps']:<4} the same" + (f" (else: {others})" if others else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "by_teacher_kind": table}, indent=1) + "\n",
                                  encoding="utf-8")
