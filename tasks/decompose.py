"""Stage 2, decompose: split every item's context into sentences with exact character offsets."""

from __future__ import annotations

import logging

import polars as pl
from tqdm.auto import tqdm

from schemas.tables import SENTENCES
from tasks.config import RunConfig
from tasks.splitter import split_sentences
from tasks.storage import RunPaths, read_table, text_key, write_parquet

log = logging.getLogger(__name__)


def _truth_by_key(statements: pl.DataFrame | None) -> dict[str, bool]:
    """Map a statement key to whether it is true; keys stated with both labels are left unknown."""
    if statements is None or statements.height == 0:
        return {}
    labels = statements.group_by("key").agg(pl.col("label").unique().alias("labels"))
    return {k: (ls[0] == 0) for k, ls in zip(labels["key"], labels["labels"]) if len(ls) == 1}


def _label(text: str, target: str | None, counterfactual: bool) -> str | None:
    """Benchmark label of one sentence; unknown (None) when the item names no target sentence."""
    if target is None:
        return None
    if text == target.strip():
        return "conflict" if counterfactual else "aligned"
    return "irrelevant"


def sentence_rows(items: pl.DataFrame, truth: dict[str, bool], progress: bool = True) -> list[dict]:
    """One row per context sentence of every item (the `sentences` table)."""
    rows: list[dict] = []
    cols = items.select("item_id", "context", "target_sentence", "counterfactual").iter_rows()
    for item_id, context, target, cf in tqdm(cols, total=items.height, desc="decompose", disable=not progress):
        for idx, (sent, start, end) in enumerate(split_sentences(context)):
            key = text_key(sent)
            rows.append(
                {
                    "item_id": item_id,
                    "sent_idx": idx,
                    "key": key,
                    "text": sent,
                    "char_start": start,
                    "char_end": end,
                    "relevance": None,
                    "label": _label(sent, target, bool(cf)),
                    "truthful": truth.get(key),
                }
            )
    return rows


def run_decompose(cfg: RunConfig, paths: RunPaths) -> dict[str, str]:
    """Split every item's context into the `sentences` table, labelled from the benchmark and statements."""
    items = read_table(paths.table("items"))
    stmt_path = paths.table("statements")
    statements = read_table(stmt_path) if stmt_path.exists() else None
    rows = sentence_rows(items, _truth_by_key(statements))
    out = write_parquet(rows, paths.table("sentences"), SENTENCES)
    n_target = sum(r["label"] in ("conflict", "aligned") for r in rows)
    missing = int(items["target_sentence"].is_not_null().sum()) - n_target
    print(f"decompose: {items.height} items -> {len(rows)} sentences, {n_target} target sentences found", flush=True)
    if missing > 0:
        log.warning("decompose: %d items' target sentence was not recovered by the splitter", missing)
    return {"sentences": str(out)}
