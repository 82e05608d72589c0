"""AtomMem: a Gymnasium environment for learned agent memory with atomic CRUD operations.

Importing the package registers the environment ids below (`gym.make("AtomMem/Synthetic-v0")`).
Ids for real datasets need `data_path=` pointing at the user's copy of the file.
"""

from gymnasium.envs.registration import register

from .env import AtomMemEnv
from .memory import MemoryEntry, MemoryOpError, Scratchpad, VectorMemory
from .protocols import format_ops, parse_action
from .tasks import Paragraph, Question, SupportingFact, Task

__version__ = "0.1.0"
__all__ = ["AtomMemEnv", "VectorMemory", "Scratchpad", "MemoryEntry", "MemoryOpError", "parse_action", "format_ops",
           "Task", "Paragraph", "Question", "SupportingFact", "ENV_IDS", "DATA_ENV_IDS"]

_ENTRY = "atommem_env.env:AtomMemEnv"

ENV_IDS = {
    # Synthetic family: no data files. The first is the README's default.
    "AtomMem/Synthetic-v0": dict(dataset="synthetic", context_tokens=4000, chunk_tokens=512),
    "AtomMem/SyntheticEasy-v0": dict(dataset="synthetic", context_tokens=400, chunk_tokens=256,
                                     synthetic={"hops": (1, 1), "distractors": 2, "volatility": 0.0,
                                                "name_pool": 32}),
    "AtomMem/SyntheticToy-v0": dict(dataset="synthetic", context_tokens=400, chunk_tokens=256,
                                    synthetic={"hops": (1, 1), "distractors": 2, "volatility": 0.0,
                                               "name_pool": 8}),
    "AtomMem/SyntheticVolatile-v0": dict(dataset="synthetic", context_tokens=4000, chunk_tokens=512,
                                         synthetic={"volatility": 0.8, "hops": (2, 4)}),
    # Volatile facts where only Update/Delete keep the current one: every question's fact takes 2-8 values, each worded
    # as the first, ids are random, the memory holds one entry and the scratchpad five characters (docs/study.md).
    "AtomMem/SyntheticVolatileBudget-v0": dict(dataset="synthetic", context_tokens=2000, chunk_tokens=256,
                                               synthetic={"hops": (1, 1), "distractors": 2, "volatility": 1.0,
                                                          "versions": (2, 8), "change_wording": "original",
                                                          "changeable_only": True, "renames": False},
                                               max_entries=1, max_scratchpad_chars=5, entry_ids="random"),
    "AtomMem/SyntheticMultiQuery-v0": dict(dataset="synthetic", context_tokens=8000, chunk_tokens=1024,
                                           synthetic={"questions": 3}),
    "AtomMem/Synthetic-Paper-v0": dict(dataset="synthetic", context_tokens=16000, chunk_tokens=4000,
                                       chunk_overlap=100, protocol="paper"),
    # Real datasets: pass data_path=.
    "AtomMem/HotpotQA-v0": dict(dataset="hotpotqa"),
    "AtomMem/HotpotQA-MultiQuery-v0": dict(dataset="hotpotqa", multi_query=True, num_documents=200,
                                           composition="official", chunk_tokens=4000, chunk_overlap=100,
                                           protocol="paper"),
    # MemAgent's RULER-HotpotQA: one question, its own paragraphs, padded to 50-6400 documents (RULER_GRID).
    "AtomMem/RULER-HotpotQA-v0": dict(dataset="hotpotqa", composition="ruler", num_documents=50),
    "AtomMem/2WikiMultihopQA-v0": dict(dataset="2wiki"),
    "AtomMem/MuSiQue-v0": dict(dataset="musique"),
}
DATA_ENV_IDS = {"AtomMem/HotpotQA-v0": "hotpotqa", "AtomMem/HotpotQA-MultiQuery-v0": "hotpotqa",
                "AtomMem/RULER-HotpotQA-v0": "hotpotqa",
                "AtomMem/2WikiMultihopQA-v0": "2wiki", "AtomMem/MuSiQue-v0": "musique"}
"""Ids that need data_path=, with the dataset whose file they read."""

for _env_id, _kwargs in ENV_IDS.items():
    register(id=_env_id, entry_point=_ENTRY, kwargs=_kwargs)
