"""Wrappers for evaluation and training."""

from __future__ import annotations

from typing import Iterable

import gymnasium as gym


class TaskSchedule(gym.Wrapper):
    """Chooses which task each reset of a vector env's sub-env draws.

    Vector envs pass the same reset options to every sub-env and none at autoreset, so a plain
    `options={"task_index": i}` cannot give sub-envs different tasks. Two ways here:

    - `task_indices=[...]`: resets take these indices in order (then sample as usual once they run
      out). Evaluation gives env i of n the tasks i, i+n, ..., the same whatever the policy.
    - `slot=k`: a reset with `options={"task_indices": [...]}` takes element k of the list, so one
      `envs.reset(options=...)` puts GRPO groups on their tasks.

    An explicit `options={"task_index": i}` or `{"task": Task}` still wins.
    """

    def __init__(self, env: gym.Env, task_indices: Iterable[int] = (), slot: int | None = None):
        super().__init__(env)
        self.schedule = list(task_indices)
        self.position = 0
        self.slot = slot

    def set_schedule(self, task_indices: Iterable[int]) -> None:
        """The next resets take these task indices in order (an episode runner reuses its envs)."""
        self.schedule = list(task_indices)
        self.position = 0

    def reset(self, *, seed=None, options=None):
        options = dict(options or {})
        per_slot = options.pop("task_indices", None)
        if "task_index" not in options and "task" not in options:
            if per_slot is not None and self.slot is not None:
                options["task_index"] = int(per_slot[self.slot])
            elif self.position < len(self.schedule):
                options["task_index"] = self.schedule[self.position]
                self.position += 1
        return self.env.reset(seed=seed, options=options)
