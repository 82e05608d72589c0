# GRPO for memory policies through vectorised envs: docs/train_grpo.md
"""GRPO on the env's terminal reward: groups of episodes per task, one advantage per episode.

    python train_grpo.py --model runs/<sft run>/checkpoint        # from an SFT checkpoint (CPU default: tiny)
    python train_grpo.py --model Qwen/Qwen3-8B --lora-r 64 --loss-type dapo --beta 0.001 --bf16 True ...
    accelerate launch --num_processes 8 train_grpo.py ...        # whole groups per process, gathered

Each chunk step of an episode is its own (prompt, completion) sample with a fresh prompt; the
episode's group-relative advantage goes to every policy token of every step. With `--branch-at superseded`
the G episodes of a group are continuations of one sampled episode from its snapshot where a stated fact is
superseded, so the advantage credits what the policy did from there. The loss follows
TRL's definitions (docs/train_grpo.md has the equations and the few departures, with reasons).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.tensorboard import SummaryWriter

from agents import LLMPolicy, local_sampler
from agents.evaluation import make_vector_env, num_tasks, protocol_of
from agents.trajectories import grpo_step_fields, open_trajectories, step_records, write_lines
from agents.training import (CompletionScorer, StepSample, base_model_of, branch_rollout, check_backend_args,
                             check_env_args, default_bf16, disable_dropout, evaluate_and_log, hparams_table,
                             importance_weights, load_trainer_state, logprob_gap, make_accelerator,
                             make_reference_logprobs, padded, peak_memory_mb, rollout, rollout_metrics, save_checkpoint,
                             setup_model, start_vllm_engine, token_logprobs, trainer_env_kwargs)


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
    context_tokens: int | None = None
    """document length of training episodes (default: the env id's registered setting)"""
    chunk_tokens: int | None = None
    """chunk size (default: the env id's registered setting)"""
    env_kwargs: str = "{}"
    """extra gym.make arguments as a JSON object, e.g. '{"top_k": 3}'; a key replaces the id's registered value"""
    embedder: str = "hashing"
    """memory embedder of the envs"""
    model: str = "tiny"
    """starting policy: a train_sft.py checkpoint, a HF id or path, 'smollm2' or 'tiny'"""
    gguf_file: str | None = None
    """GGUF file inside --model, if it is one"""
    dtype: str = "float32"
    """weights as loaded: float32 (with --bf16, mixed precision) or bfloat16 (all bf16: half the memory of a large model)"""
    lora_r: int = 0
    """LoRA rank of a fresh adapter (a LoRA start is merged first); 0 trains all weights"""
    lora_alpha: int = 32
    """LoRA alpha"""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """modules LoRA adapts"""
    num_iterations: int = 30
    """rollout + update rounds"""
    time_limit_minutes: float = 0.0
    """stop (evaluate, save) after the first iteration that ends past this many minutes of training (0: no limit)"""
    tasks_per_iteration: int = 8
    """distinct tasks per rollout batch (drawn from the train split without replacement where it is big enough)"""
    group_size: int = 4
    """episodes per task (G); rollout envs = tasks_per_iteration * group_size"""
    branch_at: Literal["start", "superseded"] = "start"
    """start: G whole episodes per task (episode-level GRPO); superseded: G continuations from the snapshot of one
    sampled episode at the first chunk that supersedes a stated fact (the start where none does), the group's
    advantage credited to the steps from there (agents.training.branch_rollout)"""
    temperature: float = 1.0
    """sampling temperature at rollout (the log-probs use the same temperature)"""
    max_new_tokens: int = 64
    """generation budget per step"""
    max_prompt_tokens: int = 1024
    """prompts over this lose the end of their chunk, never the memory (agents.prompt.encode_prompt)"""
    reward: Literal["em", "f1"] = "em"
    """episode reward: em or f1, minus format_penalty per invalid op and no_answer_penalty per unanswered question"""
    format_penalty: float = 0.0
    """subtracted from the reward per invalid operation in the episode"""
    no_answer_penalty: float = 0.0
    """subtracted from the reward times the share of questions the episode leaves unanswered, so that not answering
    scores below a wrong answer (without it both score 0)"""
    save_trajectories: str | None = None
    """write every rollout step of every iteration as a JSON line to this .jsonl file (docs/trajectories.md), with
    the iteration, group id, advantage, weight and the reward the advantage came from"""
    scale_rewards: bool = True
    """advantage (r - mean) / (std + 1e-4) per group; False: r - mean only (Dr. GRPO, MemAgent)"""
    episode_weighting: Literal["equal", "steps"] = "equal"
    """equal: each episode weighs the same whatever its number of steps; steps: each step weighs the same"""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    """grpo (mean over each sample's tokens), dapo (mean over all tokens), dr_grpo (sum / (samples * max_new_tokens))"""
    epsilon: float = 0.2
    """lower clip of the ratio: 1 - epsilon"""
    epsilon_high: float | None = None
    """upper clip: 1 + epsilon_high (default epsilon; DAPO uses 0.28)"""
    beta: float = 0.0
    """k3 KL coefficient to the reference, the run's starting policy"""
    learning_rate: float = 1e-4
    """Adam learning rate"""
    update_epochs: int = 1
    """optimisation passes over each rollout batch"""
    minibatch_size: int = 32
    """samples (steps) per optimizer step, over all processes"""
    micro_batch_size: int = 8
    """samples per forward/backward pass in each process; gradients accumulate over the minibatch"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    gradient_checkpointing: bool = False
    """trade compute for memory"""
    bf16: bool | None = None
    """bf16 autocast (default: on GPUs with bf16; on CPUs with native bf16 for models of 30M+ parameters)"""
    eval_every: int = 10
    """iterations between held-out evaluations (and at the start and the end); 0: start and end only"""
    eval_episodes: int = 32
    """held-out episodes per evaluation and context length"""
    eval_context_tokens: tuple[int, ...] = ()
    """context lengths to evaluate at (default: the training setting)"""
    eval_max_new_tokens: int = 64
    """greedy generation budget per step during evaluation"""
    num_envs: int = 8
    """vector envs per process for evaluation"""
    save_every: int = 0
    """iterations between checkpoints (0: only at the end)"""
    save_dir: str = "runs"
    """runs/<run name>/ gets TensorBoard logs and checkpoint/"""
    resume: str | None = None
    """a train_grpo.py checkpoint to continue from (model, optimizer, iteration, KL reference)"""
    device: str = "auto"
    """torch device"""
    backend: str = "hf"
    """rollout and evaluation generation: hf (transformers) or vllm (an engine per process, synced after updates)"""
    vllm_dtype: str = "auto"
    """vLLM weights: auto (bfloat16 where the trainer computes in bf16, else float32), float32 or bfloat16"""
    vllm_gpu_memory_utilization: float = 0.3
    """the engine's share of the GPU beside the trainer"""
    vllm_enforce_eager: bool = False
    """vLLM without torch.compile: starts in seconds, not minutes, and generates ~15% slower (docs/benchmarks.md)"""
    vllm_importance_sampling_cap: float = 2.0
    """truncated importance sampling (TRL, token_truncate): tokens weigh min(pi_trainer / pi_vllm, cap); 0: off"""


def check_args(args: Args) -> dict | None:
    """Exits with a clear message on a bad flag, before any model work; returns the trainer state to resume from."""
    check_env_args(args, {args.context_tokens, *args.eval_context_tokens})
    check_backend_args(args)
    if args.group_size < 2:
        raise SystemExit("error: --group-size must be at least 2 (advantages are relative to the group)")
    if min(args.num_iterations, args.tasks_per_iteration, args.minibatch_size, args.micro_batch_size,
           args.update_epochs, args.max_new_tokens, args.num_envs, args.max_prompt_tokens) <= 0 \
            or args.temperature <= 0 or args.eval_episodes < 0 or args.time_limit_minutes < 0:
        raise SystemExit("error: counts and sizes must be positive, --temperature > 0 and --time-limit-minutes >= 0")
    if min(args.format_penalty, args.no_answer_penalty) < 0:
        raise SystemExit("error: --format-penalty and --no-answer-penalty must be >= 0 (they are subtracted)")
    return load_trainer_state(args.resume, "train_grpo.py", ("optimizer", "iteration", "reference"))


def episode_rewards(episodes: list[dict], args: Args) -> np.ndarray:
    """The reward each episode's advantage comes from: em or f1, minus the format and no-answer penalties."""
    return np.array([e[args.reward] - args.format_penalty * e["invalid_ops"] - args.no_answer_penalty * e["unanswered"]
                     for e in episodes])


def group_advantages(rewards: np.ndarray, group_size: int, scale: bool) -> tuple[np.ndarray, float]:
    """(advantage per episode, fraction of groups whose rewards are all equal). Episodes are grouped in order.

    The std has Bessel's correction, as torch.std in TRL. A group whose std is zero up to rounding (TRL's
    isclose: 0.8 three times has a std of 1e-16) gets advantages of exactly 0, so its samples are skipped.
    """
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    std = grouped.std(axis=1, ddof=1, keepdims=True)
    equal = np.isclose(std, 0.0)
    advantages = np.where(equal, 0.0, centred / (std + 1e-4) if scale else centred)
    return advantages.reshape(-1), float(equal.mean())


def loss_denominator(weights, lengths, loss_type: str, max_completion: int, mean_weight: float):
    """What the summed loss of a minibatch is divided by; `lengths` are completion tokens per sample.

    `mean_weight` is the mean sample weight of the whole rollout batch: with it, grpo and dr_grpo divide
    by a constant per minibatch size, as TRL does, so a sample's weight does not depend on which others
    share its minibatch.
    """
    if loss_type == "grpo":
        return len(weights) * mean_weight
    if loss_type == "dapo":
        return (weights * lengths).sum().clamp(min=1e-8)
    return len(weights) * mean_weight * max_completion  # dr_grpo: long and short completions are not re-weighted


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, weights, mask, args: Args, denominator,
              sampling_weights=None):
    """TRL's GRPO objective with per-sample weights. Shapes: (batch, tokens) except advantages, weights (batch,).

    `denominator` is the whole minibatch's (`loss_denominator`), divided by the number of processes
    (their gradients are averaged); a micro-batch's loss is its share of the minibatch's.
    `sampling_weights` (batch, tokens): truncated importance weights of vLLM-sampled tokens, on the policy term.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    clipped = torch.clamp(ratio, 1 - args.epsilon, 1 + high)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    if sampling_weights is not None:
        per_token = per_token * sampling_weights
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        kl = torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1
        per_token = per_token + args.beta * kl
    if args.loss_type == "grpo":
        per_sample = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        numerator = (per_sample * weights).sum()
    else:
        numerator = (per_token * weights[:, None] * mask).sum()
    ratio, kl = ratio.detach(), kl.detach()
    # As TRL counts it: a token is clipped where the clip binds, on the side its advantage's sign selects.
    binding = ((ratio < 1 - args.epsilon) & (advantages[:, None] < 0)) | ((ratio > 1 + high) & (advantages[:, None] > 0))
    tokens = mask.sum().clamp(min=1)
    stats = {
        "clipfrac": float((binding.float() * mask).sum() / tokens),
        "approx_kl": float((((ratio - 1) - torch.log(ratio)) * mask).sum() / tokens),
        "kl": float((kl * mask).sum() / tokens),
    }
    return numerator / denominator, stats


@torch.no_grad()
def score_old_logprobs(scorer, samples: list[StepSample], args: Args, pad_id: int, device) -> None:
    """The old log-probs, as TRL takes them: the training forward's, before the update. Only for the samples that
    train (all with beta > 0, else those with a non-zero advantage), plus the first micro-batch, so that every
    iteration logs the gap to the sampler's log-probs (vLLM's kernels, or cached decoding in bf16), which are
    kept for it and, with vLLM, for the importance weights."""
    scored = [s for i, s in enumerate(samples) if i < args.micro_batch_size or s.advantage != 0 or args.beta > 0]
    for begin in range(0, len(scored), args.micro_batch_size):
        batch = scored[begin:begin + args.micro_batch_size]
        logprobs, _, _ = token_logprobs(scorer, batch, pad_id, args.temperature, device)
        for row, s in enumerate(batch):
            s.old_logprobs = logprobs[row, :len(s.completion_ids)].tolist()


def update(accelerator, scorer, optimizer, samples: list[StepSample], reference_logprobs, args: Args,
           shuffle_rng: np.random.RandomState, pad_id: int) -> tuple[dict, int]:
    """`update_epochs` passes over shuffled minibatches of the rollout batch; returns (loss statistics of this
    process's micro-batches, completion tokens trained on).

    Every sample counts in the denominators, as in TRL; one with zero advantage carries no gradient when
    beta = 0, so its forward pass is skipped. Each process takes every world-th sample of a minibatch in
    micro-batches (gradients accumulate, then are averaged over processes); one left without any runs a
    zero-weight sample, so every process steps together.
    """
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    mean_weight = float(np.mean([s.weight for s in samples]))
    cap = args.vllm_importance_sampling_cap if args.backend == "vllm" else 0.0
    stats = {"policy_loss": [], "clipfrac": [], "approx_kl": [], "kl": [], "entropy": []}
    tokens = 0
    for _ in range(args.update_epochs):
        order = shuffle_rng.permutation(len(samples))
        for begin in range(0, len(samples), args.minibatch_size):
            minibatch = [samples[i] for i in order[begin:begin + args.minibatch_size]]
            denominator = loss_denominator(torch.tensor([s.weight for s in minibatch], device=device),
                                           torch.tensor([len(s.completion_ids) for s in minibatch], device=device),
                                           args.loss_type, args.max_new_tokens, mean_weight) / world
            own = [s for s in minibatch[rank::world] if s.advantage != 0 or args.beta > 0]
            micro_batches = [own[i:i + args.micro_batch_size] for i in range(0, len(own), args.micro_batch_size)]
            # The stand-in's old log-probs are its sampler's: with weight 0, any finite value will do.
            micro_batches = micro_batches or [[dataclasses.replace(minibatch[0], weight=0.0, old_logprobs=(
                minibatch[0].old_logprobs or minibatch[0].sampler_logprobs))]]
            for number, batch in enumerate(micro_batches):
                with nullcontext() if number == len(micro_batches) - 1 else accelerator.no_sync(scorer):
                    logprobs, entropy, mask = token_logprobs(scorer, batch, pad_id, args.temperature, device)
                    loss, loss_stats = grpo_loss(
                        logprobs, padded([s.old_logprobs for s in batch], logprobs),
                        reference_logprobs(batch) if reference_logprobs else None,
                        torch.tensor([s.advantage for s in batch], device=device),
                        torch.tensor([s.weight for s in batch], device=device), mask, args, denominator,
                        importance_weights(batch, logprobs, cap))
                    accelerator.backward(loss)
                if own:
                    loss_stats.update(policy_loss=loss.item(), entropy=float((entropy * mask).sum() / mask.sum()))
                    for key, value in loss_stats.items():
                        stats[key].append(value)
            accelerator.clip_grad_norm_(scorer.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            tokens += sum(len(s.completion_ids) for s in minibatch)
    return stats, tokens


if __name__ == "__main__":
    args = tyro.cli(Args)
    state = check_args(args)
    num_envs = args.tasks_per_iteration * args.group_size
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.bf16 = default_bf16(args.resume or args.model, args.gguf_file, args.device) if args.bf16 is None else args.bf16
    accelerator = make_accelerator(args.bf16, args.device)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if args.tasks_per_iteration % world:
        raise SystemExit(f"error: --tasks-per-iteration ({args.tasks_per_iteration}) must be a multiple of the "
                         f"number of processes ({world}): each process runs whole groups")
    local_envs = num_envs // world
    try:  # an unwritable path fails here, before any model work
        trajectories = open_trajectories(args.save_trajectories) if accelerator.is_main_process else None
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    first_env = rank * local_envs  # this process's envs are episodes first_env .. first_env + local_envs - 1
    run_name = broadcast_object_list([run_name])[0]

    try:
        lm, tokenizer, merged_adapters = setup_model(
            args.model, args.gguf_file, args.resume, args.lora_r, args.lora_alpha, 0.0, args.lora_target_modules,
            args.gradient_checkpointing, device=str(device), dtype=args.dtype, merge_start_adapter=True)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    disable_dropout(lm)
    pad_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=args.learning_rate)
    scorer, optimizer = accelerator.prepare(CompletionScorer(lm), optimizer)
    reference_spec = (state or {}).get("reference", {"model": args.model, "gguf_file": args.gguf_file})
    reference_logprobs = make_reference_logprobs(args, accelerator, lm, scorer, reference_spec, pad_id)
    if world > 1:  # every process starts from the same weights, but samples its own completions
        torch.manual_seed(args.seed + rank)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    start_iteration = state["iteration"] if state else 0
    base_model, base_gguf = base_model_of(args.resume or args.model, args.gguf_file)
    envs = make_vector_env(args.env_id, trainer_env_kwargs(args, "train", args.context_tokens), local_envs)
    task_count = num_tasks(envs)
    writer = SummaryWriter(f"{args.save_dir}/{run_name}") if accelerator.is_main_process else None
    if writer:
        writer.add_text("hyperparameters", hparams_table(args))
    engine = start_vllm_engine(args, accelerator, lm, base_model, base_gguf)
    try:
        sampler = local_sampler(lm, tokenizer, engine, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, max_prompt_tokens=args.max_prompt_tokens)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    policy = LLMPolicy(sampler, protocol_of(args.env_id, args.env_kwargs))
    task_rng = np.random.default_rng(args.seed)

    def draw_tasks() -> np.ndarray:
        if task_count is None:
            return task_rng.integers(2**31, size=args.tasks_per_iteration)
        return task_rng.choice(task_count, size=args.tasks_per_iteration, replace=task_count < args.tasks_per_iteration)

    for _ in range(start_iteration):  # resuming: the same task stream as an uninterrupted run
        draw_tasks()
    shuffle_rng = np.random.RandomState(args.seed)  # the same minibatches in every process
    history = []

    def maybe_evaluate(iteration: int, force: bool = False):
        if args.eval_episodes and (force or (args.eval_every and iteration % args.eval_every == 0)):
            results = evaluate_and_log(lm, tokenizer, args, iteration, writer, accelerator, engine)
            if accelerator.is_main_process:
                history.append({"iteration": iteration,
                                **{k: {"em": v["em"], "valid_op_rate": v["valid_op_rate"],
                                       "ops": v["ops_per_episode"]} for k, v in results.items()}})

    maybe_evaluate(start_iteration, force=True)
    start_time = time.time()
    iteration = start_iteration
    for iteration in range(start_iteration + 1, args.num_iterations + 1):
        # 1. Rollout: G episodes per task, sampled with temperature; keep token ids and log-probs.
        #    Each process runs whole groups; then every process holds all episodes and samples.
        rollout_start = time.time()
        tasks = np.repeat(draw_tasks(), args.group_size)[first_env:first_env + local_envs]
        rollout_seed, prefix_steps = args.seed * 100_003 + iteration + first_env, []
        lm.eval()
        with accelerator.autocast():
            if args.branch_at == "superseded":
                samples, episodes, records, prefix_steps = branch_rollout(
                    envs, policy, [int(t) for t in tasks[::args.group_size]], args.group_size, rollout_seed, first_env)
            else:
                samples, episodes, records = rollout(envs, policy, [int(t) for t in tasks], rollout_seed, first_env)
        rollout_time = time.time() - rollout_start  # generation and env steps only
        episodes, prefix_steps = gather_object(episodes), gather_object(prefix_steps)
        # 2. Advantages: one per episode, relative to its group, given to every step of the episode.
        rewards = episode_rewards(episodes, args)
        advantages, zero_std = group_advantages(rewards, args.group_size, args.scale_rewards)
        for s in samples:
            s.advantage = float(advantages[s.episode])
        # 3. Old log-probs from the training forward, for this process's samples that train.
        score_start = time.time()
        with accelerator.autocast():
            score_old_logprobs(accelerator.unwrap_model(scorer), samples, args, pad_id, device)
        score_time = time.time() - score_start
        samples = gather_object(samples)
        weights = [1.0 / e["num_steps"] if args.episode_weighting == "equal" else 1.0 for e in episodes]
        for s in samples:
            s.weight = weights[s.episode]
        if args.save_trajectories:
            lines = gather_object([line for record in records for line in step_records(
                record, policy.protocol, f"{iteration}/{first_env + record['slot']}", **grpo_step_fields(
                    first_env + record["slot"], iteration, args.group_size, rewards, advantages, weights))])
            if trajectories:
                write_lines(trajectories, lines)
        # 4. Update, then give the sampler the new weights.
        lm.train()
        update_start = time.time()
        stats, train_tokens = update(accelerator, scorer, optimizer, samples, reference_logprobs, args, shuffle_rng,
                                     pad_id)
        if engine is not None:
            engine.load_weights(lm)
        update_time = time.time() - update_start

        # 5. Log (the main process): rollout metrics over all episodes, this process's loss terms, throughput.
        if writer:
            metrics = {**rollout_metrics(episodes, [len(s.completion_ids) for s in samples], rewards, zero_std),
                       **dict(zip(("rollout/logprob_diff_mean", "rollout/logprob_diff_max"), logprob_gap(samples))),
                       **{f"losses/{key}": np.mean(values) for key, values in stats.items() if values},
                       **({"rollout/branch_prefix_steps": np.mean(prefix_steps)} if prefix_steps else {}),
                       "charts/episodes_per_second": num_envs / rollout_time,
                       "charts/rollout_tokens_per_second": sum(len(s.completion_ids) for s in samples) / rollout_time,
                       "charts/trainer_logprob_seconds": score_time,
                       "charts/train_tokens_per_second": train_tokens / max(update_time, 1e-9),
                       "charts/peak_memory_mb": peak_memory_mb()}
            for key, value in metrics.items():
                writer.add_scalar(key, float(value), iteration)
            print(f"iter={iteration} reward={rewards.mean():.3f} em={metrics['rollout/em']:.3f} zero_std={zero_std:.2f} "
                  f"samples={len(samples)} loss={np.mean(stats['policy_loss'] or [0]):.4f} "
                  f"clipfrac={np.mean(stats['clipfrac'] or [0]):.3f} approx_kl={np.mean(stats['approx_kl'] or [0]):.2e} "
                  f"rollout={rollout_time:.1f}s score={score_time:.1f}s update={update_time:.1f}s")
        # Every process decides from the main process's clock, so all stop after the same iteration.
        last = iteration == args.num_iterations or broadcast_object_list(
            [bool(args.time_limit_minutes) and time.time() - start_time > 60 * args.time_limit_minutes])[0]
        maybe_evaluate(iteration, force=last)
        if (args.save_every and iteration % args.save_every == 0 or last) and accelerator.is_main_process:
            save_checkpoint(Path(args.save_dir) / run_name / "checkpoint", lm, tokenizer, args, base_model, base_gguf,
                            {"optimizer": optimizer.state_dict(), "iteration": iteration, "reference": reference_spec},
                            merged_adapters)
        if last:
            break

    envs.close()
    if trajectories:
        trajectories.close()
    accelerator.wait_for_everyone()
    if writer:
        summary = {"run_name": run_name, "checkpoint": str(Path(args.save_dir) / run_name / "checkpoint"),
                   "seconds": time.time() - start_time, "peak_memory_mb": peak_memory_mb(), "eval_history": history,
                   "num_processes": world, "num_rollout_envs": num_envs, "num_train_tasks": task_count,
                   "iterations": iteration}
        (Path(args.save_dir) / run_name / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        writer.close()
