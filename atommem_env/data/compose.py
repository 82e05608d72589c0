"""Task sources over loaded QA items: long-document composition and the multi-query setting.

Long context (MemAgent's and the paper's setting): a question's own paragraphs (gold and the
dataset's distractors) are padded with paragraphs drawn from the other questions of the same
split until the document reaches `context_tokens` tokens, then everything is shuffled, so the
gold paragraphs sit at seeded random positions. Paragraphs whose title is one of the question's
gold titles are never drawn as padding. When the pool runs out (a small file, a 1M-token
target) it is drawn again in a new order; the repeats are counted in the task metadata
(`repeated_paragraphs`, also in the env's reset info), and the first task that repeats warns,
naming the pool's size. `num_documents` pads to a number of paragraphs instead of tokens.

Multi-query (`multi_query=True`, the paper's training mix): a group of consecutive questions is
1 with probability 0.5, otherwise uniform over 2-10; the document is the gold paragraphs of the
whole group plus random distractor paragraphs from the split's pool up to `num_documents`
(default 200), shuffled. All questions are answered at the end.

`composition` picks the rule (an unknown one is an error):
- "atommem" (the default): the rules above.
- "official": the official AtomMem data (`taskutils/script/processing_multiquery.py`,
  `generate_random_chunks` and `generate_input_output`): with `multi_query`, the questions are cut
  into disjoint consecutive groups (size 1 with probability 0.5, else uniform over 2-10), one task
  per group, so each question is asked once; a group's document holds *all* the context paragraphs
  of its questions (HotpotQA: 2 gold + 8 distractors each), padded with other paragraphs of the
  pool up to `num_documents`, in the order `random.Random(4).shuffle` gives.
- "ruler": MemAgent's RULER-HotpotQA (`taskutils/memory_data/different_docs_eval.py`): each
  question keeps its own context paragraphs, padded with other paragraphs of the pool up to
  `num_documents` (one of RULER_GRID), ordered by `random.Random(4).shuffle`.
Both count documents, not tokens; a `num_documents` above the pool's paragraphs is an error naming
both numbers. They pad from the whole file, as their scripts do, except the train split, which pads
from its own questions so that no training document holds an eval question's paragraph.

Determinism: task `i` depends only on (i, context_tokens, num_documents, seed), never on the
order tasks were asked for. Splits: a question is in "eval" when a hash of its text falls in the
lowest 20%, else "train"; "all" keeps every question. Padding and groups come from the same split.
"""

from __future__ import annotations

import hashlib
import random
import warnings

import numpy as np

from ..tasks import Paragraph, Task
from ..tokens import TokenCounter
from .loaders import QAItem

SPLITS = ("all", "train", "eval")
EVAL_FRACTION = 0.2
COMPOSITIONS = ("atommem", "official", "ruler")
RULER_GRID = (50, 100, 200, 400, 800, 1600, 3200, 6400)
"""The document counts of MemAgent's RULER-HotpotQA table."""


def split_of(question_text: str) -> str:
    digest = hashlib.blake2b(question_text.encode("utf-8"), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % 1000 < EVAL_FRACTION * 1000 else "train"


def select_split(items: list[QAItem], split: str) -> list[QAItem]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return items
    chosen = [item for item in items if split_of(item.question.question) == split]
    if not chosen:
        raise ValueError(f"the {split!r} split of these {len(items)} questions is empty")
    return chosen


class ComposedTaskSource:
    """Tasks from QA items, optionally padded to a token or paragraph target, or grouped (multi-query)."""

    def __init__(self, items: list[QAItem], counter: TokenCounter, context_tokens: int | None = None,
                 num_documents: int | None = None, multi_query: bool = False, seed: int = 0, name: str = "qa",
                 composition: str = "atommem", padding_items: list[QAItem] | None = None):
        if context_tokens is not None and context_tokens <= 0:
            raise ValueError(f"context_tokens must be positive or None, got {context_tokens}")
        if num_documents is not None and num_documents <= 0:
            raise ValueError(f"num_documents must be positive or None, got {num_documents}")
        if context_tokens is not None and num_documents is not None:
            raise ValueError("give context_tokens or num_documents, not both")
        if multi_query and context_tokens is not None:
            raise ValueError("multi_query pads by num_documents (the paper's setting), not by context_tokens")
        if composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {COMPOSITIONS}, got {composition!r}")
        if composition != "atommem" and context_tokens is not None:
            raise ValueError(f"the {composition} composition pads by num_documents, not by context_tokens")
        if composition == "ruler" and (num_documents not in RULER_GRID or multi_query):
            raise ValueError(f"the ruler composition takes one question per task and num_documents in {RULER_GRID}, "
                             f"got num_documents={num_documents}")
        self.items = items
        self.counter = counter
        self.context_tokens = context_tokens
        self.num_documents = (200 if num_documents is None else num_documents) if multi_query else num_documents
        self.multi_query = multi_query
        self.seed = seed
        self.name = name
        self.composition = composition
        pool: dict[str, Paragraph] = {}
        for item in padding_items or items:
            for p in item.paragraphs:
                pool.setdefault(p.title, p)
        self.pool = list(pool.values())
        if composition != "atommem" and self.num_documents is not None and self.num_documents > len(self.pool):
            raise ValueError(f"num_documents={self.num_documents} is more than the {len(self.pool)} distinct "
                             f"paragraphs this {name} file offers for padding")
        # The official multi-query data: disjoint groups of consecutive questions, each question once.
        self.groups = [(i, i + 1) for i in range(len(items))]
        if composition == "official" and multi_query:
            rng, self.groups, start = np.random.default_rng([seed, 1]), [], 0
            while start < len(items):
                size = 1 if rng.random() < 0.5 else int(rng.integers(2, 11))
                self.groups.append((start, min(start + size, len(items))))
                start += size
        self.num_tasks = len(self.groups)
        self._pool_tokens = np.full(len(self.pool), -1, dtype=np.int64)
        self._warned_repeats = False

    def sample(self, rng: np.random.Generator) -> Task:
        return self.get(int(rng.integers(self.num_tasks)))

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, self.context_tokens or 0, self.num_documents or 0])

    def _tokens(self, pool_index: int) -> int:
        n = self._pool_tokens[pool_index]
        if n < 0:
            n = self._pool_tokens[pool_index] = self.counter.count(self.pool[pool_index].text) + 4  # + header
        return int(n)

    def _padding(self, rng, exclude_titles: set[str], tokens_needed: int | None, docs_needed: int | None):
        """Draws pool paragraphs in random order (again, once exhausted) until a target is met."""
        chosen: list[Paragraph] = []
        tokens, repeats, passes = 0, 0, 0
        while True:
            order = rng.permutation(len(self.pool))
            eligible = [int(i) for i in order if self.pool[int(i)].title not in exclude_titles]
            if not eligible:
                return chosen, repeats
            for i in eligible:
                if (tokens_needed is not None and tokens >= tokens_needed) or \
                        (docs_needed is not None and len(chosen) >= docs_needed):
                    return chosen, repeats
                chosen.append(self.pool[i])
                tokens += self._tokens(i) if tokens_needed is not None else 0
                repeats += passes > 0
            passes += 1

    def get(self, index: int) -> Task:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"task index {index} out of range [0, {self.num_tasks})")
        rng = self._rng(index)
        if self.composition != "atommem":
            first, end = self.groups[index]
            group = self.items[first:end]
            own = list({p.title: p for item in group for p in item.paragraphs}.values())
            padding, repeats = self._padding(rng, {p.title for p in own}, None, max(self.num_documents - len(own), 0))
        elif self.multi_query:
            size = 1 if rng.random() < 0.5 else int(rng.integers(2, 11))
            group = self.items[index:index + size] or [self.items[index]]
            own = [p for item in group for p in item.paragraphs if p.title in item.gold_titles]
            own = list({p.title: p for p in own}.values())
            exclude = {t for item in group for t in item.gold_titles}
            padding, repeats = self._padding(rng, exclude, None, max(self.num_documents - len(own), 0))
        else:
            group = [self.items[index]]
            own = list(group[0].paragraphs)
            exclude = set(group[0].gold_titles) | {p.title for p in own}
            if self.context_tokens is not None:
                have = sum(self.counter.count(p.text) + 4 for p in own)
                padding, repeats = self._padding(rng, exclude, max(self.context_tokens - have, 0), None)
            elif self.num_documents is not None:
                padding, repeats = self._padding(rng, exclude, None, max(self.num_documents - len(own), 0))
            else:
                padding, repeats = [], 0
        if repeats and not self._warned_repeats:
            self._warned_repeats = True
            target = f"context_tokens={self.context_tokens}" if self.context_tokens else f"num_documents={self.num_documents}"
            warnings.warn(f"{self.name}: the pool of {len(self.pool)} distinct paragraphs is too small for {target}: "
                          f"task {index} repeats {repeats} paragraphs (each task's count is in info['repeated_paragraphs']); "
                          "use a larger file or a shorter document", stacklevel=2)
        paragraphs = own + padding
        if self.composition != "atommem":  # the official scripts' order, the same permutation for every task
            order = list(range(len(paragraphs)))
            random.Random(4).shuffle(order)
        else:
            order = rng.permutation(len(paragraphs))
        metadata = (("dataset", self.name), ("index", index), ("seed", self.seed),
                    ("context_tokens", self.context_tokens), ("num_documents", self.num_documents),
                    ("num_paragraphs", len(paragraphs)), ("repeated_paragraphs", repeats))
        return Task(
            task_id=f"{self.name}-{index}" + (f"-{self.context_tokens}t" if self.context_tokens else ""),
            paragraphs=tuple(paragraphs[int(i)] for i in order),
            questions=tuple(item.question for item in group),
            metadata=metadata,
        )
