"""Paired per-item statistics of every evaluated method against each reference method: the comparisons table.

Two methods answer the same items, so whether they differ is judged on the items jointly: the paired bootstrap
resamples items for both at once, and McNemar's exact test looks only at the items where exactly one of the two is
right. Both are tighter than setting two separate intervals side by side, which is why the report's verdicts come
from this table and never from the per-method intervals of the metrics table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from schemas.tables import BINARY_METRICS, COMPARISONS, PAIRED_METRICS
from tasks.evaluate.knowledge import with_item_columns
from tasks.evaluate.scoring import (
    CI_LEVEL, METRIC_COLUMNS, iter_subsets, mcnemar_exact, mean_statistic, mr_statistic, paired_bootstrap,
)

COUNTERFACTUAL_ONLY = ("ps", "mr")  # defined on counterfactual items only, as in the metrics table
Test = Callable[[np.ndarray, np.ndarray], tuple[float, int, int]]  # (a, b) per-item scores -> (p, a wins, b wins)
PAIR_COLUMNS = [f.name for f in COMPARISONS if f.name not in ("method", "reference")]


def _scores(scored: pl.DataFrame, method: str, suffix: str) -> pl.DataFrame:
    """A method's per-item scores as columns <score>_<suffix> (p_s and p_o as 0/1 floats)."""
    return scored.filter(pl.col("method") == method).select(
        "item_id", *(pl.col(s).cast(pl.Float64).alias(f"{s}_{suffix}") for s in METRIC_COLUMNS))


def paired_frame(scored: pl.DataFrame, a: str, b: str) -> pl.DataFrame:
    """One row per item both methods answered: their scores side by side (suffixes _a, _b), with the item's
    subset columns (`scored`: predictions with their item columns, tasks/evaluate/knowledge.py)."""
    keep = [c for c in ("item_id", "condition", "counterfactual", "known") if c in scored.columns]
    first = scored.filter(pl.col("method") == a).select(keep)
    return first.join(_scores(scored, a, "a"), on="item_id").join(_scores(scored, b, "b"), on="item_id").sort("item_id")


def _metric_scores(rows: pl.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) per-item score arrays a metric is computed from: one column, or (p_s, p_o) for MR."""
    columns = ("ps", "po") if metric == "mr" else (metric,)
    return tuple(np.column_stack([rows[f"{c}_{s}"].to_numpy() for c in columns]) for s in ("a", "b"))


def metric_rows(part: pl.DataFrame, n_boot: int, seed: int, level: float = CI_LEVEL, test: Test = mcnemar_exact
                ) -> list[dict]:
    """Every metric of PAIRED_METRICS over a subset's paired rows: n, the difference a - b with its paired CI, and
    for the binary metrics the paired test's p (McNemar's exact unless `test` says otherwise) with the counts of
    items each side wins. A metric over no item (p_s and MR in a subset without counterfactual items) has no row."""
    cf = part["counterfactual"].fill_null(False) if "counterfactual" in part.columns else None
    counterfactual = part if cf is None else part.filter(cf)
    out = []
    for metric in PAIRED_METRICS:
        rows = counterfactual if metric in COUNTERFACTUAL_ONLY else part
        if rows.height == 0:
            continue
        a, b = _metric_scores(rows, metric)
        statistic = mr_statistic if metric == "mr" else mean_statistic
        diff, lo, hi = paired_bootstrap(a, b, n_boot, seed, level, statistic=statistic)
        row = {"metric": metric, "n": rows.height, "diff": diff, "lo": lo, "hi": hi,
               "n_better": None, "n_worse": None, "p_mcnemar": None}
        if metric in BINARY_METRICS:
            row["p_mcnemar"], row["n_better"], row["n_worse"] = test(a[:, 0], b[:, 0])
        out.append(row)
    return out


def paired_differences(
    predictions: pl.DataFrame | None, items: pl.DataFrame, a: str, b: str, n_boot: int, seed: int
) -> pl.DataFrame:
    """Per subset (as in the metrics table) and metric: the paired difference a - b on the same items, its 95% CI
    and, for p_s and EM, McNemar's exact p (the comparisons table's columns but method and reference). Empty when
    either method was not evaluated (or there are no predictions)."""
    schema = pl.from_arrow(COMPARISONS.empty_table()).select(PAIR_COLUMNS).schema
    if predictions is None:
        return pl.DataFrame(schema=schema)
    wide = paired_frame(with_item_columns(predictions, items), a, b)
    rows = [{"condition": condition, "knowledge": knowledge, **row}
            for condition, knowledge, part in iter_subsets(wide) for row in metric_rows(part, n_boot, seed)]
    return pl.DataFrame(rows, schema=schema)


def missing_references(evaluated: Sequence[str], references: Sequence[str]) -> list[str]:
    """The references that were not evaluated in the run: they are skipped, and the report names them."""
    return [r for r in references if r not in set(evaluated)]


def comparisons(
    predictions: pl.DataFrame, items: pl.DataFrame, references: Sequence[str], n_boot: int, seed: int
) -> pl.DataFrame:
    """The comparisons table: every evaluated method (in evaluation order) against every evaluated reference
    (a method is not compared with itself), per subset and metric; references not evaluated are skipped."""
    methods = predictions["method"].unique(maintain_order=True).to_list()
    frames = [paired_differences(predictions, items, m, r, n_boot, seed).select(
                  pl.lit(m).alias("method"), pl.lit(r).alias("reference"), pl.all())
              for r in references if r in methods for m in methods if m != r]
    return pl.concat(frames) if frames else pl.from_arrow(COMPARISONS.empty_table())
