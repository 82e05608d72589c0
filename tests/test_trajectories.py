"""Step-wise trajectories (issue 22): eval.py --save-trajectories, train_grpo.py's, the loader, token in / token out."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_script_here

from agents.models import load_causal_lm
from agents.prompt import chat_prompt_ids
from agents.training import CompletionScorer
from agents.trajectories import load_trajectories, read_trajectories


def _eval(tmp_path, *flags):
    cmd = [sys.executable, "eval.py", "--env-id", "AtomMem/SyntheticEasy-v0", "--embedder", "hashing",
           "--num-episodes", "2", "--num-envs", "2", "--context-tokens", "300", "--max-new-tokens", "8",
           "--model", "tiny", "--dtype", "float32", "--output-dir", str(tmp_path / "report"), *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def eval_steps(tmp_path_factory):
    """eval.py on the tiny model (sampling at temperature 1) and the oracle, with --save-trajectories."""
    tmp_path = tmp_path_factory.mktemp("trajectories")
    path = tmp_path / "steps.jsonl"
    result = _eval(tmp_path, "--policies", "llm", "oracle", "--temperature", "1.0", "--save-trajectories", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "eval.json").read_text())["results"]
    return path, read_trajectories(str(path)), report


def test_eval_writes_one_line_per_step_with_the_episodes_outcome(eval_steps):
    _, lines, report = eval_steps
    for policy in ("llm", "oracle"):
        for record in report[policy]["300"]["records"]:
            steps = [line for line in lines if line["episode_id"] == f"{policy}/300/{record['task_index']}"]
            assert [line["step"] for line in steps] == list(range(record["num_steps"]))
            assert [line["is_last_step"] for line in steps] == [False] * (len(steps) - 1) + [True]
            assert {(line["task_id"], line["reward"], line["em"], line["policy"], line["cell"]) for line in steps} == {
                (record["task_id"], record["reward"], record["em"], policy, "300")}
    oracle = [line for line in lines if line["policy"] == "oracle"]
    creates = [line for line in oracle if any(op["op"] == "create" for op in line["ops"])]
    assert creates and all("created entry" in line["feedback"] for line in creates)
    assert all(line["prompt_token_ids"] == [] and line["logprobs"] is None for line in oracle)  # no sampler


def test_llm_steps_keep_the_samplers_tokens_and_logprobs(eval_steps):
    """Token in, token out on the transformers path: the logged ids decode to the logged text, the prompt ids are
    the chat template's, and the log-probs are the model's for those very ids, also where the text would
    tokenise differently."""
    _, lines, _ = eval_steps
    model, tokenizer = load_causal_lm("tiny", device="cpu", dtype="float32")
    llm = [line for line in lines if line["policy"] == "llm"]
    differs = []
    for line in llm:
        assert line["prompt_token_ids"] == chat_prompt_ids(tokenizer, line["messages"])
        assert tokenizer.decode(line["completion_token_ids"], skip_special_tokens=True) == line["completion"]
        assert len(line["logprobs"]) == len(line["completion_token_ids"]) > 0
        sampled = [t for t in line["completion_token_ids"] if t != tokenizer.eos_token_id]
        if tokenizer.encode(line["completion"], add_special_tokens=False) != sampled:
            differs.append(line)
    assert differs  # temperature-1 samples of a random tiny model: some do not survive decode -> encode
    saved = [line for line in llm if line in differs]
    from agents.training import pack

    batch = pack([line["prompt_token_ids"] for line in saved], [line["completion_token_ids"] for line in saved], 0)
    with torch.no_grad():
        logprobs, _, _ = CompletionScorer(model)(**batch, temperature=1.0)
    for row, line in enumerate(saved):
        n = len(line["logprobs"])
        assert torch.allclose(logprobs[row, :n], torch.tensor(line["logprobs"]), atol=1e-4)


def test_the_loader_gives_per_sample_tensors(eval_steps):
    path, lines, _ = eval_steps
    sampled = [line for line in lines if line["completion_token_ids"]]
    loaded = load_trajectories(str(path), pad_id=0)
    assert loaded["targets"].shape[0] == len(sampled) == len(loaded["lines"])
    for row, line in enumerate(sampled):
        n = len(line["completion_token_ids"])
        assert loaded["targets"][row, :n].tolist() == line["completion_token_ids"]
        assert int(loaded["target_mask"][row].sum()) == n
        assert loaded["sampler_logprobs"][row, :n].tolist() == pytest.approx(line["logprobs"])
        assert float(loaded["rewards"][row]) == line["reward"]
    assert bool(loaded["has_logprobs"].all())


def test_the_loader_says_which_line_is_broken(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"episode_id": "a", "step": 0, "prompt_token_ids": [1], "completion_token_ids": [2], "reward": 1}\n'
                   "{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        read_trajectories(str(bad))
    bad.write_text('{"episode_id": "a", "step": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a trajectory line without \['prompt_token_ids'"):
        read_trajectories(str(bad))
    bad.write_text('{"episode_id": "a", "step": 0, "prompt_token_ids": [], "completion_token_ids": [], "reward": 0}\n')
    with pytest.raises(ValueError, match="no step with sampled tokens"):
        load_trajectories(str(bad))


@pytest.mark.parametrize("script", ["eval.py", "train_grpo.py"])
def test_an_unwritable_trajectory_path_fails_before_any_episode(tmp_path, script):
    for target, message in ((tmp_path / "missing" / "steps.jsonl", "cannot write trajectories"),
                            (tmp_path, "is a directory")):
        result = run_script_here(script, "--save-trajectories", str(target), "--model", "tiny")
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "episodes" not in result.stderr
