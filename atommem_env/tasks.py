"""The task record every data source produces and the environment consumes.

A task is one document (an ordered list of paragraphs) and one or more questions about it.
Everything is immutable and made of plain Python values, so tasks pickle, hash and compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class Paragraph:
    """One unit of the document: a titled passage (a Wikipedia paragraph, a synthetic page)."""

    title: str
    text: str


@dataclass(frozen=True)
class SupportingFact:
    """A sentence the answer depends on.

    `key` groups facts about the same (subject, relation): a later fact with the same key
    supersedes an earlier one (`current=False` marks the superseded statement). Real datasets
    leave `key` empty and every fact current.
    """

    title: str
    sentence_index: int
    text: str
    key: str = ""
    current: bool = True


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    """Gold answers; the first is canonical, the rest are aliases."""
    supporting_facts: tuple[SupportingFact, ...] = ()
    question_id: str = ""


@dataclass(frozen=True)
class Task:
    task_id: str
    paragraphs: tuple[Paragraph, ...]
    questions: tuple[Question, ...]
    metadata: tuple[tuple[str, object], ...] = field(default=())
    """Key/value pairs (dataset, split, seed, target length, ...) kept as a tuple so tasks stay hashable."""

    def __post_init__(self):
        if not self.questions:
            raise ValueError(f"task {self.task_id!r} has no question")
        for q in self.questions:
            if not q.answers:
                raise ValueError(f"task {self.task_id!r}: question {q.question!r} has no gold answer")

    @property
    def meta(self) -> dict:
        return dict(self.metadata)


class TaskSource(Protocol):
    """Where the environment draws its tasks from.

    `sample(rng)` draws a task with the env's `np_random`; `get(index)` returns a fixed task so that
    evaluation and GRPO groups can replay the same one. `num_tasks` is None for infinite sources.
    """

    num_tasks: int | None

    def get(self, index: int) -> Task: ...

    def sample(self, rng: np.random.Generator) -> Task: ...


class ListTaskSource:
    """A finite, in-memory list of tasks."""

    def __init__(self, tasks: Sequence[Task]):
        if not tasks:
            raise ValueError("ListTaskSource needs at least one task")
        self.tasks = tuple(tasks)
        self.num_tasks = len(self.tasks)

    def get(self, index: int) -> Task:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"task index {index} out of range [0, {self.num_tasks})")
        return self.tasks[index]

    def sample(self, rng: np.random.Generator) -> Task:
        return self.tasks[int(rng.integers(self.num_tasks))]


def choose_task(source: TaskSource, rng: np.random.Generator, options: dict) -> Task:
    """The task a reset starts: `options["task"]` (a Task), `options["task_index"]`, or one drawn with `rng`."""
    if "task" in options:
        if not isinstance(options["task"], Task):
            raise ValueError("options['task'] must be an atommem_env.tasks.Task")
        return options["task"]
    if "task_index" in options:
        return source.get(int(options["task_index"]))
    return source.sample(rng)
