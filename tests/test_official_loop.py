"""`protocol="paper"` is the official AtomMem loop (RUCBM/AtomMem `recurrent/impls/memory_long_short_multiquery.py`,
MMQ; scorer `verl/utils/reward_score/__init__.py`, RS): one test per row of issue 21's table, with its inputs.
`paper_fixes=True` keeps the intended behaviour (test_paper_protocol.py)."""

import json

import pytest

from conftest import FIXTURES

from atommem_env import AtomMemEnv
from atommem_env.rendering import PAPER_QUERY_INSTRUCTION
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


# Row 12: the official data keep one gold answer per question (MuSiQue: `[answer]`, without `answer_aliases`).
@pytest.mark.parametrize("fixes, reward", [(False, 0.0), (True, 1.0)])
def test_only_the_first_gold_answer_counts(fixes, reward):
    aliased = Question("Which city?", ("Paris", "City of Light"), (), "q")
    env = official_env(aliased, paper_fixes=fixes)
    _, r, terminated, _, info = env.step("<final_answer>\\boxed{City of Light}</final_answer>")
    assert terminated and r == reward and info["gold_answers"] == (("Paris", "City of Light"),)


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


# Row 15: hard windows of chunk_tokens with the overlap, `Document i:\n{title}\n{text}` (MMQ `chunk_context`).
def test_official_chunking_cuts_hard_windows():
    long = tuple(Paragraph(f"Page {i}", "word " * 2090) for i in range(3))  # ~2,094 tokens with its header
    task = Task("long", long, (TOWER,))
    official = AtomMemEnv(dataset=ListTaskSource([task]), protocol="paper", embedder="hashing", chunk_tokens=4000,
                          chunk_overlap=100)
    obs, _ = official.reset(seed=0)
    assert int(obs["num_chunks"]) == 2 and obs["chunk"].startswith("Document 1:\nPage 0\nword")
    assert official.chunker.chunk_token_count(0) == 4100 and "Document 2:\nPage 1\n" in obs["chunk"]
    fixes = AtomMemEnv(dataset=ListTaskSource([task]), protocol="paper", paper_fixes=True, embedder="hashing",
                       chunk_tokens=4000, chunk_overlap=100)
    assert int(fixes.reset(seed=0)[0]["num_chunks"]) == 3  # whole paragraphs packed


# Row 17: the official data script joins a paragraph's sentences with '' (taskutils/script/processing_multiquery.py
# `read_hotpotqa`): 2WikiMultihopQA's sentences, which carry no leading space, run together there.
def test_the_official_loop_joins_sentences_as_the_official_data_script(tmp_path):
    records = json.loads((FIXTURES / "2wiki_dev_sample.json").read_text())
    for record in records:  # the dev files' sentences, unlike this fixture's, start without a space
        record["context"] = [[title, [s.strip() for s in sentences]] for title, sentences in record["context"]]
    wiki = tmp_path / "dev.json"
    wiki.write_text(json.dumps(records))
    title, sentences = records[0]["context"][0]
    assert len(sentences) > 1

    def paragraph_text(**kwargs):
        env = AtomMemEnv(dataset="2wiki", data_path=str(wiki), embedder="hashing", **kwargs)
        return next(p.text for item in env.task_source.items for p in item.paragraphs if p.title == title)

    assert paragraph_text(protocol="paper") == "".join(sentences)
    spaced = " ".join(sentences)
    assert paragraph_text(protocol="paper", paper_fixes=True) == paragraph_text() == spaced


# Row 18: the official MemoryDataset centre-truncates the context to max_chunks x chunk_size tokens (verl
# `postprocess_data`, truncation "center"): the first and last 20 chunks' worth are read, the middle never.
def test_the_official_loop_centre_truncates_a_long_document_to_40_chunks():
    pages = tuple(Paragraph(f"Page {i}", " ".join(f"w{i}x{j}" for j in range(95))) for i in range(50))
    task = Task("long", pages, (TOWER,))

    def chunks(**kwargs):
        env = AtomMemEnv(dataset=ListTaskSource([task]), protocol="paper", embedder="hashing", chunk_tokens=100,
                         **kwargs)
        env.reset(seed=0)
        return [env.chunker.chunk(i) for i in range(len(env.chunker))], env.chunker

    official, chunker = chunks()
    assert chunker.total_tokens > 40 * 100 and len(official) == 40
    assert all(chunker.chunk_token_count(i) == 100 for i in range(40))
    assert official[0].startswith("Document 1:\nPage 0\nw0x0") and official[-1].endswith("w49x94")
    read = " ".join(official)
    first_half = chunker.text_of_range(0, 2000)
    assert official[19].endswith(first_half[-20:])  # the first 2,000 tokens, then the last 2,000
    assert "w21x" not in read and "w20x" not in read.split(first_half[-20:])[1][:40]
    fixes, whole = chunks(paper_fixes=True)
    assert len(fixes) > 40 and "w21x" in " ".join(fixes) and whole.read_tokens == whole.total_tokens


def test_centre_truncation_is_the_official_loops_alone():
    from atommem_env.chunking import Chunker
    from atommem_env.tokens import make_token_counter

    with pytest.raises(ValueError, match="official=True"):
        Chunker(PARAGRAPHS, make_token_counter("regex"), 40, max_tokens=80)


# Row 16: the official multi-query data: disjoint groups, all context paragraphs of each question.
def test_official_multi_query_composition(hotpot_path):
    import gymnasium as gym

    env = gym.make("AtomMem/HotpotQA-MultiQuery-v0", data_path=str(hotpot_path), embedder="hashing")
    source = env.unwrapped.task_source
    asked = [q.question for i in range(source.num_tasks) for q in source.get(i).questions]
    assert sorted(asked) == sorted(item.question.question for item in source.items)  # each question once
    for i in range(source.num_tasks):
        task = source.get(i)
        titles = {p.title for p in task.paragraphs}
        group = source.items[source.groups[i][0]:source.groups[i][1]]
        assert all(p.title in titles for item in group for p in item.paragraphs)  # gold and distractors
        assert len(task.paragraphs) == 200
    env.close()


# Issue 21, item 3: MemAgent's RULER-HotpotQA.
def test_ruler_hotpotqa_composition_and_errors(hotpot_path):
    import random

    import gymnasium as gym

    env = gym.make("AtomMem/RULER-HotpotQA-v0", data_path=str(hotpot_path), embedder="hashing", num_documents=100)
    task = env.unwrapped.task_source.get(3)
    item = env.unwrapped.task_source.items[3]
    order = list(range(100))
    random.Random(4).shuffle(order)  # own paragraphs first, then padding, shuffled as MemAgent does
    assert len(task.paragraphs) == 100 and len(task.questions) == 1
    assert [task.paragraphs[j].title for j, k in enumerate(order) if k < 10] == \
        [item.paragraphs[k].title for k in order if k < 10]
    env.close()
    with pytest.raises(ValueError, match="num_documents in"):
        gym.make("AtomMem/RULER-HotpotQA-v0", data_path=str(hotpot_path), num_documents=300)
    with pytest.raises(ValueError, match="num_documents=6400 is more than the 9[0-9][0-9] distinct paragraphs"):
        gym.make("AtomMem/RULER-HotpotQA-v0", data_path=str(hotpot_path), num_documents=6400)
    with pytest.raises(ValueError, match="composition must be one of"):
        gym.make("AtomMem/HotpotQA-v0", data_path=str(hotpot_path), composition="memagent")


@pytest.mark.parametrize("protocol", ["atommem", "paper"])
def test_eval_reports_sub_em_on_the_ruler_grid(protocol, hotpot_path, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run([sys.executable, "eval.py", "--env-id", "AtomMem/RULER-HotpotQA-v0", "--data-path",
                             str(hotpot_path), "--policies", "oracle", "--num-documents", "50", "100",
                             "--num-episodes", "2", "--num-envs", "2", "--embedder", "hashing",
                             "--env-kwargs", json.dumps({"protocol": protocol}), "--output-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())["results"]["oracle"]
    assert set(report) == {"50docs", "100docs"}
    assert all(cell["em"] == cell["sub_em"] == 1.0 for cell in report.values())
    assert "| sub-EM |" in (tmp_path / "eval.md").read_text()


# Issue 21, item 2: the grid lines of docs/eval.md run with the oracle at EM 1 (2Wiki and MuSiQue on their
# test fixtures, whose pools hold only 9 and 6 paragraphs).
@pytest.mark.parametrize("env_id, data, counts, extra", [
    ("AtomMem/HotpotQA-MultiQuery-v0", None, ["200", "400", "800"], {}),
    ("AtomMem/2WikiMultihopQA-v0", "2wiki_dev_sample.json", ["9"], {"protocol": "paper", "multi_query": True}),
    ("AtomMem/MuSiQue-v0", "musique_ans_dev_sample.jsonl", ["6"], {"protocol": "paper", "multi_query": True}),
])
def test_the_paper_grid_runs_with_the_oracle(env_id, data, counts, extra, hotpot_path, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import FIXTURES, REPO

    kwargs = {**extra, "composition": "official", "chunk_tokens": 4000, "chunk_overlap": 100, "split": "all",
              "max_tasks": 600} if extra else {"max_tasks": 600, "split": "all"}
    result = subprocess.run([sys.executable, "eval.py", "--env-id", env_id, "--data-path",
                             str(FIXTURES / data if data else hotpot_path), "--policies", "oracle",
                             "--num-documents", *counts, "--num-episodes", "1" if data else "2", "--num-envs", "2",
                             "--embedder", "hashing", "--env-kwargs", json.dumps(kwargs), "--output-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())["results"]["oracle"]
    assert sorted(report) == sorted(f"{n}docs" for n in counts)
    assert all(cell["em"] == 1.0 and cell["failed_episodes"] == 0 for cell in report.values())
    if data:  # the fixtures' three or two questions make one task: more episodes are refused before any work
        more = subprocess.run([sys.executable, "eval.py", "--env-id", env_id, "--data-path", str(FIXTURES / data),
                               "--policies", "oracle", "--num-documents", *counts, "--num-episodes", "5",
                               "--embedder", "hashing", "--env-kwargs", json.dumps(kwargs)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert more.returncode != 0 and "--num-episodes 5 is more than the" in more.stderr


# Rows 14 and 18, the prompt's side: no feedback section, no chunk numbers, query updates used; one user message
# on request (--single-message), and the article stays the part a prompt budget shortens.
def test_the_paper_prompt_and_the_single_message_harness():
    from agents.models import load_causal_lm
    from agents.prompt import CUT_MARK, build_messages, encode_prompt

    env = official_env()
    obs, *_ = env.step("I forgot the tags.")  # an error line in obs["feedback"]
    obs, *_ = env.step("<update_query>tower</update_query>")
    system, user = build_messages(obs, "paper")
    assert "Feedback" not in user["content"] and "Chunk 1 of" not in user["content"]
    assert "Query updates used for this question: 1" in user["content"]
    assert user["content"].endswith("The article:\n" + obs["chunk"])
    (single,) = build_messages(obs, "paper", single_message=True)
    assert single == {"role": "user", "content": system["content"] + "\n\n" + user["content"]}
    _, tokenizer = load_causal_lm("tiny", device="cpu")
    whole, _ = encode_prompt(tokenizer, [single], None)
    ids, cut = encode_prompt(tokenizer, [single], len(whole) - 20)
    assert cut > 0 and len(ids) <= len(whole) - 20 and CUT_MARK in tokenizer.decode(ids)
