"""Contexts with probe-flagged sentences marked, as both fine-tuning and evaluation see them."""

from __future__ import annotations

import polars as pl

from tasks.core.prompts import mark_context
from tasks.core.storage import RunPaths, read_table


def marked_contexts(paths: RunPaths) -> dict[str, str]:
    """item_id -> its context rebuilt from its sentences, flagged ones wrapped in <conflict> markers."""
    sentences = read_table(paths.table("sentences")).select("item_id", "sent_idx", "text")
    scores = read_table(paths.table("sentence_scores")).select("item_id", "sent_idx", "flagged")
    joined = sentences.join(scores, on=["item_id", "sent_idx"], how="left").with_columns(
        pl.col("flagged").fill_null(False)
    )
    out: dict[str, str] = {}
    for (item_id,), group in joined.sort("item_id", "sent_idx").group_by("item_id", maintain_order=True):
        out[item_id] = mark_context(group["text"].to_list(), group["flagged"].to_list())
    return out
