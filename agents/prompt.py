"""The one place an observation becomes a chat prompt for an LLM memory policy.

`build_messages(obs, protocol)` returns [system, user] messages: the system message explains the
operations of the protocol (the same grammar `atommem_env.protocols` parses); the user message
lays out the observation's fields in a fixed order. Training (SFT, GRPO) and evaluation use this
function, so a checkpoint sees the same prompt layout everywhere.

`encode_prompt(tokenizer, messages, max_tokens)` is the one truncation rule, used by generation,
SFT and evaluation alike: a prompt over budget loses the end of its last section, the chunk (or a
reader's context). The question, scratchpad, retrieved entries and feedback come before it and are
never cut: a policy that cannot see its memory cannot learn to use it.
"""

from __future__ import annotations

import re

SYSTEM_PROMPTS = {
    "atommem": (
        "You read a long document one chunk at a time and must answer the question at the end. "
        "You cannot see earlier chunks again: keep what you need in memory.\n"
        "Write operations as tags; text outside tags is ignored.\n"
        "<create>fact</create> stores a new memory entry.\n"
        "<read>query</read> searches memory; results come in the next step.\n"
        "<update id=\"N\">new text</update> rewrites entry N. <delete id=\"N\"/> removes entry N.\n"
        "<scratchpad>notes</scratchpad> replaces your scratchpad, shown at every step.\n"
        "<answer>short answer</answer> answers, only after the last chunk."
    ),
    # The official AtomMem prompts' content and layout, in our words; the chunk comes last so that the one
    # truncation rule (encode_prompt) can shorten it.
    "paper": (
        "You are given one section of an article at a time, together with your memory. Study the section and "
        "manage your memory so that you can answer the questions at the end.\n\n"
        "You have two memories. Short-term memory is a summary you rewrite at every step with "
        "<update_memory>...</update_memory>; write it in every reply. Long-term memory is a vector database "
        "changed by four atomic actions:\n"
        "<update_query>keywords</update_query>: the system keeps one query and shows you the memories that match "
        "it. Until you set a query you see nothing useful.\n"
        "<add_memory>text</add_memory>: stores a new entry. Do not add again what is shown to you, and write no "
        "index.\n"
        "<modify_memory>Memory i: new text</modify_memory>: rewrites the entry shown as Memory i. With many "
        "memories, prefer modifying over adding.\n"
        "<delete_memory>Memory i</delete_memory>: deletes the entry shown as Memory i. Delete duplicates.\n"
        "Every action is a pair of tags, so one reply can hold several actions, several adds for example.\n\n"
        "Examples:\n"
        "<update_query>founder; Acme Corporation; founding year</update_query>\n"
        "<add_memory>Acme Corporation was founded in 1952 by Jane Roe in Leeds.</add_memory>\n"
        "<modify_memory>Memory 1: Jane Roe left Acme in 1970; her son John Roe led it from then on.</modify_memory>\n"
        "Memory 2 repeats Memory 4, which is newer, so I drop it. <delete_memory>Memory 2</delete_memory>\n"
        "<update_memory>1. Acme's founder: Jane Roe (1952). 2. Still open: who led Acme in 1980.</update_memory>"
    ),
}

PAPER_READING_TIPS = (
    "Tips: do not update the query again and again. If a memory you want is not shown, it is not in the "
    "database. Rather than several query updates, write one long query made of keywords for all the questions: "
    "queries match memories by semantic similarity.\n\n"
    "How to use your memory: keep only the most important points in short-term memory and put detailed, broadly "
    "useful facts in long-term memory, so that you can retrieve what the summary leaves out. Entries you add "
    "should hold facts only (no reasoning, no notes about your state), including facts that look unrelated now: "
    "add at least 5-6 of them. With several questions, treat each one separately (1. 2. 3.) in short-term memory."
)
PAPER_ANSWER_INSTRUCTIONS = (
    "All sections are read. Using your memory, answer the problem as <final_answer>\\boxed{answer}</final_answer>. "
    "You may update the query to see other memories instead; then answer in a later reply. Do not change your "
    "memory now. Give the answer only, as an exact match, with no description. Examples: "
    "<update_query>dance partner; Alice</update_query> or <final_answer>\\boxed{Jacob}</final_answer>. "
    "If you are about to run out of query updates, skip the problem with <final_answer>don't know</final_answer>."
)


def user_message(obs: dict, question: bool = True, chunk: bool = True) -> str:
    """The observation's fields in their fixed order; without `question` or `chunk` (the TRL tools, whose
    conversation shows both already) those sections are left out."""
    chunk_index, num_chunks = int(obs["chunk_index"]), int(obs["num_chunks"])
    parts = [f"Question: {obs['question']}"] if question else []
    if obs["scratchpad"]:
        parts.append(f"Scratchpad: {obs['scratchpad']}")
    if obs["retrieved"]:
        parts.append(f"Retrieved memories:\n{obs['retrieved']}")
    if obs["feedback"]:
        parts.append(f"Feedback: {obs['feedback']}")
    parts.append(f"Memory entries: {int(obs['memory_size'])}")
    if chunk:
        parts.append(f"Chunk {chunk_index + 1} of {num_chunks}:\n{obs['chunk']}" if chunk_index < num_chunks
                     else "All chunks are read. Answer now.")  # last: the part a cut shortens
    return "\n\n".join(parts)


def paper_user_message(obs: dict) -> str:
    chunk_index, num_chunks = int(obs["chunk_index"]), int(obs["num_chunks"])
    reading = chunk_index < num_chunks
    used = 3 - int(obs["reads_left"])
    parts = [f"{'Questions to solve' if reading else 'Problem'}:\n{obs['question']}",
             f"Short-term memory from the previous step:\n{obs['scratchpad'] or '(empty)'}",
             f"Current query for retrieving memories:\n{obs.get('query', '')}",
             f"Memories that match the query:\n{obs['retrieved'] or 'No previous memory'}"]
    # As the official template: no feedback section (error lines stay in obs["feedback"]), no chunk numbers.
    parts.append(f"Query updates used for this question: {used} (3 in a row are allowed; one more skips the question "
                 "unanswered).")
    if not reading:
        parts.append(PAPER_ANSWER_INSTRUCTIONS)
        return "\n\n".join(parts)
    parts.append(PAPER_READING_TIPS)
    parts.append(f"The article:\n{obs['chunk']}")  # last: the part a cut shortens
    return "\n\n".join(parts)


def build_messages(obs: dict, protocol: str = "atommem", single_message: bool = False) -> list[dict]:
    """[system, user]; with `single_message`, one user message holding both (the official harness sends that)."""
    if protocol not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {sorted(SYSTEM_PROMPTS)}")
    user = paper_user_message(obs) if protocol == "paper" else user_message(obs)
    if single_message:
        return [{"role": "user", "content": f"{SYSTEM_PROMPTS[protocol]}\n\n{user}"}]
    return [{"role": "system", "content": SYSTEM_PROMPTS[protocol]}, {"role": "user", "content": user}]


def reader_messages(instruction: str, question: str, context: str) -> list[dict]:
    """Prompt for the static workflows' reader model (summarise or answer)."""
    return [{"role": "system", "content": instruction},
            {"role": "user", "content": f"Question: {question}\n\nContext:\n{context or '(empty)'}"}]


CUTTABLE_SECTION = re.compile(r"\n\n(?:Chunk \d+ of \d+:|The article:|Context:)\n")
"""The header of the section `encode_prompt` may shorten: the last one of the last message."""
CUT_MARK = " [... cut]"


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_prompt(tokenizer, messages: list[dict], max_tokens: int | None) -> tuple[list[int], int]:
    """(prompt token ids, tokens cut from the chunk) with the prompt within `max_tokens` where the rule allows.

    Only the text after the last chunk (or context) header of the last message is shortened, from
    its end. A prompt that is over budget even with that section empty (a huge scratchpad, say) is
    returned whole: dropping memory would be worse than a long prompt.
    """
    ids = chat_prompt_ids(tokenizer, messages)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, 0
    content = messages[-1]["content"]
    headers = list(CUTTABLE_SECTION.finditer(content))
    if not headers:
        return ids, 0
    head, section = content[:headers[-1].end()], content[headers[-1].end():]
    section_ids = tokenizer(section, add_special_tokens=False)["input_ids"]
    keep = len(section_ids) - (len(ids) - max_tokens)
    while True:
        # Token boundaries move when text is re-encoded: shrink until the whole prompt fits.
        keep = max(0, keep)
        shortened = [*messages[:-1], {**messages[-1], "content": head + tokenizer.decode(section_ids[:keep]) + CUT_MARK}]
        ids = chat_prompt_ids(tokenizer, shortened)
        if len(ids) <= max_tokens or keep == 0:
            return ids, len(section_ids) - keep
        keep -= len(ids) - max_tokens
