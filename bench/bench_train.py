"""SFT on a CPU: fp32 or bf16 autocast, all weights or LoRA; training speed and held-out loss per CPU-minute.

    python bench/bench_train.py                       # SmolLM2-135M, 4 configurations x 120 s
    python bench/bench_train.py --model tiny --seconds 30

Every configuration starts from the same weights and trains, one optimizer step per batch of
`--batch-size` oracle-broad teacher samples (AtomMem/SyntheticEasy-v0 train tasks, the SFT data of
docs/train_sft.md), for `--seconds` of wall time, with train_sft.py's scorer and loss. Printed per
configuration: the median step throughput (prompt + completion tokens/s), the steps done, and the
mean completion-token loss on `--held-out` other samples before and after. The bf16 / fp32 ratios
decide `--bf16`'s default on CPUs (agents.training.default_bf16); the loss after the same minutes
says which of all weights and LoRA learns more per CPU-minute.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_sft  # noqa: E402
from agents.models import load_tokenizer  # noqa: E402
from agents.training import CompletionScorer, pack, setup_model  # noqa: E402


CONFIGS = ("fp32-full", "bf16-full", "fp32-lora", "bf16-lora")


@dataclass
class Args:
    model: str = "smollm2"
    """model to train: a built-in name (tiny, smollm2), a Hugging Face id or a local path"""
    seconds: float = 120.0
    """training wall time per configuration"""
    configs: tuple[str, ...] = CONFIGS
    """precision-mode pairs to run, in order"""
    batch_size: int = 4
    """samples per optimizer step"""
    held_out: int = 16
    """samples kept out of training, on which the loss is measured"""
    full_learning_rate: float = 5e-5
    """all weights: the learning rate of the SFT run in docs/train_sft.md"""
    lora_learning_rate: float = 2e-4
    """LoRA (rank 16, alpha 32): the usual ~4-10x of the full-weight rate"""
    threads: int = 0
    """torch threads (0: torch's default, all cores)"""


def completion_loss(scorer, batches, bf16: bool) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in batches:
            logprobs, _, _ = scorer(**batch)
            total -= float((logprobs * batch["target_mask"]).sum())
            tokens += int(batch["target_mask"].sum())
    return total / tokens


def run_config(name: str, args: Args, train_batches, held_out_batches) -> dict:
    precision, mode = name.split("-")
    bf16, lora = precision == "bf16", mode == "lora"
    torch.manual_seed(0)
    model, _, _ = setup_model(args.model, None, None, 16 if lora else 0, 32, 0.0,
                              train_sft.Args.lora_target_modules, False, device="cpu", dtype="float32")
    scorer = CompletionScorer(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lora_learning_rate if lora else args.full_learning_rate)
    before = completion_loss(scorer, held_out_batches, bf16)
    rates, start, step = [], time.time(), 0
    while time.time() - start < args.seconds:
        batch = train_batches[step % len(train_batches)]
        tick = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = train_sft.sft_loss(scorer, batch, int(batch["target_mask"].sum()), num_processes=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rates.append(batch["input_ids"].numel() / (time.time() - tick))
        step += 1
    return {"config": name, "tokens_per_second": statistics.median(rates), "steps": step,
            "loss_before": before, "loss_after": completion_loss(scorer, held_out_batches, bf16)}


if __name__ == "__main__":
    args = tyro.cli(Args)
    wrong = [c for c in args.configs if c not in CONFIGS]
    if wrong:
        raise SystemExit(f"error: --configs takes {' '.join(CONFIGS)}, got {' '.join(wrong)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sft_args = train_sft.Args(model=args.model, env_id="AtomMem/SyntheticEasy-v0", teacher="oracle-broad",
                              num_train_episodes=64, context_tokens=(400,))
    samples, _ = train_sft.collect_teacher_samples(sft_args)
    tokenizer = load_tokenizer(args.model)
    encoded = [train_sft.tokenize(s, tokenizer, sft_args)[:2] for s in samples]
    encoded = [e for e in encoded if len(e[1]) > 1]  # "write nothing" steps teach one token; keep what has content
    torch.manual_seed(0)
    order = torch.randperm(len(encoded)).tolist()
    held, train = [encoded[i] for i in order[:args.held_out]], [encoded[i] for i in order[args.held_out:]]

    def batches(items):
        return [pack(*zip(*items[i:i + args.batch_size]), tokenizer.pad_token_id)
                for i in range(0, len(items), args.batch_size)]

    train_batches, held_out_batches = batches(train), batches(held)
    print(f"{args.model}: {len(train)} training samples, {len(held)} held out, {torch.get_num_threads()} threads, "
          f"{args.seconds:.0f} s per configuration")
    results = {}
    for name in args.configs:
        r = results[name] = run_config(name, args, train_batches, held_out_batches)
        print(f"{name}: {r['tokens_per_second']:.0f} tokens/s (median of {r['steps']} steps), held-out loss "
              f"{r['loss_before']:.3f} -> {r['loss_after']:.3f}", flush=True)
    for mode in ("full", "lora"):
        if f"fp32-{mode}" in results and f"bf16-{mode}" in results:
            ratio = results[f"bf16-{mode}"]["tokens_per_second"] / results[f"fp32-{mode}"]["tokens_per_second"]
            print(f"{mode}: bf16 / fp32 throughput {ratio:.2f}x")
