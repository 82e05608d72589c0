"""AtomMem behind TRL's `GRPOTrainer(environment_factory=...)` (trl 1.16; `pip install -e ".[trl]"`; docs/verifiers.md).

TRL keeps one growing conversation per rollout and calls an environment's public methods as tools. Here those are
the CRUD operations over the same Gymnasium env that `gym.make` builds, atommem protocol:

    create_memory(text)  update_memory(entry_id, text)  delete_memory(entry_id)  write_scratchpad(text)
    read_memory(query)   next_chunk()                   answer(text, question)

The env reads one action per step and moves to the next chunk after a step without a Read, so the write tools
queue their operation (checked at once: a text that cannot be written as its tag is refused) and `read_memory`,
`next_chunk` and `answer` send the queued operations with their own as one env step. Each of those returns what
the env then shows: feedback (the ids created, every error line), the entries found, and the next chunk when the
chunk moved on. `get_reward` is the env's return once the episode has ended (EM per question), 0 before.

    factory = AtomMemToolEnvironment.factory("AtomMem/SyntheticEasy-v0", split="train", embedder="hashing")
    trainer = GRPOTrainer(model=..., train_dataset=make_dataset(factory, num_tasks=64),
                          environment_factory=factory, args=GRPOConfig(...))

Unlike `gym.make` and the verifiers adapter, earlier chunks stay in the conversation here: TRL's
`max_completion_length` (every turn and tool result of a rollout) is the budget, so this suits short documents.
"""

from __future__ import annotations

import functools

import gymnasium as gym

import atommem_env
from agents.evaluation import make_env_kwargs
from agents.prompt import user_message
from atommem_env.protocols import Answer, Create, Delete, Read, SetScratchpad, Update, format_ops

__all__ = ["AtomMemToolEnvironment", "make_dataset", "INSTRUCTIONS"]

INSTRUCTIONS = (
    "You read a long document one chunk at a time and must answer the question at the end. Earlier chunks may "
    "scroll away: keep what you need in memory with the tools. create_memory, update_memory, delete_memory and "
    "write_scratchpad take effect with your next read_memory, next_chunk or answer call. read_memory searches "
    "memory; next_chunk moves on to the next chunk. After the last chunk, call answer with a short answer."
)


class AtomMemToolEnvironment:
    """One AtomMem episode at a time, its operations as tools; see the module docstring.

    TRL makes every public method a tool, so the only public names are `reset`, `get_reward` and the tools.
    Bad tool input (an id that is not a whole number, a text holding its own closing tag, a call after the
    episode ended) is answered with an `error:` line, never raised: the rollout goes on.
    """

    def __init__(self, env_id: str = "AtomMem/SyntheticEasy-v0", split: str = "train", **env_kwargs):
        kwargs = make_env_kwargs(env_id, split=split, extra=env_kwargs)
        protocol = kwargs.get("protocol") or atommem_env.ENV_IDS[env_id].get("protocol", "atommem")
        if protocol != "atommem":
            raise ValueError(f"the TRL tools are the atommem protocol's operations; {env_id} with these kwargs "
                             f"speaks {protocol!r}")
        self._env = gym.make(env_id, **kwargs)
        self._pending: list = []
        self._reward: float | None = None

    @classmethod
    def factory(cls, env_id: str = "AtomMem/SyntheticEasy-v0", split: str = "train", **env_kwargs):
        """The zero-argument callable `environment_factory` wants; fails here, at once, on a bad id or kwargs."""
        cls(env_id, split, **env_kwargs)._env.close()
        return functools.partial(cls, env_id, split, **env_kwargs)

    @property
    def _reading(self) -> bool:
        env = self._env.unwrapped
        return env.chunk_index < len(env.chunker)

    def reset(self, task_index: int | None = None, seed: int | None = None, **row) -> str:
        """Starts the episode of the dataset row's `task_index` (make_dataset) and returns its first observation."""
        options = None if task_index is None else {"task_index": int(task_index)}
        obs, _ = self._env.reset(seed=None if seed is None else int(seed), options=options)
        self._pending, self._reward = [], None
        return "\n\n" + user_message(obs)

    def get_reward(self) -> float:
        return 0.0 if self._reward is None else self._reward

    def create_memory(self, text: str) -> str:
        """Stores a new memory entry; its id is reported by your next read_memory, next_chunk or answer call.

        Args:
            text: the fact to store.

        Returns:
            Whether the operation was queued.
        """
        return self._queue(Create(str(text)))

    def update_memory(self, entry_id: int, text: str) -> str:
        """Replaces the text of memory entry `entry_id`.

        Args:
            entry_id: the id of the entry, as reported when it was created or found.
            text: the new text.

        Returns:
            Whether the operation was queued.
        """
        return self._with_id(entry_id, lambda number: Update(str(text), entry_id=number))

    def delete_memory(self, entry_id: int) -> str:
        """Removes memory entry `entry_id`.

        Args:
            entry_id: the id of the entry, as reported when it was created or found.

        Returns:
            Whether the operation was queued.
        """
        return self._with_id(entry_id, lambda number: Delete(entry_id=number))

    def write_scratchpad(self, text: str) -> str:
        """Replaces the scratchpad, a note shown with every observation (empty text clears it).

        Args:
            text: the new scratchpad.

        Returns:
            Whether the operation was queued.
        """
        return self._queue(SetScratchpad(str(text)))

    def read_memory(self, query: str) -> str:
        """Searches memory for the entries closest in meaning to `query`, after applying the queued operations.

        Args:
            query: what to look for.

        Returns:
            The entries found as `[id N] text` lines, feedback on the queued operations, and the next chunk if the
            chunk's reads were used up.
        """
        return self._send(Read(str(query)))

    def next_chunk(self) -> str:
        """Applies the queued operations and moves on to the next chunk.

        Returns:
            Feedback on the queued operations and the next chunk (or the call to answer after the last one).
        """
        if not self._ended() and not self._reading:
            return "error: all chunks are read: call answer"
        return self._send(None)

    def answer(self, text: str, question: int | None = None) -> str:
        """Answers a question, only after the last chunk; the episode ends when every question is answered.

        Args:
            text: the short answer.
            question: the question's number when there are several (None: the first one not yet answered).

        Returns:
            The reward when the episode ends, else feedback.
        """
        if question is not None and (isinstance(question, bool) or not isinstance(question, int) or question < 1):
            return f"error: question must be a question number (1, 2, ...), got {question!r}"
        return self._send(Answer(str(text), question))

    def _ended(self) -> bool:
        return self._reward is not None

    def _with_id(self, entry_id, make_op) -> str:
        if isinstance(entry_id, bool) or not (isinstance(entry_id, int) or (isinstance(entry_id, str) and
                                                                            entry_id.isascii() and entry_id.isdigit())):
            return f"error: entry_id must be a whole number, got {entry_id!r}"
        return self._queue(make_op(int(entry_id)))

    def _queue(self, op) -> str:
        if self._ended():
            return f"error: the episode has ended (reward {self._reward}); nothing was done"
        try:
            tag = format_ops([op])
        except ValueError as err:
            return f"error: {err}"
        self._pending.append(op)
        return f"queued {tag}: it takes effect with your next read_memory, next_chunk or answer call"

    def _send(self, op) -> str:
        """One env step: the queued operations, then `op` (None: none, which moves the chunk on)."""
        if self._ended():
            return f"error: the episode has ended (reward {self._reward}); nothing was done"
        try:
            action = format_ops(self._pending + ([op] if op is not None else []))
        except ValueError as err:  # only `op` can fail here: the queued ones were checked when queued
            return f"error: {err}"
        self._pending = []
        chunk_before = self._env.unwrapped.chunk_index
        obs, reward, terminated, truncated, _ = self._env.step(action)
        if terminated or truncated:
            self._reward = float(reward)
            return f"{obs['feedback']}\n\nThe episode has ended; reward {self._reward}.".lstrip()
        return user_message(obs, question=False, chunk=int(obs["chunk_index"]) != chunk_before)


def make_dataset(environment_factory, num_tasks: int = 64, instructions: str = INSTRUCTIONS):
    """A `datasets.Dataset` for GRPOTrainer's `train_dataset`: `num_tasks` rows of `prompt` (the instructions as
    the user's turn; `reset` appends the task's first observation) and `task_index` (tasks 0..num_tasks-1 of the
    factory's split; more than a data file's split holds is an error)."""
    from datasets import Dataset

    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks <= 0:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    probe = environment_factory()
    available = probe._env.unwrapped.task_source.num_tasks
    probe._env.close()
    if available is not None and num_tasks > available:
        raise ValueError(f"num_tasks {num_tasks} is more than the {available} tasks of the split")
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": instructions}]] * num_tasks,
                              "task_index": list(range(num_tasks))})
