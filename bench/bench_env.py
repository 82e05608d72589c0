"""Environment speed: steps/s and per-op latency at 1k / 10k / 100k memory entries.

    python bench/bench_env.py [--sizes 1000 10000 100000] [--embedders hashing minilm]

Memories are pre-filled with random unit vectors (filling 100k entries through MiniLM would
take minutes and measures the embedder, not the env). "overhead" rows time a step whose texts
are already in the embedder's cache, i.e. the env's own cost without embedding; "cold" rows
embed new text each step. Medians over repeated steps. Also streams a 1M-token document
through the env and reports peak traced memory against the document's size.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import faiss
import gymnasium as gym
import numpy as np

import atommem_env  # noqa: F401  (registers the ids)
from atommem_env.data import generate_task
from atommem_env.tasks import ListTaskSource


def fill(memory, n: int, rng) -> None:
    vecs = rng.standard_normal((n, memory.embedder.dim)).astype(np.float32)
    faiss.normalize_L2(vecs)
    ids = np.arange(memory._next_id, memory._next_id + n, dtype=np.int64)
    memory.index.add_with_ids(vecs, ids)
    memory._texts.update((int(i), f"filler entry {i}") for i in ids)
    memory._next_id += n


def median_ms(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def bench_single(embedder: str, size: int, precision: str, repeats: int) -> dict:
    env = gym.make("AtomMem/Synthetic-v0", embedder=embedder, index_precision=precision,
                   max_reads_per_chunk=10**9, context_tokens=10**6 // 20, chunk_tokens=64).unwrapped
    env.reset(seed=0)
    fill(env.memory, size, np.random.default_rng(0))
    # A long document of small chunks so every step below stays in the reading phase.
    warm = [f"warm text {i}" for i in range(repeats)]
    env.memory.embedder.embed(warm + ["a cached query"])
    created: list[int] = []

    def step(action):
        env.step(action)

    row = {
        "advance (no op)": median_ms(lambda i: step(""), repeats),
        "read overhead": median_ms(lambda i: step("<read>a cached query</read>"), repeats),
        "create overhead": median_ms(lambda i: step(f"<create>{warm[i]}</create>"), repeats),
        # The embedder cache lives for the whole process: cold texts are unique to this run.
        "read cold": median_ms(lambda i: step(f"<read>new query {size} {precision} {i}</read>"), repeats),
        "create cold": median_ms(lambda i: step(f"<create>new fact {size} {precision} {i}</create>"), repeats),
    }
    created = [i for i in env.memory._texts if i > size][:repeats]
    row["update overhead"] = median_ms(lambda i: step(f'<update id="{created[i]}">{warm[i]}</update>'), repeats)
    row["delete"] = median_ms(lambda i: step(f'<delete id="{created[i]}"/>'), repeats)
    return row


def bench_vector(embedder: str, size: int, num_envs: int, repeats: int) -> float:
    envs = gym.make_vec("AtomMem/Synthetic-v0", num_envs=num_envs, vectorization_mode="sync", embedder=embedder,
                        max_reads_per_chunk=10**9, context_tokens=10**6 // 20, chunk_tokens=64)
    envs.reset(seed=0)
    for i, env in enumerate(envs.envs):
        fill(env.unwrapped.memory, size, np.random.default_rng(i))
    actions = [f"<create>fact {k}</create><read>query {k}</read>" for k in range(num_envs)]
    envs.step(actions)
    start = time.perf_counter()
    for _ in range(repeats):
        envs.step(actions)
    elapsed = time.perf_counter() - start
    envs.close()
    return repeats * num_envs / elapsed


def bench_million_tokens(embedder: str) -> None:
    task = generate_task(0, context_tokens=1_000_000)
    doc_bytes = sum(len(p.text.encode()) + len(p.title) for p in task.paragraphs)
    env = gym.make("AtomMem/Synthetic-v0", embedder=embedder, chunk_tokens=4096,
                   dataset=ListTaskSource([task])).unwrapped
    tracemalloc.start()
    start = time.perf_counter()
    obs, _ = env.reset(seed=0)
    steps = 0
    while obs["chunk"]:
        obs, *_ = env.step("<create>one note per chunk</create>")
        steps += 1
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\n1M-token document ({doc_bytes / 2**20:.1f} MiB of text): {steps} chunks of 4096 tokens stepped in "
          f"{elapsed:.2f} s ({steps / elapsed:.0f} steps/s); peak traced memory during reset+stepping "
          f"{peak / 2**20:.1f} MiB ({peak / doc_bytes:.2f}x the document)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--embedders", nargs="+", default=["hashing", "minilm"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--num-envs", type=int, default=8)
    args = parser.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; medians over {args.repeats} steps\n")
    for embedder in args.embedders:
        for precision in ("fp32", "fp16"):
            rows = {size: bench_single(embedder, size, precision, args.repeats) for size in args.sizes}
            names = list(next(iter(rows.values())))
            print(f"## single env, embedder={embedder}, index {precision}: ms per step")
            print("| op | " + " | ".join(f"{s:,} entries" for s in args.sizes) + " |")
            print("|---|" + "---|" * len(args.sizes))
            for name in names:
                print(f"| {name} | " + " | ".join(f"{rows[s][name]:.3f}" for s in args.sizes) + " |")
            print()
        print(f"## {args.num_envs} sync vector envs, embedder={embedder}, create+read per step")
        for size in args.sizes:
            print(f"- {size:,} entries per env: {bench_vector(embedder, size, args.num_envs, 10):.0f} env steps/s")
        print()
    bench_million_tokens("hashing")


if __name__ == "__main__":
    main()
