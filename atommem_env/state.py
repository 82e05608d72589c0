"""Snapshots of an episode: several continuations can start from one point (branching rollouts), and a restored env
steps exactly as the original would have from there.

`StateSnapshots` is a part of `AtomMemEnv` (mixed into it): `get_state()` copies the episode (task, position,
answers, counters, the last observation), the memory (entries, ids, the FAISS index serialised as it is), the
scratchpad and the state of `np_random`; `set_state(state)` puts it back, into the same env or into another one
built with the same settings. `env.state` reads and writes the same, which is what a vector env reaches:
`envs.get_attr("state")` and `envs.set_attr("state", states)` (one state per env, sync and async alike).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .process import FactTracker

_EPISODE_FIELDS = ("task", "chunk_index", "steps_on_chunk", "answer_steps", "steps", "answers", "query",
                   "query_updates", "question_index", "shown_ids", "shown_texts", "replies", "step_cap", "op_counts",
                   "total_invalid_ops", "tokens_shown", "done", "_obs")


@dataclass(frozen=True)
class EnvState:
    """One env's episode at one step; plain data, so it pickles (to an async worker, or to disk)."""

    settings: tuple
    """What must match in the env it is restored into (protocol, chunking, limits, embedder, ...)."""
    episode: dict
    memory: dict
    scratchpad: str
    rng: dict

    @property
    def observation(self) -> dict:
        """The observation the episode stood at: where a continuation's policy starts."""
        return copy.deepcopy(self.episode["_obs"])


class StateSnapshots:
    """get_state / set_state / the `state` property of `AtomMemEnv`."""

    def _state_settings(self) -> tuple:
        return (self.protocol, self.official, self.chunk_tokens, self.chunk_overlap, self.top_k, self.enabled_ops,
                self.max_reads_per_chunk, self.max_answer_steps, self.max_steps, self.answer_matching,
                self.memory.max_entries, self.memory.max_entry_chars, self.scratchpad.max_chars, self.entry_ids,
                self.memory.embedder.name, self.memory.precision, self.use_scratchpad)

    def get_state(self) -> EnvState:
        if self.task is None:
            raise RuntimeError("call reset() before get_state(): there is no episode yet")
        episode = copy.deepcopy({name: getattr(self, name) for name in _EPISODE_FIELDS if name != "task"})
        episode["task"] = self.task  # immutable, and as long as the document: shared, not copied
        self.facts.refresh()  # so that a restore takes what entries hold instead of reading every entry again
        episode["facts_holding"] = dict(self.facts.holding)
        return EnvState(settings=self._state_settings(), episode=episode,
                        memory=self.memory.snapshot(), scratchpad=self.scratchpad.text,
                        rng=copy.deepcopy(self.np_random.bit_generator.state))

    def set_state(self, state: EnvState) -> dict:
        """Restores `state` and returns its observation. The env must have been reset once (Gymnasium's order check
        in `gym.make`'s wrappers needs it) and built with the same settings."""
        if not isinstance(state, EnvState):
            raise ValueError(f"set_state takes an EnvState from get_state(), got {type(state).__name__}")
        if self.task is None:
            raise RuntimeError("reset() the env once before set_state(): Gymnasium's order check needs a reset")
        if state.settings != self._state_settings():
            raise ValueError("this EnvState comes from an env with other settings: "
                             f"{state.settings} != {self._state_settings()}")
        for name in _EPISODE_FIELDS:
            value = state.episode[name]
            setattr(self, name, value if name == "task" else copy.deepcopy(value))
        self.chunker = self._make_chunker()
        self.memory.restore(state.memory)
        self.facts = FactTracker(self.task, self.memory, holding=state.episode["facts_holding"])
        self.scratchpad.text = state.scratchpad
        self.np_random.bit_generator.state = copy.deepcopy(state.rng)
        self.memory.id_rng = self.np_random if self.entry_ids == "random" else None
        return state.observation

    @property
    def state(self) -> EnvState:
        return self.get_state()

    @state.setter
    def state(self, state: EnvState) -> None:
        self.set_state(state)
