"""The pieces of issue 24's study that run without training: the teacher that Reads once per hop."""

import re

import gymnasium as gym
import pytest

import atommem_env  # noqa: F401
from agents import make_policy
from agents.evaluation import make_env_kwargs, make_vector_env, run_episodes
from agents.policies import OraclePolicy, hop_reads
from atommem_env.data.synthetic import statement_subject

TWO_HOP = {"synthetic": {"hops": [2, 2], "distractors": 2, "volatility": 0}}
VOLATILE = {"synthetic": {"hops": [2, 2], "distractors": 2, "volatility": 1.0}}


def _teacher_episodes(name, extra, tasks=8, env_id="AtomMem/Synthetic-v0", context_tokens=800, chunk_tokens=256):
    """The teacher on train tasks 0..tasks-1 in two envs, 800 tokens in 256-token chunks unless told (None: the
    id's own), steps kept."""
    kwargs = make_env_kwargs(env_id, split="train", embedder="hashing", context_tokens=context_tokens,
                             chunk_tokens=chunk_tokens, extra=extra)
    envs = make_vector_env(env_id, kwargs, 2)
    episodes = run_episodes(envs, make_policy(name, enabled_ops=extra.get("enabled_ops")),
                            [list(range(0, tasks, 2)), list(range(1, tasks, 2))], seed=0, keep_steps=True)
    envs.close()
    return episodes


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_the_hops_teacher_reads_once_per_hop_and_answers_right(hops):
    extra = {"synthetic": {"hops": [hops, hops], "distractors": 2, "volatility": 0}}
    episodes = _teacher_episodes("oracle-hops", extra, tasks=4)
    assert all(e["em"] == 1.0 and e["ops"]["read"] == hops and e["invalid_ops"] == 0 for e in episodes)
    for e in episodes:
        reads = [out.text for _, out in e["steps"] if "<read>" in out.text]
        shown = [obs["retrieved"] for obs, out in e["steps"][1:] if obs["retrieved"]]
        # Each Read after the first asks for an entity an entry of the previous Read named, and notes the hop.
        for query, previous in zip(reads[1:], shown):
            assert query.startswith("<scratchpad>")
            entity = query.split("<read>")[1].split("</read>")[0]
            assert any(entity in line for line in previous.split("\n"))
        assert e["ops"]["scratchpad"] == hops - 1


def test_the_hops_teacher_sees_the_answer_when_memory_outgrows_top_k():
    """With top-k 2 over four entries (two facts, two look-alikes) one Read with the question rarely shows the
    second hop; the entity query does."""
    kwargs = make_env_kwargs("AtomMem/Synthetic-v0", split="train", embedder="hashing", context_tokens=800,
                             chunk_tokens=256, extra={**TWO_HOP, "top_k": 2})
    shown = {}
    for name in ("oracle-broad", "oracle-hops"):
        envs = make_vector_env("AtomMem/Synthetic-v0", kwargs, 8)
        episodes = run_episodes(envs, make_policy(name), [list(range(i, 32, 8)) for i in range(8)], seed=0,
                                keep_steps=True)
        envs.close()
        shown[name] = sum(any(g in e["steps"][-1][0]["retrieved"] for g in e["gold"][0]) for e in episodes)
    assert shown["oracle-hops"] >= 30 and shown["oracle-broad"] <= 16


def test_hop_reads_follow_the_chain_and_fall_back_to_the_question():
    env = gym.make("AtomMem/Synthetic-v0", embedder="hashing", synthetic=TWO_HOP["synthetic"], context_tokens=800)
    env.reset(seed=0)
    task = env.unwrapped.task
    question = task.questions[0]
    first = next(f for f in question.supporting_facts if f.key.split("|")[0] in question.question)
    second = next(f for f in question.supporting_facts if f is not first)
    assert hop_reads(task) == [(question.question, ""), (second.key.split("|")[0], first.text)]
    assert second.key.split("|")[0] in first.text
    assert "oracle-hops" in make_policy("oracle-hops").name
    hotpot = gym.make("AtomMem/SyntheticEasy-v0", embedder="hashing")
    hotpot.reset(seed=0)
    assert hop_reads(hotpot.unwrapped.task) == [(hotpot.unwrapped.task.questions[0].question, "")]


@pytest.mark.parametrize("name", ["oracle-hops", "oracle-lookup"])
def test_the_hops_teacher_reads_the_subject_before_it_updates_the_entry_shown(name):
    """Issue 24, item 3: a student sees no ids but the ones a Read shows, so the teacher Updates only those."""
    episodes = _teacher_episodes(name, VOLATILE, tasks=16)
    assert all(e["em"] == 1.0 and e["invalid_ops"] == 0 for e in episodes)
    assert sum(e["ops"]["update"] > 0 for e in episodes) >= 8
    for e in episodes:
        for (_, before), (obs, action) in zip(e["steps"], e["steps"][1:]):
            for entry_id in re.findall(r'<update id="(\d+)">', action.text):
                assert before.text.startswith("<read>") and f"[id {entry_id}]" in obs["retrieved"]
                assert obs["chunk_index"] < obs["num_chunks"]  # still reading: the Read kept the chunk


@pytest.mark.parametrize("extra", [VOLATILE, TWO_HOP])
def test_the_lookup_teacher_reads_before_every_fact_and_updates_only_the_entry_about_it(extra):
    """Issue 24, item 3, round 4's counter-cases: Reads that end in a Create, so a Read does not mean Update."""
    episodes = _teacher_episodes("oracle-lookup", extra, tasks=16)
    assert all(e["em"] == 1.0 and e["invalid_ops"] == 0 for e in episodes)
    read_then_create = 0
    for e in episodes:
        assert "<create>" not in e["steps"][0][1].text
        for (_, before), (obs, action) in zip(e["steps"], e["steps"][1:]):
            if "<create>" in action.text and not before.text.startswith("<read>"):
                pytest.fail(f"a fact written without a Read first: {action.text!r}")
            read_then_create += before.text.startswith("<read>") and "<create>" in action.text
            shown = dict(re.findall(r"\[id (\d+)\] (.*)", obs["retrieved"]))
            for entry_id, text in re.findall(r'<update id="(\d+)">(.*?)</update>', action.text):
                assert statement_subject(shown[entry_id]) == statement_subject(text)
    assert read_then_create >= 16
    if extra is TWO_HOP:
        assert sum(e["ops"]["update"] for e in episodes) == 0


def test_the_lookup_teacher_without_update_is_the_hops_teacher():
    """Its ablation reads nothing before writing (nothing to decide): its samples are `oracle-hops`' ones."""
    ablated = {**VOLATILE, "enabled_ops": ["create", "read", "scratchpad", "query"]}
    actions = {name: [out.text for e in _teacher_episodes(name, ablated) for _, out in e["steps"]]
               for name in ("oracle-hops", "oracle-lookup")}
    assert actions["oracle-lookup"] == actions["oracle-hops"]
    with pytest.raises(ValueError, match="read_per_hop"):
        OraclePolicy(look_alikes=True, look_up=True)


@pytest.mark.parametrize("name", ["oracle", "oracle-hops", "oracle-scan"])
def test_with_update_disabled_the_oracles_create_the_new_statement_instead(name):
    episodes = _teacher_episodes(name, {**VOLATILE, "enabled_ops": ["create", "read", "delete", "scratchpad"]})
    assert all(e["em"] == 1.0 and e["invalid_ops"] == 0 and e["ops"]["update"] == 0 for e in episodes)
    full = _teacher_episodes(name, VOLATILE)
    assert sum(e["ops"]["create"] for e in episodes) == sum(e["ops"]["create"] + e["ops"]["update"] for e in full)


def _budget_episodes(name, tasks=16, chunk_tokens=None):
    """The teacher on train tasks of the volatile budget setting, at its registered length."""
    return _teacher_episodes(name, {}, tasks, "AtomMem/SyntheticVolatileBudget-v0", None, chunk_tokens)


def test_the_scan_teacher_reads_the_question_at_every_chunk_and_writes_by_the_id_shown():
    """Issue 41, section 7: a chunk's first step is always the same Read, so the write has the entry's id in view;
    and it never sends an op the one-entry memory refuses (the look-up teacher's look-alike Creates)."""
    episodes = _budget_episodes("oracle-scan")
    assert make_policy("oracle-scan").name == "oracle-scan"
    assert all(e["em"] == 1.0 and e["invalid_ops"] == 0 for e in episodes)
    assert sum(e["ops"]["update"] for e in episodes) >= 32
    assert sum(e["invalid_ops"] for e in _budget_episodes("oracle-lookup")) > 0
    for e in episodes:
        question = e["steps"][0][0]["question"]
        reading = [(obs, out.text) for obs, out in e["steps"] if obs["chunk_index"] < obs["num_chunks"]]
        firsts = [text for obs, text in reading if int(obs["reads_left"]) == 2]
        assert len(firsts) == e["steps"][0][0]["num_chunks"] and set(firsts) == {f"<read>{question}</read>"}
        for obs, text in reading:
            if int(obs["reads_left"]) == 1:
                assert "<read>" not in text
                for entry_id in re.findall(r'<update id="(\d+)">', text):
                    assert f"[id {entry_id}]" in obs["retrieved"]
                assert "<create>" not in text or obs["retrieved"].startswith("(no entries")


def test_a_fact_in_the_first_chunk_survives_the_read_before_it():
    """Before: the step after a Read on chunk 0 (no feedback, empty memory) looked like a new episode to the
    oracle, which forgot the facts the Read was for and stored nothing."""
    episodes = _budget_episodes("oracle-scan", tasks=4, chunk_tokens=4000)
    assert all(e["steps"][0][0]["num_chunks"] == 1 for e in episodes)
    assert all(e["em"] == 1.0 and e["ops"]["create"] == 1 for e in episodes)


def test_a_stale_statement_and_its_successor_in_one_chunk_store_the_successor_only():
    """Before: the oracle Created the stale statement and dropped its successor (same key, same step)."""
    env = gym.make("AtomMem/Synthetic-v0", embedder="hashing", context_tokens=800, chunk_tokens=2000,
                   synthetic={"hops": [1, 1], "distractors": 2, "volatility": 1.0})
    oracle, superseded = make_policy("oracle"), 0
    for seed in range(16):
        obs, _ = env.reset(seed=seed)
        facts = env.unwrapped.task.questions[0].supporting_facts
        action = oracle.act([obs], [env.unwrapped.task])[0].text  # the one chunk
        created = re.findall(r"<create>(.*?)</create>", action)
        assert sorted(created) == sorted(f.text for f in facts if f.current)
        superseded += any(not f.current for f in facts)
    assert superseded >= 4  # the setting does hold superseded facts
