"""Token counting, pluggable.

The default `RegexTokenCounter` counts one token per run of word characters and one per
punctuation mark. It needs no model and is fast; sub-word tokenizers (BPE) give about 1.2-1.4
times as many tokens on English prose, so a `chunk_tokens=4096` chunk under the default holds
about 5-6k BPE tokens. For exact budgets, count with the policy's own tokenizer through
`HFTokenCounter`.
"""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class TokenCounter(Protocol):
    def spans(self, text: str) -> np.ndarray:
        """(n_tokens, 2) int array of [start, end) character offsets, in order."""

    def count(self, text: str) -> int: ...


class RegexTokenCounter:
    """Words and punctuation marks; the default, model-free approximation."""

    name = "regex"

    def spans(self, text: str) -> np.ndarray:
        flat = [i for m in _TOKEN_RE.finditer(text) for i in m.span()]
        return np.asarray(flat, dtype=np.int64).reshape(-1, 2)

    def count(self, text: str) -> int:
        return len(_TOKEN_RE.findall(text))


class HFTokenCounter:
    """Counts with a Hugging Face fast tokenizer (pass the tokenizer object or a name/path)."""

    def __init__(self, tokenizer):
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("HFTokenCounter needs a fast tokenizer (offset mappings)")
        self.tokenizer = tokenizer
        self.name = f"hf:{getattr(tokenizer, 'name_or_path', '?')}"

    def spans(self, text: str) -> np.ndarray:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def make_token_counter(spec) -> TokenCounter:
    """`"regex"` (default), a TokenCounter, a tokenizer object, or `"hf:<name or path>"`."""
    if spec is None or spec == "regex":
        return RegexTokenCounter()
    if isinstance(spec, str):
        if spec.startswith("hf:"):
            return HFTokenCounter(spec[3:])
        raise ValueError(f"unknown token counter {spec!r}: use 'regex' or 'hf:<tokenizer name or path>'")
    if hasattr(spec, "spans") and hasattr(spec, "count"):
        return spec
    return HFTokenCounter(spec)
