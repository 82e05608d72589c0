"""The one place an observation becomes a chat prompt for an LLM memory policy.

`build_messages(obs, protocol)` returns [system, user] messages: the system message explains the
operations of the protocol (the same grammar `atommem_env.protocols` parses); the user message
lays out the observation's fields in a fixed order. Training (SFT, GRPO) and evaluation use this
function, so a checkpoint sees the same prompt layout everywhere.
"""

from __future__ import annotations

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
        parts.append(f"Chunk {chunk_index + 1} of {num_chunks}:\n{obs['chunk']}")
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
