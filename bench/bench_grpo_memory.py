"""Peak memory of one GRPO rollout + update as the vocabulary and the new-token budget grow.

    python bench/bench_grpo_memory.py                      # vocab 8k..128k x new tokens 64..1024, tiny models
    python bench/bench_grpo_memory.py --vocab 8192 131072 --new-tokens 64 1024

Each cell runs in a fresh process: it loads a tiny Llama (1 layer, 128 hidden units, its output rows
padded to the vocabulary size, so random weights never stop early), samples `--batch` completions of
exactly `new tokens` tokens with HFGenerator, then runs one GRPO update over them (CompletionScorer,
grpo_loss, backward, AdamW step) in micro-batches of `--micro-batch`. It prints the peak resident
memory above the memory after loading (CPU) or the peak CUDA allocation above it (GPU). The growth
the old code had was vocab x new tokens x batch x 4 bytes in generation (fp32 logits of every step,
stacked and copied) and again in the update (logits of the whole width).

Cells run with MALLOC_MMAP_THRESHOLD_=131072: glibc otherwise serves the per-step 1-4 MB tensors
from its heap, whose freed pages stay resident as fragments and make RSS grow with the number of
steps even though no tensor is held (measured: 663 MB vs 0 MB rollout growth at vocab 32k x 1024
tokens). The variable makes RSS reflect what the code holds; it helps long CPU runs too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class NeverStops:
    """The tokenizer with an end-of-turn id no model samples: every completion is exactly new_tokens long."""

    eos_token_id = -1

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def one_cell(vocab: int, new_tokens: int, batch: int, micro_batch: int) -> dict:
    sys.path.insert(0, str(REPO))
    from types import SimpleNamespace

    import torch

    from agents import HFGenerator
    from agents.models import build_tiny_model, load_causal_lm
    from agents.training import CompletionScorer
    from train_grpo import StepSample, grpo_loss, loss_denominator, padded, token_logprobs

    torch.manual_seed(0)
    path = build_tiny_model(vocab_size=2048, num_layers=1, padded_vocab_size=vocab)
    model, tokenizer = load_causal_lm(str(path), dtype="float32")
    tokenizer = NeverStops(tokenizer)
    device = next(model.parameters()).device
    scorer = CompletionScorer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    args = SimpleNamespace(epsilon=0.2, epsilon_high=None, beta=0.0, loss_type="grpo")

    def rollout_and_update(rows: int, tokens: int) -> list:
        generator = HFGenerator(model, tokenizer, max_new_tokens=tokens, temperature=1.0)
        generations = generator.generate([[{"role": "user", "content": f"question {i}"}] for i in range(rows)])
        rollout_peak = peak_mb()
        samples = [StepSample(g.prompt_ids, g.completion_ids, g.logprobs, i) for i, g in enumerate(generations)]
        for s in samples:
            s.advantage = 1.0 if s.episode % 2 else -1.0
        weights = torch.ones(rows, device=device)
        denominator = loss_denominator(weights, None, "grpo", tokens, 1.0)
        for begin in range(0, rows, micro_batch):
            part = samples[begin:begin + micro_batch]
            logprobs, _, mask = token_logprobs(scorer, part, tokenizer.pad_token_id, 1.0, device)
            loss, _ = grpo_loss(logprobs, padded([s.sampler_logprobs for s in part], logprobs), None,
                                torch.tensor([s.advantage for s in part], device=device), weights[:len(part)], mask,
                                args, denominator)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return generations, rollout_peak

    rollout_and_update(2, 2)  # warm-up: lazy allocations (optimizer state, kernels) are not the cell's growth
    base = peak_mb()
    generations, after_rollout = rollout_and_update(batch, new_tokens)
    return {"vocab": vocab, "new_tokens": new_tokens, "tokens": sum(len(g.completion_ids) for g in generations),
            "rollout_mb": after_rollout - base, "rollout_update_mb": peak_mb() - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch", type=int, default=8, help="completions per rollout")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per forward/backward in the update")
    parser.add_argument("--cell", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(one_cell(*json.loads(args.cell))))
        return
    print(f"batch {args.batch}, micro-batch {args.micro_batch}; MB above the memory after a warm-up rollout + update")
    print("| vocab | new tokens | vocab x new tokens x batch x 4 B (MB) | rollout peak (MB) | rollout + update peak (MB) |")
    print("|---|---|---|---|---|")
    for vocab in args.vocab:
        for new_tokens in args.new_tokens:
            cell = json.dumps([vocab, new_tokens, args.batch, args.micro_batch])
            out = subprocess.run([sys.executable, __file__, "--cell", cell], capture_output=True, text=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
            if out.returncode != 0:
                raise SystemExit(f"cell vocab={vocab} new_tokens={new_tokens} failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["tokens"] == args.batch * new_tokens, r
            product = vocab * new_tokens * args.batch * 4 / 2**20
            print(f"| {vocab} | {new_tokens} | {product:.0f} | {r['rollout_mb']:.0f} | {r['rollout_update_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
