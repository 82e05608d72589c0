"""The paper protocol against the official AtomMem loop (RUCBM/AtomMem, recurrent/impls/
memory_long_short_multiquery.py, and its scorer verl/utils/reward_score): one test per point of the
table in docs/eval.md, in the official loop (the default) and with `paper_fixes=True` where both share it.
The official loop's quirks, row by row, are in test_official_loop.py."""

import pytest

from agents.policies import OraclePolicy
from agents.prompt import build_messages
from atommem_env import AtomMemEnv
from atommem_env.env import PAPER_DEFAULT_QUERY
from atommem_env.protocols import Delete, parse_action
from atommem_env.scoring import paper_match
from atommem_env.tasks import ListTaskSource, Paragraph, Question, SupportingFact, Task

PARAGRAPHS = tuple(Paragraph(f"Page {i}", f"Fact number {i} is here. " * 5) for i in range(3))
TOWER = Question("Where is the tower?", ("Paris",), (SupportingFact("Page 0", 0, "Fact number 0 is here."),), "q0")
RIVER = Question("Which river?", ("Seine",), (), "q1")
BRIDGE = Question("How old is the bridge?", ("no",), (), "q2")


READ_ON = "<add_memory></add_memory>"
"""An empty add: nothing stored, the next chunk (in both modes)."""
MODES = [pytest.param({}, id="official"), pytest.param({"paper_fixes": True}, id="paper_fixes")]


def paper_env(*questions, **kwargs):
    kwargs.setdefault("embedder", "hashing")
    kwargs.setdefault("chunk_tokens", 40)  # one 35-token paragraph per chunk: 3 chunks
    task = Task("paper", PARAGRAPHS, questions or (TOWER,))
    env = AtomMemEnv(dataset=ListTaskSource([task]), protocol="paper", **kwargs)
    env.reset(seed=0)
    return env


@pytest.mark.parametrize("mode", MODES)
def test_the_query_starts_as_a_placeholder_and_memories_show_from_the_first_step(mode):
    env = paper_env(**mode)
    obs, _ = env.reset(seed=0)
    assert obs["query"] == PAPER_DEFAULT_QUERY == "defult query, change it!"
    assert obs["retrieved"] == ("" if mode else "No previous memory")  # nothing stored yet
    obs, *_ = env.step("<add_memory>The tower is in Paris.</add_memory>")
    assert obs["retrieved"] == "Memory 1: The tower is in Paris."  # no query set, the placeholder retrieves
    assert AtomMemEnv(embedder="hashing").reset(seed=0)[0]["query"] == ""  # atommem protocol: no such query


def test_with_paper_fixes_a_reply_without_tags_moves_to_the_next_chunk():
    env = paper_env(paper_fixes=True)
    obs, *_ = env.step("I will just keep reading.")
    assert int(obs["chunk_index"]) == 1 and env.total_invalid_ops == 0
    obs, *_ = env.step("<think>nothing to keep</think>")  # any paired tag counts as a tag, as in the official parser
    assert int(obs["chunk_index"]) == 1
    obs, *_ = env.step("<update_query>tower</update_query><update_memory>notes</update_memory>")
    assert int(obs["chunk_index"]) == 1 and obs["scratchpad"] == "notes"  # tags without add or modify: stays


@pytest.mark.parametrize("modify", ["<modify_memory>Memory 9: text</modify_memory>",
                                    "<modify_memory>no reference</modify_memory>"])
def test_with_paper_fixes_a_failed_modify_still_moves_on(modify):
    env = paper_env(paper_fixes=True)
    obs, *_ = env.step(modify)
    assert int(obs["chunk_index"]) == 1 and env.total_invalid_ops == 1 and obs["feedback"].startswith("error:")


@pytest.mark.parametrize("mode", MODES)
def test_a_final_answer_before_the_end_ends_the_episode(mode):
    env = paper_env(**mode)
    obs, reward, terminated, truncated, info = env.step("<final_answer>\\boxed{Paris}</final_answer>")
    assert terminated and not truncated and reward == 1.0 and int(obs["chunk_index"]) == 0
    assert info["answers"] == ("\\boxed{Paris}",)


@pytest.mark.parametrize("mode", MODES)
def test_a_query_and_an_answer_in_one_reply_are_both_applied(mode):
    env = paper_env(**mode)
    for _ in range(3):
        env.step(READ_ON)  # all read
    _, reward, terminated, _, info = env.step("<update_query>tower</update_query>"
                                              "<final_answer>\\boxed{Paris}</final_answer>")
    assert terminated and reward == 1.0 and env.query == "tower" and info["op_counts"]["query"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_delete_removes_only_the_first_reference(mode):
    assert parse_action("<delete_memory>Memory 2 and Memory 1</delete_memory>", "paper").ops == [Delete(rank=2)]
    env = paper_env(**mode)
    env.step("<update_query>fact</update_query>")
    env.step("<add_memory>First fact.</add_memory><add_memory>Second fact.</add_memory>")
    obs, *_ = env.step("<delete_memory>Memory 1, Memory 2</delete_memory>")
    assert int(obs["memory_size"]) == 1


@pytest.mark.parametrize("mode", MODES)
def test_modify_deletes_then_adds_anew(mode):
    env = paper_env(**mode)
    env.step("<update_query>tower Paris</update_query>")
    obs, *_ = env.step("<add_memory>The tower is in Paris.</add_memory><add_memory>The tower is tall.</add_memory>")
    shown = obs["retrieved"].splitlines()
    rank = 1 + [line.split(": ", 1)[1] for line in shown].index("The tower is in Paris.")
    assert shown[rank - 1] == f"Memory {rank}: The tower is in Paris."
    obs, *_ = env.step(f"<modify_memory>Memory {rank}: The tower stands in Paris.</modify_memory>")
    assert ("replaced entry 1 by entry 3" if mode else "deleted entry 1\ncreated entry 3") in obs["feedback"]
    assert [e.id for e in env.memory.entries()] == [2, 3]  # a new id: ties in score now rank it after entry 2


@pytest.mark.parametrize("mode", MODES)
def test_three_query_updates_per_question_then_it_is_skipped(mode):
    env = paper_env(TOWER, RIVER, **mode)
    for n in range(3):
        obs, *_ = env.step(f"<update_query>try {n}</update_query>")
        assert int(obs["reads_left"]) == 2 - n
    obs, *_ = env.step("<update_memory>notes</update_memory>")  # any other memory op starts the count again
    assert int(obs["reads_left"]) == 3
    for n in range(3):
        env.step(f"<update_query>again {n}</update_query>")
    obs, _, terminated, _, _ = env.step("<update_query>a fourth</update_query>")
    assert not terminated and "question 1: it is skipped" in obs["feedback"] and env.question_index == 1
    assert env.query == "again 2"
    for n in range(3):
        env.step(f"<update_query>river {n}</update_query>")
    _, reward, terminated, _, info = env.step("<update_query>river 4</update_query>")
    assert terminated and reward == 0.0 and info["answers"] == ("", "")


def test_with_paper_fixes_a_global_step_cap_of_chunks_and_questions_truncates():
    env = paper_env(paper_fixes=True)
    assert env.step_cap == 2 * 3 + 4
    for _ in range(3):
        env.step("")
    for _ in range(7):  # the 10th step is the last
        _, _, terminated, truncated, _ = env.step("<update_memory>thinking</update_memory>")
    assert truncated and not terminated
    env = paper_env(max_steps=2)
    env.step("<update_memory>a</update_memory>")
    obs, _, _, truncated, _ = env.step("<update_memory>b</update_memory>")
    assert truncated and "step limit (2 steps)" in obs["feedback"]


@pytest.mark.parametrize("mode", MODES)
def test_the_answer_phase_asks_one_question_at_a_time(mode):
    env = paper_env(TOWER, RIVER, **mode)
    obs, *_ = env.step(READ_ON)
    # While reading, all of them: the official template joins them unnumbered.
    assert obs["question"] == ("Q1: Where is the tower?\nQ2: Which river?" if mode else
                               "Where is the tower?\nWhich river?")
    env.step(READ_ON)
    obs, *_ = env.step(READ_ON)
    assert obs["question"] == "Where is the tower?"
    obs, _, terminated, _, _ = env.step("<final_answer>\\boxed{Paris}</final_answer>")
    assert not terminated and obs["question"] == "Which river?"
    _, reward, terminated, _, _ = env.step("<final_answer>\\boxed{Seine}</final_answer>")
    assert terminated and reward == 1.0


def test_scoring_reads_the_last_300_characters_with_strip_string():
    assert paper_match("It is \\boxed{ Paris }", ["paris"]) == 1.0
    assert paper_match("\\boxed{3.5\\%}", ["3.5"]) == 1.0
    assert paper_match("\\boxed{New\nYork}", ["new york"]) == 1.0
    assert paper_match("\\boxed{Paris}" + " so it is" * 40, ["Paris"]) == 0.0  # the box is before the last 300
    assert paper_match("\\boxed{Lyon} no wait \\boxed{Paris}", ["Paris"]) == 1.0
    assert paper_match("Paris", ["Paris"]) == 0.0  # no box, no match
    assert paper_match("\\boxed{Paris} \\boxed", ["Paris"]) == 0.0  # the last \boxed has no braces: none


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("matching, reward", [(None, 2 / 3), ("pooled", 2 / 3), ("per_question", 0.0)])
def test_multi_query_matching_is_pooled_by_default(matching, reward, mode):
    env = paper_env(TOWER, RIVER, BRIDGE, answer_matching=matching, **mode)
    for _ in range(3):
        env.step(READ_ON)
    for answer in ("Seine", "Paris", "maybe"):  # the first two swapped: pooled matching still counts them
        _, r, terminated, _, _ = env.step(f"<final_answer>\\boxed{{{answer}}}</final_answer>")
    assert terminated and r == pytest.approx(reward)
    with pytest.raises(ValueError, match="answer_matching"):
        paper_env(answer_matching="any")


def test_the_prompt_shows_the_query_and_the_query_budget():
    env = paper_env()
    obs, *_ = env.step("<update_query>tower; Paris</update_query>")
    user = build_messages(obs, "paper")[1]["content"]
    assert "Current query for retrieving memories:\ntower; Paris" in user
    assert "Query updates used for this question: 1" in user and "Short-term memory" in user
    assert user.rstrip().endswith(obs["chunk"].rstrip())  # the chunk last: the part a cut may shorten
    for _ in range(3):
        obs, *_ = env.step(READ_ON)
    user = build_messages(obs, "paper")[1]["content"]
    assert "Problem:\nWhere is the tower?" in user and "\\boxed{answer}" in user


@pytest.mark.parametrize("mode", MODES)
def test_the_oracle_speaks_the_paper_protocol_once_per_fact_even_with_overlap(mode):
    env = paper_env(TOWER, RIVER, chunk_overlap=20, **mode)
    oracle = OraclePolicy("paper")
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        action = oracle.act([obs], tasks=[env.task])[0].text
        obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    assert terminated and reward == 1.0 and info["op_counts"]["create"] == 1 and info["total_invalid_ops"] == 0
