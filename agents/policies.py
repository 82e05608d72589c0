"""Policies: a batch of observations in, a batch of actions out.

Every policy implements `act(observations, tasks=None, slots=None) -> list[PolicyOutput]`: one
output per observation. `slots` names the env each observation comes from (default 0..n-1), so
a caller may pass only the envs still running; stateful policies (the oracle) key their state by it. `PolicyOutput.text` is the action string; `error` is
set when the policy could not produce an action (an LLM request failed: eval.py marks that
episode failed); `generation` keeps the token ids and log-probs of an LLM policy for training.
`tasks` (the env's current Task per observation) is used only by the oracle.

Static workflows (the paper's baselines), written as policies over the same env:
- `memagent`: overwrite the scratchpad after each chunk with what the reader keeps; answer from it.
- `rag`: store every paragraph of every chunk as an entry; at the end Read with the question and
  answer from the results. `write-only` stores but never reads; `read-only` reads but never stores.
- `no-memory`: answer from the question alone.
Each takes a reader (an LLM backend) for summarising and answering.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from atommem_env.data.synthetic import statement_subject
from atommem_env.protocols import Answer, Create, Read, SetScratchpad, Update, format_ops
from atommem_env.scoring import last_boxed
from atommem_env.tasks import SupportingFact, Task

from .generation import Generation
from .prompt import build_messages, reader_messages


@dataclass
class PolicyOutput:
    text: str
    error: str | None = None
    generation: Generation | None = None
    messages: list[dict] | None = None
    """The chat prompt an LLM policy saw (kept for SFT data)."""
    raw_answer: str | None = None
    """A workflow's reader reply before `extract_answer` (kept in eval reports beside the answer)."""


def unbatch(observations: dict, num_envs: int) -> list[dict]:
    """A vector env's dict of batched fields -> one observation dict per env."""
    return [{key: value[i] for key, value in observations.items()} for i in range(num_envs)]


def answering(obs: dict) -> bool:
    return int(obs["chunk_index"]) >= int(obs["num_chunks"])


class Policy:
    name = "policy"

    def act(self, observations: list[dict], tasks: list[Task] | None = None,
            slots: list[int] | None = None) -> list[PolicyOutput]:
        raise NotImplementedError


class NoOpPolicy(Policy):
    """Does nothing, never answers: the floor."""

    name = "noop"

    def act(self, observations, tasks=None, slots=None):
        return [PolicyOutput("") for _ in observations]


class RandomPolicy(Policy):
    """Random operations on random sentences of the chunk; answers with a random word. Seeded."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def act(self, observations, tasks=None, slots=None):
        outputs = []
        for obs in observations:
            words = re.findall(r"\w+", obs["chunk"] or obs["question"]) or ["nothing"]
            sentence = " ".join(self.rng.choice(words, size=min(8, len(words))).tolist())
            kind = int(self.rng.integers(5))
            entry = int(self.rng.integers(1, max(2, int(obs["memory_size"]) + 1)))
            if answering(obs):
                text = f"<answer>{self.rng.choice(words)}</answer>"
            else:
                text = [f"<create>{sentence}</create>", f"<read>{sentence}</read>", f'<update id="{entry}">{sentence}</update>',
                        f'<delete id="{entry}"/>', f"<scratchpad>{sentence}</scratchpad>"][kind]
            outputs.append(PolicyOutput(text))
        return outputs


class OraclePolicy(Policy):
    """Uses the task's supporting facts: the upper bound, and the teacher for SFT.

    While reading, it creates an entry for every supporting sentence in the chunk, once (with
    overlapping chunks a sentence shows twice), and when a sentence supersedes an earlier one (same
    `key`) it Updates that entry instead. In the answer phase it Reads with the question once, then
    answers the gold answer. In the paper protocol it adds every supporting sentence (`Memory i`
    ranks are not stable ids, so no modify) and answers the question shown,
    `<final_answer>\\boxed{gold}</final_answer>`, one per step as the questions come.
    Its state is kept per slot (env index), so episodes of the same task in two envs do not mix.

    With `read_per_hop=True` (the `oracle-hops` teacher, which also stores look-alikes) the answer phase
    Reads once per hop before answering, as long as an answer step is left: with the question, then with the entity
    each hop's fact leads to, writing the facts followed so far to the scratchpad beside that Read (`hop_reads`), so
    the observation says which hop the Reads have reached.

    The `oracle-hops` teacher also does nothing a student could not learn from the observation: before it Updates
    a superseded fact it Reads the fact's subject (first in its action, staying on the chunk), and Updates the
    entry that Read shows by the id shown (if the Read does not show it, it Creates the new statement instead).
    With `look_up=True` (the `oracle-lookup` teacher: `oracle-hops` plus the counter-cases) it Reads before it writes
    any fact whose subject it can name, not only a superseded one, and Creates when that Read shows no entry
    about the same subject and relation: a Read is then followed by an Update only where the entry it shows is
    the one the new statement replaces. Without Update (`enabled_ops`) it has nothing to decide and Reads nothing.
    The plain oracle Updates by the id it remembers. With `enabled_ops` lacking "update" (the env's setting, for an
    ablation), every oracle Creates the new statement beside the stale one. A stale statement and its successor in
    one chunk: only the successor is stored.

    With `read_each_chunk=True` (the `oracle-scan` teacher, for a memory that holds few entries under random ids)
    every chunk's first step Reads the question, whatever the chunk holds, so that the step which writes has the
    entry and its id in view: it Updates the entry shown when the chunk restates its fact, Creates when no entry is
    shown, and writes nothing otherwise. Its first step needs no decision (always the same Read) and its second
    matches the chunk against the entry shown, the two things a small student copies (docs/study_log.md, section 7).

    With `look_alikes=True` (the `oracle-broad` teacher) it also stores the task's distractor
    sentences about look-alike entities (synthetic tasks list them in `look_alike_facts`) as they
    come, and leaves telling them apart to the Read: the question names its entity exactly, so a
    Read with it ranks the supporting entry first. A small policy learns that strategy (copy every
    sentence of the asked relation, answer from the top entry) more easily than spotting a one-letter
    difference while it writes.
    """

    name = "oracle"

    def __init__(self, protocol: str = "atommem", look_alikes: bool = False, read_per_hop: bool = False,
                 enabled_ops: Collection[str] | None = None, look_up: bool = False, read_each_chunk: bool = False):
        if look_up and not read_per_hop:
            raise ValueError("look_up Reads before it writes, as the Read-per-hop teacher does: set read_per_hop too")
        self.protocol = protocol
        self.look_alikes = look_alikes
        self.read_per_hop = read_per_hop
        self.can_update = enabled_ops is None or "update" in enabled_ops
        self.look_up = look_up and self.can_update
        self.read_each_chunk = read_each_chunk
        if read_each_chunk:
            self.name = "oracle-scan"
        if look_alikes:
            self.name = "oracle-lookup" if look_up else "oracle-hops" if read_per_hop else "oracle-broad"
        self.entry_ids: dict[int, dict[str, int]] = {}  # slot -> fact key -> memory id
        self.pending: dict[int, list[str]] = {}  # slot -> keys of the Creates sent last step, in order
        self.stored: dict[int, set[str]] = {}  # slot -> fact texts written this episode
        self.reads_done: dict[int, int] = {}  # slot -> Reads sent in this episode's answer phase
        self.updates_waiting: dict[int, list[SupportingFact]] = {}  # slot -> facts whose stale entry a Read is to show
        self.chunk_read: dict[int, int] = {}  # slot -> the chunk whose first step Read (read_each_chunk)

    def act(self, observations, tasks=None, slots=None):
        if tasks is None or len(tasks) != len(observations):
            raise ValueError("the oracle needs the env's current task for every observation (tasks=...)")
        slots = range(len(observations)) if slots is None else slots
        return [PolicyOutput(self._act_one(slot, obs, task)) for slot, obs, task in zip(slots, observations, tasks)]

    def _new_facts(self, slot: int, obs: dict, task: Task):
        """The supporting facts in this chunk not written before in the episode, each once."""
        fresh = episode_start(obs)
        stored = self.stored[slot] = set() if fresh else self.stored.get(slot, set())
        look_alikes = task.meta.get("look_alike_facts", ()) if self.look_alikes else ()
        facts = [fact for question in task.questions for fact in question.supporting_facts]
        facts += [SupportingFact(title="", sentence_index=-1, text=text) for text in look_alikes]
        present = [fact for fact in facts if fact.text and fact.text in obs["chunk"]]
        for fact in sorted(present, key=lambda fact: obs["chunk"].index(fact.text)):  # in reading order
            if fact.text not in stored:
                stored.add(fact.text)
                yield fact

    def _act_paper(self, slot: int, obs: dict, task: Task) -> str:
        if answering(obs):
            asked = next((q for q in task.questions if q.question == obs["question"]), task.questions[0])
            return format_ops([Answer(f"\\boxed{{{asked.answers[0]}}}")], "paper")
        # An add, even an empty one, is what moves the official loop to the next chunk.
        return format_ops([Create(fact.text) for fact in self._new_facts(slot, obs, task)], "paper") or \
            "<add_memory></add_memory>"

    def _act_one(self, slot: int, obs: dict, task: Task) -> str:
        if self.protocol == "paper":
            return self._act_paper(slot, obs, task)
        fresh = episode_start(obs)
        ids = self.entry_ids[slot] = {} if fresh else self.entry_ids.get(slot, {})
        created = [int(n) for n in re.findall(r"^created entry (\d+)$", obs["feedback"], re.MULTILINE)]
        ids.update(zip(self.pending.pop(slot, []) if not fresh else [], created))
        if fresh:
            self.reads_done[slot] = 0
            self.chunk_read.pop(slot, None)
        if answering(obs):
            if self.read_per_hop:
                reads = hop_reads(task)
                done = self.reads_done.get(slot, 0)
                if int(obs["memory_size"]) and done < len(reads) and int(obs["reads_left"]) > 1:
                    self.reads_done[slot] = done + 1
                    query, notes = reads[done]
                    return format_ops(([SetScratchpad(notes)] if notes else []) + [Read(query)])
            elif not obs["retrieved"] and int(obs["memory_size"]):
                return format_ops([Read(task.questions[0].question)])
            multi = len(task.questions) > 1
            return format_ops([Answer(q.answers[0], question=i + 1 if multi else None)
                               for i, q in enumerate(task.questions)])
        if self.read_each_chunk and self.chunk_read.get(slot) != int(obs["chunk_index"]):
            self.chunk_read[slot] = int(obs["chunk_index"])
            self.updates_waiting[slot] = list(self._new_facts(slot, obs, task))
            return format_ops([Read(task.questions[0].question)])
        ops, creates, waiting = [], {}, []  # creates: fact key -> index of its Create in ops

        def store(fact: SupportingFact):
            key = fact.key or fact.text
            if key in creates:  # the stale statement came in this same step: store its successor instead
                ops[creates[key]] = Create(fact.text)
            else:
                creates[key] = len(ops)
                ops.append(Create(fact.text))

        for fact in self.updates_waiting.pop(slot, []) if not fresh else []:  # last step's Read was for these
            if self.can_update and fact.key in ids and f"[id {ids[fact.key]}]" in obs["retrieved"]:
                ops.append(Update(fact.text, entry_id=ids[fact.key]))
            else:
                store(fact)
        for fact in self._new_facts(slot, obs, task):
            superseding = fact.key in ids and self.can_update
            if self.read_per_hop and (superseding or self.look_up and fact_subject(fact)):
                waiting.append(fact)
            elif superseding:
                ops.append(Update(fact.text, entry_id=ids[fact.key]))
            else:
                store(fact)
        if waiting:
            self.updates_waiting[slot] = waiting
            # First in the action: whether to Read is decided at the first token, with the chunk's cue in view.
            ops[:0] = [Read(subject) for subject in dict.fromkeys(map(fact_subject, waiting))]
        self.pending[slot] = list(creates)
        return format_ops(ops)


def episode_start(obs: dict) -> bool:
    """Whether an observation is an episode's first: chunk 0 with nothing stored, read or reported yet."""
    return (int(obs["chunk_index"]) == 0 and not int(obs["memory_size"]) and not obs["feedback"]
            and not obs["retrieved"])


def key_subject(fact: SupportingFact) -> str:
    """The entity a synthetic fact is about: its key is `subject|relation`."""
    return fact.key.split("|")[0]


def fact_subject(fact: SupportingFact) -> str | None:
    """The entity a fact is about, keyed or not (a look-alike's comes from its sentence); None if unknown."""
    return key_subject(fact) if fact.key else statement_subject(fact.text)


def hop_chain(task: Task) -> list[SupportingFact]:
    """The first question's current facts in hop order: the one whose subject the question names, then each fact
    whose subject the previous one names. Synthetic facts carry `subject|relation` keys; without keys: empty."""
    facts = [f for f in task.questions[0].supporting_facts if f.current and f.key]
    chain, text = [], task.questions[0].question
    while facts:
        hop = next((f for f in facts if key_subject(f) in text), None)
        if hop is None:
            break
        facts.remove(hop)
        chain.append(hop)
        text = hop.text
    return chain


def hop_reads(task: Task) -> list[tuple[str, str]]:
    """One (query, scratchpad) per hop: the question with no note, then for each later hop the entity the previous
    hop's fact names (the next fact's subject: a query that ranks that fact above the previous hop's look-alikes,
    which the fact's whole text would not), with the facts followed so far as the scratchpad note.
    Without keyed facts (real datasets): the question alone."""
    chain = hop_chain(task)
    return [(task.questions[0].question, "")] + [(key_subject(fact), " ".join(f.text for f in chain[:i]))
                                                 for i, fact in enumerate(chain[1:], start=1)]


def extract_answer(text: str) -> str:
    r"""The short answer in a reader's reply: what the last `<answer>` tag holds (a reader trained on this env's
    protocol answers in it), else, with any other tags dropped, the last `\boxed{...}`, else what follows the last
    "Answer:" (the literature's two conventions), else the reply's first sentence, and when that sentence reads
    "<...> is <answer>" (small models restate the question: "The head of state of X is Y."), what follows its last
    is/was/are/were. Surrounding quotes, `**` and a final period are dropped."""
    tagged = re.findall(r"<answer\b[^>]*>(.*?)</answer>", text, re.IGNORECASE | re.DOTALL)
    text = tagged[-1] if tagged else re.sub(r"</?[A-Za-z_]\w*\b[^<>]*>", " ", text)
    boxed = last_boxed(text)
    if boxed is not None:
        answer = boxed
    elif marked := re.findall(r"answer\s*:\s*(.+)", text, re.IGNORECASE):
        answer = marked[-1]
    else:
        answer = re.split(r"(?<=[.!?])\s", _first_line(text), maxsplit=1)[0]
        copula = re.search(r".*\b(?:is|was|are|were)\s+(\S.*)$", answer)
        if copula:
            answer = copula.group(1)
    return re.sub(r"^[\s\"'*]+|[\s\"'*.]+$", "", answer)


class ReaderWorkflow(Policy):
    """Shared machinery of the static workflows: batched calls to a reader backend."""

    answer_instruction = ("Answer the question using the context. The answer is short: a name, a number, a date, "
                          "a few words, or yes/no. End your reply with one line of the form 'Answer: <answer>'.")

    def __init__(self, reader):
        if reader is None:
            raise ValueError(f"the {self.name} workflow needs a reader model (an LLM backend)")
        self.reader = reader

    def _ask(self, requests: list[tuple[int, list[dict]]], outputs: list[PolicyOutput], wrap) -> None:
        """Runs the reader on (row, messages) pairs and writes wrap(text) into outputs[row]."""
        if not requests:
            return
        for (row, _), generation in zip(requests, self.reader.generate([m for _, m in requests])):
            if generation.error:
                outputs[row] = PolicyOutput("", error=generation.error)
            else:
                outputs[row] = PolicyOutput(wrap(extract_answer(generation.text)), raw_answer=generation.text)


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


class NoMemoryPolicy(ReaderWorkflow):
    name = "no-memory"

    def act(self, observations, tasks=None, slots=None):
        outputs = [PolicyOutput("") for _ in observations]
        requests = [(i, reader_messages(self.answer_instruction, o["question"], "")) for i, o in enumerate(observations)
                    if answering(o)]
        self._ask(requests, outputs, lambda t: format_ops([Answer(t or "unknown")]))
        return outputs


class MemAgentPolicy(ReaderWorkflow):
    """Rewrites the scratchpad after each chunk (MemAgent's overwrite memory), answers from it."""

    name = "memagent"
    update_instruction = ("You keep notes for answering the question. Given your previous notes and a new chunk "
                          "of the document, write the updated notes: every fact that may help answer the question, "
                          "in a few short sentences. Reply with the notes only.")

    def act(self, observations, tasks=None, slots=None):
        outputs = [PolicyOutput("") for _ in observations]
        reading = [(i, reader_messages(self.update_instruction, o["question"],
                                       f"Previous notes: {o['scratchpad'] or '(none)'}\n\nNew chunk:\n{o['chunk']}"))
                   for i, o in enumerate(observations) if not answering(o)]
        final = [(i, reader_messages(self.answer_instruction, o["question"], o["scratchpad"]))
                 for i, o in enumerate(observations) if answering(o)]
        self._ask_multiline(reading, outputs)
        self._ask(final, outputs, lambda t: format_ops([Answer(t or "unknown")]))
        return outputs

    def _ask_multiline(self, requests, outputs):
        if not requests:
            return
        for (row, _), generation in zip(requests, self.reader.generate([m for _, m in requests])):
            notes = re.sub(r"</?scratchpad>", "", generation.text).strip()
            outputs[row] = PolicyOutput(format_ops([SetScratchpad(notes)]), error=generation.error)


class RAGPolicy(ReaderWorkflow):
    """Stores every paragraph (RAG's index), reads with the question at the end, answers from the hits."""

    name = "rag"

    def __init__(self, reader, write: bool = True, read: bool = True, max_entry_chars: int = 1500):
        super().__init__(reader)
        self.write, self.read, self.max_entry_chars = write, read, max_entry_chars
        self.name = {(True, True): "rag", (True, False): "write-only", (False, True): "read-only"}[(write, read)]
        if not (write or read):
            raise ValueError("a RAG workflow that neither writes nor reads is the no-memory baseline")

    def _passages(self, chunk: str) -> list[str]:
        passages = []
        for block in re.split(r"\n\s*\n", chunk):
            block = block.strip().replace("</create>", "")
            while len(block) > self.max_entry_chars:
                cut = block.rfind(". ", 0, self.max_entry_chars) + 1 or self.max_entry_chars
                passages.append(block[:cut].strip())
                block = block[cut:].strip()
            if block:
                passages.append(block)
        return passages

    def act(self, observations, tasks=None, slots=None):
        outputs = [PolicyOutput("") for _ in observations]
        final = []
        for i, obs in enumerate(observations):
            if not answering(obs):
                if self.write:
                    outputs[i] = PolicyOutput(format_ops([Create(p) for p in self._passages(obs["chunk"])]))
            elif self.read and not obs["retrieved"]:  # after a Read, retrieved always holds hits or "(no entries"
                outputs[i] = PolicyOutput(format_ops([Read(obs["question"])]))
            else:
                final.append((i, reader_messages(self.answer_instruction, obs["question"], obs["retrieved"])))
        self._ask(final, outputs, lambda t: format_ops([Answer(t or "unknown")]))
        return outputs


class LLMPolicy(Policy):
    """An LLM that writes the CRUD operations itself (the AtomMem policy), prompted by `build_messages`."""

    name = "llm"

    def __init__(self, generator, protocol: str = "atommem", single_message: bool = False):
        self.generator = generator
        self.protocol = protocol
        self.single_message = single_message

    def act(self, observations, tasks=None, slots=None):
        conversations = [build_messages(o, self.protocol, self.single_message) for o in observations]
        return [PolicyOutput(g.text, error=g.error, generation=g, messages=m)
                for g, m in zip(self.generator.generate(conversations), conversations)]
