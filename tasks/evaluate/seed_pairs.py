"""Paired comparisons over fine-tuning seeds (a sweep's `sweep_comparisons`): every method against each reference,
per subset and metric, every seed's answers on an item taken together.

The seeds answer the same test items, so the item stays the unit of the test: a method's score on an item is its
mean over the seeds (for p_s and EM one of 0, 1/k, ..., 1 with k seeds; methods on the base model answer alike in
every seed). The difference of two methods is the mean of the per-item differences; its interval is the paired
bootstrap over items (an item's seeds resampled together), and its p the exact sign-flip test of the per-item
differences (`scoring.sign_flip_exact`; McNemar's exact test when there is one seed). Treating seeds x items as
independent pairs would overstate the evidence: the seeds of one item share its question and context. Each seed's
own difference and McNemar p (its run's comparisons table) are kept alongside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

from schemas.tables import COMPARISONS, SWEEP_COMPARISONS
from tasks.evaluate.knowledge import with_item_columns
from tasks.evaluate.paired import metric_rows, paired_frame
from tasks.evaluate.scoring import METRIC_COLUMNS, iter_subsets, sign_flip_exact

PAIR_KEYS = ["method", "reference", "condition", "knowledge", "metric"]


def seed_mean_scores(predictions: Mapping[int, pl.DataFrame], items: pl.DataFrame) -> pl.DataFrame:
    """Scored predictions with one row per method x item: each score column's mean over the seeds that evaluated
    the method, the item's columns, and `n_seeds`."""
    long = pl.concat([with_item_columns(p, items) for p in predictions.values()], how="vertical_relaxed")
    item_cols = [c for c in ("condition", "counterfactual", "known") if c in long.columns]
    return long.group_by("method", "item_id", maintain_order=True).agg(
        *(pl.col(c).cast(pl.Float64).mean() for c in METRIC_COLUMNS),
        *(pl.col(c).first() for c in item_cols),
        n_seeds=pl.len().cast(pl.Int32),
    )


def _pair_rows(scores: pl.DataFrame, method: str, reference: str, n_boot: int, seed: int) -> list[dict]:
    """Every subset x metric row of one pair on seed-mean scores (the seeds both methods were evaluated in)."""
    wide = paired_frame(scores, method, reference)
    seeds = min(scores.filter(pl.col("method").is_in([method, reference]))["n_seeds"])

    def test(a, b):
        return sign_flip_exact(a, b, seeds)

    return [{"method": method, "reference": reference, "condition": condition, "knowledge": knowledge,
             "n_seeds": seeds, **row}
            for condition, knowledge, part in iter_subsets(wide) for row in metric_rows(part, n_boot, seed, test=test)]


def _per_seed(comparisons: Mapping[int, pl.DataFrame]) -> pl.DataFrame:
    """Each pair x subset x metric's per-seed differences and McNemar p, in seed order."""
    frames = [c.select(*PAIR_KEYS, "diff", "p_mcnemar").with_columns(seed=pl.lit(s)) for s, c in comparisons.items()]
    if not frames:
        return pl.DataFrame(schema={**{k: pl.String for k in PAIR_KEYS}, "seed_diffs": pl.List(pl.Float64),
                                    "seed_p_mcnemar": pl.List(pl.Float64)})
    return (pl.concat(frames).sort("seed").group_by(PAIR_KEYS, maintain_order=True)
            .agg(seed_diffs=pl.col("diff"), seed_p_mcnemar=pl.col("p_mcnemar")))


def sweep_comparisons(
    predictions: Mapping[int, pl.DataFrame], comparisons: Mapping[int, pl.DataFrame], items: pl.DataFrame,
    references: Sequence[str], n_boot: int, seed: int,
) -> pl.DataFrame:
    """The sweep's comparisons table: every method evaluated in the seed runs against every evaluated reference,
    on seed-mean per-item scores, with each seed's own difference and McNemar p (`comparisons`: the seed runs'
    comparisons tables)."""
    scores = seed_mean_scores(predictions, items)
    methods = scores["method"].unique(maintain_order=True).to_list()
    rows = [r for ref in references if ref in methods for m in methods if m != ref
            for r in _pair_rows(scores, m, ref, n_boot, seed)]
    table = pl.DataFrame(rows, schema=pl.from_arrow(COMPARISONS.empty_table()).schema | {"n_seeds": pl.Int32})
    table = table.rename({"p_mcnemar": "p_exact"}).join(_per_seed(comparisons), on=PAIR_KEYS, how="left")
    return table.with_columns(pl.col("seed_diffs", "seed_p_mcnemar").fill_null([])).select(SWEEP_COMPARISONS.names)
