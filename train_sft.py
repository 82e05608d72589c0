# Supervised fine-tuning of a memory policy: docs/train_sft.md
"""SFT on teacher trajectories: every chunk step is one (prompt, action) sample; loss on the action only.

    python train_sft.py                                         # tiny model, oracle teacher, CPU, minutes
    python train_sft.py --model smollm2 --lora-r 16 --gradient-checkpointing
    accelerate launch train_sft.py --model Qwen/Qwen3-8B --lora-r 64 ...   # docs/train_sft.md: paper settings
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro
from accelerate import Accelerator
from torch.utils.tensorboard import SummaryWriter

import atommem_env
from agents import build_messages, make_generator, make_policy, unbatch
from agents.backends import chat_prompt_ids, truncate_middle
from agents.training import (base_model_of, check_env_args, completion_logits, env_kwargs_for, evaluate_and_log,
                             hparams_table, load_trainer_state, peak_memory_mb, save_checkpoint, setup_model)
from atommem_env.wrappers import TaskSchedule


@dataclass
class Args:
    exp_name: str = "sft"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    env_id: str = "AtomMem/SyntheticToy-v0"
    """the env id (teacher rollouts use its train split, evaluation its eval split)"""
    data_path: str | None = None
    """dataset file for the HotpotQA / 2Wiki / MuSiQue ids"""
    context_tokens: int = 400
    """document length of training episodes"""
    chunk_tokens: int = 256
    """chunk size of training and evaluation episodes"""
    embedder: str = "hashing"
    """memory embedder of the envs"""
    teacher: str = "oracle"
    """policy that writes the trajectories (any agents policy name)"""
    teacher_model: str = "smollm2"
    """reader/LLM for a teacher that needs one"""
    trajectories: str | None = None
    """JSONL of recorded samples ({"messages": [...], "completion": "..."} per line) to train on instead"""
    save_trajectories: str | None = None
    """write the collected samples to this JSONL file"""
    num_train_episodes: int = 256
    """teacher episodes to collect"""
    only_successful: bool = True
    """keep only teacher episodes that scored EM 1"""
    num_envs: int = 8
    """vector envs for teacher rollouts and evaluation"""
    model: str = "tiny"
    """model to train: a HF id or path, 'smollm2' or 'tiny'"""
    gguf_file: str | None = None
    """GGUF file inside --model, if it is one"""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights"""
    lora_alpha: int = 32
    """LoRA alpha"""
    lora_dropout: float = 0.0
    """LoRA dropout"""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """modules LoRA adapts"""
    learning_rate: float = 2e-3
    """peak learning rate (tiny model; use ~1e-5 full / 1e-4 LoRA for real models)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.05
    """fraction of steps with linear warm-up; then linear decay to 0"""
    num_epochs: int = 6
    """passes over the samples"""
    batch_size: int = 8
    """samples per micro-batch (per device)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_seq_len: int = 1024
    """prompt + completion tokens; longer prompts are cut in the middle"""
    max_completion_tokens: int = 128
    """longer teacher actions are cut (and counted)"""
    gradient_checkpointing: bool = False
    """trade compute for memory"""
    bf16: bool | None = None
    """bf16 mixed precision (default: on where the GPU supports it)"""
    eval_every: int = 200
    """optimizer steps between evaluations through the env (0: only at the end)"""
    eval_episodes: int = 32
    """held-out episodes per evaluation and context length"""
    eval_context_tokens: tuple[int, ...] = (400, 800)
    """context lengths to evaluate at"""
    eval_max_new_tokens: int = 96
    """generation budget per step during evaluation"""
    save_dir: str = "runs"
    """runs/<run name>/ gets TensorBoard logs and checkpoint/"""
    resume: str | None = None
    """a checkpoint directory to continue from (model, optimizer, scheduler, step)"""
    device: str = "auto"
    """torch device (accelerate picks it under accelerate launch)"""


def collect_teacher_samples(args: Args) -> tuple[list[dict], dict]:
    """Runs the teacher on train-split tasks 0..N-1; one sample per step of every kept episode."""
    kwargs = env_kwargs_for(args, "train", args.context_tokens)
    protocol = atommem_env.ENV_IDS[args.env_id].get("protocol", "atommem")
    n = min(args.num_envs, args.num_train_episodes)
    schedules = [list(range(i, args.num_train_episodes, n)) for i in range(n)]
    envs = gym.vector.SyncVectorEnv([lambda s=s: TaskSchedule(gym.make(args.env_id, **kwargs), s) for s in schedules])
    needs_model = args.teacher not in ("oracle", "random", "noop")
    teacher = make_policy(args.teacher, protocol=protocol, seed=args.seed,
                          generator=make_generator(args.teacher_model, device="cpu") if needs_model else None)
    obs, _ = envs.reset(seed=args.seed)
    running: list[list[dict]] = [[] for _ in range(n)]
    remaining = [len(s) for s in schedules]
    samples, ems = [], []
    just_reset = np.zeros(n, dtype=bool)
    while any(remaining):
        observations = unbatch(obs, n)
        outputs = teacher.act(observations, envs.get_attr("task"))
        for i in range(n):
            if remaining[i] and not just_reset[i]:
                running[i].append({"messages": build_messages(observations[i], protocol), "completion": outputs[i].text})
        obs, _, terminated, truncated, info = envs.step([o.text for o in outputs])
        just_reset[:] = False
        for i in np.flatnonzero(terminated | truncated):
            just_reset[i] = True
            if remaining[i]:
                remaining[i] -= 1
                ems.append(float(info["em"][i]))
                if ems[-1] == 1.0 or not args.only_successful:
                    samples += running[i]
            running[i] = []
    envs.close()
    return samples, {"teacher_em": float(np.mean(ems)), "teacher_episodes": len(ems)}


def read_trajectories(path: str) -> list[dict]:
    samples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                assert isinstance(record["messages"], list) and isinstance(record["completion"], str)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                raise SystemExit(f"error: {path}, line {line_no}: expected "
                                 '{"messages": [...], "completion": "..."}') from None
            samples.append(record)
    if not samples:
        raise SystemExit(f"error: {path} holds no samples")
    return samples


def tokenize(sample: dict, tokenizer, args: Args) -> tuple[list[int], list[int], bool]:
    """(prompt ids, completion ids ending in eos, whether the completion was cut)."""
    completion = tokenizer(sample["completion"], add_special_tokens=False)["input_ids"]
    cut = len(completion) > args.max_completion_tokens - 1
    completion = completion[:args.max_completion_tokens - 1] + [tokenizer.eos_token_id]
    prompt = truncate_middle(chat_prompt_ids(tokenizer, sample["messages"]), args.max_seq_len - len(completion))
    return prompt, completion, cut


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    width = max(len(p) + len(c) for p, c in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(batch):
        ids = prompt + completion
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, len(prompt):len(ids)] = torch.tensor(completion)
        attention[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "first_target": min(len(prompt) for prompt, _ in batch)}


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_env_args(args.env_id, args.data_path)
    if args.trajectories and not Path(args.trajectories).is_file():
        raise SystemExit(f"error: --trajectories {args.trajectories} does not exist")
    if min(args.num_epochs, args.batch_size, args.gradient_accumulation_steps, args.num_envs, args.max_seq_len,
           args.num_train_episodes, args.max_completion_tokens) <= 0 or args.eval_episodes < 0:
        raise SystemExit("error: sizes and counts must be positive")
    if args.max_completion_tokens >= args.max_seq_len:
        raise SystemExit("error: --max-completion-tokens must be below --max-seq-len")
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    bf16 = args.bf16 if args.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision="bf16" if bf16 else "no", cpu=args.device == "cpu")
    writer = SummaryWriter(f"{args.save_dir}/{run_name}") if accelerator.is_main_process else None

    try:
        model, tokenizer = setup_model(args.model, args.gguf_file, args.resume, args.lora_r, args.lora_alpha,
                                       args.lora_dropout, args.lora_target_modules, args.gradient_checkpointing,
                                       device=str(accelerator.device), dtype="float32")
    except ValueError as err:
        raise SystemExit(f"error: {err}")

    # Data: teacher rollouts (or a JSONL file), one sample per chunk step.
    if args.trajectories:
        samples, teacher_stats = read_trajectories(args.trajectories), {}
    else:
        samples, teacher_stats = collect_teacher_samples(args)
        if not samples:
            raise SystemExit("error: the teacher produced no successful episode; try --no-only-successful")
    if args.save_trajectories:
        with open(args.save_trajectories, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)

    encoded = [tokenize(s, tokenizer, args) for s in samples]
    args.num_samples = len(encoded)
    args.num_cut_completions = sum(cut for _, _, cut in encoded)
    args.num_completion_tokens = sum(len(c) for _, c, _ in encoded)
    loader = torch.utils.data.DataLoader([(p, c) for p, c, _ in encoded], batch_size=args.batch_size, shuffle=True,
                                         collate_fn=lambda b: collate(b, tokenizer.pad_token_id),
                                         generator=torch.Generator().manual_seed(args.seed))
    args.num_steps = args.num_epochs * (len(loader) // args.gradient_accumulation_steps or 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    warmup = max(1, int(args.warmup_ratio * args.num_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.num_steps - s) / max(1, args.num_steps - warmup))))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = load_trainer_state(args.resume)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
    base_model, base_gguf = base_model_of(args.resume, args.model, args.gguf_file)
    if writer:
        writer.add_text("hyperparameters", hparams_table(args))
        for key, value in teacher_stats.items():
            writer.add_scalar(f"charts/{key}", value, 0)
    print(f"{run_name}: {len(encoded)} samples ({args.num_cut_completions} completions cut), "
          f"{args.num_epochs * len(loader)} batches per process ({accelerator.num_processes} processes), "
          f"teacher {teacher_stats}")

    start_time = time.time()
    tokens_seen, micro = 0, 0
    step_losses, step_correct, step_targets = [], 0, 0  # over all micro-batches of one optimizer step
    skip_micro = step * args.gradient_accumulation_steps  # resuming: pass over the micro-batches already trained
    for epoch in range(args.num_epochs):
        for batch in loader:
            micro += 1
            if micro <= skip_micro:
                continue
            with accelerator.accumulate(model):
                logits = completion_logits(model, batch["input_ids"], batch["attention_mask"], batch["first_target"])
                labels = batch["labels"][:, batch["first_target"]:]
                mask = labels != -100
                loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens_seen += int(batch["attention_mask"].sum())
            step_losses.append(loss.item())
            step_correct += int((logits[mask].argmax(-1) == labels[mask]).sum())
            step_targets += int(mask.sum())
            if not accelerator.sync_gradients:
                continue
            step += 1
            step_loss, accuracy = float(np.mean(step_losses)), step_correct / max(1, step_targets)
            step_losses, step_correct, step_targets = [], 0, 0
            if writer:
                writer.add_scalar("losses/loss", step_loss, step)
                writer.add_scalar("charts/token_accuracy", accuracy, step)
                writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
                writer.add_scalar("charts/tokens_per_second", tokens_seen / (time.time() - start_time), step)
                writer.add_scalar("charts/peak_memory_mb", peak_memory_mb(), step)
                writer.add_scalar("charts/epoch", epoch, step)
            if step % 10 == 0:
                print(f"step={step} epoch={epoch} loss={step_loss:.4f} token_acc={accuracy:.3f} "
                      f"tokens/s={tokens_seen / (time.time() - start_time):.0f}")
            if args.eval_every and step % args.eval_every == 0 and writer and args.eval_episodes:
                evaluate_and_log(accelerator.unwrap_model(model), tokenizer, args, step, writer)

    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        checkpoint = Path(args.save_dir) / run_name / "checkpoint"
        save_checkpoint(checkpoint, unwrapped, tokenizer, args, base_model, base_gguf,
                        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step})
        summary = {"run_name": run_name, "checkpoint": str(checkpoint), "steps": step,
                   "train_tokens_per_second": tokens_seen / (time.time() - start_time),
                   "peak_memory_mb": peak_memory_mb(), **teacher_stats}
        if args.eval_episodes:
            final = evaluate_and_log(unwrapped, tokenizer, args, step, writer)
            summary["eval"] = {str(k): {m: v[m] for m in ("em", "f1", "valid_op_rate", "ops_per_episode")}
                               for k, v in final.items()}
        (Path(args.save_dir) / run_name / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        writer.close()
