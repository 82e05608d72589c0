"""The AtomMem environment: read a long document chunk by chunk, keep memory with CRUD ops, answer.

The class docstring below is the spec. The work is split by concern: parsing actions in `protocols`, applying
their memory operations in `operations`, what the agent is shown in `rendering`, choosing tasks in `tasks`,
scoring in `scoring`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .chunking import Chunker
from .embedders import get_embedder
from .memory import Scratchpad, VectorMemory
from .operations import ALL_OPS, MEMORY_OPS, MemoryOperations
from .process import FactTracker
from .protocols import PROTOCOLS, normalize_action, parse_action
from .rendering import ObservationRendering
from .scoring import score_episode
from .spaces import UnicodeText
from .state import StateSnapshots
from .tasks import Task, TaskSource, choose_task
from .tokens import make_token_counter

_TEXT_LIMIT = 1 << 30
_COUNTER = spaces.Box(low=0, high=np.iinfo(np.int64).max, shape=(), dtype=np.int64)
PAPER_DEFAULT_QUERY = "defult query, change it!"
"""The paper protocol's query before the agent sets one: the official loop's placeholder, spelling and all."""
PAPER_MAX_STEPS = 41
"""The official loop ends an episode after its 41st reply (`max_chunks` 40: a step past it), whatever the length;
its data set centre-truncates a longer context to `max_chunks` x chunk_tokens tokens (40 chunks)."""
ANSWER_MATCHING = ("pooled", "per_question")
ENTRY_IDS = ("sequential", "random")


class AtomMemEnv(MemoryOperations, ObservationRendering, StateSnapshots, gym.Env):
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
    the official file and lines). As the official data, a data file's sentences are joined with nothing
    between them, and a document over 40 x `chunk_tokens` tokens is centre-truncated to its first and
    last 20 x `chunk_tokens` (so at most 40 chunks). The query's top-k entries (the query prefixed with the official
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
    the last question are errors, the step cap is 2 x chunks + 4 x questions, sentences are joined
    with a space and the whole document is read.

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
    - `entry_ids`: "sequential" (1, 2, 3, ...) or "random" (drawn from `self.np_random`, 1 to 999,999, never
      reused in an episode), so that an id does not tell which entry was written later.
    - `embedder`: "minilm" (default, all-MiniLM-L6-v2), "hashing" (fast, model-free) or "st:<model>".
    - `index_precision` ("fp32" exact or "fp16"), `device` ("cpu", or "cuda[:N]" with faiss-gpu).
    - `invalid_op_penalty` (0.0), `render_mode` (None or "ansi").

    ## Information
    At reset also `repeated_paragraphs` (padding paragraphs drawn twice because the data file is too
    small for the length) and, for data files, `records_loaded`, `records_skipped`
    (`skip_malformed`) and `unanswerable_left_out` (MuSiQue full files). Every step: `task_id`, `chunk_index`, `num_chunks`, `memory_size`, `invalid_ops` (this step),
    `total_invalid_ops`, `op_counts` (dict: create/read/update/delete/scratchpad/query/answer,
    valid ops so far), `tokens_shown` (chunk, question, scratchpad and retrieved tokens shown so
    far), and the process metrics (`atommem_env.process`): `gold_facts` (the questions' current supporting
    facts), `gold_facts_in_memory` and `stale_facts_in_memory` (held verbatim by some entry now; stale: the
    superseded statements of volatile synthetic tasks), `read_recall` (share of gold facts in what this step's
    Reads showed; None when they showed nothing). At the last step also `em` (the reward before shaping), `f1` (mean token F1), `sub_em`
    (MemAgent's: a gold answer inside the answer or the answer inside it, normalised; the boxed content
    in the paper protocol), `answers` and `gold_answers`; with the paper protocol also `official_score` (the official scorer over every
    reply) and `question_em` (each question's answer against its own gold answers).

    ## Snapshots
    `get_state()` returns the episode at this step (memory and FAISS index, scratchpad, position, answers,
    counters, `np_random`'s state) as a picklable `EnvState`; `set_state(state)` restores it, in this env or in
    another one built with the same settings and reset once, and returns its observation: the restored env then
    steps exactly as the original would have. Vector envs reach both through the `state` attribute:
    `envs.get_attr("state")`, `envs.set_attr("state", states)`.

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
      official loop's quirks and scorer became the default, the earlier rules `paper_fixes=True`;
      last, the official loop's sentence join and centre truncation, `entry_ids` and snapshots.
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
        entry_ids: str = "sequential",
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
        if entry_ids not in ENTRY_IDS:
            raise ValueError(f"entry_ids must be one of {ENTRY_IDS}, got {entry_ids!r}")
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

        self.official = protocol == "paper" and not paper_fixes  # the official loop, quirks and all
        self.task_source = dataset if not isinstance(dataset, str) else make_task_source(
            dataset, data_path=data_path, split=split, context_tokens=context_tokens, num_documents=num_documents,
            multi_query=multi_query, synthetic=synthetic, max_tasks=max_tasks, skip_malformed=skip_malformed,
            composition=composition, official_text=self.official)
        self.chunk_tokens = int(chunk_tokens)
        self.chunk_overlap = int(chunk_overlap)
        self.token_counter = make_token_counter(token_counter)
        self.protocol = protocol
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
        self.entry_ids = entry_ids
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

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        self.task = choose_task(self.task_source, self.np_random, options)
        self.chunker = self._make_chunker()
        self.memory.clear()
        self.memory.id_rng = self.np_random if self.entry_ids == "random" else None
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
        self.facts = FactTracker(self.task, self.memory)
        self._obs = self._observation(retrieved=self._paper_retrieve() if self.protocol == "paper" else "", feedback="")
        info = self._info(0, self._obs["retrieved"])
        info["repeated_paragraphs"] = int(dict(self.task.metadata).get("repeated_paragraphs", 0))
        stats = getattr(self.task_source, "load_stats", None)
        if stats is not None:
            info.update(records_loaded=stats.loaded, records_skipped=stats.skipped, unanswerable_left_out=stats.unanswerable)
        return self._obs, info

    def _make_chunker(self) -> Chunker:
        return Chunker(self.task.paragraphs, self.token_counter, self.chunk_tokens, self.chunk_overlap,
                       count_cache=self._count_cache, official=self.official,
                       max_tokens=(PAPER_MAX_STEPS - 1) * self.chunk_tokens if self.official else None)

    def step(self, action):
        if self.task is None or self.done:
            raise RuntimeError("call reset() before step(): the episode has not started or has ended")
        messages: list[str] = []  # feedback in the order things happened; errors start with "error: "
        invalid = 0

        def error(text: str) -> None:
            nonlocal invalid
            messages.append(f"error: {text}")
            invalid += 1
        action, problems = normalize_action(action, self.max_action_chars)
        for problem in problems:
            error(problem)

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
        info = self._info(invalid, retrieved)
        reward = -self.invalid_op_penalty * invalid
        if self.done:
            scores = score_episode(self.task.questions, self.answers, self.replies, self.protocol, self.official,
                                   self.answer_matching)
            reward += scores["em"]
            info.update(scores, answers=tuple(self.answers.get(i, "") for i in range(len(self.task.questions))),
                        gold_answers=tuple(q.answers for q in self.task.questions))
        return self._obs, float(reward), terminated, truncated, info
