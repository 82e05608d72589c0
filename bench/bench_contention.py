"""SFT training speed on a shared CPU: transformers alone against an in-process vLLM engine, with and without a
competing process (issue 23, item 9).

    python bench/bench_contention.py                              # SmolLM2-135M, bf16, 4 cells x 45 s
    python bench/bench_contention.py --model tiny --seconds 5 --omp-wait-policy PASSIVE --threads 1

Each cell runs in a fresh process: it loads the model, starts a vLLM engine in-process when the cell's
backend is vllm (as `train_sft.py --backend vllm` does for its evaluations), then trains all weights with
train_sft.py's scorer and loss on fixed batches of `--batch-size` x `--tokens` tokens for `--seconds`. With
load, a second process runs 2-thread torch matmuls the whole time (what a test suite or another run does).
Printed per cell: the median training tokens/s, the torch threads and the CPU affinity the training ran with;
then each backend's slow-down under load. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
LOAD = "import torch\ntorch.set_num_threads(2)\na = torch.randn(768, 768)\nwhile True:\n    a @ a\n"


@dataclass
class Args:
    model: str = "smollm2"
    """model to train: a built-in name (tiny, smollm2), a Hugging Face id or a local path"""
    seconds: float = 45.0
    """training wall time per cell, after a warm-up step"""
    backends: tuple[str, ...] = ("hf", "vllm")
    """hf: no engine in the process; vllm: an in-process vLLM engine started before training"""
    batch_size: int = 4
    """sequences per step"""
    tokens: int = 512
    """tokens per sequence (the completion is the last quarter)"""
    bf16: bool = True
    """bf16 autocast (the SmolLM2 runs' setting)"""
    omp_wait_policy: str = ""
    """OMP_WAIT_POLICY for the training process (PASSIVE, ACTIVE; empty: the library's default)"""
    threads: int = 0
    """torch threads of the training process (0: torch's default, one per core)"""


def train_cell(args: Args, backend: str) -> dict:
    """In the child process: one cell's training, returns its numbers."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    import train_sft
    from agents.training import CompletionScorer, pack, setup_model

    model, tokenizer, _ = setup_model(args.model, None, None, 0, 32, 0.0, ("q_proj",), False, device="cpu",
                                      dtype="float32")
    if backend == "vllm":
        from agents.vllm_backend import VLLMEngine, hf_directory

        VLLMEngine(hf_directory(args.model), dtype="bfloat16" if args.bf16 else "float32").load_weights(model)
    scorer = CompletionScorer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    split = args.tokens * 3 // 4
    ids = torch.randint(10, vocab, (args.batch_size, args.tokens), generator=generator).tolist()
    batch = pack([row[:split] for row in ids], [row[split:] for row in ids], tokenizer.pad_token_id)
    rates, start, first = [], None, True
    while start is None or time.time() - start < args.seconds:
        tick = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, _, _ = train_sft.sft_loss(scorer, batch, int(batch["target_mask"].sum()), num_processes=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if first:  # warm-up step: allocations, kernel selection
            first, start = False, time.time()
            continue
        rates.append(batch["input_ids"].numel() / (time.time() - tick))
    return {"tokens_per_second": statistics.median(rates), "steps": len(rates), "threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0))}


def run_cell(args: Args, backend: str, loaded: bool) -> dict:
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    load = subprocess.Popen([sys.executable, "-c", LOAD]) if loaded else None
    try:
        child = subprocess.run([sys.executable, __file__, "--cell", backend, *sys.argv[1:]], capture_output=True,
                               text=True, env=env, cwd=REPO)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    lines = [line for line in child.stdout.splitlines() if line.startswith("CELL ")]
    if child.returncode != 0 or not lines:
        raise SystemExit(f"error: the {backend} cell failed:\n{child.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--cell":
        backend = sys.argv[2]
        print("CELL " + json.dumps(train_cell(tyro.cli(Args, args=sys.argv[3:]), backend)), flush=True)
        raise SystemExit(0)
    args = tyro.cli(Args)
    wrong = [b for b in args.backends if b not in ("hf", "vllm")]
    if wrong or args.omp_wait_policy not in ("", "PASSIVE", "ACTIVE") or args.threads < 0 or args.seconds <= 0:
        raise SystemExit("error: --backends takes hf and vllm, --omp-wait-policy PASSIVE, ACTIVE or nothing, "
                         "--threads >= 0, --seconds > 0")
    print(f"{args.model}: {args.batch_size} x {args.tokens} tokens a step, bf16 {args.bf16}, {args.seconds:.0f} s a cell, "
          f"OMP_WAIT_POLICY={args.omp_wait_policy or 'default'}, threads {args.threads or 'default'}", flush=True)
    results = {}
    for backend in args.backends:
        for loaded in (False, True):
            r = results[backend, loaded] = run_cell(args, backend, loaded)
            print(f"{backend} {'with load' if loaded else 'alone':>9}: {r['tokens_per_second']:.0f} tokens/s "
                  f"(median of {r['steps']} steps), {r['threads']} torch threads, CPUs {r['affinity']}", flush=True)
        slow = results[backend, False]["tokens_per_second"] / results[backend, True]["tokens_per_second"]
        print(f"{backend}: {slow:.2f}x slower with the competing process", flush=True)
