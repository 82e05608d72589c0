"""Answer scoring: SQuAD-style exact match and token F1, and the AtomMem paper's boxed match."""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse white space (SQuAD / HotpotQA)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    # HotpotQA's rule: yes/no/noanswer only match exactly.
    special = {"yes", "no", "noanswer"}
    if (" ".join(pred_tokens) in special or " ".join(gold_tokens) in special) and pred_tokens != gold_tokens:
        return 0.0
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def boxed_match(prediction: str, golds) -> float:
    r"""The paper's rule: last `\boxed{}` lower-cased with all spaces removed equals a gold answer (same treatment)."""
    boxed = last_boxed(prediction)
    if boxed is None:
        return 0.0
    squash = lambda s: "".join(s.lower().split())  # noqa: E731
    return float(any(squash(boxed) == squash(g) for g in golds))
