"""Answer scoring: SQuAD-style exact match and token F1, and the AtomMem paper's boxed match."""

from __future__ import annotations

import collections
import re
import string

import numpy as np

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


def sub_exact_match(prediction: str, golds) -> float:
    """MemAgent's sub_em (RULER-HotpotQA): the normalised gold answer is inside the normalised prediction, or the
    prediction inside it; an empty prediction scores 0 (MemAgent scores only replies with an answer)."""
    pred = normalize_answer(prediction)
    return float(bool(pred) and any(normalize_answer(g) in pred or pred in normalize_answer(g) for g in golds))


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
    r"""The answer in the text's last `\boxed`, as the official scorer (`last_boxed_only_string`, `remove_boxed`)
    reads it; None where it finds none.

    With any `\boxed ` (a space) in the text, the text after the last one, up to a `$`. Otherwise the last
    `\boxed` (or, with none, `\fbox`) and its balanced braces: the content of `\boxed{...}`; None where the
    braces never close (`\boxed{Paris} \boxed` has none) or the form is not `\boxed{` (`\fbox{...}`, `\boxedx{}`).
    """
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                boxed = text[start:j + 1]
                return boxed[len("\\boxed{"):-1] if boxed.startswith("\\boxed{") else None
    return None


def paper_match(answer: str, golds) -> float:
    r"""The official AtomMem rule: the last `\boxed{}` in the answer's last 300 characters, lower-cased and
    `strip_string`-normalised (no spaces, no line breaks, LaTeX spacing removed), equals a gold answer treated alike."""
    boxed = last_boxed(answer[-PAPER_ANSWER_TAIL:].lower())
    if boxed is None:
        return 0.0
    return float(any(strip_string(boxed) == strip_string(g.lower()) for g in golds))


_FINAL_ANSWER = re.compile(r"<final_answer[^>]*>(.*?)</final_answer>", re.DOTALL | re.IGNORECASE)


def official_score(replies, questions_golds) -> float:
    r"""The official multi-query score of an episode (`default_compute_score`, 'multiquery-hotpotqa'): every reply
    that holds exactly one `<final_answer>` tag scores its content, else every reply holding `\boxed{` scores as a
    whole, against the gold answers of all questions (`paper_match`); the sum, uncapped, over the number of
    questions. A reading reply with a box earns credit; two answer tags in one reply score once, as the reply."""
    pooled = [g for golds in questions_golds for g in golds]
    total = 0.0
    for reply in replies:
        tags = _FINAL_ANSWER.findall(reply)
        if len(tags) == 1:
            total += paper_match(tags[0], pooled)
        elif "\\boxed{" in reply:
            total += paper_match(reply, pooled)
    return total / len(questions_golds)


def score_episode(questions, answers: dict, replies, protocol: str, official: bool, answer_matching: str) -> dict:
    """em (the reward before shaping) and f1, means over questions; with the paper protocol also question_em
    (each answer against its own question) and official_score (the official scorer over every reply).

    `answers` maps a question's index to its recorded answer; `official`: the official loop (paper_fixes off).
    em: atommem, exact match per question; paper, the official score with "pooled" matching (it may pass 1:
    every boxed reply earns credit) or question_em's mean with "per_question"; paper_fixes, each question's
    answer against the gold answers of all questions ("pooled") or of its own.
    """
    pooled = tuple(g for q in questions for g in q.answers)
    given = [answers.get(i) for i in range(len(questions))]
    if protocol == "atommem":
        ems = [0.0 if a is None else exact_match(a, q.answers) for a, q in zip(given, questions)]
        f1s = [0.0 if a is None else f1_score(a, q.answers) for a, q in zip(given, questions)]
        subs = [0.0 if a is None else sub_exact_match(a, q.answers) for a, q in zip(given, questions)]
        return {"em": float(np.mean(ems)), "f1": float(np.mean(f1s)), "sub_em": float(np.mean(subs))}
    # The official data keep one gold answer per question (MuSiQue: `[answer]`, no `answer_aliases`).
    golds = [q.answers[:1] if official else q.answers for q in questions]
    own = [0.0 if a is None else paper_match(a, g) for a, g in zip(given, golds)]
    f1s = [0.0 if a is None else f1_score(last_boxed(a) or "", g) for a, g in zip(given, golds)]
    subs = [0.0 if a is None else sub_exact_match(last_boxed(a) or "", g) for a, g in zip(given, golds)]
    official_reward = official_score(replies, golds)
    if answer_matching == "per_question":
        em = float(np.mean(own))
    elif official:
        em = official_reward
    else:
        em = float(np.mean([0.0 if a is None else paper_match(a, pooled) for a in given]))
    return {"em": em, "f1": float(np.mean(f1s)), "sub_em": float(np.mean(subs)), "question_em": tuple(own),
            "official_score": official_reward}
