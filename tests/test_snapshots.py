"""An episode's state can be taken and put back: the restored env steps exactly as the original would have, in the
same env, in another one, through pickle, and in sync and async vector envs."""

import pickle

import gymnasium as gym
import pytest

import atommem_env  # noqa: F401  (registers the ids)
from atommem_env import AtomMemEnv
from atommem_env.state import EnvState

ATOMMEM = ["<create>fact {i}</create><read>fact {j}</read>", "<scratchpad>note {i}</scratchpad>",
           '<update id="{j}">fact {i} again</update>', '<delete id="{j}"/><answer>x{i}</answer>', "nothing"]
# No <final_answer>: an early one would end the paper episode before the snapshot; the 41-reply cap ends it.
PAPER = ["<add_memory>fact {i}</add_memory><update_query>fact {j}</update_query>", "<update_memory>n{i}</update_memory>",
         "<modify_memory>Memory 1: fact {i}</modify_memory>", "<delete_memory>Memory 2</delete_memory>", "no tags"]


def actions(templates, count):
    return [templates[i % len(templates)].format(i=i, j=max(1, i // 2)) for i in range(count)]


def play(env, acts):
    """What the agent would see and get for each action, up to the episode's end."""
    seen = []
    for action in acts:
        obs, reward, terminated, truncated, info = env.step(action)
        seen.append(({k: str(v) for k, v in obs.items()}, reward, terminated, truncated, info["memory_size"],
                     info["gold_facts_in_memory"], info["stale_facts_in_memory"]))
        if terminated or truncated:
            break
    return seen


@pytest.mark.parametrize("env_id, templates, kwargs", [
    ("AtomMem/SyntheticVolatile-v0", ATOMMEM, {"entry_ids": "random"}),
    ("AtomMem/SyntheticVolatileBudget-v0", ATOMMEM, {}),
    ("AtomMem/Synthetic-Paper-v0", PAPER, {}),
])
def test_a_restored_episode_continues_exactly_as_the_original(env_id, templates, kwargs):
    env = gym.make(env_id, embedder="hashing", **kwargs)
    env.reset(seed=3)
    acts = actions(templates, 80)
    play(env, acts[:7])
    state = env.unwrapped.get_state()
    original = play(env, acts[7:])
    assert len(original) > 3
    assert env.unwrapped.set_state(state)["chunk"] == state.observation["chunk"]
    assert play(env, acts[7:]) == original
    other = gym.make(env_id, embedder="hashing", **kwargs)
    other.reset(seed=11)  # another task: the state brings its own
    other.unwrapped.set_state(pickle.loads(pickle.dumps(state)))
    assert play(other, acts[7:]) == original


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs_take_and_restore_one_state_per_env(mode):
    kwargs = {"vector_kwargs": {"shared_memory": False}} if mode == "async" else {}
    envs = gym.make_vec("AtomMem/SyntheticVolatile-v0", num_envs=2, vectorization_mode=mode, embedder="hashing",
                        **kwargs)
    envs.reset(seed=0)
    acts = actions(ATOMMEM, 12)
    for action in acts[:5]:
        envs.step([action, action])
    states = envs.get_attr("state")
    assert all(isinstance(s, EnvState) for s in states) and states[0].episode["task"] != states[1].episode["task"]

    def run():
        return [[str(v) for v in envs.step([a, a])[0]["retrieved"]] for a in acts[5:9]]

    first = run()
    envs.set_attr("state", list(reversed(states)))  # each env now continues the other's episode
    swapped = run()
    envs.set_attr("state", states)
    assert run() == first and swapped == [list(reversed(row)) for row in first]
    envs.close()


def test_bad_states_are_refused_with_a_reason():
    env = AtomMemEnv(embedder="hashing")
    with pytest.raises(RuntimeError, match="reset"):
        env.get_state()
    env.reset(seed=0)
    state = env.get_state()
    fresh = AtomMemEnv(embedder="hashing")
    with pytest.raises(RuntimeError, match="reset"):
        fresh.set_state(state)
    with pytest.raises(ValueError, match="EnvState"):
        env.set_state({"memory": {}})
    other = AtomMemEnv(embedder="hashing", top_k=3)
    other.reset(seed=0)
    with pytest.raises(ValueError, match="other settings"):
        other.set_state(state)
