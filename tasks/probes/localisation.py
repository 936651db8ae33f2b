"""Localisation metrics: how well the probe's flags and p_conflict pick out the labelled context units.

Two targets (docs/METHOD.md, "Localisation"): `conflicting` (relevant and false: the unit CLEAR should mark)
and `not truthful` (false, relevant or not: what a pure truth probe finds). Only units with a non-null label
for the target count. A unit the probes stage did not score (pruned by `--activations.sentences relevant`)
was never marked: it counts as not flagged, and is left out of the AUROC, which needs a score.

Per layer (`layer_localisation`, the probe_localisation table), the flags are also measured under each relevance
pruning (schemas.tables.PRUNINGS): none, the relevance filter's, and the benchmark's own `relevant` labels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from tasks.core.marking import relevance_filtered

LABELS = ("truthful", "relevant", "conflicting")  # the sentences table's unit labels
COUNTS = ("n", "positives", "flagged", "true_flags", "precision", "recall", "f1")  # a probe_localisation row's
# The target column of each localisation target, from the sentences table's labels.
TARGETS: dict[str, pl.Expr] = {"conflicting": pl.col("conflicting"), "not truthful": ~pl.col("truthful")}

# The same counts over the run catalog's views (clearflow sql), quoted verbatim in docs/METHOD.md.
LOCALISATION_SQL = """\
WITH units AS (  -- test-split units; a unit the probe did not score was never flagged
    SELECT s.conflicting, NOT s.truthful AS untrue, coalesce(c.flagged, false) AS flagged
    FROM sentences s JOIN items i ON i.item_id = s.item_id
    LEFT JOIN sentence_scores c ON c.item_id = s.item_id AND c.sent_idx = s.sent_idx
    WHERE i.split = 'test'
), labelled AS (
    SELECT 'conflicting' AS target, conflicting AS y, flagged FROM units WHERE conflicting IS NOT NULL
    UNION ALL
    SELECT 'not truthful', untrue, flagged FROM units WHERE untrue IS NOT NULL
)
SELECT target, count(*) AS n, count(*) FILTER (y) AS positives, count(*) FILTER (flagged) AS flagged,
       count(*) FILTER (y AND flagged) / nullif(count(*) FILTER (flagged), 0) AS precision,
       count(*) FILTER (y AND flagged) / nullif(count(*) FILTER (y), 0) AS recall,
       2 * count(*) FILTER (y AND flagged) / nullif(count(*) FILTER (y) + count(*) FILTER (flagged), 0) AS f1
FROM labelled GROUP BY target ORDER BY target"""


def _ratio(num: int, den: int) -> float | None:
    """num / den, None when the denominator is 0 (the metric is undefined, not 0)."""
    return num / den if den else None


def rank_auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC as the Mann-Whitney U over average ranks (ties count half), None with one class. The report computes
    it, and sklearn's import (~1 s, with scipy's) would be most of the report's time."""
    positives, n = int(y.sum()), int(y.size)
    if positives in (0, n):
        return None
    ranks = pl.Series(score).rank("average").to_numpy()
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * (n - positives)))


def localisation_metrics(y: np.ndarray, flagged: np.ndarray, p_conflict: np.ndarray) -> dict[str, Any]:
    """Counts, precision / recall / F1 of the flags and AUROC of p_conflict (NaN: unscored) for one target.

    y, flagged: booleans per labelled unit. Precision is undefined with no flag, recall with no positive;
    AUROC with one class among the scored units.
    """
    y, flagged, p = np.asarray(y, bool), np.asarray(flagged, bool), np.asarray(p_conflict, float)
    tp, positives, n_flagged = int((y & flagged).sum()), int(y.sum()), int(flagged.sum())
    scored = ~np.isnan(p)
    auroc = rank_auroc(y[scored], p[scored])
    return {
        "n": int(y.size), "positives": positives, "flagged": n_flagged, "true_flags": tp,
        "precision": _ratio(tp, n_flagged), "recall": _ratio(tp, positives),
        "f1": _ratio(2 * tp, positives + n_flagged) if positives or n_flagged else None,
        "n_scored": int(scored.sum()), "auroc": auroc,
    }


def localisation_by_target(units: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """localisation_metrics of every target over `units` (columns truthful, conflicting, flagged, p_conflict;
    flagged and p_conflict null where the unit was not scored)."""
    out = {}
    for name, target in TARGETS.items():
        part = units.select(target.alias("y"), "flagged", "p_conflict").filter(pl.col("y").is_not_null())
        p = part["p_conflict"].cast(pl.Float64).fill_null(math.nan).to_numpy()
        out[name] = localisation_metrics(part["y"].to_numpy(), part["flagged"].fill_null(False).to_numpy(), p)
    return out


def pruning_flags(units: pl.DataFrame, p: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """The flags (p > threshold; NaN: not scored, never flagged) under each pruning these units allow: 'none' when
    every unit was scored, 'filter' (units the relevance filter kept) when it ran, 'gold' (units labelled relevant)."""
    p = np.asarray(p, float)
    raw = np.where(np.isnan(p), False, p > threshold)
    out = {}
    if not np.isnan(p).any():  # with activations.sentences=relevant the filtered-out units have no score at all
        out["none"] = raw
    if relevance_filtered(units):
        out["filter"] = raw & units["is_relevant"].fill_null(False).to_numpy()
    out["gold"] = raw & units["relevant"].fill_null(False).to_numpy()
    return out


def layer_localisation(units: pl.DataFrame, p: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """Counts, precision, recall and F1 of one probe's flags against `conflicting`, one row per pruning (`units`:
    columns conflicting, relevant, is_relevant; `p`: p_conflict per unit, NaN where unscored); none without labels."""
    labelled = units["conflicting"].is_not_null().to_numpy()
    if not labelled.any():
        return []
    y, p = units["conflicting"].fill_null(False).to_numpy()[labelled], np.asarray(p, float)
    rows = []
    for pruning, flags in pruning_flags(units, p, threshold).items():
        stats = localisation_metrics(y, flags[labelled], p[labelled])
        rows.append({"pruning": pruning, **{k: stats[k] for k in COUNTS}})
    return rows


def localisation_units(sentences: pl.DataFrame, scores: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Every unit with its labels, the filter's is_relevant, its item's split, and its score and flag (null where it
    was not scored)."""
    absent = [c for c in (*LABELS, "is_relevant") if c not in sentences.columns]  # a run from before the labels
    sentences = sentences.with_columns(pl.lit(None, pl.Boolean).alias(c) for c in absent)
    return sentences.select("item_id", "sent_idx", "text", "label", *LABELS, "is_relevant").join(
        scores.select("item_id", "sent_idx", "p_conflict", "flagged"), on=["item_id", "sent_idx"], how="left"
    ).join(items.select("item_id", "split"), on="item_id", how="left")
