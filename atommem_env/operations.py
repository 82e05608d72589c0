"""What an action does to the episode: the memory operations of both protocols, applied in order.

`MemoryOperations` is a part of `AtomMemEnv` (the class docstring there is the spec): each `_*_step`
method applies one parsed action to the memory, scratchpad, answers and position, and returns
(terminated, the entries retrieved for the next observation). A `MemoryOpError` on one operation is an
error line in the feedback; the memory is left as it was for that operation.
"""

from __future__ import annotations

from .memory import MemoryOpError
from .protocols import (OFFICIAL_DELETE, OFFICIAL_KINDS, OFFICIAL_MODIFY, OFFICIAL_TAG, OP_NAMES, Answer, Create,
                        Delete, Read, SetQuery, SetScratchpad, Update)

MEMORY_OPS = ("create", "read", "update", "delete")
ALL_OPS = MEMORY_OPS + ("scratchpad", "query")
PAPER_QUERY_UPDATES = 3
"""Paper protocol: query updates allowed per question in a row; one more skips the question."""


class _OfficialAbort(Exception):
    """Where the official loop raises inside a reply (and catches it): the rest of the reply is dropped."""


class MemoryOperations:
    """The operations of `AtomMemEnv`'s actions (mixed into it; the state they change is set up by its reset)."""

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
        move_on = any(tag in ("add_memory", "modify_memory") for tag in parsed.tags) or not OFFICIAL_TAG.search(action)
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
            tags = OFFICIAL_TAG.findall(action)
            if not tags:
                raise _OfficialAbort("the reply has no paired tag")
            for name, content in tags:
                name, content = name.lower(), content.strip()
                kind = OFFICIAL_KINDS.get(name)
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
        m = (OFFICIAL_MODIFY if name == "modify_memory" else OFFICIAL_DELETE).match(content)
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
