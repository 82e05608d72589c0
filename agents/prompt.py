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
    "paper": (
        "You read a long document one chunk at a time and must answer the question at the end. "
        "Use these tags:\n"
        "<update_memory>notes</update_memory> rewrites your short-term memory.\n"
        "<update_query>query</update_query> sets the query whose results you see at every step.\n"
        "<add_memory>fact</add_memory> stores a fact. <modify_memory>Memory i: text</modify_memory> rewrites the "
        "i-th memory shown. <delete_memory>Memory i</delete_memory> deletes it.\n"
        "After the last chunk: <final_answer>\\boxed{answer}</final_answer>."
    ),
}


def user_message(obs: dict) -> str:
    chunk_index, num_chunks = int(obs["chunk_index"]), int(obs["num_chunks"])
    parts = [f"Question: {obs['question']}"]
    if obs["scratchpad"]:
        parts.append(f"Scratchpad: {obs['scratchpad']}")
    if obs["retrieved"]:
        parts.append(f"Retrieved memories:\n{obs['retrieved']}")
    if obs["feedback"]:
        parts.append(f"Feedback: {obs['feedback']}")
    parts.append(f"Memory entries: {int(obs['memory_size'])}")
    if chunk_index < num_chunks:
        parts.append(f"Chunk {chunk_index + 1} of {num_chunks}:\n{obs['chunk']}")  # last: the part a cut shortens
    else:
        parts.append("All chunks are read. Answer now.")
    return "\n\n".join(parts)


def build_messages(obs: dict, protocol: str = "atommem") -> list[dict]:
    if protocol not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {sorted(SYSTEM_PROMPTS)}")
    return [{"role": "system", "content": SYSTEM_PROMPTS[protocol]}, {"role": "user", "content": user_message(obs)}]


def reader_messages(instruction: str, question: str, context: str) -> list[dict]:
    """Prompt for the static workflows' reader model (summarise or answer)."""
    return [{"role": "system", "content": instruction},
            {"role": "user", "content": f"Question: {question}\n\nContext:\n{context or '(empty)'}"}]


CUTTABLE_SECTION = re.compile(r"\n\n(?:Chunk \d+ of \d+:|Context:)\n")
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
