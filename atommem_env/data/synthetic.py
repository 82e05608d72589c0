"""Seeded multi-hop questions over an invented world: no downloads, any length, any difficulty.

A task is built from its seed alone:

1. Entities with invented names (people, companies, cities, countries), unique within the task.
2. For each question a chain of `hops` typed, functional relations from a start entity, e.g.
   company -founded_by-> person -born_in-> city -located_in-> country; the question nests one
   phrase per hop ("What is the country that contains the city where the founder of Quenlo
   Works was born?") and the gold answer is the chain's last entity (unique by construction).
3. Volatile facts (probability `volatility` per changeable hop): the document first states a
   stale value, and later a sentence supersedes it ("... has since moved to ..."); the stale
   value has facts of its own, so an agent that never updates its memory answers wrongly.
   With the same probability the answer entity is renamed after it was mentioned
   ("X was renamed Y"), and the gold answer is the current name.
4. `distractors` facts about look-alike entities (one letter changed; more once a name's
   one-letter variants are taken, as with ~40 look-alikes of one name) with the same relations;
   their sentences are listed in the task's metadata as `look_alike_facts`.
   With `name_pool=N`, every entity name (not the look-alikes) is drawn from a fixed inventory
   of N invented names per kind, the same for every task: answers come from a closed set a
   small model can learn, while the document still decides which one is right.
5. Filler sentences (common words only, never an entity name) up to `context_tokens` tokens.

Sentences are grouped into titled paragraphs ("Record k"). Every question carries its
supporting facts in document order, stale ones marked `current=False` and tied to the fact that
supersedes them by `key`, so an oracle can replay Create/Update on them.

Splits: train tasks use even seeds, eval tasks odd ones, so the two never share a task: task `i`
of a split has seed `2i` (train), `2i+1` (eval) or `i` ("all"), plus `seed * 2**32`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from ..tasks import Paragraph, Question, SupportingFact, Task
from ..tokens import RegexTokenCounter

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "qu", "r", "s", "st", "t",
           "tr", "v", "z", "th", "sh", "h", "j"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "n", "r", "l", "s", "th", "k", "m", "nd", "rt", "x", "v"]
_KIND_SUFFIX = {
    "city": ["holm", "ford", "ara", "vik", "burg", "ton", "mere", "stad"],
    "country": ["ia", "land", "stan", "ora", "esh", "mar"],
    "company": [" Works", " Systems", " Holdings", " Labs", " Foods", " Motors", " Media"],
}


@dataclass(frozen=True)
class Relation:
    name: str
    subject: str
    object: str
    statement: str
    phrase: str
    change: str | None = None
    """How a later sentence supersedes the value; None for facts that never change."""


RELATIONS = (
    Relation("born_in", "person", "city", "{s} was born in {o}.", "the city where {x} was born"),
    Relation("lives_in", "person", "city", "{s} lives in {o}.", "the city where {x} lives",
             "{s} has since moved to {o}."),
    Relation("works_for", "person", "company", "{s} works for {o}.", "the company that employs {x}",
             "{s} left that job and now works for {o}."),
    Relation("married_to", "person", "person", "{s} is married to {o}.", "the spouse of {x}"),
    Relation("founded_by", "company", "person", "{s} was founded by {o}.", "the founder of {x}"),
    Relation("headquartered_in", "company", "city", "{s} is headquartered in {o}.",
             "the city where {x} has its headquarters", "{s} has moved its headquarters to {o}."),
    Relation("located_in", "city", "country", "{s} is a city in {o}.", "the country that contains {x}"),
    Relation("led_by", "country", "person", "The head of state of {s} is {o}.", "the head of state of {x}",
             "{o} has become the new head of state of {s}."),
)
_BY_SUBJECT = {kind: [r for r in RELATIONS if r.subject == kind] for kind in ("person", "company", "city", "country")}
_CHANGEABLE_BY_SUBJECT = {kind: [r for r in options if r.change] for kind, options in _BY_SUBJECT.items()}
_RENAMABLE = ("company", "city", "country")
# Longest template first: "{s} works for {o}." would also match "{s} left that job and now works for {o}.".
_STATEMENT_PATTERNS = [
    re.compile("^" + re.escape(template).replace(r"\{s\}", "(?P<s>.+?)").replace(r"\{o\}", "(?P<o>.+?)") + "$")
    for template in sorted([t for r in RELATIONS for t in (r.statement, r.change) if t] + ["{s} was renamed {o}."],
                           key=len, reverse=True)]


def statement_subject(sentence: str) -> str | None:
    """The entity a synthetic fact sentence is about (look-alikes' too, which carry no key); None for any other
    sentence."""
    for pattern in _STATEMENT_PATTERNS:
        if match := pattern.match(sentence.strip()):
            return match["s"]
    return None

_FILLER_TEMPLATES = [
    "The {adj} {noun} near the {place} was {verb} during the {season}.",
    "Many {people} say the {noun} is {adj} in the {season}.",
    "A {adj} {noun} was {verb} by local {people} last {season}.",
    "Reports about the {place} describe a {adj} {noun}.",
    "The {people} of the {place} often talk about the {adj} {noun}.",
    "In the {season}, the {place} hosts a {adj} festival of {noun}s.",
]
_FILLER_WORDS = {
    "adj": ["quiet", "old", "busy", "narrow", "bright", "green", "famous", "small", "ancient", "modern", "windy"],
    "noun": ["bridge", "market", "garden", "library", "harbour", "tower", "square", "mill", "theatre", "orchard"],
    "place": ["valley", "river bank", "old quarter", "coast", "hill", "lake shore", "railway station", "plain"],
    "verb": ["repaired", "painted", "visited", "rebuilt", "photographed", "extended", "cleaned", "opened"],
    "people": ["farmers", "students", "travellers", "merchants", "historians", "fishermen", "artists"],
    "season": ["spring", "summer", "autumn", "winter", "harvest", "rainy season"],
}


@dataclass
class _Fact:
    text: str
    key: str = ""
    current: bool = True
    after: int | None = None
    """Index of a fact this one must follow in the document."""
    question: int | None = None
    """The question this fact supports (None for distractors)."""
    look_alike: bool = False
    """A distractor about a look-alike entity, recorded in the task's metadata (`look_alike_facts`)."""


class SyntheticWorld:
    """Builds one task from a seed; see the module docstring."""

    def __init__(self, rng: np.random.Generator, name_pool: int | None = None, changeable_only: bool = False):
        self.rng = rng
        self.changeable_only = changeable_only
        self.names: set[str] = set()
        self.pools = _name_pools(name_pool) if name_pool else None

    def _syllable(self) -> str:
        r = self.rng
        return _ONSETS[r.integers(len(_ONSETS))] + _VOWELS[r.integers(len(_VOWELS))] + _CODAS[r.integers(len(_CODAS))]

    def new_name(self, kind: str) -> str:
        if self.pools is not None:
            unused = [name for name in self.pools[kind] if name not in self.names]
            if not unused:
                raise ValueError(f"name_pool={len(self.pools[kind])} is too small for this task's {kind} entities")
            name = unused[self.rng.integers(len(unused))]
            self.names.add(name)
            return name
        return self.invent_name(kind)

    def invent_name(self, kind: str) -> str:
        for _ in range(1000):
            base = "".join(self._syllable() for _ in range(int(self.rng.integers(2, 4)))).capitalize()
            if kind == "person":
                name = f"{base} {''.join(self._syllable() for _ in range(2)).capitalize()}"
            else:
                suffixes = _KIND_SUFFIX[kind]
                name = base + suffixes[self.rng.integers(len(suffixes))]
            if name not in self.names:
                self.names.add(name)
                return name
        raise RuntimeError("could not draw a fresh entity name")

    def look_alike(self, name: str) -> str:
        """The same name with one letter of its first word changed; more letters once those variants are taken.

        A long look-alike setting (160 at 64k tokens) needs ~80 variants of one name, more than a short first
        word has one-letter ones; the one-letter draws come first and unchanged, so smaller settings keep their tasks.
        """
        letters = "aeioulnrst"
        end = max(2, name.find(" ") if " " in name else len(name))  # the first word's letters after its initial
        for changes in range(1, end):
            for _ in range(1000):
                candidate = name
                for _ in range(changes):
                    pos = int(self.rng.integers(1, end))
                    candidate = candidate[:pos] + letters[self.rng.integers(len(letters))] + candidate[pos + 1:]
                if candidate != name and candidate not in self.names:
                    self.names.add(candidate)
                    return candidate
        raise RuntimeError(f"could not draw a look-alike of {name!r}: its variants are all taken")

    def chain(self, hops: int) -> tuple[list[str], list[Relation]]:
        """A start entity and `hops` relations, each object a fresh entity."""
        for _ in range(1000):
            kind = ("person", "company", "city", "country")[self.rng.integers(4)]
            relations = []
            for _ in range(hops):
                options = _CHANGEABLE_BY_SUBJECT[kind] if self.changeable_only else _BY_SUBJECT[kind]
                if not options:  # a city: no relation of it changes
                    break
                relation = options[self.rng.integers(len(options))]
                relations.append(relation)
                kind = relation.object
            if len(relations) < hops:
                continue
            if relations[-1].object != "person" or hops == 1 or self.rng.random() < 0.5:
                start = self.new_name(relations[0].subject)
                return [start] + [self.new_name(r.object) for r in relations], relations
        raise RuntimeError("unreachable: every kind has relations")


@functools.cache
def _name_pools(size: int) -> dict[str, tuple[str, ...]]:
    """`size` invented names per kind from a fixed seed: the closed inventory of `name_pool`."""
    world = SyntheticWorld(np.random.default_rng(20_260_108))
    return {kind: tuple(world.invent_name(kind) for _ in range(size)) for kind in ("person", "company", "city", "country")}


def _question_text(start: str, relations: list[Relation]) -> str:
    phrase = start
    for relation in relations:
        phrase = relation.phrase.format(x=phrase)
    return f"What is {phrase}?"


def _filler_sentences(rng: np.random.Generator, count: int) -> list[str]:
    """`count` filler sentences, with every random choice drawn in a few vectorised calls."""
    templates = rng.integers(len(_FILLER_TEMPLATES), size=count)
    picks = {key: rng.integers(len(words), size=count) for key, words in _FILLER_WORDS.items()}
    sentences = []
    for i in range(count):
        words = {key: _FILLER_WORDS[key][picks[key][i]] for key in _FILLER_WORDS}
        sentences.append(_FILLER_TEMPLATES[templates[i]].format(**words))
    return sentences


def generate_task(seed: int, *, hops: tuple[int, int] = (2, 3), distractors: int = 6, volatility: float = 0.3,
                  context_tokens: int = 2000, questions: int = 1, sentences_per_paragraph: tuple[int, int] = (4, 8),
                  name_pool: int | None = None, versions: tuple[int, int] = (2, 2), change_wording: str = "changed",
                  changeable_only: bool = False, renames: bool = True, task_id: str | None = None) -> Task:
    """One synthetic task; the same arguments always give the same task.

    `versions` (min, max): how many values a volatile fact takes, the last one current (default 2: one stale
    value); `change_wording`: "changed" ("... has since moved to ...") or "original" (a successor is worded as
    the first statement, so only its place in the document tells it is newer); `changeable_only`: every hop is
    a relation that can change (so with volatility 1 every hop is volatile); `renames=False`: no answer is renamed.
    """
    low, high = hops
    if not 1 <= low <= high <= 6:
        raise ValueError(f"hops must satisfy 1 <= min <= max <= 6, got {hops}")
    if distractors < 0 or questions < 1 or context_tokens < 1:
        raise ValueError("distractors must be >= 0, questions >= 1 and context_tokens >= 1")
    if not 0.0 <= volatility <= 1.0:
        raise ValueError(f"volatility must be in [0, 1], got {volatility}")
    if name_pool is not None and name_pool < 8:
        raise ValueError(f"name_pool must be None (invented names) or at least 8, got {name_pool}")
    versions = tuple(versions)
    if len(versions) != 2 or not 2 <= versions[0] <= versions[1] <= 12:
        raise ValueError(f"versions must satisfy 2 <= min <= max <= 12, got {versions}")
    if change_wording not in ("changed", "original"):
        raise ValueError(f"change_wording must be 'changed' or 'original', got {change_wording!r}")
    rng = np.random.default_rng(seed)
    world = SyntheticWorld(rng, name_pool, changeable_only)
    facts: list[_Fact] = []
    qa: list[tuple[str, str]] = []
    for q in range(questions):
        entities, relations = world.chain(int(rng.integers(low, high + 1)))
        for hop, relation in enumerate(relations):
            subject, obj = entities[hop], entities[hop + 1]
            key = f"{subject}|{relation.name}"
            if relation.change is not None and rng.random() < volatility:
                count = 2 if versions == (2, 2) else int(rng.integers(versions[0], versions[1] + 1))
                values = [world.new_name(relation.object) for _ in range(count - 1)] + [obj]
                later = relation.statement if change_wording == "original" else relation.change
                for number, value in enumerate(values):  # each after the one before it
                    template = relation.statement if number == 0 else later
                    facts.append(_Fact(template.format(s=subject, o=value), key, current=value == obj,
                                       after=len(facts) - 1 if number else None, question=q))
                if hop + 1 < len(relations):  # each stale value leads somewhere else
                    nxt = relations[hop + 1]
                    for value in values[:-1]:
                        facts.append(_Fact(nxt.statement.format(s=value, o=world.new_name(nxt.object))))
            else:
                facts.append(_Fact(relation.statement.format(s=subject, o=obj), key, question=q))
        answer = entities[-1]
        if renames and relations[-1].object in _RENAMABLE and rng.random() < volatility:
            new = world.new_name(relations[-1].object)
            last_mention = max(i for i, f in enumerate(facts) if answer in f.text)
            facts.append(_Fact(f"{answer} was renamed {new}.", f"{answer}|name", after=last_mention, question=q))
            answer = new
        qa.append((_question_text(entities[0], relations), answer))
        for _ in range(distractors // questions + (q < distractors % questions)):
            hop = int(rng.integers(len(relations)))
            relation = relations[hop]
            twin = world.look_alike(entities[hop])
            facts.append(_Fact(relation.statement.format(s=twin, o=world.new_name(relation.object)), look_alike=True))

    counter = RegexTokenCounter()
    fact_tokens = sum(counter.count(f.text) for f in facts)
    filler_needed = max(0, context_tokens - fact_tokens)
    filler = _filler_sentences(rng, filler_needed // 12 + 1) if filler_needed else []

    # Positions in the sentence stream: random, then pushed later where a fact must follow another.
    total = len(filler) + len(facts)
    positions = np.sort(rng.choice(total, size=len(facts), replace=False)).tolist()
    rng.shuffle(positions)
    swapped = True
    while swapped:  # constraints form short chains (stale -> change -> rename): a few passes settle them
        swapped = False
        for i, fact in enumerate(facts):
            if fact.after is not None and positions[i] < positions[fact.after]:
                positions[i], positions[fact.after] = positions[fact.after], positions[i]
                swapped = True
    stream: list[object] = list(filler)
    for pos, i in sorted((p, i) for i, p in enumerate(positions)):
        stream.insert(pos, facts[i])

    paragraphs, located = [], {}
    cursor = 0
    lo, hi = sentences_per_paragraph
    while cursor < len(stream):
        size = int(rng.integers(lo, hi + 1))
        title = f"Record {len(paragraphs) + 1}"
        sentences = []
        for j, item in enumerate(stream[cursor:cursor + size]):
            if isinstance(item, _Fact):
                located[id(item)] = (title, j)
                sentences.append(item.text)
            else:
                sentences.append(item)
        paragraphs.append(Paragraph(title, " ".join(sentences)))
        cursor += size

    questions_out = []
    for q, (question, answer) in enumerate(qa):
        supporting = sorted(
            (SupportingFact(title=located[id(f)][0], sentence_index=located[id(f)][1], text=f.text, key=f.key,
                            current=f.current) for f in facts if f.question == q),
            key=lambda s: (int(s.title.split()[1]), s.sentence_index))
        questions_out.append(Question(question=question, answers=(answer,), supporting_facts=tuple(supporting),
                                      question_id=f"synthetic-{seed}-{q}"))
    return Task(task_id=task_id or f"synthetic-{seed}", paragraphs=tuple(paragraphs), questions=tuple(questions_out),
                metadata=(("dataset", "synthetic"), ("seed", seed), ("context_tokens", context_tokens),
                          ("hops", hops), ("distractors", distractors), ("volatility", volatility),
                          ("name_pool", name_pool), ("versions", versions), ("change_wording", change_wording),
                          ("changeable_only", changeable_only), ("renames", renames),
                          ("look_alike_facts", tuple(f.text for f in facts if f.look_alike))))


class SyntheticTaskSource:
    """Synthetic tasks by index; `num_tasks=None` makes the source unbounded (sampling draws any index)."""

    SPLITS = ("all", "train", "eval")

    def __init__(self, split: str = "all", num_tasks: int | None = None, seed: int = 0, **knobs):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        if num_tasks is not None and num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive or None, got {num_tasks}")
        knobs.setdefault("context_tokens", 2000)
        if "hops" in knobs:
            knobs["hops"] = tuple(knobs["hops"])
        generate_task(0, **knobs)  # validates the knobs now rather than at the first reset
        self.split = split
        self.num_tasks = num_tasks
        self.seed = seed
        self.knobs = knobs

    def task_seed(self, index: int) -> int:
        base = {"all": index, "train": 2 * index, "eval": 2 * index + 1}[self.split]
        return self.seed * 2**32 + base  # an even offset keeps train seeds even and eval seeds odd

    def get(self, index: int) -> Task:
        if index < 0 or (self.num_tasks is not None and index >= self.num_tasks):
            raise IndexError(f"task index {index} out of range [0, {self.num_tasks})")
        return generate_task(self.task_seed(index), task_id=f"synthetic-{self.split}-{index}", **self.knobs)

    def sample(self, rng: np.random.Generator) -> Task:
        return self.get(int(rng.integers(self.num_tasks if self.num_tasks is not None else 2**31)))
