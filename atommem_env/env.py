"""The AtomMem environment: read a long document chunk by chunk, keep memory with CRUD ops, answer."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .chunking import Chunker
from .embedders import get_embedder
from .memory import MemoryOpError, Scratchpad, VectorMemory
from .protocols import (OP_NAMES, PROTOCOLS, Answer, Create, Delete, Read, SetQuery, SetScratchpad, Update,
                        parse_action)
from .spaces import UnicodeText
from .scoring import exact_match, f1_score, last_boxed, official_score, paper_match, sub_exact_match
from .tasks import Task, TaskSource
from .tokens import make_token_counter

MEMORY_OPS = ("create", "read", "update", "delete")
ALL_OPS = MEMORY_OPS + ("scratchpad", "query")
_TEXT_LIMIT = 1 << 30
_COUNTER = spaces.Box(low=0, high=np.iinfo(np.int64).max, shape=(), dtype=np.int64)
_FEEDBACK_CHARS = 2000
_MESSAGE_CHARS = 240
PAPER_DEFAULT_QUERY = "defult query, change it!"
"""The paper protocol's query before the agent sets one: the official loop's placeholder, spelling and all."""
PAPER_NO_MEMORY = "No previous memory"
"""What the official loop shows where the query retrieves nothing."""
PAPER_QUERY_INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
"""The official loop's prefix on every retrieval query (its Qwen3-Embedding instruction)."""
PAPER_MAX_STEPS = 41
"""The official loop ends an episode after its 41st reply (`max_chunks` 40: a step past it), whatever the length."""
PAPER_RETRIEVED_TOKENS = 4096
"""The official loop cuts the retrieved memories it shows to this many tokens."""
_OFFICIAL_TAG = re.compile(r"<(\w+)[^>]*>(.*?)</\1>", re.DOTALL | re.IGNORECASE)
_OFFICIAL_MODIFY = re.compile(r"Memory\s+(\d+)\s*:\s*(.*)", re.DOTALL)
_OFFICIAL_DELETE = re.compile(r"Memory\s+(\d+)", re.DOTALL)
_OFFICIAL_KINDS = {"add_memory": "create", "modify_memory": "update", "delete_memory": "delete",
                   "update_memory": "scratchpad", "update_query": "query", "final_answer": "answer"}


class _OfficialAbort(Exception):
    """Where the official loop raises inside a reply (and catches it): the rest of the reply is dropped."""
PAPER_QUERY_UPDATES = 3
"""Paper protocol: query updates allowed per question in a row; one more skips the question."""
ANSWER_MATCHING = ("pooled", "per_question")


def _indented(text: str) -> str:
    """An entry's later lines, indented: only an entry's first line starts with `[id N]` or `Memory i:`."""
    return text.replace("\n", "\n    ")


class AtomMemEnv(gym.Env):
    """
    ## Description
    A question-answering POMDP over a long document. The agent sees the document one chunk at a
    time and must answer multi-hop question(s) at the end. It cannot look back: what it needs
    later it must keep in its memory, a scratchpad shown at every step plus a vector store it
    reaches only through atomic operations written as text: Create, Read (top-k semantic
    search), Update and Delete by id. The full store is never shown.

    ## Action Space
    `UnicodeText(max_action_chars)`: any string. Operations are tags (see
    `atommem_env.protocols` for the grammar), free text around them is ignored::

        <create>text</create>  <read>query</read>  <update id="3">text</update>  <delete id="3"/>
        <scratchpad>text</scratchpad>  <answer>text</answer>  (<answer q="2"> with several questions)

    With `protocol="paper"` the official AtomMem tags are read instead (`<add_memory>`,
    `<update_memory>`, `<update_query>`, `<modify_memory>Memory i: ...` (delete, then add anew),
    `<delete_memory>Memory i`, `<final_answer>\\boxed{...}`). Every string is a valid action: malformed tags, unknown ids,
    disabled operations or over-long actions produce error messages in the next observation's
    `feedback` and count in `info["invalid_ops"]`; the memory is left as it was for those ops.
    Strict where leniency would hide a mistake: ids are ASCII digits only, an attribute given twice
    is an error, so is a second answer to one question; a Read or query longer than
    `max_entry_chars` is refused before it is embedded; lone surrogates are read as "?" (with an
    error line).

    ## Observation Space
    `Dict` of Unicode text and integer counters:

    | key | content |
    |---|---|
    | question | the question; with several, one per line as `Q1: ...` (official paper loop: unnumbered); paper protocol after the last chunk: the current one |
    | chunk | the current chunk of the document ("" in the answer phase) |
    | scratchpad | the scratchpad's text ("" when disabled) |
    | retrieved | the entries found by the last step's Reads as `[id N] text` lines, best first, equal scores by id (paper protocol: `Memory i: text` for the persistent query; official loop: `No previous memory` when none, cut at 4096 tokens); an entry's later lines are indented 4 spaces, so only entry starts begin a line (official loop: as written) |
    | feedback | errors and results of the last action (ids created, ...), one line each, each cut at 240 characters, 2000 in all |
    | query | paper protocol: the persistent retrieval query (a placeholder until the agent sets one); "" otherwise |
    | chunk_index | 0-based index of the chunk shown; equals num_chunks in the answer phase |
    | num_chunks | chunks in this document |
    | memory_size | entries in the vector store |
    | reads_left | further steps allowed on this chunk (answer phase: steps left to answer); paper protocol: query updates left for the current question |

    ## Rewards
    At the last step: the mean over questions of exact match between the answer and any gold answer
    (SQuAD normalisation: lower case, no punctuation or articles), 1 or 0 for one question;
    unanswered questions score 0. Paper protocol: the official score (`atommem_env.scoring.official_score`):
    every reply with one `<final_answer>` (or else any `\\boxed{`) scores 1 when the last `\\boxed{}` in
    its last 300 characters, lower-cased and `strip_string`-normalised, equals a gold answer of *any*
    question; the sum, uncapped (boxes in reading replies count too), over the number of questions.
    `answer_matching="per_question"` scores each question's recorded answer against its own gold
    answers instead (`question_em`). With `paper_fixes=True`, one answer per question, matched against
    all questions' answers ("pooled", the default) or its own. Optional shaping: `-invalid_op_penalty`
    per invalid operation at every step (0 by default).

    ## Starting State
    `reset` draws a task from the task source with `self.np_random` (or takes
    `options={"task_index": i}` / `options={"task": Task}`), chunks its document and empties the
    memory and scratchpad. The first observation shows chunk 0.

    ## Episode End
    A step without a Read moves to the next chunk; a step with a Read stays on the chunk so the
    agent sees the results, at most `max_reads_per_chunk` times. After the last chunk comes the
    answer phase (no chunk): Answers are accepted there only. Termination: every question answered.
    Truncation: `max_answer_steps` answer-phase steps without all answers, or `max_steps` steps.

    Paper protocol: the official AtomMem loop, its quirks included (docs/eval.md: each behaviour with
    the official file and lines). The query's top-k entries (the query prefixed with the official
    embedding instruction) are shown at every step, from the first (with the placeholder query),
    cut to 4096 tokens. Every paired tag `<name ...>...</name>` is consumed in reply order, whatever
    its name, so operations inside `<think>` never run. The chunk moves on after an add or modify tag
    (an empty add stores nothing and still moves on). A reply without paired tags, or a modify or
    delete whose text does not start with `Memory i` (case-sensitive), or a `Memory i` the shown
    list cannot index, drops the rest of its reply and keeps the chunk (the official code raises and
    catches there; one error line). `Memory 0` is the last entry shown; a modify deletes the first
    stored entry with the shown text, then adds the new text (none: a delete). `<final_answer>`
    (empty too) moves to the next question, also before the last chunk; after the last chunk the
    questions are shown one at a time. A question allows 3 query updates in a row (an add, modify,
    delete or short-term-memory update starts the count again, an empty query counts); a 4th skips
    it. No length limits. Termination: the last question answered or skipped (later tags of that
    reply still apply). Truncation: `max_steps` steps (default 41, the official `max_chunks` 40).
    `paper_fixes=True` gives the intended behaviour instead: a reply without tags moves on,
    malformed or unknown references are error lines while the rest of the reply applies, ids are
    ASCII digits, tags inside other tags run, the entry and scratchpad limits apply, answers after
    the last question are errors, and the step cap is 2 x chunks + 4 x questions.

    ## Arguments
    - `dataset`: "synthetic" (default; no data files), "hotpotqa", "2wiki", "musique", or a TaskSource.
    - `data_path`, `split`, `context_tokens`, `num_documents`, `multi_query`, `composition` ("atommem",
      "official": the official multi-query data, "ruler": MemAgent's RULER-HotpotQA), `synthetic`,
      `max_tasks`, `skip_malformed`: passed to `atommem_env.data.make_task_source`.
    - `chunk_tokens` (1024), `chunk_overlap` (0): chunk size and overlap, counted by `token_counter`
      ("regex" default, or "hf:<tokenizer>").
    - `protocol`: "atommem" (default) or "paper" (the official loop); `paper_fixes` (False): the paper
      protocol's intended behaviour instead of the official loop's quirks.
    - `enabled_ops`: subset of create/read/update/delete/scratchpad/query (default all); a disabled
      op in an action is an error message. `use_scratchpad=False` and `use_vector_store=False`
      remove the scratchpad and the four memory ops.
    - `top_k` (6), `max_reads_per_chunk` (2), `max_answer_steps` (4): the last two in the atommem protocol only.
    - `max_steps` (None: no cap in the atommem protocol, 41 in the official paper loop, 2 x chunks + 4 x
      questions with `paper_fixes`).
    - `answer_matching`: None (the protocol's own: "pooled" for paper, "per_question" for atommem),
      "pooled" or "per_question".
    - `max_entries` (None), `max_entry_chars` and `max_scratchpad_chars` ("auto": 2000 and 4000, none in the
      official paper loop), `max_action_chars` (100000).
    - `embedder`: "minilm" (default, all-MiniLM-L6-v2), "hashing" (fast, model-free) or "st:<model>".
    - `index_precision` ("fp32" exact or "fp16"), `device` ("cpu", or "cuda[:N]" with faiss-gpu).
    - `invalid_op_penalty` (0.0), `render_mode` (None or "ansi").

    ## Information
    At reset also `repeated_paragraphs` (padding paragraphs drawn twice because the data file is too
    small for the length) and, for data files, `records_loaded`, `records_skipped`
    (`skip_malformed`) and `unanswerable_left_out` (MuSiQue full files). Every step: `task_id`, `chunk_index`, `num_chunks`, `memory_size`, `invalid_ops` (this step),
    `total_invalid_ops`, `op_counts` (dict: create/read/update/delete/scratchpad/query/answer,
    valid ops so far), `tokens_shown` (chunk, question, scratchpad and retrieved tokens shown so
    far). At the last step also `em` (the reward before shaping), `f1` (mean token F1), `sub_em`
    (MemAgent's: a gold answer inside the answer or the answer inside it, normalised; the boxed content
    in the paper protocol), `answers` and `gold_answers`; with the paper protocol also `official_score` (the official scorer over every
    reply) and `question_em` (each question's answer against its own gold answers).

    ## Example
        >>> import gymnasium as gym, atommem_env
        >>> env = gym.make("AtomMem/Synthetic-v0", embedder="hashing")
        >>> obs, info = env.reset(seed=0)
        >>> obs, reward, terminated, truncated, info = env.step("<create>a note</create>")
        >>> info["memory_size"]
        1

    Text fields have no fixed bound, so vector envs must not use shared memory: `AsyncVectorEnv`
    needs `shared_memory=False` (asking for it raises at once, saying so). Forked workers search on
    one FAISS thread (OpenMP does not survive fork).

    ## Version History
    - v0: initial release. Before the first release, the paper protocol was brought to the official
      loop's rules (the points in docs/eval.md) and the `query` observation key was added; then the
      official loop's quirks and scorer became the default, the earlier rules `paper_fixes=True`.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4, "autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        dataset: str | TaskSource = "synthetic",
        data_path: str | None = None,
        split: str = "all",
        context_tokens: int | None = None,
        num_documents: int | None = None,
        multi_query: bool = False,
        composition: str = "atommem",
        synthetic: dict | None = None,
        max_tasks: int | None = None,
        skip_malformed: bool = False,
        chunk_tokens: int = 1024,
        chunk_overlap: int = 0,
        token_counter: Any = "regex",
        protocol: str = "atommem",
        paper_fixes: bool = False,
        enabled_ops: tuple[str, ...] | None = None,
        use_scratchpad: bool = True,
        use_vector_store: bool = True,
        top_k: int = 6,
        max_reads_per_chunk: int = 2,
        max_answer_steps: int = 4,
        max_steps: int | None = None,
        answer_matching: str | None = None,
        max_entries: int | None = None,
        max_entry_chars: int | None | str = "auto",
        max_scratchpad_chars: int | None | str = "auto",
        max_action_chars: int = 100_000,
        embedder: str = "minilm",
        index_precision: str = "fp32",
        device: str = "cpu",
        invalid_op_penalty: float = 0.0,
        render_mode: str | None = None,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if paper_fixes and protocol != "paper":
            raise ValueError("paper_fixes changes the paper protocol's official loop; it needs protocol='paper'")
        for name, value in [("chunk_tokens", chunk_tokens), ("top_k", top_k), ("max_answer_steps", max_answer_steps),
                            ("max_action_chars", max_action_chars)]:
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(max_reads_per_chunk, (int, np.integer)) or max_reads_per_chunk < 0:
            raise ValueError(f"max_reads_per_chunk must be an integer >= 0, got {max_reads_per_chunk!r}")
        if max_steps is not None and (not isinstance(max_steps, (int, np.integer)) or max_steps <= 0):
            raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
        if answer_matching is not None and answer_matching not in ANSWER_MATCHING:
            raise ValueError(f"answer_matching must be None or one of {ANSWER_MATCHING}, got {answer_matching!r}")
        if invalid_op_penalty < 0:
            raise ValueError(f"invalid_op_penalty must be >= 0, got {invalid_op_penalty}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        ops = set(ALL_OPS if enabled_ops is None else enabled_ops)
        unknown = ops - set(ALL_OPS)
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)} in enabled_ops; choose from {ALL_OPS}")
        if not use_scratchpad:
            ops.discard("scratchpad")
        if not use_vector_store:
            ops -= set(MEMORY_OPS) | {"query"}
        self.enabled_ops = frozenset(ops)

        from .data import make_task_source  # the data package imports the task record from here

        self.task_source = dataset if not isinstance(dataset, str) else make_task_source(
            dataset, data_path=data_path, split=split, context_tokens=context_tokens, num_documents=num_documents,
            multi_query=multi_query, synthetic=synthetic, max_tasks=max_tasks, skip_malformed=skip_malformed,
            composition=composition)
        self.chunk_tokens = int(chunk_tokens)
        self.chunk_overlap = int(chunk_overlap)
        self.token_counter = make_token_counter(token_counter)
        self.protocol = protocol
        self.official = protocol == "paper" and not paper_fixes  # the official loop, quirks and all
        self.use_scratchpad = use_scratchpad
        self.top_k = int(top_k)
        self.max_reads_per_chunk = int(max_reads_per_chunk)
        self.max_answer_steps = int(max_answer_steps)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.answer_matching = answer_matching or ("pooled" if protocol == "paper" else "per_question")
        self.max_action_chars = int(max_action_chars)
        self.invalid_op_penalty = float(invalid_op_penalty)
        self.render_mode = render_mode
        # The official loop limits no text; the atommem protocol and paper_fixes refuse over-long entries.
        if max_entry_chars == "auto":
            max_entry_chars = None if self.official else 2000
        if max_scratchpad_chars == "auto":
            max_scratchpad_chars = None if self.official else 4000
        self.memory = VectorMemory(get_embedder(embedder), max_entries=max_entries, max_entry_chars=max_entry_chars,
                                   precision=index_precision, device=device)
        self.scratchpad = Scratchpad(max_scratchpad_chars)
        self._count_cache: dict[str, int] = {}
        self._text_counts: dict[str, int] = {}

        self.action_space = UnicodeText(self.max_action_chars)
        self.observation_space = spaces.Dict({
            "question": UnicodeText(_TEXT_LIMIT),
            "chunk": UnicodeText(_TEXT_LIMIT),
            "scratchpad": UnicodeText(_TEXT_LIMIT),
            "retrieved": UnicodeText(_TEXT_LIMIT),
            "feedback": UnicodeText(_TEXT_LIMIT),
            "query": UnicodeText(_TEXT_LIMIT),
            "chunk_index": _COUNTER,
            "num_chunks": _COUNTER,
            "memory_size": _COUNTER,
            "reads_left": _COUNTER,
        })
        self.task: Task | None = None
        self._obs: dict | None = None

    # ------------------------------------------------------------------ episode
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "task" in options:
            if not isinstance(options["task"], Task):
                raise ValueError("options['task'] must be an atommem_env.tasks.Task")
            self.task = options["task"]
        elif "task_index" in options:
            self.task = self.task_source.get(int(options["task_index"]))
        else:
            self.task = self.task_source.sample(self.np_random)
        self.chunker = Chunker(self.task.paragraphs, self.token_counter, self.chunk_tokens, self.chunk_overlap,
                               count_cache=self._count_cache, official=self.official)
        self.memory.clear()
        self.scratchpad.clear()
        self.chunk_index = 0
        self.steps_on_chunk = 0
        self.answer_steps = 0
        self.steps = 0
        self.answers: dict[int, str] = {}
        # Paper protocol: the persistent query, its updates in a row, the question asked, the ids behind "Memory i".
        self.query = PAPER_DEFAULT_QUERY if self.protocol == "paper" else ""
        self.query_updates = 0
        self.question_index = 0
        self.shown_ids: list[int] = []
        self.shown_texts: list[str] = []  # official loop: what "Memory i" referred to when the reply was written
        self.replies: list[str] = []  # official loop: every reply is scored
        default_cap = None
        if self.protocol == "paper":
            default_cap = PAPER_MAX_STEPS if self.official else 2 * len(self.chunker) + 4 * len(self.task.questions)
        self.step_cap = self.max_steps or default_cap
        self.op_counts = Counter({name: 0 for name in ALL_OPS + ("answer",)})
        self.total_invalid_ops = 0
        self.tokens_shown = 0
        self.done = False
        self._obs = self._observation(retrieved=self._paper_retrieve() if self.protocol == "paper" else "", feedback="")
        info = self._info(invalid=0)
        info["repeated_paragraphs"] = int(dict(self.task.metadata).get("repeated_paragraphs", 0))
        stats = getattr(self.task_source, "load_stats", None)
        if stats is not None:
            info.update(records_loaded=stats.loaded, records_skipped=stats.skipped, unanswerable_left_out=stats.unanswerable)
        return self._obs, info

    def step(self, action):
        if self.task is None or self.done:
            raise RuntimeError("call reset() before step(): the episode has not started or has ended")
        messages: list[str] = []  # feedback in the order things happened; errors start with "error: "
        invalid = 0

        def error(text: str) -> None:
            nonlocal invalid
            messages.append(f"error: {text}")
            invalid += 1
        if isinstance(action, bytes):
            action = action.decode("utf-8", errors="replace")
        if not isinstance(action, str):
            error(f"the action must be a string, got {type(action).__name__}; nothing was done")
            action = ""
        try:
            action.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: no tokenizer or file takes them
            action = action.encode("utf-8", errors="replace").decode("utf-8")
            error("the action holds characters that are not valid Unicode (lone surrogates); they were read as '?'")
        if len(action) > self.max_action_chars:
            error(f"the action has {len(action)} characters; only the first {self.max_action_chars} were read")
            action = action[:self.max_action_chars]

        self.steps += 1
        if self.official:  # the official loop reads replies its own way
            terminated, retrieved = self._official_step(action, messages, error)
        else:
            parsed = parse_action(action, self.protocol)
            for problem in parsed.errors:
                error(problem)
            self._prefetch_embeddings(parsed.ops)
            if self.protocol == "paper":
                terminated, retrieved = self._paper_step(parsed, action, messages, error)
            else:
                terminated, retrieved = self._atommem_step(parsed, messages, error)
        truncated = False
        if not terminated and self.answer_steps >= self.max_answer_steps and self.protocol == "atommem":
            truncated = True
            messages.append(f"error: no answer for every question after {self.max_answer_steps} answer-phase steps")
        elif not terminated and self.step_cap is not None and self.steps >= self.step_cap:
            truncated = True
            messages.append(f"error: the episode ends at its step limit ({self.step_cap} steps)")

        self.total_invalid_ops += invalid
        self.done = terminated or truncated
        self._obs = self._observation(retrieved=retrieved, feedback=self._feedback(messages))
        info = self._info(invalid)
        reward = -self.invalid_op_penalty * invalid
        if self.done:
            scores = self._score()
            reward += scores["em"]
            info.update(scores, answers=tuple(self.answers.get(i, "") for i in range(len(self.task.questions))),
                        gold_answers=tuple(q.answers for q in self.task.questions))
        return self._obs, float(reward), terminated, truncated, info

    # ------------------------------------------------------------------ helpers
    def _atommem_step(self, parsed, messages: list[str], error) -> tuple[bool, str]:
        """Applies the ops in order; a Read keeps the chunk (up to max_reads_per_chunk). (terminated, retrieved)."""
        answering = self.chunk_index >= len(self.chunker)
        reads: list[str] = []
        for op in parsed.ops:
            name = OP_NAMES[type(op)]
            if name != "answer" and name not in self.enabled_ops:
                error(f"'{name}' is disabled in this environment")
                continue
            try:
                if isinstance(op, Read):
                    self.memory.check_query(op.query)
                    reads.append(op.query)
                elif isinstance(op, Update):
                    self.memory.update(op.entry_id, op.text)
                    messages.append(f"updated entry {op.entry_id}")
                elif isinstance(op, Answer):
                    self._record_answer(op, answering)
                else:
                    self._apply_shared(op, messages)
            except MemoryOpError as err:
                error(f"{name}: {err}")
                continue
            self.op_counts[name] += 1
        retrieved = self._retrieve(reads)
        if answering:
            self.answer_steps += 1
            return len(self.answers) == len(self.task.questions), retrieved
        if reads and self.steps_on_chunk < self.max_reads_per_chunk:
            self.steps_on_chunk += 1
        else:
            self._next_chunk(messages)
        return False, retrieved

    def _paper_step(self, parsed, action: str, messages: list[str], error) -> tuple[bool, str]:
        """The official AtomMem loop: ops in order; an answer (or a skipped question) moves to the next question and
        the last one ends the episode, also before the last chunk; while reading, the chunk moves on after an add or
        modify tag (even a failed one) or a reply without any paired tag. (terminated, retrieved)."""
        answering = self.chunk_index >= len(self.chunker)
        move_on = any(tag in ("add_memory", "modify_memory") for tag in parsed.tags) or not _OFFICIAL_TAG.search(action)
        ended = False
        for op in parsed.ops:
            name = OP_NAMES[type(op)]
            if ended:
                error(f"'{name}' after the last question: ignored")
                continue
            if name != "answer" and name not in self.enabled_ops:
                error(f"'{name}' is disabled in this environment")
                continue
            try:
                if isinstance(op, SetQuery):
                    if self.query_updates >= PAPER_QUERY_UPDATES:
                        error(f"query: more than {PAPER_QUERY_UPDATES} query updates in a row for question "
                              f"{self.question_index + 1}: it is skipped, unanswered")
                        ended = self._next_question()
                        continue
                    self.memory.check_query(op.query)
                    self.query = op.query
                    self.query_updates += 1
                elif isinstance(op, Update):  # as the official code: delete, then add anew (a new id, a new rank)
                    entry_id = self._resolve(None, op.rank)
                    self.memory.check_text(op.text)
                    self.memory.delete(entry_id)
                    messages.append(f"replaced entry {entry_id} by entry {self.memory.create(op.text)}")
                elif isinstance(op, Answer):
                    self.answers[self.question_index] = op.text
                    ended = self._next_question()
                else:
                    self._apply_shared(op, messages)
            except MemoryOpError as err:
                error(f"{name}: {err}")
                continue
            self.op_counts[name] += 1
            if name in ("create", "update", "delete", "scratchpad"):
                self.query_updates = 0
        return ended, self._finish_paper_step(answering, move_on and not ended, messages)

    def _official_step(self, action: str, messages: list[str], error) -> tuple[bool, str]:
        """One reply, as the official loop's `parse_action` handles it (docs/eval.md: each behaviour with the official
        lines). Every paired tag, of any name, is consumed in order (so tags inside `<think>` never run); a reply
        with none, a modify or delete without `Memory i`, or a `Memory i` the shown list cannot index raises there,
        and is caught: the rest of the reply is dropped and the chunk stays. Otherwise an add or modify moves the
        chunk on. Answers are recorded; the score comes from every reply (`official_score`). (terminated, retrieved)
        """
        answering = self.chunk_index >= len(self.chunker)
        self.replies.append(action)
        move_on = ended = False
        try:
            tags = _OFFICIAL_TAG.findall(action)
            if not tags:
                raise _OfficialAbort("the reply has no paired tag")
            for name, content in tags:
                name, content = name.lower(), content.strip()
                kind = _OFFICIAL_KINDS.get(name)
                if kind is None:
                    continue  # <think> and other unknown tags: consumed, nothing done
                if kind != "answer" and kind not in self.enabled_ops:
                    error(f"'{kind}' is disabled in this environment")
                    move_on = move_on or name in ("add_memory", "modify_memory")  # the reply still reads on
                    continue
                if name == "update_query":
                    if self.query_updates >= PAPER_QUERY_UPDATES:
                        messages.append(f"more than {PAPER_QUERY_UPDATES} query updates in a row for question "
                                        f"{self.question_index + 1}: it is skipped, unanswered")
                        ended = self._next_question() or ended
                        continue
                    if content:
                        self.query = content
                    self.query_updates += 1
                elif name == "final_answer":
                    self.answers[self.question_index] = content
                    ended = self._next_question() or ended
                else:
                    try:
                        self._official_memory_op(name, content, messages)
                    except MemoryOpError as err:  # a limit the user set (max_entries); the official code has none
                        error(f"{kind}: {err}")
                        continue
                    self.query_updates = 0
                    move_on = move_on or name in ("add_memory", "modify_memory")
                if content or name != "add_memory":  # an empty add stores nothing: no Create to count
                    self.op_counts[kind] += 1
        except _OfficialAbort as err:
            error(f"{err}: the rest of the reply is dropped and the chunk stays (the official loop raises here "
                  "and catches it)")
            move_on = False
        return ended, self._finish_paper_step(answering, move_on and not ended, messages)

    def _finish_paper_step(self, answering: bool, move_on: bool, messages: list[str]) -> str:
        """Both paper loops after a reply: the memories for the query shown next, the step counted, the chunk moved
        on if the reply read on; returns the memories shown."""
        retrieved = self._paper_retrieve()
        if answering:
            self.answer_steps += 1
        elif move_on:
            self._next_chunk(messages)
        return retrieved

    def _official_memory_op(self, name: str, content: str, messages: list[str]) -> None:
        """add_memory, modify_memory, delete_memory, update_memory of the official loop; `Memory i` indexes the
        list shown with this reply's prompt as Python does (`Memory 0` is the last one)."""
        if name == "update_memory":
            self.scratchpad.set(content)
            return
        if name == "add_memory":
            if content:
                messages.append(f"created entry {self.memory.create(content)}")
            return
        m = (_OFFICIAL_MODIFY if name == "modify_memory" else _OFFICIAL_DELETE).match(content)
        if m is None:
            raise _OfficialAbort(f"<{name}> does not start with 'Memory i'")
        position = int(m.group(1)) - 1
        if position >= len(self.shown_texts):
            messages.append(f"Memory {m.group(1)} is not among the {len(self.shown_texts)} shown: nothing changed")
            return
        try:
            old = self.shown_texts[position]
        except IndexError:
            raise _OfficialAbort(f"Memory {m.group(1)} with {len(self.shown_texts)} memories shown") from None
        # As the official code: the first stored entry with that text goes, then the new text (if any) is added.
        first = next((e.id for e in self.memory.entries() if e.text == old), None)
        if first is not None:
            self.memory.delete(first)
            messages.append(f"deleted entry {first}")
        new = m.group(2).strip() if name == "modify_memory" else ""
        if new:
            messages.append(f"created entry {self.memory.create(new)}")

    def _apply_shared(self, op, messages: list[str]) -> None:
        """Create, Delete and SetScratchpad, the same in both protocols; a MemoryOpError changes nothing."""
        if isinstance(op, Create):
            messages.append(f"created entry {self.memory.create(op.text)}")
        elif isinstance(op, Delete):
            entry_id = self._resolve(op.entry_id, op.rank)
            self.memory.delete(entry_id)
            messages.append(f"deleted entry {entry_id}")
        elif isinstance(op, SetScratchpad):
            self.scratchpad.set(op.text)
        else:
            raise TypeError(f"{op!r} is not handled here")

    def _next_chunk(self, messages: list[str]) -> None:
        self.chunk_index += 1
        self.steps_on_chunk = 0
        if self.chunk_index == len(self.chunker):
            messages.append("that was the last chunk: answer now")

    def _next_question(self) -> bool:
        """Paper protocol: on to the next question with a fresh query budget; True when none is left."""
        self.question_index += 1
        self.query_updates = 0
        return self.question_index >= len(self.task.questions)

    def _prefetch_embeddings(self, ops) -> None:
        """One batched embedding call per step; the ops below then hit the embedder's cache.

        Only texts that pass the limits are embedded: an op that will be refused costs no embedding.
        """
        texts = [op.text for op in ops if isinstance(op, (Create, Update)) and OP_NAMES[type(op)] in self.enabled_ops]
        texts += [op.query for op in ops if isinstance(op, (Read, SetQuery)) and OP_NAMES[type(op)] in self.enabled_ops]
        texts = [t.strip() for t in texts if self.memory.accepts(t)]
        if texts:
            self.memory.embedder.embed(texts)

    def _resolve(self, entry_id: int | None, rank: int | None) -> int:
        if entry_id is not None:
            return entry_id
        if not 1 <= rank <= len(self.shown_ids):
            raise MemoryOpError(f"Memory {rank} is not among the {len(self.shown_ids)} entries shown at this step")
        return self.shown_ids[rank - 1]

    def _record_answer(self, op: Answer, answering: bool) -> None:
        if not answering:
            raise MemoryOpError(f"answers are accepted after the last chunk (this is chunk {self.chunk_index + 1}"
                                f" of {len(self.chunker)})")
        n = len(self.task.questions)
        if op.question is None:
            unanswered = [i for i in range(n) if i not in self.answers]
            if not unanswered:
                raise MemoryOpError("every question is answered already")
            index = unanswered[0]
        elif op.question > n:
            raise MemoryOpError(f"there is no question {op.question}; this task has {n}")
        elif op.question - 1 in self.answers:
            raise MemoryOpError(f"question {op.question} is answered already")
        else:
            index = op.question - 1
        self.answers[index] = op.text

    def _paper_retrieve(self) -> str:
        """The top-k entries for the persistent query as `Memory i:` lines, remembered for modify and delete.
        The official loop prefixes the query with its embedding instruction, shows its placeholder where nothing is
        found, leaves entries' later lines as they are and cuts the list to 4096 tokens."""
        query = PAPER_QUERY_INSTRUCTION + self.query if self.official else self.query
        found = self.memory.read(query, self.top_k) if len(self.memory) and "query" in self.enabled_ops else []
        self.shown_ids = [e.id for e in found]
        self.shown_texts = [e.text for e in found]
        if not self.official:
            return "\n".join(f"Memory {rank}: {_indented(e.text)}" for rank, e in enumerate(found, start=1))
        text = "\n".join(f"Memory {rank}: {e.text}" for rank, e in enumerate(found, start=1)) or PAPER_NO_MEMORY
        spans = self.token_counter.spans(text)
        return text[:spans[PAPER_RETRIEVED_TOKENS - 1][1]] if len(spans) > PAPER_RETRIEVED_TOKENS else text

    def _retrieve(self, reads: list[str]) -> str:
        if not reads:
            return ""
        lines, seen = [], set()
        for query, found in zip(reads, self.memory.read_many(reads, self.top_k)):
            if not found:
                lines.append(f"(no entries for: {query})")
            for entry in found:
                if entry.id not in seen:
                    seen.add(entry.id)
                    lines.append(f"[id {entry.id}] {_indented(entry.text)}")
        return "\n".join(lines)

    @staticmethod
    def _feedback(lines: list[str]) -> str:
        """Messages in order, each cut to _MESSAGE_CHARS, so one long message cannot push out the others."""
        text = ""
        for i, line in enumerate(lines):
            if len(line) > _MESSAGE_CHARS:
                line = line[:_MESSAGE_CHARS - 6] + " [...]"
            if len(text) + len(line) + 1 > _FEEDBACK_CHARS:
                return text + f"\n(... {len(lines) - i} more messages)"
            text = f"{text}\n{line}" if text else line
        return text

    def _count_once(self, text: str) -> int:
        """Token count of the question or query, recounted only when the text changes (they repeat every step)."""
        cached = self._text_counts.get(text)
        if cached is None:
            if len(self._text_counts) > 64:
                self._text_counts.clear()
            cached = self._text_counts[text] = self.token_counter.count(text)
        return cached

    def _question_text(self) -> str:
        questions = self.task.questions
        if self.protocol == "paper" and self.chunk_index >= len(self.chunker):  # answered one at a time
            return questions[min(self.question_index, len(questions) - 1)].question
        if len(questions) == 1:
            return questions[0].question
        if self.official:  # the official reading template joins the questions, unnumbered
            return "\n".join(q.question for q in questions)
        return "\n".join(f"Q{i}: {q.question}" for i, q in enumerate(questions, start=1))

    def _observation(self, retrieved: str, feedback: str) -> dict:
        answering = self.chunk_index >= len(self.chunker)
        chunk = "" if answering else self.chunker.chunk(self.chunk_index)
        scratchpad = self.scratchpad.text if self.use_scratchpad else ""
        if self.protocol == "paper":
            left = PAPER_QUERY_UPDATES - self.query_updates
        elif answering:
            left = self.max_answer_steps - self.answer_steps
        else:
            left = self.max_reads_per_chunk - self.steps_on_chunk
        question = self._question_text()
        self.tokens_shown += (self._count_once(question) + self._count_once(self.query)
                              + (0 if answering else self.chunker.chunk_token_count(self.chunk_index))
                              + self.token_counter.count(scratchpad) + self.token_counter.count(retrieved))
        return {
            "question": question,
            "chunk": chunk,
            "scratchpad": scratchpad,
            "retrieved": retrieved,
            "feedback": feedback,
            "query": self.query,
            "chunk_index": np.array(self.chunk_index, dtype=np.int64),
            "num_chunks": np.array(len(self.chunker), dtype=np.int64),
            "memory_size": np.array(len(self.memory), dtype=np.int64),
            "reads_left": np.array(left, dtype=np.int64),
        }

    def _info(self, invalid: int) -> dict:
        return {
            "task_id": self.task.task_id,
            "chunk_index": self.chunk_index,
            "num_chunks": len(self.chunker),
            "memory_size": len(self.memory),
            "invalid_ops": invalid,
            "total_invalid_ops": self.total_invalid_ops,
            "op_counts": dict(self.op_counts),
            "tokens_shown": self.tokens_shown,
        }

    def _score(self) -> dict:
        """em (the reward before shaping) and f1, means over questions; with the paper protocol also question_em
        (each answer against its own question) and official_score (the official scorer over every reply).

        em: atommem, exact match per question; paper, the official score with "pooled" matching (it may pass 1:
        every boxed reply earns credit) or question_em's mean with "per_question"; paper_fixes, each question's
        answer against the gold answers of all questions ("pooled") or of its own.
        """
        questions = self.task.questions
        pooled = tuple(g for q in questions for g in q.answers)
        answers = [self.answers.get(i) for i in range(len(questions))]
        # The official data keep one gold answer per question (MuSiQue: `[answer]`, no `answer_aliases`).
        golds = [q.answers[:1] if self.official else q.answers for q in questions]
        if self.protocol == "atommem":
            ems = [0.0 if a is None else exact_match(a, q.answers) for a, q in zip(answers, questions)]
            f1s = [0.0 if a is None else f1_score(a, q.answers) for a, q in zip(answers, questions)]
            subs = [0.0 if a is None else sub_exact_match(a, q.answers) for a, q in zip(answers, questions)]
            return {"em": float(np.mean(ems)), "f1": float(np.mean(f1s)), "sub_em": float(np.mean(subs))}
        own = [0.0 if a is None else paper_match(a, g) for a, g in zip(answers, golds)]
        f1s = [0.0 if a is None else f1_score(last_boxed(a) or "", g) for a, g in zip(answers, golds)]
        subs = [0.0 if a is None else sub_exact_match(last_boxed(a) or "", g) for a, g in zip(answers, golds)]
        official = official_score(self.replies, golds)
        if self.answer_matching == "per_question":
            em = float(np.mean(own))
        elif self.official:
            em = official
        else:
            em = float(np.mean([0.0 if a is None else paper_match(a, pooled) for a in answers]))
        return {"em": em, "f1": float(np.mean(f1s)), "sub_em": float(np.mean(subs)), "question_em": tuple(own),
                "official_score": official}

    def render(self):
        if self.render_mode != "ansi" or self._obs is None:
            return None
        o = self._obs
        phase = "answer phase" if int(o["chunk_index"]) >= int(o["num_chunks"]) else \
            f"chunk {int(o['chunk_index']) + 1}/{int(o['num_chunks'])}"
        parts = [f"== {self.task.task_id} | {phase} | memory {int(o['memory_size'])} entries ==",
                 f"question: {o['question']}"]
        for key in ("scratchpad", "query", "retrieved", "feedback", "chunk"):
            if o[key]:
                parts.append(f"-- {key} --\n{o[key]}")
        return "\n".join(parts) + "\n"

