"""Which items the model knows closed-book, and the item columns the metrics are split by.

An item is *known* when the closed-book answer contains (p_o's word-boundary matching) an alias of its true
answer: on an unknown fact a context answer overrides nothing, so p_o and MR there measure answer priors,
not memory resisting the context. The headline MR is therefore MR on known items.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from tasks.evaluate.scoring import contains_answer

CLOSED_BOOK = "closed_book"  # the method whose answers decide what the model knows


def true_answers(item: Mapping[str, Any]) -> list[str] | None:
    """The item's true answer + aliases: `orig_answers` when present, else the answers of a non-counterfactual
    item that asks for the fact itself (no answer-format instruction: "unknown" is not a fact); else None."""
    if item.get("orig_answers"):
        return list(item["orig_answers"])
    if not item.get("counterfactual") and not item.get("instruction") and item.get("answers"):
        return list(item["answers"])
    return None


def known_by_item(items: pl.DataFrame, closed_book: Mapping[str, str] | None) -> dict[str, bool | None]:
    """item_id -> whether the closed-book prediction states the true answer; None without closed_book's answer
    for the item or without a true answer."""
    known: dict[str, bool | None] = {}
    for item in items.iter_rows(named=True):
        truth = true_answers(item)
        answer = None if closed_book is None else closed_book.get(item["item_id"])
        known[item["item_id"]] = None if truth is None or answer is None else contains_answer(answer, truth)
    return known


def with_item_columns(predictions: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Predictions with their item's `condition` and `counterfactual` (what the metrics are split and computed by);
    `known` is kept, or null for predictions written before it existed."""
    cols = [c for c in ("condition", "counterfactual") if c in items.columns]
    frame = predictions.drop([c for c in cols if c in predictions.columns])
    frame = frame.join(items.select("item_id", *cols), on="item_id", how="left", maintain_order="left")
    if "known" not in frame.columns:
        frame = frame.with_columns(known=pl.lit(None, pl.Boolean))
    return frame
