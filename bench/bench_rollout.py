"""Rollout generation throughput: transformers (HFGenerator) against vLLM (VLLMGenerator), same prompts, one run.

    python bench/bench_rollout.py                                   # SmolLM2-135M and the tiny model
    python bench/bench_rollout.py --models smollm2 --prompts 32 --new-tokens 64 --repeats 3
    python bench/bench_rollout.py --models smollm2 --dtypes float32   # a CPU without native bf16

The prompts are the policy's real ones: `build_messages` of the first observations of SyntheticEasy-v0
episodes (~400 tokens with SmolLM2's tokenizer). Sampling at temperature 1; vLLM's end-of-turn token
is ignored so both backends generate exactly `new tokens` per prompt. Each row: one warm-up call,
then the median over `repeats` calls of generated tokens per second; vLLM compiled (the default) and eager
(--vllm-enforce-eager), with each engine's start-up time. bf16 for hf is torch.autocast on the CPU (what the
trainers' --bf16 True does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prompts(count: int) -> list[list[dict]]:
    import gymnasium as gym

    import atommem_env  # noqa: F401
    from agents import build_messages

    env = gym.make("AtomMem/SyntheticEasy-v0", embedder="hashing")
    conversations = []
    for index in range(count):
        obs, _ = env.reset(seed=0, options={"task_index": index})
        conversations.append(build_messages(obs))
    return conversations


def fixed_length(generator_class):
    """A VLLMGenerator that ignores end-of-turn tokens, so every completion has exactly max_new_tokens."""

    class FixedLength(generator_class):
        def sampling_params(self, vllm):
            params = super().sampling_params(vllm)
            params.ignore_eos, params.stop_token_ids = True, []
            return params

    return FixedLength


def tokens_per_second(generate, conversations, new_tokens: int, repeats: int) -> float:
    generate(conversations[:2])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        generations = generate(conversations)
        elapsed = time.perf_counter() - start
        rates.append(sum(len(g.completion_ids) for g in generations) / elapsed)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "tiny"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if min(args.prompts, args.new_tokens, args.repeats) <= 0:
        parser.error("--prompts, --new-tokens and --repeats must be positive")

    import torch

    from agents import HFGenerator
    from agents.models import load_causal_lm
    from agents.vllm_backend import VLLMEngine, VLLMGenerator, hf_directory
    from bench_grpo_memory import NeverStops  # this folder is on sys.path when run as a script

    FixedLength = fixed_length(VLLMGenerator)
    conversations = prompts(args.prompts)
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, temperature 1, median of {args.repeats}; "
          f"{torch.get_num_threads()} threads")
    print("| model | backend | dtype | engine start s | generated tokens/s | vs hf, same dtype |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        directory = hf_directory(name)
        model, tokenizer = load_causal_lm(directory, device="cpu", dtype="float32")
        never_stops = NeverStops(tokenizer)
        rates, starts = {}, {}
        for dtype in args.dtypes:
            generator = HFGenerator(model, never_stops, max_new_tokens=args.new_tokens, temperature=1.0)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
            with autocast:
                rates[("hf", dtype)] = tokens_per_second(generator.generate, conversations, args.new_tokens,
                                                         args.repeats)
        for dtype in args.dtypes:
            for backend in ("vllm", "vllm eager"):
                start = time.perf_counter()
                engine = VLLMEngine(directory, dtype=dtype, enforce_eager=backend == "vllm eager")
                starts[(backend, dtype)] = time.perf_counter() - start
                sampler = FixedLength(engine, tokenizer, max_new_tokens=args.new_tokens, temperature=1.0)
                rates[(backend, dtype)] = tokens_per_second(sampler.generate, conversations, args.new_tokens,
                                                            args.repeats)
                del engine, sampler
        for (backend, dtype), rate in rates.items():
            start = f"{starts[(backend, dtype)]:.0f}" if (backend, dtype) in starts else "-"
            print(f"| {name} | {backend} | {dtype} | {start} | {rate:.0f} | {rate / rates[('hf', dtype)]:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
