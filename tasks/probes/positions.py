"""Where a probe reads: the rows it trains and is measured on at each token position, and their vectors.

`last` (a text fed alone, its last token) is the statements' position: a probe there trains on the labelled
statements, as the reference's does. Statements are never read inside a context, so `ctx_last` and `ctx_mean` exist
only for the context units: a probe at those positions trains on the units whose truth the benchmark gives, read in
their context, with label 1 where the unit is false and 0 where it is true (the statements' labels: false =
conflicting with memory). A unit's split is its item's; its group is the subject of the statement with its text
(docs/METHOD.md, "Positions"), so cross-fitting and the split check treat both kinds of rows alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from tasks.core.activation_store import CTX_POSITIONS, ActivationStore
from tasks.core.config import ProbeConfig
from tasks.core.storage import text_key
from tasks.probes.crossfit import unit_groups

log = logging.getLogger(__name__)

# What every probe row carries: the statements' columns plus the context a ctx_* row was read in (null for `last`).
ROW_COLUMNS = ("stmt_id", "key", "context_key", "text", "label", "group", "split")


def probe_positions(probe: ProbeConfig) -> list[str]:
    """The positions fitted per layer: the configured ones, then the flagging one if not among them."""
    return list(dict.fromkeys([*probe.positions, probe.position]))


def check_extracted(store: ActivationStore, positions: Sequence[str], run: str) -> None:
    """Refuse, in one line naming the command that extracts them, positions the activation store lacks."""
    missing = [p for p in positions if p not in store.positions]
    if missing:
        wanted = ",".join(dict.fromkeys(["last", *store.positions, *missing]))
        raise ValueError(
            f"probe position(s) {missing} were not extracted (the activation store {store.dir} holds"
            f" {store.positions}): run `clearflow stage activations --run {run} --activations.positions {wanted}`"
            f" first, or `clearflow run` with --activations.positions {wanted}")


def unit_context_keys(units: pl.DataFrame, items: pl.DataFrame) -> list[str]:
    """The context key of each unit's row at a ctx_* position: text_key of its item's context."""
    ckey = {item_id: text_key(context) for item_id, context in items.select("item_id", "context").iter_rows()}
    return [ckey[i] for i in units["item_id"]]


def probe_rows(
    position: str, statements: pl.DataFrame, units: pl.DataFrame, items: pl.DataFrame, norm: Callable[[str], str]
) -> pl.DataFrame:
    """The rows a probe at `position` trains and is measured on (ROW_COLUMNS): the statements at a statement
    position, the labelled probed context units at a context one."""
    if position not in CTX_POSITIONS:
        return statements.with_columns(pl.lit(None, pl.String).alias("context_key")).select(ROW_COLUMNS)
    return context_rows(statements, units, items, norm)


def context_rows(
    statements: pl.DataFrame, units: pl.DataFrame, items: pl.DataFrame, norm: Callable[[str], str]
) -> pl.DataFrame:
    """Probed units with a truth label, one row per (unit text, context); a pair whose items disagree on its split
    or label is dropped. Group: the first statement group the unit's text derives from when that group's statements
    share the item's split, else the item's group (so no group straddles splits)."""
    items_of = items.select("item_id", pl.col("split").alias("item_split"), pl.col("group").alias("item_group"))
    labelled = units.filter(pl.col("truthful").is_not_null()).sort("item_id", "sent_idx").join(
        items_of, on="item_id", how="left", maintain_order="left")
    if labelled.height == 0:
        raise ValueError("a probe at a context position (ctx_last, ctx_mean) trains on context units with a truth"
                         " label (sentences.truthful), and this run's units have none: use --probe.position last")
    split_of_group = dict(statements.select("group", "split").unique("group").iter_rows())
    derived = [groups[0] for groups in unit_groups(labelled, statements, items, norm)]
    group = [g if split_of_group.get(g, s) == s else own
             for g, s, own in zip(derived, labelled["item_split"], labelled["item_group"])]
    rows = labelled.select(
        (pl.col("item_id") + ":" + pl.col("sent_idx").cast(pl.String)).alias("stmt_id"), "key",
        pl.Series("context_key", unit_context_keys(labelled, items), dtype=pl.String), "text",
        (~pl.col("truthful")).cast(pl.Int8).alias("label"), pl.Series("group", group, dtype=pl.String),
        pl.col("item_split").alias("split"),
    )
    pair = ["key", "context_key"]
    agree = (pl.col("split").n_unique().over(pair) == 1) & (pl.col("label").n_unique().over(pair) == 1)
    kept = rows.filter(agree).unique(pair, keep="first", maintain_order=True)
    dropped = rows.filter(~agree).unique(pair).height
    if dropped:
        log.info("probes: %d (unit, context) pairs dropped: their items disagree on split or truth label", dropped)
    return kept


def row_vectors(store: ActivationStore, layer: int, position: str, rows: pl.DataFrame) -> np.ndarray:
    """The vectors of `rows` (columns key, context_key) at one layer and position."""
    in_context = position in CTX_POSITIONS
    return store.vectors(layer, rows["key"].to_list(), position,
                         rows["context_key"].to_list() if in_context else None)


def unit_rows(units: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Context units as vector rows (key, context_key), so `row_vectors` reads them at any position."""
    return units.select("key").with_columns(pl.Series("context_key", unit_context_keys(units, items), pl.String))
