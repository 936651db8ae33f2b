"""K, the paper's knowledge of one question, and what the report says of it over items and layers.

K_q = (1 / |pairs|) * sum over (correct a, incorrect b) of 1[S(a) > S(b)] (Gekhman et al. 2025, eq. 1): the
indicator is strict, so a tie counts as a pair not ranked correctly; K* = 1[K = 1]. Means over items carry
percentile bootstrap intervals from the evaluation's helper (tasks/evaluate/scoring.py), the same item resamples for
every layer and scorer, so the internal - external gap is paired.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from schemas.tables import INSIDEOUT_K, INSIDEOUT_LAYERS
from tasks.evaluate.scoring import paired_bootstrap

EXTERNAL, INTERNAL = "external", "internal"
NO_LAYER = -1  # the external scorer's layer while joining (null in the tables)
_LAYERS_SCHEMA = pl.from_arrow(INSIDEOUT_LAYERS.empty_table()).schema


def knowledge_k(scores: np.ndarray, correct: np.ndarray) -> float | None:
    """K of one question: the share of (correct, incorrect) pairs whose correct answer scores strictly higher;
    None when there is no pair (no correct or no incorrect candidate)."""
    scores, correct = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool)
    good, bad = scores[correct], scores[~correct]
    if not len(good) or not len(bad):
        return None
    return float((good[:, None] > bad[None, :]).mean())


def k_per_item(scores: pl.DataFrame) -> pl.DataFrame:
    """K and K* per (item, scorer, layer) from the candidate scores (INSIDEOUT_SCORES rows), every pair at once."""
    keys = ["item_id", "split", "scorer", "_layer"]
    frame = scores.with_columns(_layer=pl.col("layer").fill_null(NO_LAYER))
    good = frame.filter(pl.col("correct")).select(*keys, pl.col("score").alias("good"))
    bad = frame.filter(~pl.col("correct")).select(*keys, pl.col("score").alias("bad"))
    pairs = good.join(bad, on=keys).group_by(keys).agg(k=(pl.col("good") > pl.col("bad")).mean())
    counts = frame.group_by(keys).agg(n_correct=pl.col("correct").sum(), n_incorrect=(~pl.col("correct")).sum())
    out = pairs.join(counts, on=keys).with_columns(
        layer=pl.when(pl.col("_layer") == NO_LAYER).then(None).otherwise(pl.col("_layer")),
        k_star=pl.col("k") == 1.0,
    )
    return out.select(INSIDEOUT_K.names).cast({"layer": pl.Int32, "n_correct": pl.Int32, "n_incorrect": pl.Int32}
                                              ).sort("split", "scorer", "layer", "item_id", nulls_last=False)


def mean_ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float | None, float | None, float | None]:
    """The mean over items and its percentile bootstrap 95% CI (the paired helper against 0: the same resamples)."""
    return paired_bootstrap(values, np.zeros(len(values)), n_boot, seed)


def _summary_row(split: str, scorer: str, layer: int | None, k: np.ndarray, k_ext: np.ndarray | None,
                 n_boot: int, seed: int) -> dict:
    """One INSIDEOUT_LAYERS row; `k_ext`, the same items' external K, only on internal rows."""
    mean, lo, hi = mean_ci(k, n_boot, seed)
    row = {"split": split, "scorer": scorer, "layer": layer, "n_items": len(k), "mean_k": mean, "mean_k_lo": lo,
           "mean_k_hi": hi, "k_star": float((k == 1.0).mean())}
    if k_ext is not None:
        hidden = (k > k_ext).astype(float)
        row["hidden_share"], row["hidden_share_lo"], row["hidden_share_hi"] = mean_ci(hidden, n_boot, seed)
        row["gap"], row["gap_lo"], row["gap_hi"] = paired_bootstrap(k, k_ext, n_boot, seed)
    return row


def summarise(k_items: pl.DataFrame, l2: dict[int, float], n_boot: int, seed: int) -> pl.DataFrame:
    """Per split, the external row then one internal row per layer; `chosen` marks the layer of best dev mean
    internal K (ties: the lower layer), on both splits. `l2`: each layer's probe C."""
    rows = []
    for split in ("dev", "test"):
        part = k_items.filter(pl.col("split") == split)
        ext = part.filter(pl.col("scorer") == EXTERNAL).sort("item_id")
        if ext.height == 0:
            continue
        rows.append(_summary_row(split, EXTERNAL, None, ext["k"].to_numpy(), None, n_boot, seed))
        for (layer,), grp in part.filter(pl.col("scorer") == INTERNAL).sort("layer").group_by("layer",
                                                                                             maintain_order=True):
            paired = grp.join(ext.select("item_id", pl.col("k").alias("k_ext")), on="item_id").sort("item_id")
            rows.append({**_summary_row(split, INTERNAL, layer, paired["k"].to_numpy(), paired["k_ext"].to_numpy(),
                                        n_boot, seed), "l2": l2.get(layer)})
    frame = pl.DataFrame(rows, schema={n: t for n, t in _LAYERS_SCHEMA.items() if n != "chosen"})
    return with_choice(frame)


def chosen_layer(summary: pl.DataFrame) -> int | None:
    """The internal layer of best dev mean K (ties: the lower layer); None without dev rows."""
    dev = summary.filter((pl.col("split") == "dev") & (pl.col("scorer") == INTERNAL))
    if dev.height == 0:
        return None
    return int(dev.sort(["mean_k", "layer"], descending=[True, False])["layer"][0])


def with_choice(summary: pl.DataFrame) -> pl.DataFrame:
    """The summary with `chosen` set on the chosen layer's internal rows."""
    layer = chosen_layer(summary)
    return summary.with_columns(chosen=((pl.col("scorer") == INTERNAL) & (pl.col("layer") == layer)).fill_null(False))
