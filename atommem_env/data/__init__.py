"""Task sources: real multi-hop QA files, long-context composition, and the synthetic generator."""

from __future__ import annotations

import warnings

from ..tokens import make_token_counter
from .compose import COMPOSITIONS, RULER_GRID, SPLITS, ComposedTaskSource, select_split, split_of
from .loaders import DATASETS, DataFormatError, LoadStats, QAItem, load_items
from .synthetic import SyntheticTaskSource, generate_task

__all__ = ["make_task_source", "load_items", "ComposedTaskSource", "SyntheticTaskSource", "generate_task",
           "DataFormatError", "LoadStats", "QAItem", "DATASETS", "SPLITS", "COMPOSITIONS", "RULER_GRID", "select_split",
           "split_of"]


def make_task_source(dataset: str = "synthetic", *, data_path=None, split: str = "all", context_tokens=None,
                     num_documents=None, multi_query: bool = False, synthetic: dict | None = None,
                     max_tasks: int | None = None, skip_malformed: bool = False, seed: int = 0,
                     token_counter="regex", composition: str = "atommem", official_text: bool = False):
    """The env's task source from plain arguments (so `gym.make` kwargs stay simple values).

    - "synthetic": `synthetic` holds the generator's knobs (hops, distractors, volatility,
      questions, ...); `context_tokens` sets the document length; `max_tasks` bounds the pool.
    - "hotpotqa" / "2wiki" / "musique": `data_path` is the user's file; `split`, `context_tokens`,
      `num_documents`, `multi_query` and `composition` as in `ComposedTaskSource`; `max_tasks` keeps the
      first N; `official_text`: paragraphs' sentences joined as the official data script joins them (the official
      paper loop's data).
      Skipped (`skip_malformed`) and unanswerable records are counted in a warning and in the
      source's `load_stats` (the env's reset info shows them).
    """
    if max_tasks is not None and max_tasks <= 0:
        raise ValueError(f"max_tasks must be positive or None, got {max_tasks}")
    if dataset == "synthetic":
        if data_path is not None:
            raise ValueError("the synthetic dataset takes no data_path")
        if composition != "atommem":
            raise ValueError(f"the {composition} composition applies to data files, not the synthetic dataset")
        if multi_query or num_documents is not None:
            raise ValueError("for several questions per synthetic task use synthetic={'questions': n}")
        knobs = dict(synthetic or {})
        if context_tokens is not None:
            knobs["context_tokens"] = context_tokens
        return SyntheticTaskSource(split=split, num_tasks=max_tasks, seed=seed, **knobs)
    if synthetic:
        raise ValueError(f"synthetic= knobs apply to the synthetic dataset, not {dataset!r}")
    stats = LoadStats()
    every_item = load_items(dataset, data_path, skip_malformed=skip_malformed, stats=stats,
                            official_text=official_text)
    items = select_split(every_item, split)
    if stats.skipped or stats.unanswerable:
        first = f"; first error: {stats.errors[0]}" if stats.errors else ""
        warnings.warn(f"{data_path}: {stats.loaded} records loaded, {stats.skipped} malformed ones skipped, "
                      f"{stats.unanswerable} unanswerable ones left out{first}", stacklevel=2)
    if max_tasks is not None:
        items = items[:max_tasks]
    # The official and RULER documents pad from the whole file, as their scripts do; but a training document never
    # holds an eval question's paragraph, so the train split pads from itself.
    padding_items = every_item if composition != "atommem" and split != "train" else None
    source = ComposedTaskSource(items, make_token_counter(token_counter), context_tokens=context_tokens,
                                num_documents=num_documents, multi_query=multi_query, seed=seed, name=dataset,
                                composition=composition, padding_items=padding_items)
    source.load_stats = stats
    return source
