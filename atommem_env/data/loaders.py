"""Loaders for the official multi-hop QA files, into one item record.

| dataset | file the user downloads | layout read |
|---|---|---|
| HotpotQA | hotpot_dev_distractor_v1.json / hotpot_train_v1.1.json, or a Hugging Face `hotpot_qa` export | JSON list; `context` as [[title, [sentences]]] (official) or {title: [...], sentences: [[...]]} (HF) |
| 2WikiMultihopQA | dev.json / train.json | JSON list like official HotpotQA plus `evidences` and `type` |
| MuSiQue | musique_ans_v1.0_dev.jsonl (and `_full_`) | JSON lines: `paragraphs` [{title, paragraph_text, is_supporting}], `answer_aliases`, `question_decomposition` |

A missing file raises ValueError naming the path; a file that is not UTF-8 JSON, a wrong layout,
a `null` record or a malformed one raises `DataFormatError` naming the file, the record (JSON
lines: the line) and the field. With `skip_malformed=True` bad records are skipped instead and
counted in `LoadStats.skipped` (with their errors kept). MuSiQue's *full* files mix in unanswerable
questions (`"answerable": false`): they are always left out and counted in `LoadStats.unanswerable`.
Sentences are joined with a space unless one is already there (HotpotQA's sentences carry their
leading space, 2WikiMultihopQA's do not); `official_text=True` joins them as the official AtomMem data script
does (`''.join`, taskutils/script/processing_multiquery.py), which glues 2WikiMultihopQA's sentences together.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..tasks import Paragraph, Question, SupportingFact


class DataFormatError(ValueError):
    """`record` is a record number (JSON list) or a label such as "line 7" (JSON lines)."""

    def __init__(self, path, record: int | str | None, field_name: str | None, problem: str):
        where = str(path)
        if record is not None:
            where += f", record {record}" if isinstance(record, int) else f", {record}"
        if field_name:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class QAItem:
    """One question with its own paragraphs (gold and the dataset's distractors)."""

    question: Question
    paragraphs: tuple[Paragraph, ...]
    gold_titles: frozenset[str]
    dataset: str


@dataclass
class LoadStats:
    loaded: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    unanswerable: int = 0
    """MuSiQue rows marked `"answerable": false` (full files), left out."""
    facts_without_sentence: int = 0
    """Supporting facts whose sentence index is past the paragraph (a known quirk of HotpotQA dev); kept with empty text."""


def _req(record: dict, key: str, kind, path, index, within: str = ""):
    """record[key] of the given type; `within` prefixes the field name in errors (e.g. "paragraphs[3].")."""
    if not isinstance(record, dict):
        raise DataFormatError(path, index, within.rstrip(".") or None,
                              f"expected a JSON object, got {'null' if record is None else type(record).__name__}")
    if key not in record:
        raise DataFormatError(path, index, within + key, "missing")
    value = record[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataFormatError(path, index, within + key, f"expected {names}, got {type(value).__name__}")
    return value


def _answers(record: dict, path, index) -> tuple[str, ...]:
    """The answer, then its aliases: a list of strings (a bare string would become one alias per letter)."""
    answer = _req(record, "answer", str, path, index)
    aliases = record.get("answer_aliases")
    if aliases is None:
        aliases = []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise DataFormatError(path, index, "answer_aliases", f"expected a list of strings, got {aliases!r:.80}")
    return tuple(dict.fromkeys([answer, *aliases]))


def _join_sentences(sentences: list[str]) -> str:
    text = ""
    for sentence in sentences:
        if text and sentence and not text[-1].isspace() and not sentence[0].isspace():
            text += " "
        text += sentence
    return text.strip()


def _stable_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.blake2b(text.encode('utf-8'), digest_size=6).hexdigest()}"


def _column_pairs(value: dict, first: str, second: str, path, index, field_name: str) -> list[tuple]:
    """The Hugging Face layout's {first: [...], second: [...]} -> [(first, second), ...]."""
    a, b = value.get(first), value.get(second)
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
        raise DataFormatError(path, index, field_name, f"expected {{{first}: [...], {second}: [...]}} of equal lengths")
    return list(zip(a, b))


def _sentence_paragraphs(context, path, index) -> list[tuple[str, list[str]]]:
    """Both HotpotQA layouts -> [(title, sentences)]."""
    if isinstance(context, dict):
        pairs = _column_pairs(context, "title", "sentences", path, index, "context")
    elif isinstance(context, list):
        pairs = []
        for entry in context:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise DataFormatError(path, index, "context", "expected [[title, [sentences]], ...]")
            pairs.append((entry[0], entry[1]))
    else:
        raise DataFormatError(path, index, "context", f"expected a list or a dict, got {type(context).__name__}")
    for title, sents in pairs:
        if not isinstance(title, str) or not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise DataFormatError(path, index, "context", f"paragraph {title!r}: expected a title and a list of sentences")
    return pairs


def _supporting_pairs(facts, path, index) -> list[tuple[str, int]]:
    if isinstance(facts, dict):
        pairs = _column_pairs(facts, "title", "sent_id", path, index, "supporting_facts")
    elif isinstance(facts, list):
        if not all(isinstance(f, (list, tuple)) and len(f) == 2 for f in facts):
            raise DataFormatError(path, index, "supporting_facts", "expected [[title, sentence index], ...]")
        pairs = [tuple(f) for f in facts]
    else:
        raise DataFormatError(path, index, "supporting_facts", f"expected a list or a dict, got {type(facts).__name__}")
    for title, sent in pairs:
        if not isinstance(title, str) or not isinstance(sent, int):
            raise DataFormatError(path, index, "supporting_facts", f"bad entry {[title, sent]!r}")
    return pairs


def _hotpot_like(record, path, index, dataset: str, stats: LoadStats, official_text: bool) -> QAItem:
    question = _req(record, "question", str, path, index)
    answers = _answers(record, path, index)
    context = _sentence_paragraphs(_req(record, "context", (list, dict), path, index), path, index)
    facts = _supporting_pairs(_req(record, "supporting_facts", (list, dict), path, index), path, index)
    sentences_by_title = {title: sents for title, sents in context}
    supporting = []
    for title, sent in facts:
        if title not in sentences_by_title:
            raise DataFormatError(path, index, "supporting_facts", f"title {title!r} is not in the context")
        sents = sentences_by_title[title]
        if 0 <= sent < len(sents):
            text = sents[sent].strip()
        else:
            text = ""
            stats.facts_without_sentence += 1
        supporting.append(SupportingFact(title=title, sentence_index=sent, text=text))
    qid = record.get("_id") or record.get("id") or _stable_id(dataset, question)
    return QAItem(
        question=Question(question=question, answers=answers, supporting_facts=tuple(supporting), question_id=str(qid)),
        paragraphs=tuple(Paragraph(title, "".join(sents) if official_text else _join_sentences(sents))
                         for title, sents in context),
        gold_titles=frozenset(t for t, _ in facts),
        dataset=dataset,
    )


def _musique(record, path, index, dataset: str, stats: LoadStats, official_text: bool) -> QAItem | None:
    """MuSiQue paragraphs come as one text: `official_text` changes nothing."""
    question = _req(record, "question", str, path, index)
    answerable = record.get("answerable", True)
    if not isinstance(answerable, bool):
        raise DataFormatError(path, index, "answerable", "expected true or false")
    if not answerable:
        stats.unanswerable += 1
        return None
    answers = _answers(record, path, index)
    paragraphs_raw = _req(record, "paragraphs", list, path, index)
    paragraphs, supporting = [], []
    for j, p in enumerate(paragraphs_raw):
        title = _req(p, "title", str, path, index, within=f"paragraphs[{j}].")
        text = _req(p, "paragraph_text", str, path, index, within=f"paragraphs[{j}].")
        is_supporting = p.get("is_supporting", False)
        if not isinstance(is_supporting, bool):
            raise DataFormatError(path, index, f"paragraphs[{j}].is_supporting", "expected true or false")
        paragraphs.append(Paragraph(title, text.strip()))
        if is_supporting:
            supporting.append(SupportingFact(title=title, sentence_index=-1, text=text.strip()))
    qid = record.get("id") or _stable_id(dataset, question)
    return QAItem(
        question=Question(question=question, answers=answers, supporting_facts=tuple(supporting), question_id=str(qid)),
        paragraphs=tuple(paragraphs),
        gold_titles=frozenset(f.title for f in supporting),
        dataset=dataset,
    )


_PARSERS: dict[str, tuple[Callable, bool]] = {
    "hotpotqa": (_hotpot_like, False),
    "2wiki": (_hotpot_like, False),
    "musique": (_musique, True),
}
DATASETS = tuple(_PARSERS)


def load_items(dataset: str, path, skip_malformed: bool = False, stats: LoadStats | None = None,
               official_text: bool = False) -> list[QAItem]:
    """Reads one official file into QAItems; see the module docstring for layouts, errors and `official_text`."""
    if dataset not in _PARSERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if path is None:
        raise ValueError(f"dataset {dataset!r} needs data_path= pointing at your copy of its file")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{dataset} data file not found: {path}")
    parse, jsonl = _PARSERS[dataset]
    stats = stats if stats is not None else LoadStats()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, None, None, f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                                                f"{err.start}); re-save the file as UTF-8") from None
    labelled = _jsonl_records(text, path, skip_malformed, stats) if jsonl else list(enumerate(_json_records(text, path)))
    items = []
    for label, record in labelled:
        try:
            if record is None:
                raise DataFormatError(path, label, None, "the record is null")
            item = parse(record, path, label, dataset, stats, official_text)
        except DataFormatError as err:
            if not skip_malformed:
                raise
            stats.skipped += 1
            stats.errors.append(str(err))
            continue
        if item is not None:
            items.append(item)
    if not items:
        raise DataFormatError(path, None, None, f"no usable {dataset} records"
                              + (f" ({stats.unanswerable} unanswerable ones left out)" if stats.unanswerable else ""))
    stats.loaded = len(items)
    return items


def _json_records(text: str, path) -> list:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        record = _failing_record(text)
        where = f"record {record}, " if record is not None else ""
        raise DataFormatError(path, None, None, f"not JSON: {err.msg} ({where}line {err.lineno}, column {err.colno}, "
                                                f"character {err.pos} of {len(text)}; a truncated download?)") from None
    if not isinstance(records, list):
        raise DataFormatError(path, None, None, f"expected a JSON list of records, got {type(records).__name__}")
    return records


def _failing_record(text: str) -> int | None:
    """The number of the list element where JSON decoding fails (the official files are one long line)."""
    decoder, pos, number = json.JSONDecoder(), text.find("[") + 1, 0
    if pos == 0:
        return None
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return number if pos >= len(text) else None
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return number
        number += 1


def _jsonl_records(text: str, path, skip_malformed: bool, stats: LoadStats) -> list[tuple[str, object]]:
    """(("line N"), record) per non-blank line: errors name the line a user can open."""
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            if not skip_malformed:
                raise DataFormatError(path, f"line {line_no}", None, f"not JSON ({err.msg})") from None
            stats.skipped += 1
            stats.errors.append(f"{path}, line {line_no}: not JSON")
    return records
