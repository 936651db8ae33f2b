"""Stage 1, ingest: read a benchmark into the `items`, `statements` and `rejects` tables.

Each --dataset name maps to a Reader of tasks.ingest.formats (the offline default ``known-facts`` lives in
tasks/ingest/formats/known_facts.py). A dataset without probe statements borrows them from the bundled known
facts or from an MQuAKE file (``ingest.probe_dataset``): tasks/ingest/sources.py decides a run's sources once,
and both the reading and the provenance take that list. The sha256 of every input file and the loader versions
go into ``ingest_provenance.json`` (and the manifest); the same files and options hit the ingest cache and are
not parsed again.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from schemas.tables import ITEMS, REJECTS, STATEMENTS
from tasks.core.config import ModelConfig, RunConfig
from tasks.ingest.formats import Ingested, ReadOptions
from tasks.ingest.formats import known_facts_options
from tasks.ingest.formats.known_facts import KNOWN_FACTS_PATH, RELATION_TEMPLATES, make_question, make_sentence
from tasks.core.models import load_tokenizer, model_window
from tasks.ingest.provenance import (
    PROMPT_RESERVE,
    IngestCache,
    provenance_of,
)
from tasks.ingest.sources import Source, run_sources
from tasks.core.storage import RunPaths, key_lock, write_json, write_parquet

log = logging.getLogger(__name__)
QUESTION_TOKENS = PROMPT_RESERVE - 64  # of the prompt's reserve, what the system line and the answer leave a question

__all__ = [
    "KNOWN_FACTS_PATH", "RELATION_TEMPLATES", "Ingested", "ingest", "make_question", "make_sentence",
    "read_options", "run_ingest",
]


class TokenCounter:
    """Token count of a context, loading the tokenizer only for a context that could exceed the budget.

    Tokenizers emit at most one token per UTF-8 byte plus a few prefix tokens, so a context whose byte length
    (+8) is within the budget fits without tokenizing it: the common case loads nothing.
    """

    def __init__(self, model: ModelConfig, limit: int):
        self.model, self.limit, self._tok = model, limit, None

    def __call__(self, text: str) -> int:
        bound = len(text.encode("utf-8", "surrogatepass")) + 8
        if bound <= self.limit:
            return bound  # an upper bound that already fits
        if self._tok is None:
            self._tok = load_tokenizer(self.model)
        return len(self._tok(text, add_special_tokens=False)["input_ids"])


def context_budget(cfg: RunConfig) -> int | None:
    """Tokens a context may take: the explicit budget, else the model's window minus room for the prompt."""
    if cfg.ingest.max_context_tokens is not None:
        return cfg.ingest.max_context_tokens
    window = model_window(cfg.model)
    return max(window - PROMPT_RESERVE, 16) if window else None


def read_options(cfg: RunConfig) -> ReadOptions:
    """Reader options of this run: sampling, the known-facts contexts, the context budget in tokens."""
    limit = context_budget(cfg)
    return ReadOptions(
        seed=cfg.seed,
        limit=cfg.limit,
        n_distractors=cfg.ingest.n_distractors,
        max_context_tokens=limit,
        truncation=cfg.ingest.truncation,
        count_tokens=TokenCounter(cfg.model, limit) if limit else None,
        max_question_tokens=QUESTION_TOKENS if limit else None,
        count_question=TokenCounter(cfg.model, QUESTION_TOKENS) if limit else None,
        known_facts=known_facts_options.from_config(cfg.ingest),
    )


def read_sources(sources: list[Source], opts: ReadOptions) -> list[Ingested]:
    """The rows of every source of the run, in its order (the main dataset first)."""
    return [src.read(opts) for src in sources]


def merge(results: list[Ingested]) -> Ingested:
    """One set of tables: the dataset's items, the last source's statements, every source's rejects."""
    main = results[0]
    out = Ingested(dataset=main.dataset, items=main.items, statements=results[-1].statements,
                   n_read=main.n_read, n_kept=main.n_kept)
    out.rejects = [r for res in results for r in res.rejects]
    return out


def check_usable(results: list[Ingested], rejects_at: Path | None = None) -> None:
    """Stop a run that has nothing to work on, saying why (and where the refused records' reasons are)."""
    main, where = results[0], f"; the reasons are in {rejects_at}" if rejects_at else ""
    if not main.items:
        raise ValueError(f"{main.dataset}: no usable items, every record was refused ({main.summary()}){where}")
    if not results[-1].statements:
        raise ValueError(
            f"{results[-1].dataset}: no probe statements; set --ingest.probe-dataset known-facts (bundled) or mquake"
        )


def ingest(cfg: RunConfig) -> Ingested:
    """Read the configured dataset and its probe statements into one set of rows."""
    results = read_sources(run_sources(cfg), read_options(cfg))
    check_usable(results)
    return merge(results)


def _counts(res: Ingested) -> dict[str, Any]:
    """A source's read/kept/rejected counts, as provenance keeps them."""
    return {"read": res.n_read, "kept": res.n_kept, "rejected": len(res.rejects),
            "by_reason": dict(Counter(r["reason"] for r in res.rejects))}


def _write_tables(result: Ingested, paths: RunPaths) -> dict[str, Path]:
    return {
        "items": write_parquet(result.items, paths.table("items"), ITEMS),
        "statements": write_parquet(result.statements, paths.table("statements"), STATEMENTS),
    }


def _ingest_or_restore(cfg: RunConfig, sources: list[Source], cache: IngestCache, paths: RunPaths) -> dict[str, Any]:
    """The run's tables from the cache entry, or read from the sources and stored in it; returns the summary."""
    if cache.hit():
        cache.restore({t: paths.table(t) for t in cache.tables()})
        log.info("ingest: cache hit %s, no file parsed", cache.key)
        return cache.summary()
    results = read_sources(sources, read_options(cfg))
    merged = merge(results)
    rejects = write_parquet(merged.rejects, paths.table("rejects"), REJECTS)  # kept even when the run stops here
    check_usable(results, rejects)
    tables = {**_write_tables(merged, paths), "rejects": rejects}
    summary = {"lines": [r.summary() for r in results], "counts": {r.dataset: _counts(r) for r in results}}
    cache.store(tables, summary)
    return summary


def run_ingest(cfg: RunConfig, paths: RunPaths) -> None:
    """Write items, statements and rejects (from the cache when the same inputs were read before)."""
    sources = run_sources(cfg)
    prov = provenance_of(cfg, sources)
    cache = IngestCache.for_key(prov["cache_key"])
    with key_lock(cache.root.with_name(f".{cache.key}.lock"), f"ingest cache {cache.key}"):
        summary = _ingest_or_restore(cfg, sources, cache, paths)
    prov["counts"] = summary["counts"]
    write_json(prov, paths.ingest_provenance)
    for line in summary["lines"]:
        log.info(line)
