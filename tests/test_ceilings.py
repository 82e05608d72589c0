"""The volatile-budget setting can show its claim: only a policy that Updates keeps the current fact (study/ceilings.py,
the table in docs/study.md)."""

import importlib.util
import re
import sys

import gymnasium as gym
import numpy as np
import pytest

from conftest import REPO, run_script_here

import atommem_env  # noqa: F401  (registers the ids)

_spec = importlib.util.spec_from_file_location("ceilings", REPO / "study" / "ceilings.py")
ceilings = importlib.util.module_from_spec(_spec)
sys.modules["ceilings"] = ceilings  # its dataclasses look their module up
_spec.loader.exec_module(ceilings)

ID = "AtomMem/SyntheticVolatileBudget-v0"


def created(obs) -> int:
    return int(re.search(r"created entry (\d+)", obs["feedback"])[1])


@pytest.fixture(scope="module")
def table():
    args = ceilings.Args(num_episodes=32, num_envs=4,
                         columns=("registered", "no entry budget, sequential ids", "no scratchpad limit"))
    return ceilings.ceilings(args)


def test_only_the_crud_probe_keeps_the_current_fact(table):
    registered = table["registered"]
    assert registered["crud"] == 1.0
    assert set(registered) == set(ceilings.PROBES)
    assert max(em for probe, em in registered.items() if probe != "crud") <= 0.6, registered


def test_each_constraint_lifted_lets_a_write_once_probe_through(table):
    # Id order, or a stamp, tells the latest statement, as far as a top-6 Read shows them all (up to 8 are stored).
    assert table["no entry budget, sequential ids"]["append-id"] >= 0.9
    assert table["no entry budget, sequential ids"]["append-stamped"] >= 0.9
    assert table["no scratchpad limit"]["scratchpad"] == 1.0  # the scratchpad is an updatable memory
    assert table["no scratchpad limit"]["crud"] == 1.0


def test_the_setting_is_what_its_spec_says():
    env = gym.make(ID, embedder="hashing", split="train")
    _, info = env.reset(seed=3)
    task = env.unwrapped.task
    (question,) = task.questions
    facts = question.supporting_facts
    assert 2 <= len(facts) <= 8 and len({f.key for f in facts}) == 1 and [f.current for f in facts][-1]
    relation, entity = ceilings.asked_fact(question.question)
    assert all(f.text == relation.statement.format(s=entity, o=ceilings.statement_values(f.text, relation, entity)[0])
               for f in facts)  # every change worded as the first statement
    obs, *_ = env.step("<create>one</create>")
    first = created(obs)
    obs, *_ = env.step("<create>two</create><scratchpad>123456</scratchpad>")
    assert "memory is full (1 of 1 entries)" in obs["feedback"] and "limit is 5" in obs["feedback"]
    env.reset(seed=4)
    obs, *_ = env.step("<create>one</create>")
    assert created(obs) != first and first != 1  # random ids, drawn per episode
    env.close()


def test_random_ids_are_unique_reproducible_and_never_reused():
    from atommem_env import AtomMemEnv

    def ids(seed):
        env = AtomMemEnv(embedder="hashing", entry_ids="random")
        env.reset(seed=seed)
        made = []
        for text in ("a", "b", "c"):
            obs, *_ = env.step(f"<create>{text}</create>")
            made.append(created(obs))
        env.step(f'<delete id="{made[0]}"/>')
        obs, *_ = env.step("<create>d</create>")
        return made + [created(obs)]

    assert ids(0) == ids(0) and ids(0) != ids(1)
    assert len(set(ids(0))) == 4 and all(0 < i < 1_000_000 for i in ids(0))
    with pytest.raises(ValueError, match="entry_ids"):
        AtomMemEnv(embedder="hashing", entry_ids="shuffled")


def test_the_write_once_rule_is_bayes_optimal_on_small_cases():
    # One chunk: writing there keeps the last statement for sure.
    assert ceilings.write_value(1, 2, 3)[(0, 2)][0] == pytest.approx(1.0)
    # Two chunks, exactly two statements: P(both in chunk 1) = 1/4; seeing one in chunk 1, the other is in chunk 2.
    now, wait = ceilings.write_value(2, 2, 2)[(0, 1)]
    assert now == pytest.approx(0.0) and wait == pytest.approx(1.0)
    # Against a simulation of the same model, following the rule's table.
    rng, n, lo, hi, wins, trials = np.random.default_rng(0), 6, 2, 5, 0, 20_000
    table = ceilings.write_value(n, lo, hi)
    for _ in range(trials):
        chunks = np.bincount(rng.integers(n, size=rng.integers(lo, hi + 1)), minlength=n)
        seen, written = 0, None
        for c in np.flatnonzero(chunks):
            seen += chunks[c]
            if written is None:
                now, wait = table[(int(c), int(seen))]
                written = "last" if now >= wait else None
            else:
                written = "stale"
        wins += written == "last"
    assert abs(wins / trials - ceilings.optimal_success(n, lo, hi)) < 0.015
    assert 0.4 < ceilings.optimal_success(9, 2, 8) < 0.6  # the registered setting's ~9 chunks


def test_the_probes_refuse_what_they_cannot_read():
    with pytest.raises(ValueError, match="one-hop"):
        ceilings.asked_fact("What is the country that contains the city where Bo Ra was born?")
    with pytest.raises(ValueError, match="unknown probe"):
        ceilings.Probe("oracle")
    for flags, message in [(["--env-id", "AtomMem/HotpotQA-v0"], "synthetic id"), (["--probes", "nope"], "unknown"),
                           (["--num-episodes", "0"], "positive"), (["--out", "/nonexistent/x.json"], "no directory")]:
        result = run_script_here("study/ceilings.py", *flags)
        assert result.returncode != 0 and message in result.stderr, (flags, result.stderr[-300:])
