"""atommem_trl: the env's operations as TRL GRPOTrainer tools, and examples/trl_grpo.py on a tiny model on CPU."""

from __future__ import annotations

import inspect

import gymnasium as gym
import pytest
import torch

from atommem_trl import INSTRUCTIONS, AtomMemToolEnvironment, make_dataset
from conftest import HOTPOT_HF, run_script_here, run_summary

ENV_ID = "AtomMem/SyntheticEasy-v0"
TOOLS = {"create_memory", "update_memory", "delete_memory", "write_scratchpad", "read_memory", "next_chunk", "answer"}


@pytest.fixture
def tools():
    return AtomMemToolEnvironment(ENV_ID, "train", embedder="hashing", context_tokens=300, chunk_tokens=128)


def test_trl_sees_the_operations_as_tools_with_schemas(tools):
    from transformers.utils import get_json_schema

    # As GRPOTrainer lists them: the class's public functions other than reset and get_reward.
    public = {name for name, _ in inspect.getmembers(type(tools), predicate=inspect.isfunction)
              if not name.startswith("_")}
    assert public - {"reset", "get_reward"} == TOOLS
    schemas = {name: get_json_schema(getattr(tools, name))["function"] for name in TOOLS}
    assert schemas["update_memory"]["parameters"]["properties"]["entry_id"]["type"] == "integer"
    assert schemas["answer"]["parameters"]["required"] == ["text"]
    assert schemas["next_chunk"]["parameters"]["properties"] == {}


def test_a_tool_episode_is_the_gym_episode_and_is_rewarded(tools):
    gym_env = gym.make(ENV_ID, split="train", embedder="hashing", context_tokens=300, chunk_tokens=128)
    first = tools.reset(task_index=3, prompt=[{"role": "user", "content": INSTRUCTIONS}])
    obs, _ = gym_env.reset(options={"task_index": 3})
    assert obs["chunk"] in first and obs["question"] in first
    assert tools.get_reward() == 0.0

    assert tools.create_memory(obs["chunk"][:80]).startswith("queued <create>")
    assert tools.write_scratchpad("plan").startswith("queued <scratchpad>")
    shown = tools.read_memory(obs["chunk"][:40])
    gym_obs, *_ = gym_env.step(f"<create>{obs['chunk'][:80]}</create><scratchpad>plan</scratchpad>"
                               f"<read>{obs['chunk'][:40]}</read>")
    assert gym_obs["retrieved"] in shown and "created entry 1" in shown and "Scratchpad: plan" in shown
    assert "Chunk" not in shown  # the chunk stays (a Read step): not shown again
    while tools._reading:
        moved = tools.next_chunk()
        gym_obs, *_ = gym_env.step("")
        assert (gym_obs["chunk"] or "All chunks are read") in moved
    gold = gym_env.unwrapped.task.questions[0].answers[0]
    assert gym_env.unwrapped.task.questions == tools._env.unwrapped.task.questions
    assert "reward 1.0" in tools.answer(gold)
    assert tools.get_reward() == 1.0
    # The next rollout reuses the instance (TRL's pool): reset starts afresh.
    tools.reset(task_index=4)
    assert tools.get_reward() == 0.0 and len(tools._env.unwrapped.memory) == 0


def test_bad_tool_input_is_an_error_line_and_the_episode_goes_on(tools):
    tools.reset(task_index=0)
    assert tools.update_memory("three", "x") == "error: entry_id must be a whole number, got 'three'"
    assert tools.delete_memory(True) == "error: entry_id must be a whole number, got True"
    assert tools.create_memory("a </create> b").startswith("error: text 'a </create> b' contains </create>")
    assert tools.read_memory("q </read>").startswith("error: text")
    assert tools.answer("x", question=0).startswith("error: question must be a question number")
    assert tools.update_memory("7", "x").startswith('queued <update id="7">')  # digits as text are an id
    shown = tools.next_chunk()
    assert "error: update: " in shown and "7" in shown  # the env's own error line for an unknown id
    assert "error: answer: answers are accepted after the last chunk" in tools.answer("early")
    while tools._reading:
        tools.next_chunk()
    assert tools.next_chunk() == "error: all chunks are read: call answer"
    tools.answer("wrong")
    assert tools.get_reward() == 0.0
    for call in (lambda: tools.create_memory("late"), tools.next_chunk, lambda: tools.answer("again")):
        assert call() == "error: the episode has ended (reward 0.0); nothing was done"


def test_bad_settings_fail_when_the_factory_is_made():
    with pytest.raises(ValueError, match="atommem protocol's operations"):
        AtomMemToolEnvironment.factory(ENV_ID, "train", embedder="hashing", protocol="paper")
    with pytest.raises(ValueError, match="unknown env id"):
        AtomMemToolEnvironment.factory("AtomMem/Nope-v0")
    factory = AtomMemToolEnvironment.factory(ENV_ID, "train", embedder="hashing")
    with pytest.raises(ValueError, match="positive integer"):
        make_dataset(factory, 0)
    rows = make_dataset(factory, 3)
    assert rows["task_index"] == [0, 1, 2] and rows["prompt"][0] == [{"role": "user", "content": INSTRUCTIONS}]


def test_make_dataset_refuses_more_tasks_than_the_split_has():
    factory = AtomMemToolEnvironment.factory("AtomMem/HotpotQA-v0", "eval", embedder="hashing",
                                             data_path=str(HOTPOT_HF))
    with pytest.raises(ValueError, match="more than the"):
        make_dataset(factory, 10_000)


def test_example_bad_flags_fail_clearly():
    result = run_script_here("examples/trl_grpo.py", "--env-kwargs", "[1]")
    assert result.returncode != 0 and "--env-kwargs must be a JSON object" in result.stderr
    result = run_script_here("examples/trl_grpo.py", "--num-generations", "3")
    assert result.returncode != 0 and "multiple of --num-generations" in result.stderr
    result = run_script_here("examples/trl_grpo.py", "--chat-template", "nope", "--num-tasks", "2")
    assert result.returncode != 0 and "TRL has no chat template 'nope'" in result.stderr
    result = run_script_here("examples/trl_grpo.py", "--model", "./no/such/model", "--num-tasks", "2")
    assert result.returncode != 0 and "model path not found" in result.stderr
    # The tiny model's own ChatML template renders no tool calls: TRL refuses it, the script says what to do.
    result = run_script_here("examples/trl_grpo.py", "--model", "tiny", "--num-tasks", "2", "--cpu")
    assert result.returncode != 0 and "does not support tool calling" in result.stderr
    assert "--chat-template NAME" in result.stderr


@pytest.fixture(scope="module")
def tool_calling_tiny_model(tmp_path_factory):
    """A tiny Mistral on the tiny tokenizer, taught (a few seconds of cross-entropy) to answer with a next_chunk
    tool call in the Qwen3 format: random weights call no tool, and the trainer's tool loop would go untested. Its
    64-token attention window makes training on prompt ends enough for the ~2.5k-token prompts GRPOTrainer builds."""
    from transformers import MistralConfig, MistralForCausalLM
    from trl.chat_template_utils import qwen3_chat_template

    from agents.models import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny")
    tokenizer.chat_template = qwen3_chat_template
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=64, max_position_embeddings=8192, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    tools = AtomMemToolEnvironment(ENV_ID, "train", embedder="hashing")
    schema_tools = [getattr(tools, name) for name, _ in inspect.getmembers(type(tools), inspect.isfunction)
                    if name in TOOLS]  # in GRPOTrainer's order: its prompts list them in the system turn
    call = {"type": "function", "function": {"name": "next_chunk", "arguments": {}}}
    reply = tokenizer('<tool_call>\n{"name": "next_chunk", "arguments": {}}\n</tool_call><|im_end|>',
                      add_special_tokens=False)["input_ids"]
    examples = []
    for task_index in range(2):  # the first prompt, and the prompt after a tool result
        messages = [{"role": "user", "content": INSTRUCTIONS + tools.reset(task_index=task_index)}]
        for _ in range(2):
            ids = tokenizer.apply_chat_template(messages, tools=schema_tools, add_generation_prompt=True,
                                                tokenize=True)["input_ids"][-72:]
            examples.append((torch.tensor([ids + reply]), torch.tensor([[-100] * len(ids) + reply])))
            messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "name": "next_chunk", "content": tools.next_chunk()}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(250):
        input_ids, labels = examples[step % len(examples)]
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("tool-calling-tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_example_trains_through_the_tools_on_cpu(tool_calling_tiny_model, tmp_path):
    result = run_script_here("examples/trl_grpo.py", "--model", str(tool_calling_tiny_model), "--num-tasks", "2",
                             "--max-steps", "2", "--num-generations", "2", "--per-device-train-batch-size", "2",
                             "--max-completion-length", "512", "--max-tool-calling-iterations", "3", "--cpu",
                             "--save-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run, summary = run_summary(tmp_path)
    steps = [entry for entry in summary["log_history"] if "loss" in entry]
    assert len(steps) == 2
    # Rollouts called the env's tools (the trained-in next_chunk), and none failed: the calls reached the env.
    assert all(entry["tools/call_frequency"] > 0 for entry in steps)
    assert all(entry["tools/failure_frequency"] == 0 for entry in steps)
    assert "rewards/AtomMemToolEnvironment/mean" in steps[0]
    assert (run / "checkpoint" / "model.safetensors").is_file() and list(run.rglob("events.out.tfevents.*"))
