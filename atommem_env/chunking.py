"""Splitting a task's document into chunks of at most `chunk_tokens` tokens, lazily.

Each paragraph is rendered as ``Document i: <title>`` followed by its text. Chunks pack whole
paragraphs; a paragraph longer than a chunk is cut at token boundaries. With `overlap > 0`
(the paper's 100 tokens) each chunk also shows that many tokens before and after its span.

`official=True` chunks as the official AtomMem loop (`chunk_context`): the document is one text,
``Document i:\n<title>\n<text>`` per paragraph, cut into hard windows of `chunk_tokens` tokens
whatever the paragraph boundaries, each shown with `overlap` tokens before and after. The official
code counts with the policy's tokenizer (give the env `token_counter="hf:<tokenizer>"`); tokens
are counted per paragraph here, so a BPE merge across two paragraphs' boundary is not seen. With `max_tokens`
a longer document is centre-truncated first, as the official `MemoryDataset` truncates its context (verl's
`truncation="center"` at `max_chunks x chunk_size` tokens): its first `max_tokens // 2` and last
`max_tokens - max_tokens // 2` tokens are kept, and the windows run over them; where a window spans the cut,
the two sides meet with one space.

Only per-paragraph token counts are computed up front (cached by a 16-byte digest of the paragraph
text, so the distractor paragraphs shared by many composed documents are counted once, and the cache
holds at most _COUNT_CACHE_LIMIT small entries, ~25 MB, however long the paragraphs); chunk text is
built when asked for. Memory stays about the size of the document.
"""

from __future__ import annotations

import bisect
import hashlib

import numpy as np

from .tasks import Paragraph
from .tokens import TokenCounter

_COUNT_CACHE_LIMIT = 200_000


def render_paragraph(index: int, paragraph: Paragraph, official: bool = False) -> str:
    """`index` is 0-based; documents are numbered from 1 in the text."""
    return f"{_header(index, paragraph, official)}{paragraph.text}"


def _header(index: int, paragraph: Paragraph, official: bool) -> str:
    return f"Document {index + 1}:\n{paragraph.title}\n" if official else f"Document {index + 1}: {paragraph.title}\n"


class Chunker:
    def __init__(self, paragraphs, counter: TokenCounter, chunk_tokens: int, overlap: int = 0,
                 count_cache: dict | None = None, official: bool = False, max_tokens: int | None = None):
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        if overlap < 0:
            raise ValueError(f"chunk overlap must be >= 0, got {overlap}")
        if max_tokens is not None and not official:
            raise ValueError("max_tokens centre-truncates as the official loop does; it needs official=True")
        self.paragraphs = paragraphs
        self.counter = counter
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.official = official
        cache = count_cache if count_cache is not None else {}
        counts = np.empty(len(paragraphs), dtype=np.int64)
        for i, p in enumerate(paragraphs):
            key = hashlib.blake2b(p.text.encode("utf-8", "replace"), digest_size=16).digest()
            n = cache.get(key)
            if n is None:
                n = counter.count(p.text)
                if len(cache) < _COUNT_CACHE_LIMIT:
                    cache[key] = n
            counts[i] = n + counter.count(_header(i, p, official))
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.total_tokens = int(self.offsets[-1])
        # [start, end) document positions that are read: all of them, or the two ends the official loop keeps.
        self.kept = [(0, self.total_tokens)]
        if max_tokens is not None and self.total_tokens > max_tokens:
            self.kept = [(0, max_tokens // 2), (self.total_tokens - (max_tokens - max_tokens // 2), self.total_tokens)]
        self.read_tokens = sum(end - start for start, end in self.kept)
        if official:  # hard windows, as the official chunk_context
            self.bounds = [(start, min(start + chunk_tokens, self.read_tokens))
                           for start in range(0, max(self.read_tokens, 1), chunk_tokens)]
        else:
            self.bounds = self._pack()

    def _pack(self) -> list[tuple[int, int]]:
        """[start, end) global token positions of each chunk."""
        bounds: list[tuple[int, int]] = []
        start = 0
        for i, n in enumerate(self.counts.tolist()):
            p_start, p_end = int(self.offsets[i]), int(self.offsets[i + 1])
            if p_end - start <= self.chunk_tokens:
                continue
            if p_start > start:  # close the chunk before this paragraph
                bounds.append((start, p_start))
                start = p_start
            while p_end - start > self.chunk_tokens:  # cut an oversize paragraph
                bounds.append((start, start + self.chunk_tokens))
                start += self.chunk_tokens
        if start < self.total_tokens or not bounds:
            bounds.append((start, self.total_tokens))
        return bounds

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self):
        """The chunks' texts in order, as `chunk(i)` gives them."""
        return (self.chunk(index) for index in range(len(self)))

    def chunk_token_count(self, index: int) -> int:
        start, end = self._span(index)
        return end - start

    def _span(self, index: int) -> tuple[int, int]:
        """[start, end) of chunk `index` with its overlap, in positions of the kept tokens."""
        start, end = self.bounds[index]
        return max(0, start - self.overlap), min(self.read_tokens, end + self.overlap)

    def chunk(self, index: int) -> str:
        start, end = self._span(index)
        pieces, offset = [], 0
        for kept_start, kept_end in self.kept:
            lo, hi = max(start, offset), min(end, offset + kept_end - kept_start)
            if lo < hi:
                pieces.append(self.text_of_range(kept_start + lo - offset, kept_start + hi - offset))
            offset += kept_end - kept_start
        return " ".join(pieces)

    def text_of_range(self, start: int, end: int) -> str:
        pieces = []
        first = bisect.bisect_right(self.offsets, start) - 1
        for i in range(first, len(self.paragraphs)):
            p_start, p_end = int(self.offsets[i]), int(self.offsets[i + 1])
            if p_start >= end:
                break
            text = render_paragraph(i, self.paragraphs[i], self.official)
            if start <= p_start and p_end <= end:
                pieces.append(text)
                continue
            spans = self.counter.spans(text)
            lo = max(start - p_start, 0)
            hi = min(end - p_start, len(spans))
            if lo < hi:
                pieces.append(text[spans[lo][0]:spans[hi - 1][1]])
        return "\n\n".join(pieces)
