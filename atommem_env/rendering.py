"""What the agent is shown: the observation, the retrieved entries, the feedback lines, the ansi rendering.

`ObservationRendering` is a part of `AtomMemEnv` (the class docstring there is the spec of every key).
"""

from __future__ import annotations

import numpy as np

from .operations import PAPER_QUERY_UPDATES

_FEEDBACK_CHARS = 2000
_MESSAGE_CHARS = 240
PAPER_NO_MEMORY = "No previous memory"
"""What the official loop shows where the query retrieves nothing."""
PAPER_QUERY_INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
"""The official loop's prefix on every retrieval query (its Qwen3-Embedding instruction)."""
PAPER_RETRIEVED_TOKENS = 4096
"""The official loop cuts the retrieved memories it shows to this many tokens."""


def _indented(text: str) -> str:
    """An entry's later lines, indented: only an entry's first line starts with `[id N]` or `Memory i:`."""
    return text.replace("\n", "\n    ")


class ObservationRendering:
    """The observation, info and rendering of `AtomMemEnv` (mixed into it)."""

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

    def _info(self, invalid: int, retrieved: str) -> dict:
        """The step's info; `retrieved`, the entries its Reads showed, for the process metrics' read recall."""
        return {
            "task_id": self.task.task_id,
            "chunk_index": self.chunk_index,
            "num_chunks": len(self.chunker),
            "memory_size": len(self.memory),
            "invalid_ops": invalid,
            "total_invalid_ops": self.total_invalid_ops,
            "op_counts": dict(self.op_counts),
            "tokens_shown": self.tokens_shown,
            **self.facts.metrics(retrieved),
        }

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
