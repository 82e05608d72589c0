# GRPO for memory policies through vectorised envs: docs/train_grpo.md
"""GRPO on the env's terminal reward: groups of episodes per task, one advantage per episode.

    python train_grpo.py --model runs/<sft run>/checkpoint        # from an SFT checkpoint (CPU default: tiny)
    python train_grpo.py --model Qwen/Qwen3-8B --lora-r 64 --loss-type dapo --beta 0.001 ...
    accelerate launch --num_processes 8 train_grpo.py ...        # whole groups per process, gathered

Each chunk step of an episode is its own (prompt, completion) sample with a fresh prompt; the
episode's group-relative advantage goes to every policy token of every step. The loss follows
TRL's definitions (docs/train_grpo.md has the equations).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.tensorboard import SummaryWriter

import atommem_env
from agents import HFGenerator, build_messages, unbatch
from agents.evaluation import OP_KEYS
from agents.training import (base_model_of, check_env_args, completion_logits, env_kwargs_for, evaluate_and_log,
                             hparams_table, load_trainer_state, peak_memory_mb, save_checkpoint, setup_model)
from atommem_env.wrappers import TaskSchedule


@dataclass
class Args:
    exp_name: str = "grpo"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    env_id: str = "AtomMem/SyntheticToy-v0"
    """the env id (rollouts on its train split, evaluation on its eval split)"""
    data_path: str | None = None
    """dataset file for the HotpotQA / 2Wiki / MuSiQue ids"""
    context_tokens: int = 400
    """document length of training episodes"""
    chunk_tokens: int = 256
    """chunk size"""
    embedder: str = "hashing"
    """memory embedder of the envs"""
    model: str = "tiny"
    """starting policy: a train_sft.py checkpoint, a HF id or path, 'smollm2' or 'tiny'"""
    gguf_file: str | None = None
    """GGUF file inside --model, if it is one"""
    lora_r: int = 0
    """LoRA rank for a fresh adapter; 0 trains all weights (a LoRA checkpoint keeps its adapter)"""
    lora_alpha: int = 32
    """LoRA alpha"""
    lora_dropout: float = 0.0
    """LoRA dropout"""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """modules LoRA adapts"""
    num_iterations: int = 30
    """rollout + update rounds"""
    tasks_per_iteration: int = 8
    """distinct tasks per rollout batch"""
    group_size: int = 4
    """episodes per task (G); num_envs = tasks_per_iteration * group_size"""
    temperature: float = 1.0
    """sampling temperature at rollout (the log-probs use the same temperature)"""
    max_new_tokens: int = 64
    """generation budget per step"""
    max_seq_len: int = 1024
    """prompt tokens beyond this are cut in the middle"""
    reward: str = "em"
    """episode reward: em or f1, minus format_penalty per invalid op"""
    format_penalty: float = 0.0
    """subtracted from the reward per invalid operation in the episode"""
    scale_rewards: bool = True
    """advantage (r - mean) / (std + 1e-4) per group; False: r - mean only (MemAgent)"""
    episode_weighting: str = "equal"
    """equal: each episode weighs the same whatever its number of steps; steps: each step weighs the same"""
    loss_type: str = "grpo"
    """grpo (mean over each sample's tokens), dapo (mean over all tokens), dr_grpo (sum / (samples * max_new_tokens))"""
    epsilon: float = 0.2
    """lower clip of the ratio: 1 - epsilon"""
    epsilon_high: float | None = None
    """upper clip: 1 + epsilon_high (default epsilon; DAPO uses 0.28)"""
    beta: float = 0.0
    """k3 KL coefficient to the reference (the starting policy; with LoRA the adapter disabled)"""
    learning_rate: float = 1e-4
    """Adam learning rate"""
    update_epochs: int = 1
    """optimisation passes over each rollout batch"""
    minibatch_size: int = 32
    """samples (steps) per optimizer step, over all processes"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    gradient_checkpointing: bool = False
    """trade compute for memory"""
    bf16: bool | None = None
    """bf16 mixed precision (default: on where the GPU supports it)"""
    eval_every: int = 10
    """iterations between held-out evaluations (and at the start and the end); 0: start and end only"""
    eval_episodes: int = 32
    """held-out episodes per evaluation and context length"""
    eval_context_tokens: tuple[int, ...] = (400,)
    """context lengths to evaluate at"""
    eval_max_new_tokens: int = 64
    """greedy generation budget per step during evaluation"""
    num_envs: int = 8
    """vector envs for evaluation"""
    save_every: int = 0
    """iterations between checkpoints (0: only at the end)"""
    save_dir: str = "runs"
    """runs/<run name>/ gets TensorBoard logs and checkpoint/"""
    resume: str | None = None
    """a train_grpo.py checkpoint to continue from (model, optimizer, iteration)"""
    device: str = "auto"
    """torch device"""
    extra: dict = field(default_factory=dict)
    """derived values, filled in at start (logged with the hyper-parameters)"""


@dataclass
class StepSample:
    """One chunk step of one episode: the policy's tokens and what the loss needs about them."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logprobs: list[float]
    episode: int
    advantage: float = 0.0
    weight: float = 1.0


def rollout(envs, generator: HFGenerator, task_indices: list[int], seed: int, protocol: str):
    """Runs one episode per env (env i on task task_indices[i]); returns samples and per-episode stats."""
    n = envs.num_envs
    obs, _ = envs.reset(seed=seed, options={"task_indices": task_indices})
    running = np.ones(n, dtype=bool)
    samples: list[StepSample] = []
    episodes = [dict() for _ in range(n)]
    while running.any():
        active = np.flatnonzero(running).tolist()
        observations = unbatch(obs, n)
        generations = generator.generate([build_messages(observations[i], protocol) for i in active])
        actions = [""] * n
        for i, g in zip(active, generations):
            actions[i] = g.text
            samples.append(StepSample(g.prompt_ids, g.completion_ids, g.logprobs, episode=i))
        obs, _, terminated, truncated, info = envs.step(actions)
        for i in np.flatnonzero((terminated | truncated) & running):
            running[i] = False
            episodes[i] = {"em": float(info["em"][i]), "f1": float(info["f1"][i]),
                           "invalid_ops": int(info["total_invalid_ops"][i]),
                           "ops": {k: int(info["op_counts"][k][i]) for k in OP_KEYS + ("answer",)}}
    return samples, episodes


def group_advantages(rewards: np.ndarray, group_size: int, scale: bool) -> tuple[np.ndarray, float]:
    """(advantage per episode, fraction of groups whose rewards are all equal). Episodes are grouped in order."""
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    std = grouped.std(axis=1, keepdims=True)
    advantages = centred / (std + 1e-4) if scale else centred
    return advantages.reshape(-1), float(np.mean(std.squeeze(1) == 0))


def token_logprobs(model, samples: list[StepSample], pad_id: int, temperature: float, device):
    """Right-padded forward pass; returns (log-probs, entropy, mask), each (batch, max completion length)."""
    width = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    longest = max(len(s.completion_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        ids = s.prompt_ids + s.completion_ids
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
    first_target = min(len(s.prompt_ids) for s in samples)
    logits = completion_logits(model, input_ids.to(device), attention.to(device), first_target) / temperature
    logprobs = torch.zeros((len(samples), longest), device=device)
    entropy = torch.zeros((len(samples), longest), device=device)
    mask = torch.zeros((len(samples), longest), device=device)
    for row, s in enumerate(samples):
        start, length = len(s.prompt_ids), len(s.completion_ids)
        step_logits = logits[row, start - first_target:start - first_target + length]
        dist = torch.log_softmax(step_logits, dim=-1)
        target = torch.tensor(s.completion_ids, device=device)
        logprobs[row, :length] = dist.gather(-1, target[:, None]).squeeze(-1)
        entropy[row, :length] = -(dist.exp() * dist).sum(-1).detach()  # a metric, not part of the loss
        mask[row, :length] = 1
    return logprobs, entropy, mask


def padded_old_logprobs(samples: list[StepSample], like: torch.Tensor) -> torch.Tensor:
    """The rollout log-probs laid out like `token_logprobs`' output (zeros past each completion)."""
    old = torch.zeros_like(like)
    for row, s in enumerate(samples):
        old[row, :len(s.old_logprobs)] = torch.tensor(s.old_logprobs, device=like.device)
    return old


def loss_denominator(weights, lengths, loss_type: str, max_completion: int):
    """What the summed loss of a minibatch is divided by; `lengths` are completion tokens per sample."""
    if loss_type == "grpo":
        return weights.sum()
    if loss_type == "dapo":
        return (weights * lengths).sum().clamp(min=1e-8)
    return weights.sum() * max_completion  # dr_grpo: a constant, so long and short completions are not re-weighted


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, weights, mask, args: Args, max_completion: int,
              denominator=None):
    """TRL's GRPO objective with per-sample weights. Shapes: (batch, tokens) except advantages, weights (batch,).

    `denominator` defaults to this batch's own; a process holding part of a minibatch passes the whole
    minibatch's, divided by the number of processes (their gradients are averaged).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    clipped = torch.clamp(ratio, 1 - args.epsilon, 1 + high)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        kl = torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1
        per_token = per_token + args.beta * kl
    if args.loss_type == "grpo":
        per_sample = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        numerator = (per_sample * weights).sum()
    else:
        numerator = (per_token * weights[:, None] * mask).sum()
    if denominator is None:
        denominator = loss_denominator(weights, mask.sum(-1), args.loss_type, max_completion)
    loss = numerator / denominator
    ratio, kl = ratio.detach(), kl.detach()
    stats = {
        "clipfrac": float((((ratio < 1 - args.epsilon) | (ratio > 1 + high)).float() * mask).sum() / mask.sum()),
        "approx_kl": float((((ratio - 1) - torch.log(ratio)) * mask).sum() / mask.sum()),
        "kl": float((kl * mask).sum() / mask.sum()),
    }
    return loss, stats


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_env_args(args.env_id, args.data_path)
    if args.loss_type not in ("grpo", "dapo", "dr_grpo"):
        raise SystemExit(f"error: --loss-type must be grpo, dapo or dr_grpo, got {args.loss_type!r}")
    if args.reward not in ("em", "f1") or args.episode_weighting not in ("equal", "steps"):
        raise SystemExit("error: --reward must be em or f1 and --episode-weighting equal or steps")
    if args.group_size < 2:
        raise SystemExit("error: --group-size must be at least 2 (advantages are relative to the group)")
    if min(args.num_iterations, args.tasks_per_iteration, args.minibatch_size, args.update_epochs,
           args.max_new_tokens, args.num_envs) <= 0 or args.temperature <= 0 or args.eval_episodes < 0:
        raise SystemExit("error: counts and sizes must be positive and --temperature > 0")
    num_envs = args.tasks_per_iteration * args.group_size
    args.extra = {"num_rollout_envs": num_envs, "episodes_per_iteration": num_envs}
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    bf16 = args.bf16 if args.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    # The other processes wait for the main one's held-out evaluation: allow it hours, not minutes.
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=args.device == "cpu",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=3))])
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.tasks_per_iteration % world:
        raise SystemExit(f"error: --tasks-per-iteration ({args.tasks_per_iteration}) must be a multiple of the "
                         f"number of processes ({world}): each process runs whole groups")
    local_envs = num_envs // world
    first_env = rank * local_envs  # this process's envs are episodes first_env .. first_env + local_envs - 1
    run_name = broadcast_object_list([run_name])[0]
    writer = SummaryWriter(f"{args.save_dir}/{run_name}") if accelerator.is_main_process else None
    if writer:
        writer.add_text("hyperparameters", hparams_table(args))

    try:
        model, tokenizer = setup_model(args.model, args.gguf_file, args.resume, args.lora_r, args.lora_alpha,
                                       args.lora_dropout, args.lora_target_modules, args.gradient_checkpointing,
                                       device=str(accelerator.device), dtype="float32")
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    uses_lora = hasattr(model, "peft_config")
    reference = None
    if args.beta > 0 and not uses_lora:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    if world > 1:  # every process starts from the same weights, but samples its own completions
        torch.manual_seed(args.seed + rank)
    state = load_trainer_state(args.resume)
    start_iteration = 0
    if state is not None and "iteration" in state:
        optimizer.load_state_dict(state["optimizer"])
        start_iteration = state["iteration"]
    base_model, base_gguf = base_model_of(args.resume, args.model, args.gguf_file)
    protocol = atommem_env.ENV_IDS[args.env_id].get("protocol", "atommem")
    kwargs = env_kwargs_for(args, "train", args.context_tokens)
    envs = gym.vector.SyncVectorEnv([lambda i=i: TaskSchedule(gym.make(args.env_id, **kwargs), slot=i)
                                     for i in range(local_envs)])
    generator = HFGenerator(accelerator.unwrap_model(model), tokenizer, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, max_prompt_tokens=args.max_seq_len)
    task_rng = np.random.default_rng(args.seed)
    for _ in range(start_iteration):  # resuming: the same task stream as an uninterrupted run
        task_rng.integers(2**31, size=args.tasks_per_iteration)
    shuffle_rng = np.random.RandomState(args.seed)  # the same minibatches in every process
    device = accelerator.device
    history = []

    def maybe_evaluate(iteration: int, force: bool = False):
        if args.eval_episodes and (force or (args.eval_every and iteration % args.eval_every == 0)):
            if accelerator.is_main_process:
                results = evaluate_and_log(accelerator.unwrap_model(model), tokenizer, args, iteration, writer)
                history.append({"iteration": iteration,
                                **{str(k): {"em": v["em"], "valid_op_rate": v["valid_op_rate"],
                                            "ops": v["ops_per_episode"]} for k, v in results.items()}})
            accelerator.wait_for_everyone()

    maybe_evaluate(start_iteration, force=True)
    start_time = time.time()
    for iteration in range(start_iteration + 1, args.num_iterations + 1):
        # 1. Rollout: G episodes per task, sampled with temperature; keep token ids and log-probs.
        #    Each process runs whole groups; then every process holds all episodes and samples.
        rollout_start = time.time()
        tasks = task_rng.integers(2**31, size=args.tasks_per_iteration)
        model.eval()
        samples, episodes = rollout(envs, generator,
                                    [int(t) for t in np.repeat(tasks, args.group_size)[first_env:first_env + local_envs]],
                                    seed=args.seed * 100_003 + iteration + first_env, protocol=protocol)
        for s in samples:
            s.episode += first_env
        samples, episodes = gather_object(samples), gather_object(episodes)
        rollout_time = time.time() - rollout_start
        # 2. Advantages: one per episode, relative to its group, given to every step of the episode.
        rewards = np.array([e[args.reward] - args.format_penalty * e["invalid_ops"] for e in episodes])
        advantages, zero_std = group_advantages(rewards, args.group_size, args.scale_rewards)
        steps_per_episode = np.bincount([s.episode for s in samples], minlength=num_envs)
        for s in samples:
            s.advantage = float(advantages[s.episode])
            s.weight = 1.0 / steps_per_episode[s.episode] if args.episode_weighting == "equal" else 1.0
        response_lengths = [len(s.completion_ids) for s in samples]  # all steps, before any are dropped
        # Samples with no policy token (cannot happen with eos kept) or zero advantage carry no gradient.
        samples = [s for s in samples if s.completion_ids and (s.advantage != 0 or args.beta > 0)]
        # 3. Update. Each process takes every world-th sample of a minibatch (gradients are averaged);
        #    one left without any runs a zero-weight sample, so every process steps together.
        model.train()
        update_start = time.time()
        stats = {"loss": [], "clipfrac": [], "approx_kl": [], "kl": [], "entropy": []}
        train_tokens = 0
        for _ in range(args.update_epochs):
            order = shuffle_rng.permutation(len(samples))
            for begin in range(0, len(samples), args.minibatch_size):
                minibatch = [samples[i] for i in order[begin:begin + args.minibatch_size]]
                denominator = loss_denominator(torch.tensor([s.weight for s in minibatch], device=device),
                                               torch.tensor([len(s.completion_ids) for s in minibatch], device=device),
                                               args.loss_type, args.max_new_tokens) / world
                own = minibatch[rank::world]
                batch = own or [dataclasses.replace(minibatch[0], weight=0.0)]
                logprobs, entropy, mask = token_logprobs(model, batch, tokenizer.pad_token_id, args.temperature, device)
                old = padded_old_logprobs(batch, logprobs)
                ref = None
                if args.beta > 0:
                    with torch.no_grad():
                        if uses_lora:
                            with accelerator.unwrap_model(model).disable_adapter():
                                ref = token_logprobs(model, batch, tokenizer.pad_token_id, args.temperature, device)[0]
                        else:
                            ref = token_logprobs(reference, batch, tokenizer.pad_token_id, args.temperature, device)[0]
                loss, loss_stats = grpo_loss(
                    logprobs, old, ref, torch.tensor([s.advantage for s in batch], device=device),
                    torch.tensor([s.weight for s in batch], device=device), mask, args, args.max_new_tokens,
                    denominator)
                optimizer.zero_grad()
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if own:
                    stats["loss"].append(loss.item())
                    stats["entropy"].append(float((entropy * mask).sum() / mask.sum()))
                    for key, value in loss_stats.items():
                        stats[key].append(value)
                train_tokens += sum(len(s.completion_ids) for s in minibatch)
        update_time = time.time() - update_start

        # 4. Log: rewards, op frequencies, loss terms, throughput (the main process).
        if writer:
            ems = np.array([e["em"] for e in episodes])
            total_ops = sum(sum(e["ops"].values()) + e["invalid_ops"] for e in episodes)
            writer.add_scalar("rollout/reward_mean", rewards.mean(), iteration)
            writer.add_scalar("rollout/reward_std", rewards.std(), iteration)
            writer.add_scalar("rollout/em", ems.mean(), iteration)
            writer.add_scalar("rollout/f1", np.mean([e["f1"] for e in episodes]), iteration)
            writer.add_scalar("rollout/zero_std_group_fraction", zero_std, iteration)
            writer.add_scalar("rollout/invalid_op_rate", sum(e["invalid_ops"] for e in episodes) / max(1, total_ops),
                              iteration)
            for op in OP_KEYS + ("answer",):
                writer.add_scalar(f"rollout/ops_{op}_per_episode", np.mean([e["ops"][op] for e in episodes]), iteration)
            writer.add_scalar("rollout/response_length", float(np.mean(response_lengths)), iteration)
            for key, values in stats.items():
                if values:
                    writer.add_scalar(f"losses/{'policy_loss' if key == 'loss' else key}", float(np.mean(values)), iteration)
            writer.add_scalar("charts/episodes_per_second", num_envs / rollout_time, iteration)
            writer.add_scalar("charts/rollout_tokens_per_second", sum(response_lengths) / rollout_time, iteration)
            writer.add_scalar("charts/train_tokens_per_second", train_tokens / max(update_time, 1e-9), iteration)
            writer.add_scalar("charts/peak_memory_mb", peak_memory_mb(), iteration)
            print(f"iter={iteration} reward={rewards.mean():.3f} em={ems.mean():.3f} zero_std={zero_std:.2f} "
                  f"samples={len(samples)} loss={np.mean(stats['loss'] or [0]):.4f} "
                  f"clipfrac={np.mean(stats['clipfrac'] or [0]):.3f} rollout={rollout_time:.1f}s update={update_time:.1f}s")
        maybe_evaluate(iteration, force=iteration == args.num_iterations)
        saving = args.save_every and iteration % args.save_every == 0 or iteration == args.num_iterations
        if saving and accelerator.is_main_process:
            save_checkpoint(Path(args.save_dir) / run_name / "checkpoint", accelerator.unwrap_model(model), tokenizer,
                            args, base_model, base_gguf, {"optimizer": optimizer.state_dict(), "iteration": iteration})

    envs.close()
    accelerator.wait_for_everyone()
    if writer:
        summary = {"run_name": run_name, "checkpoint": str(Path(args.save_dir) / run_name / "checkpoint"),
                   "seconds": time.time() - start_time, "peak_memory_mb": peak_memory_mb(), "eval_history": history,
                   "num_processes": world}
        (Path(args.save_dir) / run_name / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        writer.close()
