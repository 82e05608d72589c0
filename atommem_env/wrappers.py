"""Wrappers for evaluation and training."""

from __future__ import annotations

from typing import Iterable

import gymnasium as gym


class TaskSchedule(gym.Wrapper):
    """Resets onto the given task indices in order (then samples as usual once they run out).

    Vector envs pass the same reset options to every sub-env and none at autoreset; this wrapper
    gives each sub-env its own fixed list, so an evaluation sees the same tasks whatever the
    policy and however fast each env finishes. `options={"task_index": i}` still wins.
    """

    def __init__(self, env: gym.Env, task_indices: Iterable[int]):
        super().__init__(env)
        self.schedule = list(task_indices)
        self.position = 0

    def reset(self, *, seed=None, options=None):
        options = dict(options or {})
        if "task_index" not in options and "task" not in options and self.position < len(self.schedule):
            options["task_index"] = self.schedule[self.position]
            self.position += 1
        return self.env.reset(seed=seed, options=options)
