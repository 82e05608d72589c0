"""Step-wise trajectories on disk: one JSON line per policy step, a layout any RL stack can read.

AtomMem's episodes are not one growing conversation: every chunk is a fresh prompt (the memory carries
the state), so one episode is several training samples that share one reward. `eval.py
--save-trajectories` and `train_grpo.py --save-trajectories` write each step as a line:

    episode_id, task_id, task_index, step, is_last_step, messages, completion, prompt_token_ids,
    completion_token_ids, logprobs, ops, parse_errors, feedback, reward, em, error
    (+ whatever the writer adds: policy and cell in eval.py; iteration, group_id, advantage, weight in GRPO)

Token ids are the sampler's own (transformers' decoding loop, the vLLM engine, or an endpoint's
`return_token_ids`), never a re-tokenisation of the text; `logprobs` are the sampler's per completion
token (temperature applied), null where the backend gave none. docs/trajectories.md maps the fields to
SkyRL's step-wise and verl's agent-loop records; `load_trajectories` reads a file back into tensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import IO, Callable

import torch

from atommem_env.protocols import OP_NAMES, parse_action

from .training import StepSample, pack, padded


def open_trajectories(path: str | None) -> IO[str] | None:
    """PATH opened for writing (emptied), so that an unwritable path fails before any episode runs; None: no file."""
    if path is None:
        return None
    if Path(path).is_dir():
        raise ValueError(f"--save-trajectories {path} is a directory; give a .jsonl file path")
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot write trajectories to {path}: {err.strerror or err}") from err


def step_records(record: dict, protocol: str, episode_id: str, **extra) -> list[dict]:
    """The lines of one episode record of `run_episodes(..., keep_steps=True)`, in step order.

    `feedback` is what came back after the step: the next observation's feedback, or the episode's last.
    """
    steps = record["steps"]
    feedback = [str(obs["feedback"]) for obs, _ in steps[1:]] + [record.get("final_feedback", "")]
    lines = []
    for number, ((_, output), came_back) in enumerate(zip(steps, feedback)):
        generation = output.generation
        parsed = parse_action(output.text, protocol)
        lines.append({
            "episode_id": episode_id, "task_id": record["task_id"], "task_index": record["task_index"],
            "step": number, "is_last_step": number == len(steps) - 1, "messages": output.messages,
            "completion": output.text,
            "prompt_token_ids": list(generation.prompt_ids) if generation else [],
            "completion_token_ids": list(generation.completion_ids) if generation else [],
            "logprobs": list(generation.logprobs) if generation and generation.logprobs else None,
            "ops": [{"op": OP_NAMES[type(op)], **asdict(op)} for op in parsed.ops],
            "parse_errors": parsed.errors, "feedback": came_back, "reward": record["reward"], "em": record["em"],
            "error": output.error, **extra,
        })
    return lines


def grpo_step_fields(episode: int, iteration: int, group_size: int, rewards, advantages, weights) -> dict:
    """What train_grpo.py --save-trajectories adds to a rollout step: the reward its advantage came from replaces the
    env's."""
    return {"iteration": iteration, "group_id": f"{iteration}/{episode // group_size}",
            "advantage": float(advantages[episode]), "weight": weights[episode], "reward": float(rewards[episode])}


def write_lines(file: IO[str], lines: list[dict]) -> None:
    for line in lines:
        file.write(json.dumps(line, ensure_ascii=False) + "\n")
    file.flush()


def write_episodes(file: IO[str], records: list[dict], protocol: str, episode_id: Callable[[dict], str],
                   extra: Callable[[dict], dict] = lambda record: {}) -> None:
    """Writes the steps of `records` (with "steps"), in task order, as JSON lines."""
    write_lines(file, [line for record in sorted(records, key=lambda r: r["task_index"])
                       for line in step_records(record, protocol, episode_id(record), **extra(record))])


def read_trajectories(path: str) -> list[dict]:
    """The lines of a trajectory file, each checked for the fields a trainer needs."""
    required = ("episode_id", "step", "prompt_token_ids", "completion_token_ids", "reward")
    lines = []
    with open(path, encoding="utf-8") as file:
        for number, text in enumerate(file, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
            missing = [key for key in required if key not in line]
            if missing:
                raise ValueError(f"{path}:{number}: a trajectory line without {missing}")
            lines.append(line)
    return lines


def step_samples(lines: list[dict]) -> list[StepSample]:
    """Lines with sampled tokens as the StepSamples train_grpo.py trains on (episode: index of its episode_id in
    order of first appearance; advantage and weight where the file has them, else 0 and 1)."""
    episodes: dict[str, int] = {}
    return [StepSample(line["prompt_token_ids"], line["completion_token_ids"], line["logprobs"] or [],
                       episodes.setdefault(line["episode_id"], len(episodes)), float(line.get("advantage", 0.0)),
                       float(line.get("weight", 1.0))) for line in lines]


def load_trajectories(path: str, pad_id: int = 0) -> dict:
    """A trajectory file as per-sample tensors, one row per step with sampled tokens.

    Returns `pack`'s left-padded input_ids, attention_mask, position_ids, targets and target_mask (the completion
    tokens), plus sampler_logprobs (batch, completion width; zeros where the file has none, has_logprobs says
    which rows have them), advantages, weights, rewards and episode (index of the row's episode), and `lines`.
    """
    lines = [line for line in read_trajectories(path) if line["completion_token_ids"]]
    samples = step_samples(lines)
    if not samples:
        raise ValueError(f"{path}: no step with sampled tokens")
    batch = pack([s.prompt_ids for s in samples], [s.completion_ids for s in samples], pad_id)
    logprobs = padded([s.sampler_logprobs for s in samples], torch.zeros(batch["targets"].shape))
    return {**batch, "sampler_logprobs": logprobs,
            "has_logprobs": torch.tensor([bool(s.sampler_logprobs) for s in samples]),
            "advantages": torch.tensor([s.advantage for s in samples]),
            "weights": torch.tensor([s.weight for s in samples]),
            "rewards": torch.tensor([float(line["reward"]) for line in lines]),
            "episode": torch.tensor([s.episode for s in samples]), "lines": lines}
