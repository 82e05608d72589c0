"""What an episode snapshot costs: get_state, pickling, set_state, at 1k and 10k memory entries.

    python bench/bench_snapshot.py [--sizes 1000 10000] [--embedder minilm] [--repeats 20]

The memory is pre-filled with random unit vectors (as bench_env.py: filling 10k entries through the embedder
measures the embedder), the document is SyntheticVolatile-v0's 4k tokens. Medians over repeats: get_state (the
entries copied, the FAISS index serialised), pickle.dumps (what an async vector env sends to a worker) and its
size, set_state (the index deserialised, the chunker rebuilt), and one step after a restore against one before.
"""

from __future__ import annotations

import argparse
import pickle
import time

import gymnasium as gym
import numpy as np

import atommem_env  # noqa: F401  (registers the ids)
from bench_env import fill  # this folder is on sys.path when run as a script


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--embedder", default="minilm")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.repeats <= 0 or min(args.sizes) <= 0:
        parser.error("--sizes and --repeats must be positive")
    print(f"| entries | get_state ms | pickle ms | pickled MB | set_state ms | step after set_state ms |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        env = gym.make("AtomMem/SyntheticVolatile-v0", embedder=args.embedder)
        env.reset(seed=0)
        base = env.unwrapped
        fill(base.memory, size, np.random.default_rng(0))
        state = base.get_state()
        blob = pickle.dumps(state)
        step = "<read>where does the founder live</read>"
        env.step(step)  # the embedding of the query is cached from here on
        before = median_ms(lambda: (base.set_state(state), env.step(step)), args.repeats)
        restore = median_ms(lambda: base.set_state(state), args.repeats)
        print(f"| {size:,} | {median_ms(base.get_state, args.repeats):.2f} | "
              f"{median_ms(lambda: pickle.dumps(state), args.repeats):.2f} | {len(blob) / 1e6:.1f} | {restore:.2f} | "
              f"{before - restore:.2f} |")
        env.close()


if __name__ == "__main__":
    main()
