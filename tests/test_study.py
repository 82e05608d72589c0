"""The pieces of issue 24's study that run without training: the teacher that Reads once per hop."""

import gymnasium as gym
import pytest

import atommem_env  # noqa: F401
from agents import make_policy
from agents.evaluation import make_env_kwargs, make_vector_env, run_episodes
from agents.policies import hop_reads

TWO_HOP = {"synthetic": {"hops": [2, 2], "distractors": 2, "volatility": 0}}


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_the_hops_teacher_reads_once_per_hop_and_answers_right(hops):
    extra = {"synthetic": {"hops": [hops, hops], "distractors": 2, "volatility": 0}}
    kwargs = make_env_kwargs("AtomMem/Synthetic-v0", split="train", embedder="hashing", context_tokens=800,
                             chunk_tokens=256, extra=extra)
    envs = make_vector_env("AtomMem/Synthetic-v0", kwargs, 2)
    episodes = run_episodes(envs, make_policy("oracle-hops"), [[0, 2], [1, 3]], seed=0, keep_steps=True)
    envs.close()
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
