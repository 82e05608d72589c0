# GRPO for memory policies through vectorised envs: docs/train_grpo.md
"""GRPO on the env's terminal reward: groups of episodes per task, one advantage per episode.

    python train_grpo.py --model runs/<sft run>/checkpoint        # from an SFT checkpoint (CPU default: tiny)
    python train_grpo.py --model Qwen/Qwen3-8B --lora-r 64 --loss-type dapo --beta 0.001 --bf16 True ...
    accelerate launch --num_processes 8 train_grpo.py ...        # whole groups per process, gathered

Each chunk step of an episode is its own (prompt, completion) sample with a fresh prompt; the
episode's group-relative advantage goes to every policy token of every step. The loss follows
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

import numpy as np
import torch
import tyro
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.tensorboard import SummaryWriter

from agents import HFGenerator, LLMPolicy
from agents.evaluation import OP_KEYS, make_vector_env, num_tasks, protocol_of, run_episodes
from agents.training import (CompletionScorer, base_model_of, check_backend_args, check_env_args, default_bf16,
                             evaluate_and_log, hparams_table, load_reference, load_trainer_state, make_accelerator,
                             pack, peak_memory_mb, save_checkpoint, setup_model, start_vllm_engine, trainer_env_kwargs)


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
    """extra gym.make arguments as a JSON object, e.g. '{"top_k": 3}'; a key replaces the id's registered value
    (`synthetic` as a whole)"""
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
    """stop after the first iteration that ends past this many minutes from the start of training, evaluating and
    saving as at the last iteration (0: no limit)"""
    tasks_per_iteration: int = 8
    """distinct tasks per rollout batch (drawn from the train split without replacement where it is big enough)"""
    group_size: int = 4
    """episodes per task (G); rollout envs = tasks_per_iteration * group_size"""
    temperature: float = 1.0
    """sampling temperature at rollout (the log-probs use the same temperature)"""
    max_new_tokens: int = 64
    """generation budget per step"""
    max_prompt_tokens: int = 1024
    """prompts over this lose the end of their chunk, never the memory (agents.prompt.encode_prompt)"""
    reward: str = "em"
    """episode reward: em or f1, minus format_penalty per invalid op"""
    format_penalty: float = 0.0
    """subtracted from the reward per invalid operation in the episode"""
    scale_rewards: bool = True
    """advantage (r - mean) / (std + 1e-4) per group; False: r - mean only (Dr. GRPO, MemAgent)"""
    episode_weighting: str = "equal"
    """equal: each episode weighs the same whatever its number of steps; steps: each step weighs the same"""
    loss_type: str = "grpo"
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
    """bf16 autocast (default: on GPUs with bf16, and on CPUs with native bf16 for models of 30M+ parameters:
    faster there, slower on smaller ones, bench/bench_train.py)"""
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
    """generation for rollouts and in-run evaluation: hf (transformers on the trainer's weights) or vllm (an engine
    in each process, given the new weights after every update)"""
    vllm_dtype: str = "auto"
    """vLLM weights: auto (bfloat16 where the trainer computes in bf16, else float32), float32 or bfloat16"""
    vllm_gpu_memory_utilization: float = 0.3
    """the engine's share of the GPU beside the trainer"""
    vllm_importance_sampling_cap: float = 2.0
    """truncated importance sampling (TRL, token_truncate): tokens weigh min(pi_trainer / pi_vllm, cap); 0: off"""


@dataclass
class StepSample:
    """One chunk step of one episode: the policy's tokens and what the loss needs about them."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logprobs: list[float]
    episode: int
    advantage: float = 0.0
    weight: float = 1.0
    sampler_logprobs: list[float] | None = None
    """With vLLM: the sampler's log-probs, while old_logprobs are the trainer's for the same tokens."""


def rollout(envs, policy: LLMPolicy, task_indices: list[int], seed: int, first_episode: int):
    """One episode per env (env i on task task_indices[i], episode number first_episode + i).

    Returns (samples, episodes): every step as a StepSample with the sampled ids and log-probs, and
    per episode its reward inputs and op counts, in env order.
    """
    records = sorted(run_episodes(envs, policy, [[t] for t in task_indices], seed, keep_steps=True),
                     key=lambda r: r["slot"])
    samples, episodes = [], []
    for record in records:
        for _, output in record["steps"]:
            g = output.generation
            if g.completion_ids:  # a failed generation (vLLM: prompt over its length) has none
                samples.append(StepSample(g.prompt_ids, g.completion_ids, g.logprobs, first_episode + record["slot"]))
        episodes.append({k: record[k] for k in ("em", "f1", "invalid_ops", "ops", "num_steps", "prompts_cut",
                                                "prompt_tokens_cut")})
    return samples, episodes


def group_advantages(rewards: np.ndarray, group_size: int, scale: bool) -> tuple[np.ndarray, float]:
    """(advantage per episode, fraction of groups whose rewards are all equal). Episodes are grouped in order.

    The std has Bessel's correction, as torch.std in TRL.
    """
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    std = grouped.std(axis=1, ddof=1, keepdims=True)
    advantages = centred / (std + 1e-4) if scale else centred
    return advantages.reshape(-1), float(np.mean(std.squeeze(1) == 0))


def token_logprobs(scorer, samples: list[StepSample], pad_id: int, temperature: float, device):
    """(log-probs, entropy, mask) of the samples' completion tokens, each (batch, longest completion)."""
    batch = pack([s.prompt_ids for s in samples], [s.completion_ids for s in samples], pad_id)
    logprobs, entropy, _ = scorer(**{k: v.to(device) for k, v in batch.items()}, temperature=temperature)
    return logprobs, entropy, batch["target_mask"].to(device).float()


def padded_old_logprobs(samples: list[StepSample], like: torch.Tensor) -> torch.Tensor:
    """The rollout log-probs laid out like `token_logprobs`' output (zeros past each completion)."""
    old = torch.zeros_like(like)
    for row, s in enumerate(samples):
        old[row, :len(s.old_logprobs)] = torch.tensor(s.old_logprobs, device=like.device)
    return old


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
def trainer_logprobs(scorer, samples: list[StepSample], pad_id: int, temperature: float, device,
                     micro_batch: int) -> None:
    """vLLM rollouts: the trainer's log-probs of the sampled tokens become old_logprobs; the sampler's are kept
    for the importance weights and the sync check."""
    for begin in range(0, len(samples), micro_batch):
        batch = samples[begin:begin + micro_batch]
        logprobs, _, _ = token_logprobs(scorer, batch, pad_id, temperature, device)
        for row, s in enumerate(batch):
            s.sampler_logprobs, s.old_logprobs = s.old_logprobs, logprobs[row, :len(s.completion_ids)].tolist()


def samples_to_score(samples: list[StepSample], beta: float, sync_check: int) -> list[StepSample]:
    """The samples whose old log-probs the update uses: all with beta > 0, else those with a non-zero advantage
    (the others carry no gradient), plus the first `sync_check` so that every iteration logs the log-prob gap."""
    return [s for i, s in enumerate(samples) if i < sync_check or s.advantage != 0 or beta > 0]


def logprob_gap(samples: list[StepSample]) -> tuple[float, float]:
    """(mean, max) absolute gap between the trainer's and the sampler's log-probs, over the scored samples' tokens."""
    gaps = np.concatenate([np.abs(np.subtract(s.old_logprobs, s.sampler_logprobs)) for s in samples
                           if s.sampler_logprobs is not None])
    return float(gaps.mean()), float(gaps.max())


def sampling_weights(samples: list[StepSample], like: torch.Tensor, cap: float) -> torch.Tensor | None:
    """min(exp(trainer - sampler log-prob), cap) per token (TRL's truncated importance sampling); None without vLLM."""
    if cap <= 0 or samples[0].sampler_logprobs is None:
        return None
    sampler = torch.zeros_like(like)
    for row, s in enumerate(samples):
        sampler[row, :len(s.sampler_logprobs)] = torch.tensor(s.sampler_logprobs, device=like.device)
    return torch.exp(padded_old_logprobs(samples, like) - sampler).clamp(max=cap)


def disable_dropout(model) -> None:
    """Rollouts sample in eval mode; the update must see the same network, or the first ratio is not 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_env_args(args.env_id, args.data_path, args.env_kwargs)
    check_backend_args(args)
    if args.loss_type not in ("grpo", "dapo", "dr_grpo"):
        raise SystemExit(f"error: --loss-type must be grpo, dapo or dr_grpo, got {args.loss_type!r}")
    if args.reward not in ("em", "f1") or args.episode_weighting not in ("equal", "steps"):
        raise SystemExit("error: --reward must be em or f1 and --episode-weighting equal or steps")
    if args.dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"error: --dtype must be float32 or bfloat16, got {args.dtype!r}")
    if args.group_size < 2:
        raise SystemExit("error: --group-size must be at least 2 (advantages are relative to the group)")
    if min(args.num_iterations, args.tasks_per_iteration, args.minibatch_size, args.micro_batch_size,
           args.update_epochs, args.max_new_tokens, args.num_envs, args.max_prompt_tokens) <= 0 \
            or args.temperature <= 0 or args.eval_episodes < 0 or args.time_limit_minutes < 0:
        raise SystemExit("error: counts and sizes must be positive, --temperature > 0 and --time-limit-minutes >= 0")
    num_envs = args.tasks_per_iteration * args.group_size
    args.num_rollout_envs = num_envs
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.bf16 is None:
        args.bf16 = default_bf16(args.resume or args.model, args.gguf_file, args.device)
    accelerator = make_accelerator(args.bf16, args.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.tasks_per_iteration % world:
        raise SystemExit(f"error: --tasks-per-iteration ({args.tasks_per_iteration}) must be a multiple of the "
                         f"number of processes ({world}): each process runs whole groups")
    local_envs = num_envs // world
    first_env = rank * local_envs  # this process's envs are episodes first_env .. first_env + local_envs - 1
    run_name = broadcast_object_list([run_name])[0]

    try:
        lm, tokenizer, merged_adapters = setup_model(
            args.model, args.gguf_file, args.resume, args.lora_r, args.lora_alpha, 0.0, args.lora_target_modules,
            args.gradient_checkpointing, device=str(accelerator.device), dtype=args.dtype, merge_start_adapter=True)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    disable_dropout(lm)
    uses_lora = hasattr(lm, "peft_config")
    state = load_trainer_state(args.resume)
    # The KL reference is the run's starting policy, the same after --resume. LoRA: the adapter disabled
    # (the base, with any start adapter merged); all weights: the start loaded again, in the policy's precision.
    reference_spec = (state or {}).get("reference", {"model": args.model, "gguf_file": args.gguf_file})
    reference = None
    if args.beta > 0 and not uses_lora:
        reference_dtype = "bfloat16" if args.dtype == "bfloat16" or accelerator.mixed_precision == "bf16" else "float32"
        try:
            reference = load_reference(reference_spec, str(accelerator.device), reference_dtype)
        except ValueError as err:
            raise SystemExit(f"error: {err}")
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=args.learning_rate)
    scorer, optimizer = accelerator.prepare(CompletionScorer(lm), optimizer)
    if world > 1:  # every process starts from the same weights, but samples its own completions
        torch.manual_seed(args.seed + rank)
    start_iteration = 0
    if state is not None and "iteration" in state:
        optimizer.load_state_dict(state["optimizer"])
        start_iteration = state["iteration"]
    base_model, base_gguf = base_model_of(args.resume or args.model, args.gguf_file)
    envs = make_vector_env(args.env_id, trainer_env_kwargs(args, "train", args.context_tokens), local_envs)
    task_count = num_tasks(envs)
    args.num_train_tasks = task_count
    writer = SummaryWriter(f"{args.save_dir}/{run_name}") if accelerator.is_main_process else None
    if writer:
        writer.add_text("hyperparameters", hparams_table(args))
    engine = start_vllm_engine(args, accelerator, lm, base_model, base_gguf)
    if engine is not None:
        from agents.vllm_backend import VLLMGenerator

        try:
            sampler = VLLMGenerator(engine, tokenizer, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, max_prompt_tokens=args.max_prompt_tokens)
        except ValueError as err:
            raise SystemExit(f"error: {err}")
    else:
        sampler = HFGenerator(lm, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              max_prompt_tokens=args.max_prompt_tokens)
    policy = LLMPolicy(sampler, protocol_of(args.env_id))
    task_rng = np.random.default_rng(args.seed)

    def draw_tasks() -> np.ndarray:
        if task_count is None:
            return task_rng.integers(2**31, size=args.tasks_per_iteration)
        return task_rng.choice(task_count, size=args.tasks_per_iteration, replace=task_count < args.tasks_per_iteration)

    for _ in range(start_iteration):  # resuming: the same task stream as an uninterrupted run
        draw_tasks()
    shuffle_rng = np.random.RandomState(args.seed)  # the same minibatches in every process
    device = accelerator.device
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
    args.iterations_done = start_iteration
    for iteration in range(start_iteration + 1, args.num_iterations + 1):
        # 1. Rollout: G episodes per task, sampled with temperature; keep token ids and log-probs.
        #    Each process runs whole groups; then every process holds all episodes and samples.
        rollout_start = time.time()
        tasks = np.repeat(draw_tasks(), args.group_size)[first_env:first_env + local_envs]
        lm.eval()
        with accelerator.autocast():
            samples, episodes = rollout(envs, policy, [int(t) for t in tasks],
                                        seed=args.seed * 100_003 + iteration + first_env, first_episode=first_env)
        rollout_time = time.time() - rollout_start  # generation and env steps only
        episodes = gather_object(episodes)
        # 2. Advantages: one per episode, relative to its group, given to every step of the episode.
        rewards = np.array([e[args.reward] - args.format_penalty * e["invalid_ops"] for e in episodes])
        advantages, zero_std = group_advantages(rewards, args.group_size, args.scale_rewards)
        for s in samples:
            s.advantage = float(advantages[s.episode])
        score_start = time.time()
        if engine is not None:  # the trainer's log-probs of vLLM's tokens, for this process's samples that train
            with accelerator.autocast():
                trainer_logprobs(accelerator.unwrap_model(scorer), samples_to_score(samples, args.beta,
                                 args.micro_batch_size), tokenizer.pad_token_id, args.temperature, device,
                                 args.micro_batch_size)
        score_time = time.time() - score_start
        samples = gather_object(samples)
        for s in samples:
            s.weight = 1.0 / episodes[s.episode]["num_steps"] if args.episode_weighting == "equal" else 1.0
        mean_weight = float(np.mean([s.weight for s in samples]))
        # 3. Update. Every sample counts in the denominators, as in TRL; one with zero advantage carries no
        #    gradient when beta = 0, so its forward pass is skipped. Each process takes every world-th sample
        #    of a minibatch in micro-batches (gradients accumulate, then are averaged over processes); one left
        #    without any runs a zero-weight sample, so every process steps together.
        lm.train()
        update_start = time.time()
        stats = {"loss": [], "clipfrac": [], "approx_kl": [], "kl": [], "entropy": []}
        train_tokens = 0
        for _ in range(args.update_epochs):
            order = shuffle_rng.permutation(len(samples))
            for begin in range(0, len(samples), args.minibatch_size):
                minibatch = [samples[i] for i in order[begin:begin + args.minibatch_size]]
                denominator = loss_denominator(torch.tensor([s.weight for s in minibatch], device=device),
                                               torch.tensor([len(s.completion_ids) for s in minibatch], device=device),
                                               args.loss_type, args.max_new_tokens, mean_weight) / world
                own = [s for s in minibatch[rank::world] if s.advantage != 0 or args.beta > 0]
                micro_batches = [own[i:i + args.micro_batch_size] for i in range(0, len(own), args.micro_batch_size)]
                micro_batches = micro_batches or [[dataclasses.replace(minibatch[0], weight=0.0)]]
                for number, batch in enumerate(micro_batches):
                    last = number == len(micro_batches) - 1
                    with nullcontext() if last else accelerator.no_sync(scorer):
                        logprobs, entropy, mask = token_logprobs(scorer, batch, tokenizer.pad_token_id,
                                                                 args.temperature, device)
                        ref = None
                        if args.beta > 0:
                            with torch.no_grad():
                                if uses_lora:
                                    with lm.disable_adapter():
                                        ref = token_logprobs(accelerator.unwrap_model(scorer), batch,
                                                             tokenizer.pad_token_id, args.temperature, device)[0]
                                else:
                                    with accelerator.autocast():
                                        ref = token_logprobs(reference, batch, tokenizer.pad_token_id,
                                                             args.temperature, device)[0]
                        loss, loss_stats = grpo_loss(
                            logprobs, padded_old_logprobs(batch, logprobs), ref,
                            torch.tensor([s.advantage for s in batch], device=device),
                            torch.tensor([s.weight for s in batch], device=device), mask, args, denominator,
                            sampling_weights(batch, logprobs, args.vllm_importance_sampling_cap))
                        accelerator.backward(loss)
                    if own:
                        stats["loss"].append(loss.item())
                        stats["entropy"].append(float((entropy * mask).sum() / mask.sum()))
                        for key, value in loss_stats.items():
                            stats[key].append(value)
                accelerator.clip_grad_norm_(scorer.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                train_tokens += sum(len(s.completion_ids) for s in minibatch)
        if engine is not None:
            engine.load_weights(lm)
        update_time = time.time() - update_start

        # 4. Log: rewards, op frequencies, prompt cuts, loss terms, throughput (the main process).
        if writer:
            ems = np.array([e["em"] for e in episodes])
            total_ops = sum(sum(e["ops"].values()) + e["invalid_ops"] for e in episodes)
            total_steps = sum(e["num_steps"] for e in episodes)
            response_lengths = [len(s.completion_ids) for s in samples]
            writer.add_scalar("rollout/reward_mean", rewards.mean(), iteration)
            writer.add_scalar("rollout/reward_std", rewards.std(), iteration)
            writer.add_scalar("rollout/em", ems.mean(), iteration)
            writer.add_scalar("rollout/f1", np.mean([e["f1"] for e in episodes]), iteration)
            writer.add_scalar("rollout/zero_std_group_fraction", zero_std, iteration)
            writer.add_scalar("rollout/invalid_op_rate", sum(e["invalid_ops"] for e in episodes) / max(1, total_ops),
                              iteration)
            writer.add_scalar("rollout/prompt_cut_rate", sum(e["prompts_cut"] for e in episodes) / total_steps,
                              iteration)
            writer.add_scalar("rollout/prompt_tokens_cut_per_step",
                              sum(e["prompt_tokens_cut"] for e in episodes) / total_steps, iteration)
            for op in OP_KEYS + ("answer",):
                writer.add_scalar(f"rollout/ops_{op}_per_episode", np.mean([e["ops"][op] for e in episodes]), iteration)
            writer.add_scalar("rollout/response_length", float(np.mean(response_lengths)), iteration)
            if engine is not None:
                gap_mean, gap_max = logprob_gap(samples)
                writer.add_scalar("rollout/logprob_diff_mean", gap_mean, iteration)
                writer.add_scalar("rollout/logprob_diff_max", gap_max, iteration)
            for key, values in stats.items():
                if values:
                    writer.add_scalar(f"losses/{'policy_loss' if key == 'loss' else key}", float(np.mean(values)), iteration)
            writer.add_scalar("charts/episodes_per_second", num_envs / rollout_time, iteration)
            writer.add_scalar("charts/trainer_logprob_seconds", score_time, iteration)
            writer.add_scalar("charts/rollout_tokens_per_second", sum(response_lengths) / rollout_time, iteration)
            writer.add_scalar("charts/train_tokens_per_second", train_tokens / max(update_time, 1e-9), iteration)
            writer.add_scalar("charts/peak_memory_mb", peak_memory_mb(), iteration)
            print(f"iter={iteration} reward={rewards.mean():.3f} em={ems.mean():.3f} zero_std={zero_std:.2f} "
                  f"samples={len(samples)} loss={np.mean(stats['loss'] or [0]):.4f} "
                  f"clipfrac={np.mean(stats['clipfrac'] or [0]):.3f} approx_kl={np.mean(stats['approx_kl'] or [0]):.2e} "
                  f"rollout={rollout_time:.1f}s score={score_time:.1f}s update={update_time:.1f}s")
        # Every process decides from the main process's clock, so all stop after the same iteration.
        last = iteration == args.num_iterations or broadcast_object_list(
            [bool(args.time_limit_minutes) and time.time() - start_time > 60 * args.time_limit_minutes])[0]
        maybe_evaluate(iteration, force=last)
        saving = args.save_every and iteration % args.save_every == 0 or last
        if saving and accelerator.is_main_process:
            save_checkpoint(Path(args.save_dir) / run_name / "checkpoint", lm, tokenizer, args, base_model, base_gguf,
                            {"optimizer": optimizer.state_dict(), "iteration": iteration, "reference": reference_spec},
                            merged_adapters)
        if last:
            args.iterations_done = iteration
            break

    envs.close()
    accelerator.wait_for_everyone()
    if writer:
        summary = {"run_name": run_name, "checkpoint": str(Path(args.save_dir) / run_name / "checkpoint"),
                   "seconds": time.time() - start_time, "peak_memory_mb": peak_memory_mb(), "eval_history": history,
                   "num_processes": world, "num_train_tasks": task_count,
                   "iterations": args.iterations_done}
        (Path(args.save_dir) / run_name / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        writer.close()
