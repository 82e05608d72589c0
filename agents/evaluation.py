"""The one episode runner over vector envs, and the one builder of env arguments.

eval.py, train_sft.py (teacher rollouts, in-run evaluation) and train_grpo.py (rollouts) all run
episodes through `run_episodes` and build env arguments with `make_env_kwargs`, so an id runs with
the same settings and the same loop everywhere.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import gymnasium as gym
import numpy as np

import atommem_env
from atommem_env.wrappers import TaskSchedule

from .policies import Policy, unbatch

OP_KEYS = ("create", "read", "update", "delete", "scratchpad", "query")


def parse_env_kwargs(text: str) -> dict:
    """--env-kwargs: a JSON object, so numbers, booleans and null arrive typed."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--env-kwargs must be a JSON object like '{{\"top_k\": 3}}': {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--env-kwargs must be a JSON object, got {type(kwargs).__name__}")
    return kwargs


def make_env_kwargs(env_id: str, *, split: str, data_path: str | None = None, embedder: str | None = None,
                    context_tokens: int | None = None, chunk_tokens: int | None = None,
                    extra: dict | None = None, num_documents: int | None = None) -> dict:
    """gym.make arguments: the id's registered settings, overridden only by what is given here.

    `context_tokens` None or 0 keeps the id's document length. An id that pads by document count
    (`num_documents`) takes no token length unless it is single-question with the atommem composition
    (the length then replaces the count); `num_documents` replaces the id's count; `extra` (eval.py's
    ablations, --env-kwargs) goes in last.
    """
    if env_id not in atommem_env.ENV_IDS:
        raise ValueError(f"unknown env id {env_id!r}; registered: {sorted(atommem_env.ENV_IDS)}")
    registered = atommem_env.ENV_IDS[env_id]
    if context_tokens and num_documents:
        raise ValueError("give a token length or a document count, not both")
    if context_tokens and (registered.get("multi_query") or registered.get("composition")):
        raise ValueError(f"{env_id} pads by document count (num_documents={registered.get('num_documents')}), not by "
                         "tokens: give the context length 0 for its registered setting, and num_documents through "
                         "the env kwargs to change it")
    context_tokens = context_tokens or None
    kwargs: dict = {"split": split}
    if data_path:
        kwargs["data_path"] = data_path
    if embedder:
        kwargs["embedder"] = embedder
    if context_tokens is not None:
        kwargs["context_tokens"] = context_tokens
        if registered.get("num_documents") is not None:
            kwargs["num_documents"] = None
    if num_documents:
        kwargs["num_documents"] = num_documents
    if chunk_tokens is not None:
        kwargs["chunk_tokens"] = chunk_tokens
    kwargs.update(extra or {})
    return kwargs


def length_label(env_id: str, context_tokens: int | None, num_documents: int | None = None) -> str:
    """How a document length is named in reports and metric keys: the tokens, the documents, or the id's own."""
    registered = atommem_env.ENV_IDS[env_id]
    if context_tokens is not None:
        return str(context_tokens)
    if num_documents:
        return f"{num_documents}docs"
    if registered.get("context_tokens") is not None:
        return str(registered["context_tokens"])
    if registered.get("num_documents") is not None:
        return f"{registered['num_documents']}docs"
    return "default"


def make_vector_env(env_id: str, env_kwargs: dict, num_envs: int) -> gym.vector.SyncVectorEnv:
    """`num_envs` envs, each wrapped in a TaskSchedule for `run_episodes`."""
    return gym.vector.SyncVectorEnv([lambda: TaskSchedule(gym.make(env_id, **env_kwargs)) for _ in range(num_envs)])


def num_tasks(envs: gym.vector.SyncVectorEnv) -> int | None:
    """Tasks in the envs' split (None: unbounded, as for synthetic ids)."""
    return envs.envs[0].unwrapped.task_source.num_tasks


def episode_schedules(num_episodes: int, num_envs: int, process_index: int = 0, num_processes: int = 1) -> list[list[int]]:
    """Task indices per env: env j of all n = num_envs * num_processes takes tasks j, j+n, ...; this process's share."""
    n = min(num_envs * num_processes, num_episodes)
    schedules = [list(range(j, num_episodes, n)) for j in range(n)]
    per_process = -(-n // num_processes)
    return schedules[process_index * per_process:(process_index + 1) * per_process]


def run_episodes(envs: gym.vector.SyncVectorEnv, policy: Policy, schedules: list[list[int]], seed: int,
                 keep_steps: bool = False, progress: Callable[[int], object] | None = None,
                 start_states: list | None = None) -> list[dict]:
    """Runs env i through the tasks `schedules[i]`, in order; one record per episode, in the order they end.
    `start_states[i]` (an `EnvState`, or None) puts env i's first episode at that snapshot after its reset: the
    episode continues from there (branching rollouts), its steps and trace from that point on.

    An output with `error` (a failed LLM request) marks its episode failed (EM and F1 0); empty
    actions then run that episode to its end. With `keep_steps`, a record's "steps" lists
    (observation, PolicyOutput) for each of its steps: SFT data and GRPO samples come from there, and
    "final_feedback" the feedback the last step got back (trajectories). A record's "reward" is the env's
    return over the episode. Envs past their schedule (or without one) idle with empty actions.
    """
    n = envs.num_envs
    if len(schedules) > n:
        raise ValueError(f"{len(schedules)} schedules for {n} envs")
    schedules = list(schedules) + [[] for _ in range(n - len(schedules))]
    for env, schedule in zip(envs.envs, schedules):
        env.set_schedule(schedule)
    obs, _ = envs.reset(seed=seed)
    observations = unbatch(obs, n)
    for i, state in enumerate(start_states or []):
        if state is not None:
            observations[i] = envs.envs[i].unwrapped.set_state(state)
    remaining = [len(s) for s in schedules]
    failed: list[str | None] = [None] * n
    steps: list[list] = [[] for _ in range(n)]
    started = [time.perf_counter()] * n
    returns = np.zeros(n)
    traces: list[list] = [[] for _ in range(n)]  # per step: chunk index, gold and stale facts in memory, read recall
    just_reset = np.zeros(n, dtype=bool)  # the vector env's autoreset step: its action is ignored
    episodes = []
    while any(remaining):
        tasks = envs.get_attr("task")
        active = [i for i in range(n) if remaining[i] and not failed[i] and not just_reset[i]]
        actions = [""] * n
        if active:
            outputs = policy.act([observations[i] for i in active], [tasks[i] for i in active], slots=active)
            for i, out in zip(active, outputs):
                actions[i] = out.text
                steps[i].append((observations[i], out))
                if out.error:
                    failed[i] = out.error
        obs, rewards, terminated, truncated, info = envs.step(actions)
        observations = unbatch(obs, n)
        returns += np.where(just_reset, 0.0, rewards)
        for i in np.flatnonzero(~just_reset):
            recall = info["read_recall"][i]  # None where nothing was shown: NaN once a vector env stacks it with floats
            traces[i].append([int(info["chunk_index"][i]), int(info["gold_facts_in_memory"][i]),
                              int(info["stale_facts_in_memory"][i]), None if recall is None or recall != recall
                              else float(recall)])
        just_reset[:] = False
        for i in np.flatnonzero(terminated | truncated):
            just_reset[i] = True
            if not remaining[i]:
                continue
            remaining[i] -= 1
            cut = [out.generation.prompt_tokens_cut for _, out in steps[i] if out.generation is not None]
            record = {
                "slot": int(i), "task_index": schedules[i][len(schedules[i]) - remaining[i] - 1],
                "task_id": info["task_id"][i], "em": 0.0 if failed[i] else float(info["em"][i]),
                "f1": 0.0 if failed[i] else float(info["f1"][i]),
                "sub_em": 0.0 if failed[i] else float(info["sub_em"][i]), "reward": float(returns[i]),
                "failed": failed[i],
                "answer": info["answers"][i], "gold": info["gold_answers"][i],
                "raw_answers": [out.raw_answer for _, out in steps[i] if out.raw_answer is not None],
                "ops": {k: int(info["op_counts"][k][i]) for k in OP_KEYS + ("answer",)},
                "invalid_ops": int(info["total_invalid_ops"][i]), "tokens_shown": int(info["tokens_shown"][i]),
                "num_chunks": int(info["num_chunks"][i]), "num_steps": len(steps[i]),
                "prompts_cut": sum(c > 0 for c in cut), "prompt_tokens_cut": int(sum(cut)),
                "seconds": time.perf_counter() - started[i],
                **process_record(traces[i], int(info["gold_facts"][i])),
            }
            if keep_steps:
                record["steps"] = steps[i]
                record["final_feedback"] = str(obs["feedback"][i])
            episodes.append(record)
            failed[i] = None
            returns[i] = 0.0
            steps[i] = []
            traces[i] = []
            started[i] = time.perf_counter()
            if progress is not None:
                progress(1)
    return episodes


def process_record(trace: list[list], gold_facts: int) -> dict:
    """An episode's process metrics (atommem_env.process) from its steps' [chunk index, gold in memory, stale in
    memory, read recall]: the last step's counts, the mean recall over the steps whose Reads showed something
    (None: none did), and the trace itself (`by_step`)."""
    recalls = [r for *_, r in trace if r is not None]
    return {"gold_facts": gold_facts, "gold_facts_in_memory": trace[-1][1] if trace else 0,
            "stale_facts_in_memory": trace[-1][2] if trace else 0,
            "read_recall": float(np.mean(recalls)) if recalls else None,
            "by_step": trace}


def evaluate_policy(policy: Policy, env_id: str, env_kwargs: dict, num_episodes: int, num_envs: int, seed: int,
                    progress: Callable[[int], object] | None = None,
                    on_records: Callable[[list[dict]], object] | None = None) -> dict:
    """Runs tasks 0..num_episodes-1 of the env's split, the same set for every policy; `summarize()`s them.
    `on_records` gets the episode records with their steps first (eval.py --save-trajectories)."""
    schedules = episode_schedules(num_episodes, num_envs)
    envs = make_vector_env(env_id, env_kwargs, len(schedules))
    try:
        records = run_episodes(envs, policy, schedules, seed, keep_steps=on_records is not None, progress=progress)
        if on_records is not None:
            on_records(records)
        return summarize(records)
    finally:
        envs.close()


def summarize(episodes: list[dict]) -> dict:
    episodes = sorted(episodes, key=lambda e: e["task_index"])  # the same order however many envs or processes
    mean = lambda key: float(np.mean([e[key] for e in episodes]))  # noqa: E731
    valid = sum(sum(e["ops"].values()) for e in episodes)
    invalid = sum(e["invalid_ops"] for e in episodes)
    recalls = [e["read_recall"] for e in episodes if e["read_recall"] is not None]
    return {
        "episodes": len(episodes),
        "em": mean("em"), "em_stderr": float(np.std([e["em"] for e in episodes]) / np.sqrt(len(episodes))),
        "f1": mean("f1"), "sub_em": mean("sub_em"),
        "ops_per_episode": {k: float(np.mean([e["ops"][k] for e in episodes])) for k in OP_KEYS + ("answer",)},
        "invalid_ops_per_episode": mean("invalid_ops"),
        # Valid ops over all attempted; 1.0 when nothing was attempted (read it with the op counts).
        "valid_op_rate": valid / (valid + invalid) if valid + invalid else 1.0,
        "tokens_shown_per_episode": mean("tokens_shown"),
        "prompt_cut_rate": sum(e["prompts_cut"] for e in episodes) / max(1, sum(e["num_steps"] for e in episodes)),
        "prompt_tokens_cut_per_episode": mean("prompt_tokens_cut"),
        "seconds_per_episode": mean("seconds"),
        "failed_episodes": sum(e["failed"] is not None for e in episodes),
        "failures": sorted({e["failed"] for e in episodes if e["failed"]}),
        # What memory held at the end, of the gold (current) and stale facts, and what the Reads showed of the gold.
        "process": {"gold_facts": mean("gold_facts"), "gold_facts_in_memory": mean("gold_facts_in_memory"),
                    "stale_facts_in_memory": mean("stale_facts_in_memory"),
                    "read_recall": float(np.mean(recalls)) if recalls else None},
        "records": [{k: v for k, v in e.items() if k not in ("steps", "final_feedback")} for e in episodes],
    }


def protocol_of(env_id: str, env_kwargs: str = "{}") -> str:
    """The protocol an id's envs speak: --env-kwargs' `protocol` where it gives one, else the id's registered one."""
    return parse_env_kwargs(env_kwargs).get("protocol") or atommem_env.ENV_IDS[env_id].get("protocol", "atommem")
