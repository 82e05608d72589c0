"""Plumbing shared by train_sft.py and train_grpo.py: model set-up, checkpoints, memory readings.

The algorithms stay in the scripts; this holds what both need identically, so a checkpoint of
one loads in the other and in eval.py (`--model <checkpoint dir>`).
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .models import BASE_MODEL_FILE, load_causal_lm

TRAINER_STATE = "trainer_state.pt"


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_target: int) -> torch.Tensor:
    """Float32 logits at positions first_target-1 .. width-2: those predicting tokens first_target .. width-1.

    Only these positions go through the LM head (`logits_to_keep`): over whole prompts the logits
    of a 150k-token vocabulary take gigabytes per sample. Slicing from the end stays right for a
    model whose forward ignores the argument.
    """
    keep = input_ids.shape[1] - first_target + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    return logits[:, -keep:-1].float()


def check_env_args(env_id: str, data_path: str | None) -> None:
    """Exits with a clear message for an unknown id or a dataset id without an existing data file."""
    import atommem_env

    if env_id not in atommem_env.ENV_IDS:
        raise SystemExit(f"error: unknown env id {env_id!r}; registered: {sorted(atommem_env.ENV_IDS)}")
    if env_id in atommem_env.DATA_ENV_IDS and not (data_path and Path(data_path).is_file()):
        raise SystemExit(f"error: {env_id} needs --data-path pointing at an existing file")


def setup_model(model: str, gguf_file: str | None, resume: str | None, lora_r: int, lora_alpha: int,
                lora_dropout: float, lora_target_modules: tuple[str, ...], gradient_checkpointing: bool, device: str,
                dtype: str):
    """(model, tokenizer) ready to train: a fresh LoRA (lora_r > 0) or full model, or a resumed checkpoint."""
    if resume is not None:
        if not (Path(resume) / TRAINER_STATE).is_file():
            raise ValueError(f"--resume {resume}: not a checkpoint directory (no {TRAINER_STATE})")
        net, tokenizer = load_causal_lm(resume, device=device, dtype=dtype, trainable=True)
    else:
        net, tokenizer = load_causal_lm(model, gguf_file=gguf_file, device=device, dtype=dtype, trainable=True)
        if lora_r > 0 and not hasattr(net, "peft_config"):  # a LoRA checkpoint goes on training its adapter
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
    net.train()
    return net, tokenizer


def save_checkpoint(path: Path, model, tokenizer, args, base_model: str, gguf_file: str | None,
                    trainer_state: dict) -> None:
    """Model (or LoRA adapter), tokenizer, Args as JSON, and the optimizer/scheduler/step state."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if hasattr(model, "peft_config"):
        (path / BASE_MODEL_FILE).write_text(json.dumps({"model": base_model, "gguf_file": gguf_file}))
    (path / "args.json").write_text(json.dumps(asdict(args), indent=1, default=str))
    torch.save(trainer_state, path / TRAINER_STATE)


def load_trainer_state(resume: str | None) -> dict | None:
    if resume is None:
        return None
    return torch.load(Path(resume) / TRAINER_STATE, weights_only=False)


def base_model_of(resume: str | None, model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """The base model a LoRA checkpoint was made from (to record again when it is saved anew)."""
    if resume is not None and (Path(resume) / BASE_MODEL_FILE).is_file():
        base = json.loads((Path(resume) / BASE_MODEL_FILE).read_text())
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


def env_kwargs_for(args, split: str, context_tokens: int) -> dict:
    """The env arguments both trainers use, from their Args (env id, data, chunking, embedder)."""
    kwargs = dict(split=split, context_tokens=context_tokens, chunk_tokens=args.chunk_tokens, embedder=args.embedder)
    if args.data_path:
        kwargs["data_path"] = args.data_path
    return kwargs


def evaluate_and_log(model, tokenizer, args, step: int, writer) -> dict:
    """Greedy evaluation of the model as an LLM policy on held-out tasks, logged under eval/."""
    import atommem_env

    from .backends import HFGenerator
    from .evaluation import evaluate_policy
    from .policies import LLMPolicy

    generator = HFGenerator(model, tokenizer, max_new_tokens=args.eval_max_new_tokens,
                            max_prompt_tokens=args.max_seq_len)
    policy = LLMPolicy(generator, atommem_env.ENV_IDS[args.env_id].get("protocol", "atommem"))
    was_training = model.training
    model.eval()
    results = {}
    for length in args.eval_context_tokens:
        r = evaluate_policy(policy, args.env_id, env_kwargs_for(args, "eval", length), args.eval_episodes,
                            args.num_envs, seed=10_000 + args.seed)
        results[length] = r
        for key in ("em", "f1", "valid_op_rate"):
            writer.add_scalar(f"eval/{key}_{length}", r[key], step)
        for op, count in r["ops_per_episode"].items():
            writer.add_scalar(f"eval/ops_{op}_{length}", count, step)
        print(f"eval step={step} context={length}: em={r['em']:.3f} valid_op_rate={r['valid_op_rate']:.3f} "
              f"ops={ {k: round(v, 1) for k, v in r['ops_per_episode'].items()} }")
    model.train(was_training)
    return results
