"""Wrappers for evaluation and training."""

from __future__ import annotations

from typing import Iterable

import gymnasium as gym


class TaskSchedule(gym.Wrapper):
    """Chooses which task each reset of a vector env's sub-env draws.

    Vector envs pass the same reset options to every sub-env and none at autoreset, so a plain
    `options={"task_index": i}` cannot give sub-envs different tasks. Here each sub-env gets its own
    list (`task_indices=[...]` or `set_schedule`): its resets take these indices in order, then
    sample as usual once they run out. Evaluation gives env i of n the tasks i, i+n, ..., the same
    whatever the policy; GRPO gives the envs of a group the same task.

    An explicit `options={"task_index": i}` or `{"task": Task}` still wins.
    """

    def __init__(self, env: gym.Env, task_indices: Iterable[int] = ()):
        super().__init__(env)
        self.set_schedule(task_indices)

    def set_schedule(self, task_indices: Iterable[int]) -> None:
        """The next resets take these task indices in order (an episode runner reuses its envs)."""
        self.schedule = list(task_indices)
        self.position = 0

    def reset(self, *, seed=None, options=None):
        options = dict(options or {})
        if "task_index" not in options and "task" not in options and self.position < len(self.schedule):
            options["task_index"] = self.schedule[self.position]
            self.position += 1
        return self.env.reset(seed=seed, options=options)
