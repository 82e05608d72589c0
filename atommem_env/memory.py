"""Agent memory: a scratchpad and a FAISS vector store with stable integer ids.

Usable on its own::

    >>> from atommem_env.memory import VectorMemory
    >>> from atommem_env.embedders import HashingEmbedder
    >>> mem = VectorMemory(HashingEmbedder())
    >>> i = mem.create("Scott Derrickson is American.")
    >>> mem.read("Scott Derrickson nationality", k=1)[0].text
    'Scott Derrickson is American.'

The index is `IndexIDMap2` over an inner-product flat index on normalised embeddings (cosine
similarity). `precision="fp32"` is exact; `precision="fp16"` stores the vectors as half floats
(`IndexScalarQuantizer`), which halves the memory scanned per Read: on one core of the 2-core
development machine a Read over 100k entries takes ~10 ms in fp32 and ~6-7 ms in fp16, at a recall@6
of ~0.998 (`bench/bench_env.py`, docs/benchmarks.md). With
faiss-gpu installed, `device="cuda"` (or "cuda:N") puts the index on a GPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from .embedders import Embedder, get_embedder

# faiss 1.15 on a flat index: one query is scanned fastest by its SIMD loop (the default
# threshold), several by BLAS (a low threshold): at 100k entries, 1 query 11.5 ms vs 28.5 ms with
# BLAS, 64 queries 80 ms with BLAS vs 819 ms without (bench/bench_faiss.py). `read_many` picks per call.
_BLAS_THRESHOLD_SINGLE_QUERY = faiss.cvar.distance_compute_blas_threshold
_BLAS_THRESHOLD_BATCH = 1
_RANDOM_ID_LIMIT = 1_000_000

# FAISS's OpenMP thread pool does not survive fork: a child (an AsyncVectorEnv worker) that searches
# after the parent did would wait forever on the parent's threads. Forked children search on one
# thread; their parallelism is the workers themselves.
os.register_at_fork(after_in_child=lambda: faiss.omp_set_num_threads(1))


class MemoryOpError(Exception):
    """A memory operation that cannot be carried out (unknown id, full store, empty text).

    The environment turns it into an error message in the next observation.
    """


@dataclass(frozen=True)
class MemoryEntry:
    id: int
    text: str
    score: float = 0.0


class VectorMemory:
    """Create / read(query, k) / update(id, text) / delete(id) over FAISS, ids stable for an entry's life."""

    def __init__(
        self,
        embedder: Embedder | str = "hashing",
        max_entries: int | None = None,
        max_entry_chars: int | None = None,
        precision: str = "fp32",
        device: str = "cpu",
    ):
        self.embedder = get_embedder(embedder)
        if max_entries is not None and max_entries <= 0:
            raise ValueError(f"max_entries must be positive or None, got {max_entries}")
        if max_entry_chars is not None and max_entry_chars <= 0:
            raise ValueError(f"max_entry_chars must be positive or None, got {max_entry_chars}")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        self.max_entries = max_entries
        self.max_entry_chars = max_entry_chars
        self.precision = precision
        self.device = device
        self.index = self._new_index()
        self._texts: dict[int, str] = {}
        self._next_id = 1
        self.id_rng: np.random.Generator | None = None
        """When set, new ids are drawn from it (1 to 999,999, never one used since the last clear), so an id says
        nothing of when its entry was made; else ids count up from 1."""
        self._used_ids: set[int] = set()
        self.touched: set[int] = set()
        """Ids created, updated or deleted since a reader last cleared it (the env's process metrics)."""

    def _new_index(self):
        dim = self.embedder.dim
        if self.precision == "fp16":
            inner = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            inner = faiss.IndexFlatIP(dim)
        if self.device != "cpu":
            inner = _to_gpu(inner, self.device)
        return faiss.IndexIDMap2(inner)

    def __len__(self) -> int:
        return len(self._texts)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._texts

    def get(self, entry_id: int) -> str:
        if entry_id not in self._texts:
            raise MemoryOpError(f"no memory entry with id {entry_id}")
        return self._texts[entry_id]

    def entry_ids(self) -> list[int]:
        return list(self._texts)

    def entries(self) -> list[MemoryEntry]:
        return [MemoryEntry(i, t) for i, t in sorted(self._texts.items())]

    def accepts(self, text: str) -> bool:
        """Whether `text` passes the entry limits (checked before any embedding work)."""
        text = text.strip()
        return bool(text) and (self.max_entry_chars is None or len(text) <= self.max_entry_chars)

    def check_query(self, query: str) -> None:
        """A query longer than an entry may be is refused before it is embedded."""
        if self.max_entry_chars is not None and len(query.strip()) > self.max_entry_chars:
            raise MemoryOpError(f"query has {len(query.strip())} characters, the limit is {self.max_entry_chars}")

    def check_text(self, text: str) -> str:
        """The stripped text, or MemoryOpError when no entry may hold it."""
        text = text.strip()
        if not text:
            raise MemoryOpError("memory text is empty")
        if self.max_entry_chars is not None and len(text) > self.max_entry_chars:
            raise MemoryOpError(f"memory text has {len(text)} characters, the limit is {self.max_entry_chars}")
        return text

    def create(self, text: str) -> int:
        return self.create_many([text])[0]

    def create_many(self, texts: Sequence[str]) -> list[int]:
        texts = [self.check_text(t) for t in texts]
        if self.max_entries is not None and len(self) + len(texts) > self.max_entries:
            raise MemoryOpError(f"memory is full ({len(self)} of {self.max_entries} entries): update or delete first")
        ids = self._new_ids(len(texts))
        self.index.add_with_ids(self.embedder.embed(texts), np.asarray(ids, dtype=np.int64))
        self._texts.update(zip(ids, texts))
        self.touched.update(ids)
        return ids

    def _new_ids(self, count: int) -> list[int]:
        if self.id_rng is None:
            ids = list(range(self._next_id, self._next_id + count))
            self._next_id += count
            return ids
        ids = []
        while len(ids) < count:
            candidate = int(self.id_rng.integers(1, _RANDOM_ID_LIMIT))
            if candidate not in self._used_ids:
                self._used_ids.add(candidate)
                ids.append(candidate)
        return ids

    def read(self, query: str, k: int) -> list[MemoryEntry]:
        return self.read_many([query], k)[0]

    def read_many(self, queries: Sequence[str], k: int) -> list[list[MemoryEntry]]:
        """Top-k entries per query, best first, equal scores by id; fewer when the memory holds fewer than k.

        Ties are broken by id, not by the index's internal order (which an Update or a rebuilt copy
        changes), so a pickled or deep-copied env reads exactly as the original: while the k-th score
        ties with the last one fetched, more are fetched, then candidates are sorted by (-score, id).
        """
        if k <= 0:
            raise MemoryOpError(f"k must be positive, got {k}")
        if not queries or not self._texts:
            return [[] for _ in queries]
        faiss.cvar.distance_compute_blas_threshold = (
            _BLAS_THRESHOLD_SINGLE_QUERY if len(queries) == 1 else _BLAS_THRESHOLD_BATCH
        )
        vectors, k = self.embedder.embed(list(queries)), min(k, len(self))
        fetch = min(k + 1, len(self))
        while True:
            scores, ids = self.index.search(vectors, fetch)
            if fetch == len(self) or not (scores[:, k - 1] == scores[:, fetch - 1]).any():
                break
            fetch = min(2 * fetch, len(self))
        results = []
        for row_s, row_i in zip(scores, ids):
            ranked = sorted((-float(s), int(i)) for s, i in zip(row_s, row_i) if i >= 0)[:k]
            results.append([MemoryEntry(i, self._texts[i], -s) for s, i in ranked])
        return results

    def update(self, entry_id: int, text: str) -> None:
        text = self.check_text(text)
        self.get(entry_id)
        vec = self.embedder.embed([text])
        self.index.remove_ids(np.asarray([entry_id], dtype=np.int64))
        self.index.add_with_ids(vec, np.asarray([entry_id], dtype=np.int64))
        self._texts[entry_id] = text
        self.touched.add(entry_id)

    def delete(self, entry_id: int) -> None:
        self.get(entry_id)
        self.index.remove_ids(np.asarray([entry_id], dtype=np.int64))
        del self._texts[entry_id]
        self.touched.add(entry_id)

    def clear(self) -> None:
        self.index.reset()
        self._texts.clear()
        self._next_id = 1
        self._used_ids.clear()
        self.touched.clear()

    def __getstate__(self):
        # FAISS indexes do not pickle: carry the entries and rebuild the index on arrival.
        state = self.__dict__.copy()
        del state["index"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.index = self._new_index()
        if self._texts:
            ids = np.fromiter(self._texts, dtype=np.int64, count=len(self._texts))
            self.index.add_with_ids(self.embedder.embed(list(self._texts.values())), ids)

    def snapshot(self) -> dict:
        """Everything a later `restore` needs to read exactly as now: the entries, the id counter and the ids used,
        and the index itself (serialised, so no text is embedded again). Plain data: it pickles."""
        index = self.index if self.device == "cpu" else faiss.index_gpu_to_cpu(self.index)
        return {"texts": dict(self._texts), "next_id": self._next_id, "used_ids": set(self._used_ids),
                "index": faiss.serialize_index(index)}

    def restore(self, snapshot: dict) -> None:
        """Back to a `snapshot` of a memory with the same embedder, precision and device (ValueError otherwise)."""
        index = faiss.deserialize_index(snapshot["index"])
        if index.d != self.embedder.dim or index.ntotal != len(snapshot["texts"]):
            raise ValueError(f"the snapshot holds {index.ntotal} vectors of {index.d} dimensions for "
                             f"{len(snapshot['texts'])} entries; this memory embeds in {self.embedder.dim}")
        self.index = index if self.device == "cpu" else _to_gpu(index, self.device)
        self._texts = dict(snapshot["texts"])
        self._next_id = snapshot["next_id"]
        self._used_ids = set(snapshot["used_ids"])

    def save(self, path: str | Path) -> None:
        """Writes a JSON file of the entries (text and ids); vectors are recomputed on load."""
        payload = {"embedder": self.embedder.name, "next_id": self._next_id,
                   "entries": [{"id": i, "text": t} for i, t in sorted(self._texts.items())]}
        Path(path).write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | str | None = None, **kwargs) -> "VectorMemory":
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            entries = [(int(e["id"]), str(e["text"])) for e in payload["entries"]]
            next_id = int(payload["next_id"])
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a saved VectorMemory ({err})") from err
        memory = cls(embedder or payload.get("embedder", "hashing"), **kwargs)
        if entries:
            ids = np.asarray([i for i, _ in entries], dtype=np.int64)
            memory.index.add_with_ids(memory.embedder.embed([t for _, t in entries]), ids)
            memory._texts = dict(entries)
        memory._next_id = max([next_id] + [i + 1 for i, _ in entries])
        return memory


def _to_gpu(index, device: str):
    if not hasattr(faiss, "StandardGpuResources"):
        raise ValueError(f"device={device!r} needs faiss-gpu (pip install 'atommem[gpu]'); this faiss is CPU-only")
    gpu_id = int(device.split(":")[1]) if ":" in device else 0
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu_id, index)


class Scratchpad:
    """Free text shown to the agent at every step; replaced whole, optionally length-limited."""

    def __init__(self, max_chars: int | None = None):
        if max_chars is not None and max_chars < 0:
            raise ValueError(f"max_scratchpad_chars must be >= 0 or None, got {max_chars}")
        self.max_chars = max_chars
        self.text = ""

    def set(self, text: str) -> None:
        text = text.strip()
        if self.max_chars is not None and len(text) > self.max_chars:
            raise MemoryOpError(f"scratchpad text has {len(text)} characters, the limit is {self.max_chars}")
        self.text = text

    def clear(self) -> None:
        self.text = ""
