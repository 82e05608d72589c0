"""Action syntax: the text an agent emits, parsed into atomic memory operations.

This module is the one place the syntax is defined. Two protocols share the operations below:

AtomMem protocol (`protocol="atommem"`, the default). Tags, case-insensitive, in any order, any
number per action; free text around them (reasoning) is ignored; tags do not nest (a tag's text
runs to its first closing tag)::

    <create>Scott Derrickson is American.</create>       store a new entry; its id is reported back
    <read>nationality of Ed Wood</read>                   top-k search; results in the next observation
    <update id="3">Ed Wood was American.</update>         replace entry 3's text
    <delete id="3"/>                                      remove entry 3 (also <delete id="3"></delete>)
    <scratchpad>plan: find both birthplaces</scratchpad>  replace the scratchpad (empty text clears it)
    <answer>yes</answer>                                  answer (with several questions: <answer q="2">)

Paper protocol (`protocol="paper"`), the official AtomMem code's tags::

    <update_memory>...</update_memory>           rewrite the short-term memory (our scratchpad)
    <update_query>...</update_query>             set the persistent retrieval query
    <add_memory>...</add_memory>                 create an entry (empty: store nothing, move on)
    <modify_memory>Memory 2: new text</modify_memory>   replace the 2nd entry shown at this step
    <delete_memory>Memory 2</delete_memory>      delete the 2nd entry shown (only the reference the text starts with)
    <final_answer>\\boxed{...}</final_answer>      answer the current question

`parse_action(text, protocol)` never raises: problems come back as error messages beside the
operations that did parse. `format_ops(ops, protocol)` writes operations back as text, so that
`parse_action(format_ops(ops)).ops == ops` for operations whose texts carry no surrounding
white space and no closing tag of their own.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Callable, Union


@dataclass(frozen=True)
class Create:
    text: str


@dataclass(frozen=True)
class Read:
    query: str


@dataclass(frozen=True)
class Update:
    """`entry_id` is a stable memory id (AtomMem protocol); `rank` a 1-based position in the shown list (paper)."""

    text: str
    entry_id: int | None = None
    rank: int | None = None


@dataclass(frozen=True)
class Delete:
    entry_id: int | None = None
    rank: int | None = None


@dataclass(frozen=True)
class SetScratchpad:
    text: str


@dataclass(frozen=True)
class SetQuery:
    """Paper protocol: a persistent query whose top-k results are shown at every following step."""

    query: str


@dataclass(frozen=True)
class Answer:
    text: str
    question: int | None = None
    """1-based question number; None means the first question not yet answered."""


Op = Union[Create, Read, Update, Delete, SetScratchpad, SetQuery, Answer]

OP_NAMES = {Create: "create", Read: "read", Update: "update", Delete: "delete",
            SetScratchpad: "scratchpad", SetQuery: "query", Answer: "answer"}
"""Operation kind -> the name used in `enabled_ops`, info counts and messages."""


@dataclass
class ParseResult:
    ops: list[Op] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    """Every complete tag of the protocol found, in order, also those that became errors (the paper protocol
    moves to the next chunk after any add or modify tag, even a failed one)."""


_ATTR_RE = re.compile(r"""([A-Za-z_]\w*)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>/]+))""")


def _parse_attrs(text: str) -> tuple[dict[str, str], str | None]:
    attrs: dict[str, str] = {}
    pos = 0
    for m in _ATTR_RE.finditer(text):
        if text[pos:m.start()].strip():
            return attrs, f"malformed attributes {text.strip()!r}"
        value = next(v for v in m.groups()[1:] if v is not None)
        if m.group(1).lower() in attrs:
            return attrs, f"attribute {m.group(1).lower()!r} is given twice"
        attrs[m.group(1).lower()] = value
        pos = m.end()
    if text[pos:].strip():
        return attrs, f"malformed attributes {text.strip()!r}"
    return attrs, None


def _scan(action: str, builders: dict[str, Callable[[dict, str | None], Op | list[Op]]]) -> ParseResult:
    """Finds `<name attrs>text</name>` and `<name attrs/>` for the given names and builds ops.

    A builder gets the attributes and the stripped text (None for a self-closing tag) and returns
    an op, a list of ops, or raises ValueError with a message for the agent.
    """
    names = "|".join(sorted(builders, key=len, reverse=True))
    open_re = re.compile(rf"<\s*({names})\b([^<>]*?)(/?)\s*>", re.IGNORECASE)
    close_re = re.compile(rf"<\s*/\s*({names})\s*>", re.IGNORECASE)
    result = ParseResult()
    consumed: list[tuple[int, int]] = []
    # name -> (position searched from, first closing tag found there or None): reused while still
    # ahead, so a long run of unclosed tags costs one scan, not one scan per tag.
    close_cache: dict[str, tuple[int, re.Match | None]] = {}
    pos = 0
    while (m := open_re.search(action, pos)) is not None:
        name = m.group(1).lower()
        attrs, attr_error = _parse_attrs(m.group(2))
        if m.group(3):
            content, end = None, m.end()
        else:
            searched_from, close = close_cache.get(name, (len(action) + 1, None))
            if searched_from > m.end() or (close is not None and close.start() < m.end()):
                close = re.compile(rf"<\s*/\s*{name}\s*>", re.IGNORECASE).search(action, m.end())
                close_cache[name] = (m.end(), close)
            if close is None:
                result.errors.append(f"<{name}> at character {m.start()} is never closed with </{name}>")
                pos = m.end()
                continue
            content, end = action[m.end():close.start()].strip(), close.end()
        consumed.append((m.start(), end))
        result.tags.append(name)
        pos = end
        if attr_error:
            result.errors.append(f"<{name}>: {attr_error}")
            continue
        try:
            built = builders[name](attrs, content)
        except ValueError as err:
            result.errors.append(f"<{name}>: {err}")
            continue
        result.ops.extend(built if isinstance(built, list) else [built])
    starts = [start for start, _ in consumed]  # sorted and non-overlapping: found left to right
    for m in close_re.finditer(action):
        i = bisect.bisect_right(starts, m.start()) - 1
        if i < 0 or m.start() >= consumed[i][1]:
            result.errors.append(f"stray </{m.group(1).lower()}> at character {m.start()} without an opening tag")
    return result


def _no_attrs(attrs: dict) -> None:
    if attrs:
        raise ValueError(f"takes no attributes, got {sorted(attrs)}")


def _needs_text(content: str | None, what: str) -> str:
    if not content:
        raise ValueError(f"needs a non-empty {what}")
    return content


_ASCII_DIGITS = re.compile(r"[0-9]+")


def _int_attr(attrs: dict, name: str, lowest: int) -> int:
    if name not in attrs:
        raise ValueError(f'needs a {name}="..." attribute')
    text = attrs.pop(name).strip()
    if not _ASCII_DIGITS.fullmatch(text):  # int() would also take "1_0" (10) and "٣" (3)
        raise ValueError(f"{name} must be written with the digits 0-9, got {text!r}")
    value = int(text)
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return value


def _delete_atommem(attrs: dict, content: str | None) -> Delete:
    if "id" not in attrs and content and _ASCII_DIGITS.fullmatch(content):
        attrs = {"id": content}
        content = None
    entry_id = _int_attr(attrs, "id", 0)
    _no_attrs(attrs)
    if content:
        raise ValueError("takes no text; write <delete id=\"N\"/>")
    return Delete(entry_id=entry_id)


def _update_atommem(attrs: dict, content: str | None) -> Update:
    attrs = dict(attrs)
    entry_id = _int_attr(attrs, "id", 0)
    _no_attrs(attrs)
    return Update(text=_needs_text(content, "text"), entry_id=entry_id)


def _answer_atommem(attrs: dict, content: str | None) -> Answer:
    attrs = dict(attrs)
    question = _int_attr(attrs, "q", 1) if "q" in attrs else None
    _no_attrs(attrs)
    return Answer(text=_needs_text(content, "answer"), question=question)


def _simple(kind, what: str | None):
    def build(attrs: dict, content: str | None):
        _no_attrs(attrs)
        return kind(content or "") if what is None else kind(_needs_text(content, what))
    return build


_ATOMMEM_BUILDERS = {
    "create": _simple(Create, "text"),
    "read": _simple(Read, "query"),
    "update": _update_atommem,
    "delete": _delete_atommem,
    "scratchpad": _simple(SetScratchpad, None),
    "answer": _answer_atommem,
}

_MEMORY_REF_RE = re.compile(r"^\s*memory\s+([0-9]+)\s*(?::\s*(.*))?$", re.IGNORECASE | re.DOTALL)


def _modify_paper(attrs: dict, content: str | None) -> Update:
    _no_attrs(attrs)
    m = _MEMORY_REF_RE.match(content or "")
    if m is None or not (m.group(2) or "").strip():
        raise ValueError("write 'Memory i: new text', i being the entry's number in the list shown")
    return Update(text=m.group(2).strip(), rank=_positive(m.group(1)))


def _delete_paper(attrs: dict, content: str | None) -> Delete:
    """The official code deletes the one entry the text starts with; later references are ignored."""
    _no_attrs(attrs)
    m = re.match(r"\s*memory\s+([0-9]+)", content or "", re.IGNORECASE)
    if m is None:
        raise ValueError("write 'Memory i', i being the entry's number in the list shown")
    return Delete(rank=_positive(m.group(1)))


def _add_paper(attrs: dict, content: str | None) -> Create | list:
    """An entry; an empty add stores nothing, and moves the chunk on as any add does."""
    _no_attrs(attrs)
    return Create(content) if content else []


def _positive(digits: str) -> int:
    if int(digits) < 1:
        raise ValueError("memory numbers start at 1")
    return int(digits)


_PAPER_BUILDERS = {
    "update_memory": _simple(SetScratchpad, None),
    "update_query": _simple(SetQuery, "query"),
    "add_memory": _add_paper,
    "modify_memory": _modify_paper,
    "delete_memory": _delete_paper,
    "final_answer": _simple(Answer, "answer"),
}

OFFICIAL_TAG = re.compile(r"<(\w+)[^>]*>(.*?)</\1>", re.DOTALL | re.IGNORECASE)
"""The official loop's reading of a reply (paper protocol, paper_fixes off): every paired tag, of any name, in order."""
OFFICIAL_MODIFY = re.compile(r"Memory\s+(\d+)\s*:\s*(.*)", re.DOTALL)
OFFICIAL_DELETE = re.compile(r"Memory\s+(\d+)", re.DOTALL)
OFFICIAL_KINDS = {"add_memory": "create", "modify_memory": "update", "delete_memory": "delete",
                  "update_memory": "scratchpad", "update_query": "query", "final_answer": "answer"}
"""The official tags and the operation each counts as; other tags (`<think>`) are consumed and do nothing."""


PROTOCOLS = ("atommem", "paper")


def normalize_action(action, max_chars: int) -> tuple[str, list[str]]:
    """Any action as the text that is parsed, and the problems found on the way (each an invalid op): bytes are
    decoded as UTF-8, a non-string does nothing, lone surrogates are read as "?", text past `max_chars` is cut."""
    problems = []
    if isinstance(action, bytes):
        action = action.decode("utf-8", errors="replace")
    if not isinstance(action, str):
        problems.append(f"the action must be a string, got {type(action).__name__}; nothing was done")
        action = ""
    try:
        action.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: no tokenizer or file takes them
        action = action.encode("utf-8", errors="replace").decode("utf-8")
        problems.append("the action holds characters that are not valid Unicode (lone surrogates); they were read as '?'")
    if len(action) > max_chars:
        problems.append(f"the action has {len(action)} characters; only the first {max_chars} were read")
        action = action[:max_chars]
    return action, problems


def parse_action(action: str, protocol: str = "atommem") -> ParseResult:
    if protocol == "atommem":
        return _scan(action, _ATOMMEM_BUILDERS)
    if protocol == "paper":
        return _scan(action, _PAPER_BUILDERS)
    raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")


def _tag(name: str, text: str, attrs: str = "") -> str:
    if re.search(rf"<\s*/\s*{name}\s*>", text, re.IGNORECASE):
        raise ValueError(f"text {text!r} contains </{name}> and cannot be written inside <{name}>")
    return f"<{name}{attrs}>{text}</{name}>"


def _format_atommem(op: Op) -> str:
    if isinstance(op, Create):
        return _tag("create", op.text)
    if isinstance(op, Read):
        return _tag("read", op.query)
    if isinstance(op, Update) and op.entry_id is not None:
        return _tag("update", op.text, f' id="{op.entry_id}"')
    if isinstance(op, Delete) and op.entry_id is not None:
        return f'<delete id="{op.entry_id}"/>'
    if isinstance(op, SetScratchpad):
        return _tag("scratchpad", op.text)
    if isinstance(op, Answer):
        return _tag("answer", op.text, f' q="{op.question}"' if op.question is not None else "")
    raise ValueError(f"{op!r} has no form in the atommem protocol")


def _format_paper(op: Op) -> str:
    if isinstance(op, SetScratchpad):
        return _tag("update_memory", op.text)
    if isinstance(op, SetQuery):
        return _tag("update_query", op.query)
    if isinstance(op, Create):
        return _tag("add_memory", op.text)
    if isinstance(op, Update) and op.rank is not None:
        return _tag("modify_memory", f"Memory {op.rank}: {op.text}")
    if isinstance(op, Delete) and op.rank is not None:
        return _tag("delete_memory", f"Memory {op.rank}")
    if isinstance(op, Answer) and op.question is None:
        return _tag("final_answer", op.text)
    raise ValueError(f"{op!r} has no form in the paper protocol")


def format_ops(ops, protocol: str = "atommem") -> str:
    """Operations -> action text, one tag per line."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    writer = _format_atommem if protocol == "atommem" else _format_paper
    return "\n".join(writer(op) for op in ops)
