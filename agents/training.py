"""Plumbing shared by train_sft.py and train_grpo.py: model set-up, the completion scorer, checkpoints.

The algorithms stay in the scripts; this holds what both need identically, so a checkpoint of
one loads in the other and in eval.py (`--model <checkpoint dir>`).
"""

from __future__ import annotations

import datetime
import inspect
import json
import resource
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from .models import BASE_MODEL_FILE, load_causal_lm, merged_adapters_of, parameter_count, pick_device

TRAINER_STATE = "trainer_state.pt"
LOGIT_CHUNK_ELEMENTS = 1 << 24
"""Logits computed at once by CompletionScorer: rows of the LM head per chunk = this / vocabulary size."""


@dataclass
class StepSample:
    """One chunk step of one episode: the policy's tokens and what the loss needs about them."""

    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    """The sampler's log-probs of the completion (cached decoding or vLLM)."""
    episode: int
    advantage: float = 0.0
    weight: float = 1.0
    old_logprobs: list[float] | None = None
    """The trainer's log-probs of the same tokens before the update (`score_old_logprobs`): the ratio's denominator."""


def rollout(envs, policy, task_indices: list[int], seed: int, first_episode: int, start_states: list | None = None):
    """train_grpo.py's rollout: one episode per env, env i on task task_indices[i] as episode first_episode + i
    (from `start_states[i]` where given: `branch_rollout`).

    Returns (samples, episodes, records): every step as a StepSample with the sampled ids and log-probs; per
    episode its reward inputs and op counts, in env order; and `run_episodes`' records with their steps, in the
    same order (for --save-trajectories).
    """
    from .evaluation import run_episodes

    records = sorted(run_episodes(envs, policy, [[int(t)] for t in task_indices], seed, keep_steps=True,
                                  start_states=start_states), key=lambda r: r["slot"])
    samples, episodes = [], []
    for record in records:
        for _, output in record["steps"]:
            g = output.generation  # None from a scripted policy; no ids from a failed generation (vLLM: long prompt)
            if g is not None and g.completion_ids:
                samples.append(StepSample(g.prompt_ids, g.completion_ids, g.logprobs, first_episode + record["slot"]))
        episodes.append({**{k: record[k] for k in ("em", "f1", "invalid_ops", "ops", "num_steps", "prompts_cut",
                                                   "prompt_tokens_cut")},
                         "unanswered": float(np.mean([answer == "" for answer in record["answer"]]))})
    return samples, episodes, records


def branch_rollout(envs, policy, group_tasks: list[int], group_size: int, seed: int, first_episode: int):
    """train_grpo.py's rollout with `--branch-at superseded`: per group, one root episode on its task runs (sampled)
    up to the first chunk that supersedes a stated fact (`first_superseding_chunk`; the start where none does, or
    where the root ends first); its snapshot there starts the group's `group_size` continuations, in envs
    g * group_size .. (g + 1) * group_size - 1. The continuations differ only after the branch point, so their
    group-relative advantages credit the decisions from there on; the shared prefix carries no advantage and is
    not trained on. Returns what `rollout` does, over the continuations, and the prefix steps per group."""
    from atommem_env.process import first_superseding_chunk

    roots = [envs.envs[g * group_size].unwrapped for g in range(len(group_tasks))]
    observations = [root.reset(seed=seed + g, options={"task_index": int(task)})[0]
                    for g, (root, task) in enumerate(zip(roots, group_tasks))]
    start_states = [root.get_state() for root in roots]
    branch_chunks = [first_superseding_chunk(root.facts, root.chunker) for root in roots]
    states = [None if chunk else start for chunk, start in zip(branch_chunks, start_states)]
    prefix_steps = [0] * len(roots)
    while True:
        active = [g for g, state in enumerate(states) if state is None]
        if not active:
            break
        outputs = policy.act([observations[g] for g in active], [roots[g].task for g in active],
                             slots=[g * group_size for g in active])
        for g, out in zip(active, outputs):
            observations[g], _, terminated, truncated, _ = roots[g].step(out.text)
            prefix_steps[g] += 1
            if terminated or truncated or out.error:  # ended before its branch point: branch at the start
                states[g] = start_states[g]
            elif observations[g]["chunk_index"] >= branch_chunks[g]:
                states[g] = roots[g].get_state()
    samples, episodes, records = rollout(envs, policy, [task for task in group_tasks for _ in range(group_size)],
                                         seed, first_episode,
                                         start_states=[state for state in states for _ in range(group_size)])
    return samples, episodes, records, prefix_steps


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """One training batch: prompts left-padded, completions right-padded, so every completion starts at one column.

    Returns input_ids and attention_mask (batch, longest prompt + longest completion), position_ids
    counting real tokens only (as generation does), targets (batch, longest completion) and
    target_mask. Only the completion columns then go through the LM head, whatever the prompt lengths.
    """
    prompt_width, completion_width = max(map(len, prompts)), max(map(len, completions))
    rows = len(prompts)
    input_ids = torch.full((rows, prompt_width + completion_width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    targets = torch.full((rows, completion_width), pad_id, dtype=torch.long)
    target_mask = torch.zeros((rows, completion_width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        start = prompt_width - len(prompt)
        input_ids[row, start:prompt_width + len(completion)] = torch.tensor(prompt + completion)
        attention[row, start:prompt_width + len(completion)] = 1
        targets[row, :len(completion)] = torch.tensor(completion)
        target_mask[row, :len(completion)] = True
    return {"input_ids": input_ids, "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "targets": targets, "target_mask": target_mask}


def padded(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-token values laid out like `token_logprobs`' output (zeros past each completion)."""
    out = torch.zeros_like(like)
    for row, values in enumerate(rows):
        out[row, :len(values)] = torch.tensor(values, device=like.device)
    return out


def logprob_gap(samples: list[StepSample]) -> tuple[float, float]:
    """(mean, max) absolute gap between the trainer's and the sampler's log-probs, over the scored samples' tokens."""
    gaps = np.concatenate([np.abs(np.subtract(s.old_logprobs, s.sampler_logprobs)) for s in samples
                           if s.old_logprobs is not None])
    return float(gaps.mean()), float(gaps.max())


def importance_weights(samples: list[StepSample], like: torch.Tensor, cap: float) -> torch.Tensor | None:
    """min(exp(trainer - sampler log-prob), cap) per token: TRL's truncated importance sampling; None when off."""
    if cap <= 0:
        return None
    gap = padded([s.old_logprobs for s in samples], like) - padded([s.sampler_logprobs for s in samples], like)
    return torch.exp(gap).clamp(max=cap)


def _score_rows(head, softcap, temperature, hidden, targets):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    with torch.no_grad():  # metrics, not part of any loss
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        correct = logprobs.argmax(-1) == targets
    return logprobs.gather(-1, targets[:, None]).squeeze(-1), entropy, correct


def _base(lm):
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class CompletionScorer(torch.nn.Module):
    """Log-probs of completion tokens under a causal LM: the loss input of SFT (-log-prob) and GRPO.

    forward(**pack(...), temperature) -> (log-probs, entropy, argmax == target), each (batch, longest
    completion), zero past each completion. Memory scales with the completion tokens of the batch, never
    with completion tokens x vocabulary: the decoder's last hidden states at the completion positions go
    through the LM head a chunk of rows at a time, each chunk recomputed in the backward pass
    (activation checkpointing) instead of kept. `final_logit_softcapping` (Gemma) is applied;
    `verify_scorer` checks the result against the model's own logits at start-up.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, targets, target_mask, temperature: float = 1.0):
        base = _base(self.lm)
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state
        first = input_ids.shape[1] - targets.shape[1]  # the column of every row's first completion token
        hidden = hidden[:, first - 1:-1][target_mask]
        flat_targets = targets[target_mask]
        head, softcap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)
        rows = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
        parts = []
        for begin in range(0, len(flat_targets), rows):
            args = (head, softcap, temperature, hidden[begin:begin + rows], flat_targets[begin:begin + rows])
            parts.append(checkpoint(_score_rows, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _score_rows(*args))
        outputs = []
        for values, dtype in zip(zip(*parts), (torch.float32, torch.float32, torch.bool)):
            full = torch.zeros(targets.shape, dtype=dtype, device=targets.device)
            full[target_mask] = torch.cat(values)
            outputs.append(full)
        return tuple(outputs)


@torch.no_grad()
def verify_scorer(lm) -> None:
    """Raises ValueError if CompletionScorer's log-probs differ from the model's own logits (a model whose
    logits are more than its LM head over the last hidden state)."""
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    vocab = _base(lm).get_output_embeddings().weight.shape[0]
    ids = (torch.arange(12) * 7919 % vocab).tolist()
    batch = {k: v.to(device) for k, v in pack([ids[:8]], [ids[8:]], pad_id=0).items()}
    ours = CompletionScorer(lm)(**batch)[0][0]
    full = torch.log_softmax(lm(input_ids=torch.tensor([ids], device=device)).logits[0, 7:11].float(), dim=-1)
    reference = full.gather(-1, torch.tensor(ids[8:], device=device)[:, None]).squeeze(-1)
    lm.train(was_training)
    gap = float((ours - reference).abs().max())
    if gap > (1e-3 if next(lm.parameters()).dtype == torch.float32 else 5e-2):
        raise ValueError(f"the model's logits are not its LM head over the decoder's last hidden state "
                         f"(log-prob gap {gap:.3g}): CompletionScorer cannot train it")


BF16_CPU_MIN_PARAMETERS = 30_000_000
"""On a CPU with native bf16, autocast pays off from about this size: bench/bench_train.py measured it slower
than fp32 on the 1M-parameter tiny model and faster on SmolLM2-135M (docs/benchmarks.md)."""


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: oneDNN then runs bf16 matmuls natively instead of emulating them."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_bf16(model: str, gguf_file: str | None, device: str) -> bool:
    """--bf16's default: on GPUs with bf16, and on CPUs with native bf16 for models of BF16_CPU_MIN_PARAMETERS
    or more; off elsewhere. A model whose config cannot be read gets fp32 (its loading then says why)."""
    if pick_device(device).startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if not cpu_has_native_bf16():
        return False
    try:
        return parameter_count(*base_model_of(model, gguf_file)) >= BF16_CPU_MIN_PARAMETERS
    except (OSError, ValueError):
        return False


def warn_if_bf16_is_emulated(bf16: bool, device: str) -> None:
    if bf16 and not pick_device(device).startswith("cuda") and not cpu_has_native_bf16():
        warnings.warn("bf16 autocast on a CPU without native bf16 (AVX-512 BF16 or AMX): oneDNN emulates it, "
                      "far slower than fp32 (docs/benchmarks.md); --bf16 False trains in fp32", stacklevel=3)


def make_accelerator(bf16: bool, device: str):
    """The Accelerator of both trainers: bf16 autocast where asked, and a process-group time-out of hours,
    since other processes wait while the main one saves or logs."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    warn_if_bf16_is_emulated(bf16, device)
    return Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device == "cpu",
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=3))])


def check_backend_args(args) -> None:
    if args.dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"error: --dtype must be float32 or bfloat16, got {args.dtype!r}")
    if args.backend not in ("hf", "vllm") or args.vllm_dtype not in ("auto", "float32", "bfloat16"):
        raise SystemExit("error: --backend must be hf or vllm, --vllm-dtype auto, float32 or bfloat16")
    if args.vllm_enforce_eager and args.backend != "vllm":
        raise SystemExit("error: --vllm-enforce-eager is for --backend vllm")


def start_vllm_engine(args, accelerator, model, base_model: str, base_gguf: str | None):
    """With --backend vllm: this process's engine, holding the model's current weights; else None.

    The engine starts from the base model's files (written once as a Hugging Face directory if it is a
    GGUF file); the trainer's weights are loaded right away, so a checkpoint or a LoRA start is what it runs.
    """
    if args.backend != "vllm":
        return None
    from .vllm_backend import VLLMEngine, hf_directory

    try:
        if accelerator.is_main_process:  # the others then reuse the written directory
            hf_directory(base_model, base_gguf)
        accelerator.wait_for_everyone()
        computes_bf16 = args.dtype == "bfloat16" or accelerator.mixed_precision == "bf16"
        dtype = args.vllm_dtype if args.vllm_dtype != "auto" else "bfloat16" if computes_bf16 else "float32"
        engine = VLLMEngine(hf_directory(base_model, base_gguf), dtype=dtype, seed=args.seed + accelerator.process_index,
                            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                            enforce_eager=args.vllm_enforce_eager)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    engine.load_weights(model)
    return engine


def check_env_args(args, lengths) -> None:
    """Exits with a clear message, before any model work, for an unknown id, a dataset id without an existing data
    file, --env-kwargs that is not a JSON object of the env's arguments, or a length the id cannot take
    (`lengths`: every context length the run will build envs with, None for the id's own)."""
    import atommem_env
    from atommem_env.env import AtomMemEnv

    if args.env_id not in atommem_env.ENV_IDS:
        raise SystemExit(f"error: unknown env id {args.env_id!r}; registered: {sorted(atommem_env.ENV_IDS)}")
    if args.env_id in atommem_env.DATA_ENV_IDS and not (args.data_path and Path(args.data_path).is_file()):
        raise SystemExit(f"error: {args.env_id} needs --data-path pointing at an existing file")
    try:
        for length in lengths:  # the builder every run uses: whatever it refuses is refused here first
            extra = trainer_env_kwargs(args, "train", length)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    unknown = sorted(set(extra) - set(inspect.signature(AtomMemEnv.__init__).parameters) - {"self"})
    if unknown:
        raise SystemExit(f"error: --env-kwargs: {unknown} are not arguments of the env (atommem_env/env.py)")


def setup_model(model: str, gguf_file: str | None, resume: str | None, lora_r: int, lora_alpha: int,
                lora_dropout: float, lora_target_modules: tuple[str, ...], gradient_checkpointing: bool, device: str,
                dtype: str, merge_start_adapter: bool = False):
    """(model, tokenizer, merged adapters) ready to train: a fresh LoRA (lora_r > 0) or full model, or a resumed checkpoint.

    A LoRA checkpoint as the start goes on training its adapter, unless `merge_start_adapter` (GRPO):
    then the adapter is merged into the base, so that the start is one model, and a fresh adapter
    (or all weights) trains on top; the merged adapters are returned, to be saved with the checkpoint.
    """
    if resume is not None:
        net, tokenizer = load_causal_lm(resume, device=device, dtype=dtype, trainable=True)
        merged = merged_adapters_of(resume)
    else:
        net, tokenizer = load_causal_lm(model, gguf_file=gguf_file, device=device, dtype=dtype, trainable=True)
        merged = merged_adapters_of(model)
        if merge_start_adapter and hasattr(net, "peft_config"):
            merged.append(Path(model))
            net = net.merge_and_unload()
        if lora_r > 0 and not hasattr(net, "peft_config"):
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                target_modules=list(lora_target_modules), task_type="CAUSAL_LM")
            try:
                net = get_peft_model(net, config)
            except ValueError as err:
                raise ValueError(f"LoRA set-up failed (check --lora-target-modules): {err}") from err
    if gradient_checkpointing:
        # transformers 5 renamed it and deprecated the old name; 4.49 (our floor) only has the old one.
        enable = getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable
        enable()
        if hasattr(net, "enable_input_require_grads"):
            net.enable_input_require_grads()  # LoRA: frozen embeddings would cut the graph
    verify_scorer(net)
    net.train()
    return net, tokenizer, merged


def load_reference(spec: dict, device: str, dtype: str):
    """The KL reference for full fine-tuning: the run's starting policy, loaded again, frozen (LoRA runs use
    the policy with its adapter disabled instead). `spec` is what the run recorded: model, gguf_file."""
    try:
        net, _ = load_causal_lm(spec["model"], gguf_file=spec.get("gguf_file"), device=device, dtype=dtype)
    except ValueError as err:
        raise ValueError(f"cannot load the KL reference (the run's starting policy): {err}") from err
    if hasattr(net, "peft_config"):
        net = net.merge_and_unload()
    return CompletionScorer(net).eval().requires_grad_(False)


def token_logprobs(scorer, samples, pad_id: int, temperature: float, device):
    """(log-probs, entropy, mask) of the samples' completion tokens, each (batch, longest completion)."""
    batch = pack([s.prompt_ids for s in samples], [s.completion_ids for s in samples], pad_id)
    logprobs, entropy, _ = scorer(**{k: v.to(device) for k, v in batch.items()}, temperature=temperature)
    return logprobs, entropy, batch["target_mask"].to(device).float()


def disable_dropout(model) -> None:
    """Rollouts sample in eval mode; the update must see the same network, or the first ratio is not 1. Dropout
    lives in nn.Dropout modules and in attention's functional dropout rate (`attention_dropout` in Llama)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def make_reference_logprobs(args, accelerator, lm, scorer, reference_spec: dict, pad_id: int):
    """batch -> the KL reference's log-probs (None with beta 0). The reference is the run's starting policy,
    the same after --resume: with LoRA, the policy with its adapter disabled (the base, with any start adapter
    merged); with all weights, the start loaded again, frozen, in the policy's precision."""
    if args.beta == 0:
        return None
    if hasattr(lm, "peft_config"):
        def reference_logprobs(batch):
            with torch.no_grad(), lm.disable_adapter():
                return token_logprobs(accelerator.unwrap_model(scorer), batch, pad_id, args.temperature,
                                      accelerator.device)[0]
        return reference_logprobs
    dtype = "bfloat16" if args.dtype == "bfloat16" or accelerator.mixed_precision == "bf16" else "float32"
    try:
        reference = load_reference(reference_spec, str(accelerator.device), dtype)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    def reference_logprobs(batch):
        with torch.no_grad(), accelerator.autocast():
            return token_logprobs(reference, batch, pad_id, args.temperature, accelerator.device)[0]
    return reference_logprobs


def rollout_metrics(episodes: list[dict], response_lengths: list[int], rewards: np.ndarray, zero_std: float) -> dict:
    """train_grpo.py's rollout/ metrics of an iteration, over all its episodes; `response_lengths`: tokens per step."""
    from .evaluation import OP_KEYS

    total_ops = sum(sum(e["ops"].values()) + e["invalid_ops"] for e in episodes)
    total_steps = sum(e["num_steps"] for e in episodes)
    return {
        "rollout/reward_mean": rewards.mean(), "rollout/reward_std": rewards.std(),
        "rollout/em": np.mean([e["em"] for e in episodes]), "rollout/f1": np.mean([e["f1"] for e in episodes]),
        "rollout/zero_std_group_fraction": zero_std,
        "rollout/unanswered_rate": np.mean([e["unanswered"] for e in episodes]),
        "rollout/invalid_op_rate": sum(e["invalid_ops"] for e in episodes) / max(1, total_ops),
        "rollout/prompt_cut_rate": sum(e["prompts_cut"] for e in episodes) / total_steps,
        "rollout/prompt_tokens_cut_per_step": sum(e["prompt_tokens_cut"] for e in episodes) / total_steps,
        "rollout/response_length": np.mean(response_lengths),
        **{f"rollout/ops_{op}_per_episode": np.mean([e["ops"][op] for e in episodes]) for op in OP_KEYS + ("answer",)},
    }


def save_checkpoint(path: Path, model, tokenizer, args, base_model: str, gguf_file: str | None,
                    trainer_state: dict, merged_adapters: list[Path] = ()) -> None:
    """Model (or LoRA adapter, with the adapters merged under it), tokenizer, Args as JSON, trainer state."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if hasattr(model, "peft_config"):
        names = []
        for k, source in enumerate(merged_adapters):
            names.append(f"merged_adapter_{k}")
            if Path(source).resolve() != (path / names[-1]).resolve():
                shutil.copytree(source, path / names[-1], dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns(TRAINER_STATE, "merged_adapter_*"))
        (path / BASE_MODEL_FILE).write_text(json.dumps({"model": base_model, "gguf_file": gguf_file,
                                                        "merged_adapters": names}))
    (path / "args.json").write_text(json.dumps(asdict(args), indent=1, default=str))
    torch.save(trainer_state, path / TRAINER_STATE)


def load_trainer_state(resume: str | None, script: str, required: tuple[str, ...]) -> dict | None:
    """The trainer state of a `script` checkpoint to resume from (None without --resume); exits, before any model
    work, on a directory that is not one, naming what a resumable checkpoint of `script` holds."""
    if resume is None:
        return None
    path = Path(resume) / TRAINER_STATE
    holds = f"a {script} checkpoint directory (runs/<run>/checkpoint) holds {TRAINER_STATE} with {', '.join(required)}"
    if not path.is_file():
        raise SystemExit(f"error: --resume {resume}: not a checkpoint directory (no {TRAINER_STATE}); {holds}")
    state = torch.load(path, weights_only=False)
    missing = [key for key in required if key not in state]
    if missing:
        raise SystemExit(f"error: --resume {resume}: not a {script} checkpoint (its {TRAINER_STATE} has no "
                         f"{', '.join(missing)}); {holds}. To start from another run's checkpoint, give it as --model")
    return state


def base_model_of(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """The base model under a LoRA checkpoint (to record again when it is saved anew); else the model itself."""
    if (Path(model) / BASE_MODEL_FILE).is_file():
        base = json.loads((Path(model) / BASE_MODEL_FILE).read_text())
        return base["model"], base.get("gguf_file")
    return model, gguf_file


def peak_memory_mb() -> float:
    """Peak GPU memory if on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2**20


def hparams_table(args) -> str:
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())


def trainer_env_kwargs(args, split: str, context_tokens: int | None) -> dict:
    """`make_env_kwargs` from a trainer's Args: the id's registered settings unless a flag says otherwise."""
    from .evaluation import make_env_kwargs, parse_env_kwargs

    return make_env_kwargs(args.env_id, split=split, data_path=args.data_path, embedder=args.embedder,
                           context_tokens=context_tokens, chunk_tokens=args.chunk_tokens,
                           extra=parse_env_kwargs(args.env_kwargs))


def evaluate_and_log(model, tokenizer, args, step: int, writer, accelerator, engine=None) -> dict:
    """Greedy held-out evaluation of the model as an LLM policy, shared by all processes; the main one logs.

    With a vLLM `engine` (agents.vllm_backend), it generates there, after loading the model's weights.
    Returns {length label: summary} on the main process, {} on the others.
    """
    from accelerate.utils import gather_object

    from .backends import local_sampler
    from .evaluation import (episode_schedules, length_label, make_vector_env, protocol_of, run_episodes,
                             summarize)
    from .policies import LLMPolicy

    if engine is not None:
        engine.load_weights(model)
    generator = local_sampler(model, tokenizer, engine, max_new_tokens=args.eval_max_new_tokens,
                              max_prompt_tokens=args.max_prompt_tokens)
    policy = LLMPolicy(generator, protocol_of(args.env_id, args.env_kwargs))
    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    results = {}
    # SFT trains on a tuple of lengths, GRPO on one length (or None: the id's own).
    trained = args.context_tokens if isinstance(args.context_tokens, tuple) else (args.context_tokens,)
    for length in args.eval_context_tokens or dict.fromkeys(trained or (None,)):
        schedules = episode_schedules(args.eval_episodes, args.num_envs, rank, world)
        envs = make_vector_env(args.env_id, trainer_env_kwargs(args, "eval", length), args.num_envs)
        with accelerator.autocast():
            records = run_episodes(envs, policy, schedules, seed=10_000 + args.seed + rank * args.num_envs)
        envs.close()
        records = gather_object(records)
        if not accelerator.is_main_process:
            continue
        label = length_label(args.env_id, length)
        r = results[label] = summarize(records)
        for key in ("em", "f1", "valid_op_rate", "prompt_cut_rate"):
            writer.add_scalar(f"eval/{key}_{label}", r[key], step)
        for op, count in r["ops_per_episode"].items():
            writer.add_scalar(f"eval/ops_{op}_{label}", count, step)
        print(f"eval step={step} context={label}: em={r['em']:.3f} valid_op_rate={r['valid_op_rate']:.3f} "
              f"prompt_cut_rate={r['prompt_cut_rate']:.2f} ops={ {k: round(v, 1) for k, v in r['ops_per_episode'].items()} }")
    model.train(was_training)
    return results
