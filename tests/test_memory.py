import numpy as np
import pytest

from atommem_env.embedders import HashingEmbedder, get_embedder
from atommem_env.memory import MemoryOpError, Scratchpad, VectorMemory


def test_crud_and_stable_ids():
    mem = VectorMemory("hashing")
    a = mem.create("Scott Derrickson is an American director.")
    b = mem.create("Ed Wood was an American filmmaker.")
    c = mem.create("The Eiffel Tower is in Paris.")
    assert (a, b, c) == (1, 2, 3)
    assert mem.read("Where is the Eiffel Tower?", k=1)[0].id == c
    mem.update(a, "Scott Derrickson lives in Los Angeles.")
    assert mem.get(a) == "Scott Derrickson lives in Los Angeles."
    assert mem.read("Los Angeles", k=1)[0].id == a
    mem.delete(b)
    assert b not in mem and len(mem) == 2
    assert mem.create("new") == 4  # ids are never reused
    assert [e.id for e in mem.read("anything", k=10)] and len(mem.read("anything", k=10)) == 3


def test_errors_leave_memory_unchanged():
    mem = VectorMemory("hashing", max_entries=2, max_entry_chars=20)
    mem.create("first")
    for bad in [lambda: mem.update(7, "x"), lambda: mem.delete(7), lambda: mem.create("   "),
                lambda: mem.create("x" * 21), lambda: mem.update(1, ""), lambda: mem.read("q", 0)]:
        with pytest.raises(MemoryOpError):
            bad()
    mem.create("second")
    with pytest.raises(MemoryOpError, match="memory is full"):
        mem.create("third")
    assert [e.text for e in mem.entries()] == ["first", "second"]
    assert mem.index.ntotal == 2


def test_read_on_empty_memory_and_k_larger_than_size():
    mem = VectorMemory("hashing")
    assert mem.read("q", 5) == []
    mem.create("only one")
    assert len(mem.read("q", 5)) == 1


def test_read_many_matches_single_reads():
    mem = VectorMemory("hashing")
    mem.create_many([f"fact number {i} about topic {i % 7}" for i in range(200)])
    queries = [f"topic {i}" for i in range(30)]
    batched = mem.read_many(queries, 5)  # 30 queries: faiss takes its BLAS path, singles do not
    for query, found in zip(queries, batched):
        single = mem.read(query, 5)
        assert np.allclose([e.score for e in found], [e.score for e in single], atol=1e-5)
        top = {e.id for e in single if e.score > single[-1].score + 1e-5}  # ties at the cut may differ
        assert top <= {e.id for e in found}


def test_fp16_precision_returns_the_same_top_hit():
    texts = [f"entity {i} lives in city {i * 7 % 13}" for i in range(300)]
    exact, half = VectorMemory("hashing"), VectorMemory("hashing", precision="fp16")
    exact.create_many(texts)
    half.create_many(texts)
    for q in ["entity 5", "city 3", "entity 120 lives"]:
        assert exact.read(q, 1)[0].id == half.read(q, 1)[0].id


def test_save_and_load(tmp_path):
    mem = VectorMemory("hashing")
    for t in ["a b c", "d e f", "g h i"]:
        mem.create(t)
    mem.delete(2)
    mem.save(tmp_path / "mem.json")
    loaded = VectorMemory.load(tmp_path / "mem.json")
    assert loaded.entries() == mem.entries()
    assert loaded.create("new") == 4
    assert loaded.read("d e f g h i", 1)[0].id == 3
    (tmp_path / "bad.json").write_text('{"entries": 3}')
    with pytest.raises(ValueError, match="not a saved VectorMemory"):
        VectorMemory.load(tmp_path / "bad.json")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="precision"):
        VectorMemory("hashing", precision="int3")
    with pytest.raises(ValueError, match="max_entries"):
        VectorMemory("hashing", max_entries=0)
    with pytest.raises(ValueError, match="unknown embedder"):
        get_embedder("word2vec")
    with pytest.raises(ValueError, match="faiss-gpu"):
        VectorMemory("hashing", device="cuda")


def test_hashing_embedder_is_deterministic_normalised_and_cached():
    emb = HashingEmbedder(dim=64)
    vecs = emb.embed(["hello world", "hello world", ""])
    assert vecs.shape == (3, 64) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs[:2], axis=1), 1.0) and not vecs[2].any()
    assert np.array_equal(vecs[0], HashingEmbedder(dim=64).embed(["hello world"])[0])
    assert len(emb._cache) == 2


def test_minilm_embedder_loads_offline_and_ranks_semantically():
    mem = VectorMemory("minilm")
    assert mem.embedder.dim == 384
    cat = mem.create("The cat sat on the mat.")
    mem.create("Quarterly revenue grew by four percent.")
    assert mem.read("a kitten resting on a rug", 1)[0].id == cat


def test_scratchpad_limit():
    pad = Scratchpad(max_chars=5)
    pad.set("  abc ")
    assert pad.text == "abc"
    with pytest.raises(MemoryOpError):
        pad.set("too long")
    assert pad.text == "abc"
