"""Raw FAISS search over random unit vectors: the probes behind VectorMemory's index choices.

    python bench/bench_faiss.py [--entries 100000] [--dim 384] [--repeats 30]

Median ms per search of flat fp32 (with faiss's default BLAS threshold and with a low one, for one
query and for a batch of 64), fp16 and 8-bit scalar quantisation, fp16 split into two shards
searched on two threads, and approximate IVF indexes (inverted lists over k-means cells, fp32 and
fp16 vectors) at several `nprobe`, with their recall@6 against the flat index on 200 held-out
queries (noisy copies of stored vectors, as a Read near its fact would be). docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np


def median_ms(search, queries: np.ndarray, k: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        search(queries, k)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def scalar_quantizer(dim: int, kind) -> faiss.Index:
    return faiss.IndexScalarQuantizer(dim, kind, faiss.METRIC_INNER_PRODUCT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if min(args.entries, args.dim, args.repeats) < 1:
        raise SystemExit("error: --entries, --dim and --repeats must be positive")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.entries, args.dim)).astype(np.float32)
    faiss.normalize_L2(vectors)
    one, batch = vectors[:1].copy(), vectors[:64].copy()
    default_threshold = faiss.cvar.distance_compute_blas_threshold
    print(f"faiss {faiss.__version__}, {args.entries:,} entries x {args.dim} dims, medians of {args.repeats}, "
          f"k=6; one faiss thread (the shards row runs its own two)\n")
    print("| index | queries | BLAS threshold | ms |\n|---|---|---|---|")
    faiss.omp_set_num_threads(1)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(vectors)
    for queries in (one, batch):
        for threshold in (default_threshold, 1):
            faiss.cvar.distance_compute_blas_threshold = threshold
            print(f"| flat fp32 | {len(queries)} | {threshold} | {median_ms(flat.search, queries, 6, args.repeats):.2f} |")
    faiss.cvar.distance_compute_blas_threshold = default_threshold
    for name, kind in (("fp16", faiss.ScalarQuantizer.QT_fp16), ("8-bit", faiss.ScalarQuantizer.QT_8bit)):
        index = scalar_quantizer(args.dim, kind)
        index.train(vectors)
        index.add(vectors)
        print(f"| {name} | 1 | - | {median_ms(index.search, one, 6, args.repeats):.2f} |")
    shards = faiss.IndexShards(args.dim, True, False)  # threaded: one std::thread per shard
    halves = [scalar_quantizer(args.dim, faiss.ScalarQuantizer.QT_fp16) for _ in range(2)]
    for shard, part in zip(halves, (vectors[0::2], vectors[1::2])):
        shard.add(part)
        shards.add_shard(shard)
    print(f"| fp16, 2 shards on 2 threads | 1 | - | {median_ms(shards.search, one, 6, args.repeats):.2f} |")

    probes = vectors[rng.choice(args.entries, 200, replace=False)] + 0.05 * rng.standard_normal((200, args.dim))
    probes = probes.astype(np.float32)
    faiss.normalize_L2(probes)
    truth = flat.search(probes, 6)[1]
    print("\n| approximate index | nprobe | ms (1 query) | recall@6 |\n|---|---|---|---|")
    cells = max(1, int(4 * np.sqrt(args.entries)))
    for name, kind in (("IVF flat", None), ("IVF fp16", faiss.ScalarQuantizer.QT_fp16)):
        quantizer = faiss.IndexFlatIP(args.dim)
        index = (faiss.IndexIVFFlat(quantizer, args.dim, cells, faiss.METRIC_INNER_PRODUCT) if kind is None else
                 faiss.IndexIVFScalarQuantizer(quantizer, args.dim, cells, kind, faiss.METRIC_INNER_PRODUCT))
        index.train(vectors)
        index.add(vectors)
        for nprobe in (4, 16, 64):
            index.nprobe = nprobe
            found = index.search(probes, 6)[1]
            recall = np.mean([len(set(f) & set(t)) / 6 for f, t in zip(found, truth)])
            print(f"| {name}, {cells} cells | {nprobe} | {median_ms(index.search, one, 6, args.repeats):.2f} | "
                  f"{recall:.3f} |")


if __name__ == "__main__":
    main()
