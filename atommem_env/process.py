"""Process metrics: what the memory holds of the task's facts at each step, beside the final answer's score.

A fact counts as held where its sentence stands in an entry (lower case, white space collapsed, the final period
dropped): a verbatim or longer copy, not a paraphrase, so a policy that rewrites facts in its own words scores
below what it knows. Gold facts are the questions' current supporting facts; stale ones the superseded statements
that synthetic volatile tasks mark (`current=False`). Read recall is the share of gold facts that the entries a
step's Reads showed hold (None for a step that showed nothing: NaN would make equal infos unequal).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip().rstrip(".")


class FactTracker:
    """The task's facts and which entries hold them, kept up to date from the ids the memory reports touched, so a
    step costs what it changed, not the size of the memory."""

    def __init__(self, task, memory, holding: dict | None = None):
        """`holding`: another tracker's `holding` for this memory as it is now (a restored snapshot); without it
        every entry there now is read once, at the next `metrics`."""
        facts = [f for q in task.questions for f in q.supporting_facts if f.text]
        self.gold = [normalize(f.text) for f in facts if f.current]
        self.stale = [normalize(f.text) for f in facts if not f.current]
        self.memory = memory
        self.holding: dict[int, tuple[frozenset, frozenset]] = dict(holding or {})
        """entry id -> (gold, stale) fact indices it holds, for the entries that hold any"""
        memory.touched = set() if holding is not None else set(memory.entry_ids())

    def _held(self, text: str) -> tuple[frozenset, frozenset]:
        norm = normalize(text)
        return (frozenset(i for i, f in enumerate(self.gold) if f in norm),
                frozenset(i for i, f in enumerate(self.stale) if f in norm))

    def refresh(self) -> None:
        """Reads the entries the memory touched since the last refresh."""
        for entry_id in self.memory.touched:
            self.holding.pop(entry_id, None)
            if entry_id in self.memory:
                gold, stale = self._held(self.memory.get(entry_id))
                if gold or stale:
                    self.holding[entry_id] = (gold, stale)
        self.memory.touched.clear()

    def metrics(self, retrieved: str) -> dict:
        self.refresh()
        gold = set().union(*(g for g, _ in self.holding.values()))
        stale = set().union(*(s for _, s in self.holding.values()))
        if retrieved and self.gold:
            shown = normalize(retrieved)
            recall = sum(f in shown for f in self.gold) / len(self.gold)
        else:
            recall = None
        return {"gold_facts": len(self.gold), "gold_facts_in_memory": len(gold),
                "stale_facts_in_memory": len(stale), "read_recall": recall}


def first_superseding_chunk(tracker: FactTracker, chunks: Iterable[str]) -> int | None:
    """The first chunk that states a fact (current or stale) after an earlier chunk stated a stale one: where a
    fact the policy may have stored is superseded (synthetic volatile tasks). None where no chunk does."""
    stale_seen = False
    for index, chunk in enumerate(chunks):
        text = normalize(chunk)
        if stale_seen and any(fact in text for fact in tracker.gold + tracker.stale):
            return index
        stale_seen = stale_seen or any(fact in text for fact in tracker.stale)
    return None
