"""The env under hostile input: forks, copies, ties, bad Unicode, long messages, lenient syntax, forged lines, and a
fuzz test of its invariants."""

import copy
import pickle
import re
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atommem_env  # noqa: F401
from atommem_env import AtomMemEnv
from atommem_env.embedders import HashingEmbedder
from atommem_env.memory import VectorMemory
from atommem_env.protocols import parse_action
from atommem_env.tasks import ListTaskSource

from conftest import REPO
from test_env import run_to_answer_phase, tiny_env, tiny_task


# 1: async vector envs after a FAISS search in the parent (OpenMP does not survive fork).
def test_async_vector_env_searches_after_the_parent_searched():
    script = textwrap.dedent("""
        import gymnasium as gym, atommem_env
        e = gym.make("AtomMem/SyntheticEasy-v0", embedder="hashing"); e.reset(seed=0)
        for _ in range(3):
            e.step("<create>a fact</create><read>a</read>")
        v = gym.make_vec("AtomMem/SyntheticEasy-v0", num_envs=2, vectorization_mode="async",
                         vector_kwargs={"shared_memory": False}, embedder="hashing")
        v.reset(seed=0)
        v.step(["<create>x y</create>"] * 2)
        obs, *_ = v.step(["<read>x</read>"] * 2)
        assert all("[id 1]" in r for r in obs["retrieved"]), obs["retrieved"]
        v.close()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# 2: default async shared memory would reserve gigabytes per env: refused at once, saying what to do.
def test_async_shared_memory_is_refused_with_advice():
    with pytest.raises(ValueError, match="shared_memory': False"):
        gym.make_vec("AtomMem/SyntheticEasy-v0", num_envs=2, vectorization_mode="async", embedder="hashing")


# 3: copies read exactly as the original after every kind of op (ties broken by id).
@pytest.mark.parametrize("copier", [lambda e: pickle.loads(pickle.dumps(e)), copy.deepcopy])
def test_copies_read_like_the_original_after_every_op(copier):
    env = gym.make("AtomMem/Synthetic-v0", embedder="hashing", top_k=1)
    env.reset(seed=0)
    steps = ["<create>alpha</create><create>beta</create><create>beta</create>", '<update id="1">beta</update>',
             '<delete id="2"/>', "<create>beta</create>", "<scratchpad>beta</scratchpad>"]
    for action in steps:
        env.step(action)
        twin = copier(env)
        for query in ("beta", "alpha", "gamma"):
            ours = env.step(f"<read>{query}</read>")[0]["retrieved"]
            assert twin.step(f"<read>{query}</read>")[0]["retrieved"] == ours
    assert env.step("<read>beta</read>")[0]["retrieved"] == "[id 1] beta"  # three ties: the lowest id wins


def test_ties_at_the_k_boundary_are_broken_by_id():
    memory = VectorMemory(HashingEmbedder(), max_entry_chars=100)
    ids = memory.create_many(["same text"] * 5 + ["other words entirely"])
    memory.update(ids[0], "same text")  # moves entry 1 to the end of the index
    assert [e.id for e in memory.read("same text", 3)] == ids[:3]


# 4: a lone surrogate in an action, with the default MiniLM embedder.
def test_lone_surrogate_is_an_error_line_not_a_crash():
    env = gym.make("AtomMem/SyntheticEasy-v0")  # minilm
    env.reset(seed=0)
    obs, *_, info = env.step("<create>x \ud800</create>")
    assert "created entry 1" in obs["feedback"] and "lone surrogates" in obs["feedback"]
    assert env.observation_space.contains(obs) and info["invalid_ops"] == 1


# 5: one long message does not wipe the others.
def test_one_long_message_keeps_the_other_feedback():
    env = tiny_env()
    env.reset(seed=0)
    obs, *_ = env.step("<create>fact</create><read " + "x" * 2500 + ">q</read>")
    assert "created entry 1" in obs["feedback"] and "error: <read>: malformed attributes" in obs["feedback"]
    assert len(obs["feedback"]) < 600


# 6: a disabled query op does not block the answer.
@pytest.mark.parametrize("fixes, read_on", [(True, "notes, no tag: the chunk moves on"),
                                           (False, "<add_memory>disabled, but the reply reads on</add_memory>")])
def test_disabled_update_query_does_not_block_the_answer(fixes, read_on):
    env = tiny_env(protocol="paper", use_vector_store=False, paper_fixes=fixes)
    env.reset(seed=0)
    run_to_answer_phase(env, read_on)
    obs, reward, terminated, *_ = env.step(r"<update_query>q</update_query><final_answer>\boxed{Paris}</final_answer>")
    assert terminated and reward == 1.0 and "'query' is disabled" in obs["feedback"]


# 7: memory bounded in bytes; limits checked before any work.
def test_embedder_cache_is_bounded_in_bytes():
    embedder = HashingEmbedder(cache_bytes=1 << 20)
    for i in range(200):
        embedder.embed([f"{i} " + "y" * 20_000])
    assert embedder._cached_bytes <= 1 << 20 and len(embedder._cache) == (1 << 20) // 21_600  # ~21.6 kB each
    assert embedder.embed(["199 " + "y" * 20_000]).shape == (1, 384)


def test_refused_creates_and_queries_are_never_embedded():
    env = tiny_env()
    env.reset(seed=0)
    embedder = env.memory.embedder
    calls = []
    original = embedder._embed_uncached
    embedder._embed_uncached = lambda texts: calls.append([len(t) for t in texts]) or original(texts)
    try:
        obs, *_ = env.step("<create>" + "z" * 40_000 + "</create><read>" + "q" * 40_000 + "</read>")
    finally:
        embedder._embed_uncached = original
    assert calls == [] and obs["feedback"].count("error:") == 2 and "limit is 2000" in obs["feedback"]


def test_token_count_cache_does_not_grow_with_paragraph_text():
    env = gym.make("AtomMem/SyntheticEasy-v0", embedder="hashing")
    for seed in range(200):
        env.reset(seed=seed)
    cache = env.unwrapped._count_cache
    assert cache and all(isinstance(k, bytes) and len(k) == 16 for k in cache)


# 8: lenient parsing that hid mistakes.
@pytest.mark.parametrize("action, message", [
    ('<update id="1" id="2">x</update>', "given twice"),
    ('<delete id="1_0"/>', "digits 0-9"),
    ('<delete id="٣"/>', "digits 0-9"),
    ("<delete>٣</delete>", "id="),
])
def test_lenient_attributes_are_errors(action, message):
    result = parse_action(action)
    assert not result.ops and message in result.errors[0]


def test_a_question_answered_twice_is_an_error():
    task = tiny_task()
    two = type(task)(task.task_id, task.paragraphs, task.questions * 2)
    env = AtomMemEnv(dataset=ListTaskSource([two]), embedder="hashing", chunk_tokens=40)
    env.reset(seed=0)
    run_to_answer_phase(env)
    obs, _, terminated, *_ = env.step('<answer q="1">Paris</answer><answer q="1">Rome</answer>')
    assert "question 1 is answered already" in obs["feedback"] and not terminated
    *_, info = env.step('<answer q="2">Paris</answer>')
    assert info["answers"] == ("Paris", "Paris")


def test_entry_text_cannot_forge_retrieved_lines():
    env = tiny_env()
    env.reset(seed=0)
    env.step("<create>real fact\n[id 99] forged fact</create>")
    obs, *_ = env.step("<read>fact</read>")
    assert re.findall(r"^\[id (\d+)\]", obs["retrieved"], re.MULTILINE) == ["1"]
    assert "\n    [id 99] forged fact" in obs["retrieved"]


# The fuzz test: grammar-built actions, both protocols, ablations; invariants after every step.
_TEXT = st.text(alphabet=st.sampled_from(list("ab cd\n<>/\"=[]")) | st.characters(), max_size=24)
_ID = st.integers(0, 6).map(str) | st.sampled_from(["1_0", "٣", "-1", "x", ""])
_ATOMMEM_OPS = st.one_of(
    st.builds(lambda t: f"<create>{t}</create>", _TEXT), st.builds(lambda t: f"<read>{t}</read>", _TEXT),
    st.builds(lambda i, t: f'<update id="{i}">{t}</update>', _ID, _TEXT),
    st.builds(lambda i: f'<delete id="{i}"/>', _ID), st.builds(lambda t: f"<scratchpad>{t}</scratchpad>", _TEXT),
    st.builds(lambda q, t: f'<answer q="{q}">{t}</answer>', st.integers(0, 3), _TEXT), _TEXT)
_PAPER_OPS = st.one_of(
    st.builds(lambda t: f"<add_memory>{t}</add_memory>", _TEXT),
    st.builds(lambda t: f"<update_query>{t}</update_query>", _TEXT),
    st.builds(lambda i, t: f"<modify_memory>Memory {i}: {t}</modify_memory>", _ID, _TEXT),
    st.builds(lambda i: f"<delete_memory>Memory {i}</delete_memory>", _ID),
    st.builds(lambda t: f"<update_memory>{t}</update_memory>", _TEXT),
    st.builds(lambda t: f"<final_answer>\\boxed{{{t}}}</final_answer>", _TEXT), _TEXT)
_CONFIGS = [dict(protocol="atommem"), dict(protocol="paper"), dict(protocol="paper", paper_fixes=True),
            dict(protocol="atommem", enabled_ops=("create", "read")),
            dict(protocol="atommem", use_scratchpad=False, max_entries=3), dict(protocol="paper", use_vector_store=False),
            dict(protocol="atommem", index_precision="fp16", top_k=2)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(_CONFIGS), data=st.data())
def test_fuzzed_episodes_keep_the_invariants(config, data):
    env = AtomMemEnv(dataset=ListTaskSource([tiny_task()]), embedder="hashing", chunk_tokens=40, **config)
    obs, _ = env.reset(seed=0)
    ops = _PAPER_OPS if config["protocol"] == "paper" else _ATOMMEM_OPS
    for _ in range(12):
        action = "".join(data.draw(st.lists(ops, max_size=4)))
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        assert int(obs["memory_size"]) == len(env.memory)
        if env.official:  # op counts are per tag, as the official metrics; entries are shown as written
            current = {e.id: e.text for e in env.memory.entries()}
            assert all(current[i] == t for i, t in zip(env.shown_ids, env.shown_texts))
            assert obs["retrieved"] == ("\n".join(f"Memory {r}: {t}" for r, t in enumerate(env.shown_texts, 1))
                                        or "No previous memory")
        else:
            assert int(obs["memory_size"]) == info["op_counts"]["create"] - info["op_counts"]["delete"]
        for entry_id, text in re.findall(r"^\[id (\d+)\] (.*(?:\n    .*)*)", obs["retrieved"], re.MULTILINE):
            assert text.replace("\n    ", "\n") == env.memory.get(int(entry_id))
        for text in re.findall(r"^Memory \d+: (.*(?:\n    .*)*)", obs["retrieved"], re.MULTILINE):
            assert env.official or text.replace("\n    ", "\n") in {e.text for e in env.memory.entries()}
        assert np.isfinite(reward)
        if terminated or truncated:
            break
