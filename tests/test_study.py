"""The pieces of issue 24's study that run without training: the teacher that Reads once per hop."""

import gymnasium as gym
import pytest

import atommem_env  # noqa: F401
from agents import make_policy
from agents.evaluation import make_env_kwargs, make_vector_env, run_episodes
from agents.policies import hop_queries

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
        reads = [out.text for _, out in e["steps"] if out.text.startswith("<read>")]
        shown = [obs["retrieved"] for obs, out in e["steps"][1:] if obs["retrieved"]]
        # Each Read after the first asks with an entry the previous Read returned: the one of the chain's hop.
        for query, previous in zip(reads[1:], shown):
            assert query[len("<read>"):-len("</read>")] in [line.split("] ", 1)[1] for line in previous.split("\n")]


def test_hop_queries_follow_the_chain_and_fall_back_to_the_question():
    env = gym.make("AtomMem/Synthetic-v0", embedder="hashing", synthetic=TWO_HOP["synthetic"], context_tokens=800)
    env.reset(seed=0)
    task = env.unwrapped.task
    question = task.questions[0]
    queries = hop_queries(task)
    first = next(f for f in question.supporting_facts if f.key.split("|")[0] in question.question)
    assert queries == [question.question, first.text]
    assert "oracle-hops" in make_policy("oracle-hops").name
    hotpot = gym.make("AtomMem/SyntheticEasy-v0", embedder="hashing")
    hotpot.reset(seed=0)
    assert hop_queries(hotpot.unwrapped.task) == [hotpot.unwrapped.task.questions[0].question]
