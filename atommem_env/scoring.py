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


# The official AtomMem scorer's normalisation (after lm-evaluation-harness' hendrycks_math strip_string), in order.
_STRIP_STEPS = (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("\\%", ""), (" .", " 0."),
                ("{.", "{0."), (" ", ""))
PAPER_ANSWER_TAIL = 300
"""The official scorer looks only at an answer's last 300 characters."""


def strip_string(text: str) -> str:
    for old, new in _STRIP_STEPS:
        text = text.replace(old, new)
    return text


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` (braces balanced), or of a `\boxed ` form up to a `$`; else None.

    As the official scorer: with any `\boxed ` (a space, no brace) in the text, that form wins.
    """
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
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


def paper_match(answer: str, golds) -> float:
    r"""The official AtomMem rule: the last `\boxed{}` in the answer's last 300 characters, lower-cased and
    `strip_string`-normalised (no spaces, no line breaks, LaTeX spacing removed), equals a gold answer treated alike."""
    boxed = last_boxed(answer[-PAPER_ANSWER_TAIL:].lower())
    if boxed is None:
        return 0.0
    return float(any(strip_string(boxed) == strip_string(g.lower()) for g in golds))
