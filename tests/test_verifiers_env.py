"""The verifiers environment (issue 22): tasks, failures, and against a real `vllm serve` the same replies and rewards
as `eval.py --endpoint` on the same tasks."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

if os.environ.get("CI"):  # CI installs the [verifiers] extra: a broken install must fail here, not skip
    import verifiers.v1  # noqa: F401
pytest.importorskip("verifiers.v1")
import atommem_verifiers  # noqa: E402
from agents.backends import OpenAIGenerator  # noqa: E402

KWARGS = {"embedder": "hashing", "context_tokens": 300}


def test_tasks_follow_the_split_and_bad_settings_are_refused():
    env = atommem_verifiers.load_environment("AtomMem/SyntheticEasy-v0", num_tasks=3, **KWARGS)
    tasks = list(env.taskset)
    assert [t.data.task_index for t in tasks] == [0, 1, 2]
    assert all(t.data.prompt and t.data.gold_answers and t.data.env_kwargs["split"] == "eval" for t in tasks)
    with pytest.raises(ValueError, match="unknown env id"):
        atommem_verifiers.load_environment("AtomMem/Nope-v0")
    with pytest.raises(ValueError, match="atommem-verifiers: .*data_path"):
        list(atommem_verifiers.load_environment("AtomMem/HotpotQA-v0").taskset)


def test_a_failing_endpoint_fails_its_episode_with_the_reason():
    (task,) = list(atommem_verifiers.load_environment("AtomMem/SyntheticEasy-v0", num_tasks=1, **KWARGS).taskset)
    dead = OpenAIGenerator("http://127.0.0.1:9/v1", "tiny", timeout=5, max_retries=0)
    result = asyncio.run(atommem_verifiers.play_episode(task.data, dead))
    assert "cannot reach" in result["failed"] and result["reward"] == 0.0 and result["replies"] == []


@pytest.mark.xdist_group("vllm_serve")  # one `vllm serve` per worker: its users share one
def test_vf_eval_gives_eval_pys_replies_and_rewards(tmp_path, vllm_serve):
    vf_eval = subprocess.run(
        [sys.executable, "-c", "from verifiers.v1.cli.eval.main import main; main()", "atommem-verifiers",
         "--env.taskset.env-id", "AtomMem/SyntheticEasy-v0", "--env.taskset.env-kwargs", json.dumps(KWARGS),
         "--env.taskset.num-tasks", "2", "-m", "tiny", "--client.base-url", vllm_serve,
         "--client.api-key-var", "OPENAI_API_KEY", "--sampling.max-tokens", "8", "--no-push", "--no-rich",
         "--max-concurrent", "1", "--run.name", "vf", "-o", str(tmp_path / "vf")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OPENAI_API_KEY": "none"})
    assert vf_eval.returncode == 0, (vf_eval.stdout + vf_eval.stderr)[-3000:]
    episodes = [json.loads(line) for line in (tmp_path / "vf" / "vf" / "traces.jsonl").read_text().splitlines()]
    assert len(episodes) == 2 and all(episode["ok"] for episode in episodes), episodes[0].get("errors")
    traces = [episode["traces"][0] for episode in episodes]
    through_verifiers = {trace["task"]["data"]["task_index"]: (trace["info"]["atommem"]["replies"],
                                                              trace["rewards"]["env_reward"]["score"])
                         for trace in traces}

    steps = tmp_path / "steps.jsonl"
    direct = subprocess.run(
        [sys.executable, "eval.py", "--policies", "llm", "--endpoint", vllm_serve, "--model", "tiny", "--env-id",
         "AtomMem/SyntheticEasy-v0", "--embedder", "hashing", "--context-tokens", "300", "--num-episodes", "2",
         "--num-envs", "1", "--max-new-tokens", "8", "--output-dir", str(tmp_path / "report"),
         "--save-trajectories", str(steps)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert direct.returncode == 0, direct.stderr[-3000:]
    lines = [json.loads(line) for line in steps.read_text().splitlines()]
    through_eval = {index: ([line["completion"] for line in lines if line["task_index"] == index],
                            next(line["reward"] for line in lines if line["task_index"] == index)) for index in (0, 1)}
    assert through_verifiers == through_eval
    # The interception recorded every step as its own model call: prime-rl's samples.
    assert [len(trace["calls"]) for trace in traces] == [len(through_verifiers[t["task"]["data"]["task_index"]][0])
                                                        for t in traces]
