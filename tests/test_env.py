import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import atommem_env
from atommem_env import AtomMemEnv, DATA_ENV_IDS, ENV_IDS
from atommem_env.protocols import Create
from atommem_env.tasks import ListTaskSource, Paragraph, Question, SupportingFact, Task

from conftest import FIXTURES, HOTPOT_HF

DATA_PATHS = {"hotpotqa": HOTPOT_HF, "2wiki": FIXTURES / "2wiki_dev_sample.json",
              "musique": FIXTURES / "musique_ans_dev_sample.jsonl"}


def make(env_id, **kwargs):
    if env_id in DATA_ENV_IDS:
        kwargs.setdefault("data_path", str(DATA_PATHS[DATA_ENV_IDS[env_id]]))
    kwargs.setdefault("embedder", "hashing")
    return gym.make(env_id, **kwargs)


def tiny_task(answer="Paris", n_paragraphs=3):
    paragraphs = tuple(Paragraph(f"Page {i}", f"Fact number {i} is here. " * 5) for i in range(n_paragraphs))
    question = Question("Where is the tower?", (answer, "the city of Paris"),
                        (SupportingFact("Page 0", 0, "Fact number 0 is here."),), "q0")
    return Task("tiny", paragraphs, (question,))


def tiny_env(**kwargs):
    kwargs.setdefault("embedder", "hashing")
    kwargs.setdefault("chunk_tokens", 40)  # one 35-token paragraph per chunk
    return AtomMemEnv(dataset=ListTaskSource([tiny_task()]), **kwargs)


def run_to_answer_phase(env, action=""):
    obs, _ = env.reset(seed=0)
    while int(obs["chunk_index"]) < int(obs["num_chunks"]):
        obs, *_ = env.step(action)
    return obs


@pytest.mark.parametrize("env_id", sorted(ENV_IDS))
def test_check_env_passes_for_every_registered_id(env_id):
    env = make(env_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []
    env.close()


@pytest.mark.parametrize("env_id", sorted(ENV_IDS))
def test_same_seed_same_episode(env_id):
    script = ["<create>first note</create>", "<read>note</read>", "<scratchpad>plan</scratchpad>", "",
              "<delete id=\"1\"/>", "<answer>x</answer>"]

    def rollout():
        env = make(env_id)
        obs, info = env.reset(seed=123)
        trace = [(obs, info)]
        for step in range(12):
            obs, reward, terminated, truncated, info = env.step(script[step % len(script)])
            trace.append((obs, reward, terminated, truncated, info))
            if terminated or truncated:
                break
        return trace

    first, second = rollout(), rollout()
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert gym.utils.env_checker.data_equivalence(a, b)


@pytest.mark.parametrize("env_id", sorted(ENV_IDS))
def test_pickle_and_render(env_id):
    env = make(env_id, render_mode="ansi")
    env.reset(seed=1)
    env.step(atommem_env.format_ops([Create("kept across pickling")], env.unwrapped.protocol))
    clone = pickle.loads(pickle.dumps(env))
    assert clone.unwrapped.memory.read("kept", 1)[0].text == "kept across pickling"
    text = env.render()
    assert "question:" in text and "chunk" in text


def test_readme_example_runs(hotpot_path):
    env = gym.make("AtomMem/HotpotQA-v0", data_path=str(hotpot_path), context_tokens=32_000, chunk_tokens=4096,
                   top_k=6, embedder="hashing")
    obs, info = env.reset(seed=0)
    steps = 0
    while True:
        obs, reward, terminated, truncated, info = env.step("<answer>yes</answer>")
        steps += 1
        if terminated or truncated:
            break
    assert terminated and info["num_chunks"] >= 7 and steps == info["num_chunks"] + 1
    assert reward in (0.0, 1.0) and info["em"] == reward


def test_crud_through_steps_and_reads_stay_on_chunk():
    env = tiny_env(max_reads_per_chunk=1)
    obs, info = env.reset(seed=0)
    assert info["num_chunks"] == 3 and int(obs["chunk_index"]) == 0
    obs, *_ , info = env.step("<create>The tower is in Paris.</create><create>Fact two.</create>")
    assert obs["feedback"] == "created entry 1\ncreated entry 2" and int(obs["chunk_index"]) == 1
    obs, *_, info = env.step("<read>tower</read>")
    assert obs["retrieved"].startswith("[id 1] The tower is in Paris.") and int(obs["chunk_index"]) == 1
    obs, *_, info = env.step("<read>tower</read>")  # the read limit is reached: results shown, chunk moves on
    assert obs["retrieved"] and int(obs["chunk_index"]) == 2
    obs, *_, info = env.step('<update id="2">Fact two, revised.</update><delete id="1"/><scratchpad>s</scratchpad>')
    assert obs["feedback"] == "updated entry 2\ndeleted entry 1\nthat was the last chunk: answer now"
    assert obs["chunk"] == "" and obs["scratchpad"] == "s" and int(obs["memory_size"]) == 1
    obs, reward, terminated, truncated, info = env.step("<answer>the city of Paris</answer>")
    assert terminated and not truncated and reward == 1.0 and info["em"] == 1.0 and info["f1"] == 1.0
    assert info["op_counts"] == {"create": 2, "read": 2, "update": 1, "delete": 1, "scratchpad": 1, "query": 0,
                                 "answer": 1}
    with pytest.raises(RuntimeError, match="reset"):
        env.step("")


def test_wrong_answer_scores_zero_with_partial_f1():
    env = tiny_env()
    run_to_answer_phase(env)
    _, reward, terminated, _, info = env.step("<answer>Paris, Texas</answer>")
    assert terminated and reward == 0.0 and 0 < info["f1"] < 1


def test_answer_phase_budget_truncates():
    env = tiny_env(max_answer_steps=2)
    run_to_answer_phase(env)
    _, _, terminated, truncated, _ = env.step("<read>x</read>")
    assert not (terminated or truncated)
    obs, reward, terminated, truncated, info = env.step("no answer")
    assert truncated and not terminated and reward == 0.0 and info["answers"] == ("",)
    assert "error: no answer" in obs["feedback"]


@pytest.mark.parametrize("action", [
    '<update id="99">x</update>', '<delete id="99"/>', "<create></create>", "<read>unclosed",
    "</create>", "<answer>too early</answer>", "x" * 200_000 + "<create>lost</create>", None, 42,
])
def test_bad_actions_are_feedback_not_crashes(action):
    env = tiny_env()
    env.reset(seed=0)
    env.step("<create>keep me</create>")
    obs, reward, terminated, truncated, info = env.step(action)
    assert info["invalid_ops"] >= 1 and obs["feedback"].startswith("error: ")
    assert [e.text for e in env.memory.entries()] == ["keep me"]
    assert env.observation_space.contains(obs) and not terminated


def test_sampled_actions_never_crash_and_obs_stay_in_space():
    env = make("AtomMem/Synthetic-v0")
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    for _ in range(40):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        if terminated or truncated:
            obs, _ = env.reset()


def test_feedback_is_bounded():
    env = tiny_env()
    env.reset(seed=0)
    obs, _, _, _, info = env.step('<delete id="7"/>' * 5000)
    assert info["invalid_ops"] == 5000 and len(obs["feedback"]) < 2100 and "more messages" in obs["feedback"]


def test_disabled_ops_and_ablations():
    env = tiny_env(enabled_ops=("create", "read"), use_scratchpad=False)
    env.reset(seed=0)
    obs, _, _, _, info = env.step('<create>a</create><delete id="1"/><scratchpad>s</scratchpad>')
    assert info["invalid_ops"] == 2 and "'delete' is disabled" in obs["feedback"]
    assert "'scratchpad' is disabled" in obs["feedback"] and obs["scratchpad"] == "" and len(env.memory) == 1
    env = tiny_env(use_vector_store=False)
    env.reset(seed=0)
    obs, _, _, _, info = env.step("<create>a</create><read>a</read>")
    assert info["invalid_ops"] == 2 and len(env.memory) == 0


def test_limits_on_entries_and_scratchpad():
    env = tiny_env(max_entries=1, max_scratchpad_chars=3)
    env.reset(seed=0)
    obs, _, _, _, info = env.step("<create>a</create><create>b</create><scratchpad>long text</scratchpad>")
    assert info["invalid_ops"] == 2 and "memory is full" in obs["feedback"] and "limit is 3" in obs["feedback"]


def test_invalid_op_penalty_shapes_reward():
    env = tiny_env(invalid_op_penalty=0.1)
    env.reset(seed=0)
    _, reward, *_ = env.step('<delete id="1"/><delete id="2"/>')
    assert reward == pytest.approx(-0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_tokens=0), "chunk_tokens"), (dict(top_k=-1), "top_k"), (dict(enabled_ops=("create", "fly")), "fly"),
    (dict(protocol="json"), "protocol"), (dict(max_reads_per_chunk=-1), "max_reads_per_chunk"),
    (dict(render_mode="human"), "render_mode"), (dict(embedder="bert"), "unknown embedder"),
    (dict(dataset="hotpotqa", data_path="/nonexistent/hotpot.json"), "not found: /nonexistent/hotpot.json"),
    (dict(dataset="hotpotqa"), "needs data_path"), (dict(dataset="squad"), "unknown dataset"),
    (dict(synthetic={"hops": (0, 2)}), "hops"), (dict(max_entries=0), "max_entries"),
])
def test_bad_constructor_arguments_raise_value_error(kwargs, match):
    kwargs.setdefault("embedder", "hashing")
    with pytest.raises(ValueError, match=match):
        AtomMemEnv(**kwargs)


def test_multi_question_answers():
    questions = (Question("Q one?", ("a",)), Question("Q two?", ("b",)))
    task = Task("two", (Paragraph("P", "text"),), questions)
    env = AtomMemEnv(dataset=ListTaskSource([task]), embedder="hashing")
    obs, _ = env.reset(seed=0)
    assert obs["question"] == "Q1: Q one?\nQ2: Q two?"
    env.step("")
    obs, _, terminated, _, _ = env.step('<answer q="2">b</answer><answer q="3">c</answer>')
    assert not terminated and "there is no question 3" in obs["feedback"]
    _, reward, terminated, _, info = env.step("<answer>wrong</answer>")
    assert terminated and reward == 0.5 and info["answers"] == ("wrong", "b")


def test_paper_chunks_overlap():
    env = tiny_env(chunk_tokens=20, chunk_overlap=5)
    assert env.chunk_overlap == 5
    obs, _ = env.reset(seed=0)
    first = obs["chunk"]
    obs, *_ = env.step("")
    assert first.split()[-1] in obs["chunk"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs(mode):
    kwargs = {"vector_kwargs": {"shared_memory": False}} if mode == "async" else {}
    envs = gym.make_vec("AtomMem/Synthetic-v0", num_envs=2, vectorization_mode=mode, embedder="hashing", **kwargs)
    obs, info = envs.reset(seed=0)
    assert len(obs["chunk"]) == 2 and obs["chunk_index"].shape == (2,)
    finished = 0
    for _ in range(40):
        obs, reward, terminated, truncated, info = envs.step(["<create>note</create>", "<answer>x</answer>"])
        finished += int(np.sum(terminated | truncated))
        assert obs["memory_size"].shape == (2,)
    assert finished >= 2
    envs.close()


def test_sync_vector_envs_share_one_embedder_instance():
    envs = gym.make_vec("AtomMem/Synthetic-v0", num_envs=2, vectorization_mode="sync", embedder="hashing")
    first, second = (e.unwrapped.memory.embedder for e in envs.envs)
    assert first is second
    envs.close()


def test_readme_example_runs_as_written(monkeypatch, hotpot_path):
    import re

    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    example = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "env.step" in block)
    monkeypatch.chdir(REPO)  # the example names ../shared/data relative to the checkout
    shown = []

    def my_policy(obs):
        shown.append(obs["chunk"])
        return "<create>a note</create>" if obs["chunk"] else "<answer>yes</answer>"

    scope = {"my_policy": my_policy}
    exec(example, scope)
    assert scope["terminated"] and len(shown) == scope["info"]["num_chunks"] + 1
    assert scope["info"]["memory_size"] == scope["info"]["num_chunks"]
