"""`protocol="paper"` is the official AtomMem loop (RUCBM/AtomMem `recurrent/impls/memory_long_short_multiquery.py`,
MMQ; scorer `verl/utils/reward_score/__init__.py`, RS): one test per row of issue 21's table, with its inputs.
`paper_fixes=True` keeps the intended behaviour (test_paper_protocol.py)."""

import pytest

from atommem_env import AtomMemEnv
from atommem_env.env import PAPER_QUERY_INSTRUCTION
from atommem_env.scoring import official_score
from atommem_env.tasks import ListTaskSource, Paragraph, Question, Task

PARAGRAPHS = tuple(Paragraph(f"Page {i}", f"Fact number {i} is here. " * 5) for i in range(3))
TOWER = Question("Where is the tower?", ("Paris",), (), "q0")
RIVER = Question("Which river?", ("Seine",), (), "q1")
BRIDGE = Question("How old is the bridge?", ("no",), (), "q2")
READ_ON = "<add_memory></add_memory>"


def official_env(*questions, **kwargs):
    kwargs.setdefault("embedder", "hashing")
    kwargs.setdefault("chunk_tokens", 40)  # one 35-token paragraph per chunk: 3 chunks
    env = AtomMemEnv(dataset=ListTaskSource([Task("t", PARAGRAPHS, questions or (TOWER,))]), protocol="paper",
                     **kwargs)
    env.reset(seed=0)
    return env


def texts(env):
    return [e.text for e in env.memory.entries()]


def shown(obs):
    """Memory i -> text, as the observation lists them."""
    return dict(line.split(": ", 1) for line in obs["retrieved"].split("\n") if line.startswith("Memory "))


def rank_of(obs, text):
    return int(next(k for k, v in shown(obs).items() if v == text).split()[1])


# Row 1: a reply with no tags (or empty) raises in MMQ 461-464 and is caught at 491: the chunk stays.
@pytest.mark.parametrize("reply", ["I will keep reading.", ""])
def test_a_reply_without_tags_keeps_the_chunk(reply):
    env = official_env()
    obs, *_ = env.step(reply)
    assert int(obs["chunk_index"]) == 0 and env.total_invalid_ops == 1 and "no paired tag" in obs["feedback"]
    obs, *_ = env.step(READ_ON)
    assert int(obs["chunk_index"]) == 1 and env.total_invalid_ops == 1


# Row 2: a malformed `Memory i` drops the rest of the reply; the chunk stays; an add before it stays.
def test_a_malformed_memory_reference_drops_the_rest_of_the_reply():
    env = official_env()
    obs, *_ = env.step("<add_memory>a</add_memory><delete_memory>2</delete_memory><add_memory>b</add_memory>")
    assert texts(env) == ["a"] and int(obs["chunk_index"]) == 0 and "rest of the reply is dropped" in obs["feedback"]


# Row 3: the official regex is case-sensitive.
def test_lower_case_memory_is_malformed():
    env = official_env()
    env.step("<add_memory>keep me</add_memory>")
    obs, *_ = env.step("<delete_memory>memory 1</delete_memory>")
    assert texts(env) == ["keep me"] and int(obs["chunk_index"]) == 1 and env.total_invalid_ops == 1


# Row 4: every paired tag is consumed in order (MMQ 546-553), so operations inside <think> or unknown tags never run.
def test_tags_inside_think_or_unknown_tags_never_run():
    env = official_env()
    obs, *_ = env.step("<think>maybe <add_memory>x</add_memory></think><update_memory>n</update_memory>")
    assert texts(env) == [] and obs["scratchpad"] == "n" and int(obs["chunk_index"]) == 0
    env.step("<note>see <add_memory>y</add_memory></note><add_memory>z</add_memory>")
    assert texts(env) == ["z"]


# Row 5: the official tag syntax.
def test_the_official_tag_syntax():
    env = official_env()
    env.step('<add_memory source="x">with attribute</add_memory><add_memory/> self-closed </add_memory>')
    assert texts(env) == ["with attribute", "self-closed"]
    obs, *_ = env.step("<add_memory>spaced close</add_memory ><update_memory>kept</update_memory>")
    assert "spaced close" not in texts(env) and obs["scratchpad"] == "kept" and int(obs["chunk_index"]) == 1
    env.step("< add_memory>spaced open</add_memory>")  # no paired tag at all
    assert "spaced open" not in texts(env)
    obs, *_ = env.step("<update_query>with attribute</update_query>")
    rank = rank_of(obs, "with attribute")
    arabic = "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669"[rank]  # \d and int() take Unicode digits
    env.step(f"<delete_memory>Memory {arabic}</delete_memory>")
    assert texts(env) == ["self-closed"]


# Row 6: `Memory 0` is Python's index -1, the last entry shown; an empty `Memory 2:` modify deletes the entry.
def test_memory_zero_edits_the_last_shown_and_an_empty_modify_deletes():
    env = official_env()
    obs, *_ = env.step("<add_memory>first</add_memory><add_memory>second</add_memory>")
    last = shown(obs)[f"Memory {len(shown(obs))}"]
    obs, *_ = env.step("<modify_memory>Memory 0: replaced last</modify_memory>")
    assert last not in texts(env) and "replaced last" in texts(env)
    other = next(t for t in texts(env) if t != "replaced last")
    env.step(f"<modify_memory>Memory {rank_of(obs, other)}:</modify_memory>")
    assert texts(env) == ["replaced last"]
    empty = official_env()  # nothing shown: index -1 of an empty list raises, the rest is dropped
    obs, *_ = empty.step("<modify_memory>Memory 0: x</modify_memory><add_memory>after</add_memory>")
    assert texts(empty) == [] and int(obs["chunk_index"]) == 0 and empty.total_invalid_ops == 1


# Row 7: an empty add and an out-of-range modify or delete reset the query count; an empty query counts.
@pytest.mark.parametrize("reset", [READ_ON, "<modify_memory>Memory 9: x</modify_memory>",
                                   "<delete_memory>Memory 9</delete_memory>"])
def test_what_resets_the_query_count(reset):
    env = official_env()
    env.step("<update_query>tower</update_query>")
    obs, *_ = env.step("<update_query></update_query>")
    assert env.query == "tower" and int(obs["reads_left"]) == 1  # the empty query counted, changed nothing
    obs, *_ = env.step(reset)
    assert int(obs["reads_left"]) == 3


# Row 8: the same entry modified twice adds the new text again; a delete removes the first stored copy of a text.
def test_twice_modified_entries_and_duplicate_texts():
    env = official_env()
    env.step("<add_memory>only</add_memory>")
    env.step("<modify_memory>Memory 1: A</modify_memory><modify_memory>Memory 1: B</modify_memory>")
    assert texts(env) == ["A", "B"]
    env = official_env()
    env.step("<add_memory>dup</add_memory><add_memory>other</add_memory><add_memory>dup</add_memory>")
    ids = [e.id for e in env.memory.entries() if e.text == "dup"]
    obs, *_ = env.step("<update_query>dup</update_query>")
    rank = rank_of(obs, "dup")
    env.step(f"<delete_memory>Memory {rank}</delete_memory>")
    assert [e.id for e in env.memory.entries() if e.text == "dup"] == ids[1:]  # the first stored copy went


# Row 9: an empty final answer moves to the next question; operations after the last question are applied.
def test_empty_answers_move_on_and_operations_after_the_last_question_apply():
    env = official_env(TOWER, RIVER)
    obs, _, terminated, _, _ = env.step("<final_answer></final_answer>")
    assert not terminated and env.question_index == 1
    _, _, terminated, _, info = env.step("<final_answer>\\boxed{Seine}</final_answer><add_memory>after</add_memory>"
                                         "<update_memory>late</update_memory>")
    assert terminated and texts(env) == ["after"] and env.scratchpad.text == "late"
    assert info["answers"] == ("", "\\boxed{Seine}") and info["question_em"] == (0.0, 1.0)


# Row 10: the official loop limits no length; paper_fixes and the atommem protocol keep the limits.
def test_no_length_limits():
    env = official_env()
    long_entry, long_query, long_notes = "e" * 5000, "q" * 3000, "n" * 9000
    obs, *_ = env.step(f"<update_query>{long_query}</update_query><update_memory>{long_notes}</update_memory>")
    assert env.query == long_query and obs["scratchpad"] == long_notes and env.total_invalid_ops == 0
    env.step(f"<add_memory>{long_entry}</add_memory>")
    assert texts(env) == [long_entry]
    fixes = official_env(paper_fixes=True)
    obs, *_ = fixes.step(f"<add_memory>{long_entry}</add_memory>")
    assert texts(fixes) == [] and "limit is 2000" in obs["feedback"]


# Row 11: every reply is scored (RS 25-38, 177-186).
def test_every_reply_is_scored_and_summed_over_the_questions():
    golds = [("Paris",), ("Seine",), ("no",)]
    assert official_score(["<final_answer>\\boxed{Paris}</final_answer><final_answer>\\boxed{Seine}</final_answer>"],
                          golds) == pytest.approx(1 / 3)  # two answers in one reply: the reply scores once
    assert official_score(["<final_answer>\\boxed{Paris} \\boxed</final_answer>"], golds) == 0.0
    assert official_score(["<final_answer>Paris</final_answer> and \\boxed{Seine}"], golds) == 0.0  # the tag wins
    env = official_env(TOWER, RIVER, BRIDGE)
    env.step("<add_memory>The tower is in Paris.</add_memory> So: \\boxed{Paris}")
    env.step("<add_memory>A river.</add_memory> \\boxed{Seine} and \\boxed{Paris}")
    env.step("<add_memory>More.</add_memory> \\boxed{Seine}")
    for answer in ("Paris", "Seine", "maybe"):
        _, reward, terminated, _, info = env.step(f"<final_answer>\\boxed{{{answer}}}</final_answer>")
    assert terminated and reward == info["em"] == info["official_score"] == pytest.approx(5 / 3)
    assert info["question_em"] == (1.0, 1.0, 0.0)
    per_question = official_env(TOWER, answer_matching="per_question")
    per_question.step("<add_memory>x</add_memory> \\boxed{Paris}")
    _, reward, _, _, info = per_question.step("<final_answer>\\boxed{Lyon}</final_answer>")
    assert reward == 0.0 and info["official_score"] == 1.0


# Row 13: 41 replies whatever the length (MMQ 391, max_chunks 40).
def test_the_episode_ends_after_41_replies():
    env = official_env()
    assert env.step_cap == 41
    for step in range(1, 42):
        _, _, terminated, truncated, _ = env.step("<update_memory>thinking</update_memory>")
        assert truncated == (step == 41) and not terminated


# Row 14 (what the env shows): multi-line entries unindented; the placeholder and "No previous memory" are
# tested in test_paper_protocol.py, unnumbered questions there too.
def test_entries_are_shown_as_written():
    env = official_env()
    obs, *_ = env.step("<add_memory>line one\nline two</add_memory>")
    assert obs["retrieved"] == "Memory 1: line one\nline two"


# Row 17: the query carries the official instruction prefix; the memories shown are cut to 4096 tokens.
def test_retrieval_prefix_and_cut(monkeypatch):
    env = official_env(top_k=3)
    queries = []
    read = env.memory.read
    monkeypatch.setattr(env.memory, "read", lambda query, k: queries.append(query) or read(query, k))
    obs, *_ = env.step("".join(f"<add_memory>{'word ' * 2000}{i}</add_memory>" for i in range(3)))
    assert queries[-1] == PAPER_QUERY_INSTRUCTION + env.query
    assert env.token_counter.count(obs["retrieved"]) == 4096 and obs["retrieved"].startswith("Memory 1: word")


def test_paper_fixes_needs_the_paper_protocol():
    with pytest.raises(ValueError, match="paper_fixes"):
        AtomMemEnv(embedder="hashing", paper_fixes=True)
