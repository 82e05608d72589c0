"""GRPO on AtomMem with TRL's GRPOTrainer: the env's CRUD operations as tools (atommem_trl; docs/verifiers.md).

    pip install -e ".[trl]"
    python examples/trl_grpo.py --model Qwen/Qwen3-0.6B --max-steps 100
    # CPU smoke run on the built-in tiny model (random weights, so it rarely calls a tool):
    python examples/trl_grpo.py --model tiny --chat-template qwen3 --max-steps 2 --max-completion-length 256
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import tyro


@dataclass
class Args:
    model: str = "Qwen/Qwen3-0.6B"
    """the policy: a Hugging Face id, a local path, or a built-in ("tiny", "smollm2"); its chat template must
    render tool calls"""
    chat_template: str | None = None
    """use one of TRL's chat templates by name (e.g. qwen3) instead of the tokenizer's own, for tokenizers whose
    template cannot render tool calls (the tiny model's)"""
    env_id: str = "AtomMem/SyntheticEasy-v0"
    """a registered AtomMem id of the atommem protocol"""
    env_kwargs: str = '{"embedder": "hashing"}'
    """gym.make keyword arguments over the id's registered ones, as JSON"""
    num_tasks: int = 64
    """training tasks: 0..N-1 of the train split"""
    exp_name: str = "trl_grpo"
    """the experiment's name in the run name"""
    seed: int = 1
    """the trainer's seed"""
    max_steps: int = 100
    """optimizer steps"""
    num_generations: int = 4
    """the GRPO group: rollouts per task"""
    per_device_train_batch_size: int = 4
    """rollouts per device and step (a multiple of num_generations)"""
    max_completion_length: int = 2048
    """tokens of a rollout's turns and tool results together (earlier chunks stay in the conversation)"""
    max_tool_calling_iterations: int = 24
    """tool-calling rounds per rollout"""
    learning_rate: float = 1e-6
    """AdamW's learning rate"""
    bf16: bool = False
    """train in bf16 (only where the hardware has it)"""
    cpu: bool = False
    """train on the CPU even where a GPU is found"""
    save_dir: str = "runs"
    """where the run's folder goes: TensorBoard events, checkpoint/, summary.json (TRL's log history)"""


def tool_chat_template(name: str) -> str:
    import trl.chat_template_utils as templates

    template = getattr(templates, f"{name}_chat_template", None)
    if not isinstance(template, str):
        raise SystemExit(f"error: TRL has no chat template {name!r}")
    return template


def main(args: Args) -> str:
    try:
        env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: --env-kwargs is not JSON: {err}") from None
    if not isinstance(env_kwargs, dict):
        raise SystemExit("error: --env-kwargs must be a JSON object")
    if args.per_device_train_batch_size % args.num_generations:
        raise SystemExit("error: --per-device-train-batch-size must be a multiple of --num-generations")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from agents.models import load_causal_lm
    from atommem_trl import AtomMemToolEnvironment, make_dataset
    from trl import GRPOConfig, GRPOTrainer

    try:
        factory = AtomMemToolEnvironment.factory(args.env_id, split="train", **env_kwargs)
        dataset = make_dataset(factory, args.num_tasks)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None
    template = tool_chat_template(args.chat_template) if args.chat_template else None
    try:
        model, tokenizer = load_causal_lm(args.model, trainable=True, device="cpu" if args.cpu else "auto",
                                          dtype="bfloat16" if args.bf16 else "float32")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.padding_side = "left"
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.save_dir, run_name)
    config = GRPOConfig(
        output_dir=run_dir, report_to="tensorboard", seed=args.seed,
        max_steps=args.max_steps, num_generations=args.num_generations, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size, bf16=args.bf16, logging_steps=1,
        max_completion_length=args.max_completion_length, max_tool_calling_iterations=args.max_tool_calling_iterations,
        save_strategy="no", use_cpu=args.cpu)
    try:
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=dataset,
                              environment_factory=factory)
    except ValueError as err:  # a chat template that cannot render tool calls, or no response parser for it
        raise SystemExit(f"error: {err} (--chat-template NAME uses one of TRL's)") from None
    trainer.train()
    trainer.save_model(os.path.join(run_dir, "checkpoint"))
    with open(os.path.join(run_dir, "summary.json"), "w") as file:
        json.dump({"args": vars(args), "log_history": trainer.state.log_history}, file, indent=1)
    print(f"run: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
