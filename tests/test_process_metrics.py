"""Process metrics: at every step the env says how many gold and stale facts memory holds and what the Reads showed
of the gold ones; eval reports keep them per step, and study/plot_process.py draws them per chunk."""

import json

import gymnasium as gym
import pytest

from conftest import run_script_here

import atommem_env  # noqa: F401  (registers the ids)
from agents import make_policy
from agents.evaluation import make_env_kwargs, make_vector_env, run_episodes, summarize

VOLATILE = "AtomMem/SyntheticVolatile-v0"


def test_each_step_counts_the_facts_memory_holds_and_the_reads_show():
    env = gym.make(VOLATILE, embedder="hashing", split="train")
    _, info = env.reset(seed=2)
    facts = [f for q in env.unwrapped.task.questions for f in q.supporting_facts]
    gold = [f for f in facts if f.current]
    stale = [f for f in facts if not f.current]
    assert stale and info["gold_facts"] == len(gold) and info["gold_facts_in_memory"] == 0
    assert info["read_recall"] is None  # nothing shown yet
    _, _, _, _, info = env.step(f"<create>Note: {gold[0].text.upper()}</create><create>{stale[0].text}</create>")
    assert info["gold_facts_in_memory"] == 1 and info["stale_facts_in_memory"] == 1  # case and framing aside
    entry = int(info["memory_size"])  # ids 1 and 2: the stale one is entry 2
    _, _, _, _, info = env.step(f'<update id="{entry}">{gold[-1].text}</update><read>{gold[0].text}</read>')
    assert info["stale_facts_in_memory"] == 0 and info["gold_facts_in_memory"] == min(2, len(gold))
    assert 0 < info["read_recall"] <= 1
    _, _, _, _, info = env.step('<delete id="1"/>')
    assert info["gold_facts_in_memory"] == (1 if len(gold) > 1 else 0) and info["read_recall"] is None
    env.close()


@pytest.mark.parametrize("enabled_ops, stale_left", [(None, False), (("create", "read", "scratchpad"), True)])
def test_updates_leave_no_stale_fact_and_the_report_keeps_each_step(enabled_ops, stale_left):
    extra = {"enabled_ops": enabled_ops} if enabled_ops else {}
    kwargs = make_env_kwargs(VOLATILE, split="eval", embedder="hashing", context_tokens=1200, chunk_tokens=256,
                             extra=extra)
    envs = make_vector_env(VOLATILE, kwargs, 2)
    records = run_episodes(envs, make_policy("oracle", enabled_ops=enabled_ops), [[0, 2], [1, 3]], seed=0)
    envs.close()
    summary = summarize(records)
    assert summary["em"] == 1.0
    for record in records:
        assert record["gold_facts_in_memory"] == record["gold_facts"] > 0
        assert len(record["by_step"]) == record["num_steps"]
        assert [c for c, *_ in record["by_step"]] == sorted(c for c, *_ in record["by_step"])
    assert (summary["process"]["stale_facts_in_memory"] > 0) == stale_left
    assert summary["process"]["read_recall"] == pytest.approx(1.0)  # the oracle Reads with the question: all shown


def test_the_per_chunk_plot_reads_a_report_and_refuses_an_old_one(tmp_path):
    kwargs = make_env_kwargs(VOLATILE, split="eval", embedder="hashing", context_tokens=1200, chunk_tokens=256)
    envs = make_vector_env(VOLATILE, kwargs, 2)
    summary = summarize(run_episodes(envs, make_policy("oracle", enabled_ops=("create", "read")), [[0], [1]], 0))
    envs.close()
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"args": {}, "results": {"oracle": {"1200": summary}}}))
    result = run_script_here("study/plot_process.py", "--reports", str(report), "--out", str(tmp_path / "p.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "p.png").stat().st_size > 0 and "eval: oracle 1200: " in result.stdout and "stale" in result.stdout
    for record in summary["records"]:
        del record["by_step"]
    report.write_text(json.dumps({"args": {}, "results": {"oracle": {"1200": summary}}}))
    result = run_script_here("study/plot_process.py", "--reports", str(report), "--out", str(tmp_path / "q.png"))
    assert result.returncode != 0 and "predates eval.py's process metrics" in result.stderr
