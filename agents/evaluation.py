"""Running a policy over a fixed set of tasks through vector envs: shared by eval.py and the trainers."""

from __future__ import annotations

import time
from typing import Callable

import gymnasium as gym
import numpy as np

from atommem_env.wrappers import TaskSchedule

from .policies import Policy, unbatch

OP_KEYS = ("create", "read", "update", "delete", "scratchpad", "query")


def evaluate_policy(policy: Policy, env_id: str, env_kwargs: dict, num_episodes: int, num_envs: int, seed: int,
                    progress: Callable[[int], object] | None = None) -> dict:
    """Runs tasks 0..num_episodes-1 of the env's split (env i of n takes tasks i, i+n, ...).

    The task set is the same for every policy. An output with `error` (a failed LLM request)
    marks its episode failed (EM and F1 0); empty actions then run that episode to its end.
    Returns `summarize()` of the per-episode records.
    """
    n = min(num_envs, num_episodes)
    schedules = [list(range(i, num_episodes, n)) for i in range(n)]
    envs = gym.vector.SyncVectorEnv([lambda s=s: TaskSchedule(gym.make(env_id, **env_kwargs), s) for s in schedules])
    obs, _ = envs.reset(seed=seed)
    remaining = [len(s) for s in schedules]
    failed: list[str | None] = [None] * n
    started = [time.perf_counter()] * n
    just_reset = np.zeros(n, dtype=bool)  # the vector env's autoreset step: its action is ignored
    episodes = []
    while any(remaining):
        observations = unbatch(obs, n)
        tasks = envs.get_attr("task")
        active = [i for i in range(n) if remaining[i] and not failed[i] and not just_reset[i]]
        actions = [""] * n
        if active:
            outputs = policy.act([observations[i] for i in active], [tasks[i] for i in active], slots=active)
            for i, out in zip(active, outputs):
                actions[i] = out.text
                if out.error:
                    failed[i] = out.error
        obs, _, terminated, truncated, info = envs.step(actions)
        just_reset[:] = False
        for i in np.flatnonzero(terminated | truncated):
            just_reset[i] = True
            if not remaining[i]:
                continue
            remaining[i] -= 1
            episodes.append({
                "task_id": info["task_id"][i], "em": 0.0 if failed[i] else float(info["em"][i]),
                "f1": 0.0 if failed[i] else float(info["f1"][i]), "failed": failed[i],
                "answer": info["answers"][i], "gold": info["gold_answers"][i],
                "ops": {k: int(info["op_counts"][k][i]) for k in OP_KEYS + ("answer",)},
                "invalid_ops": int(info["total_invalid_ops"][i]), "tokens_shown": int(info["tokens_shown"][i]),
                "num_chunks": int(info["num_chunks"][i]), "seconds": time.perf_counter() - started[i],
            })
            failed[i] = None
            started[i] = time.perf_counter()
            if progress is not None:
                progress(1)
    envs.close()
    return summarize(episodes)


def summarize(episodes: list[dict]) -> dict:
    mean = lambda key: float(np.mean([e[key] for e in episodes]))  # noqa: E731
    valid = sum(sum(e["ops"].values()) for e in episodes)
    invalid = sum(e["invalid_ops"] for e in episodes)
    return {
        "episodes": len(episodes),
        "em": mean("em"), "em_stderr": float(np.std([e["em"] for e in episodes]) / np.sqrt(len(episodes))),
        "f1": mean("f1"),
        "ops_per_episode": {k: float(np.mean([e["ops"][k] for e in episodes])) for k in OP_KEYS + ("answer",)},
        "invalid_ops_per_episode": mean("invalid_ops"),
        # Valid ops over all attempted; 1.0 when nothing was attempted (read it with the op counts).
        "valid_op_rate": valid / (valid + invalid) if valid + invalid else 1.0,
        "tokens_shown_per_episode": mean("tokens_shown"),
        "seconds_per_episode": mean("seconds"),
        "failed_episodes": sum(e["failed"] is not None for e in episodes),
        "failures": sorted({e["failed"] for e in episodes if e["failed"]}),
        "records": episodes,
    }
