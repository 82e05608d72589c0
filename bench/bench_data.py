"""Build time and peak memory of long episodes: 32K, 256K and 1M tokens.

    python bench/bench_data.py

For the synthetic generator and for HotpotQA composition (the 100-question sample in
../shared/data, padded with distractors from the other questions; a small pool means repeats).
Peak memory is traced Python allocation during a second, traced build (tracemalloc), next to the size of the
document's text. Medians over 3 builds of different tasks.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np

from atommem_env.chunking import Chunker
from atommem_env.data import ComposedTaskSource, generate_task, load_items
from atommem_env.tokens import RegexTokenCounter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa_dev_distractor_100.json"


def measure(build):
    """Times one build, then traces a second one (tracemalloc slows allocation-heavy code several-fold)."""
    start = time.perf_counter()
    Chunker(build().paragraphs, RegexTokenCounter(), 4096)
    elapsed = time.perf_counter() - start
    tracemalloc.start()
    task = build()
    chunker = Chunker(task.paragraphs, RegexTokenCounter(), 4096)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    text_bytes = sum(len(p.text.encode()) for p in task.paragraphs)
    return elapsed, peak, text_bytes, chunker.total_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32_000, 256_000, 1_000_000])
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    items = load_items("hotpotqa", args.data)
    counter = RegexTokenCounter()
    print("| source | target tokens | tokens built | build+chunk s (median of 3) | peak traced MiB | text MiB |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        source = ComposedTaskSource(items, counter, context_tokens=length)
        builders = {
            "synthetic": [lambda s=s: generate_task(s, context_tokens=length) for s in range(3)],
            "hotpotqa": [lambda i=i: source.get(i) for i in range(3)],
        }
        for name, builds in builders.items():
            results = [measure(b) for b in builds]
            t, peak, text, tokens = (float(np.median([r[k] for r in results])) for k in range(4))
            print(f"| {name} | {length:,} | {int(tokens):,} | {t:.3f} | {peak / 2**20:.1f} | {text / 2**20:.1f} |")


if __name__ == "__main__":
    main()
