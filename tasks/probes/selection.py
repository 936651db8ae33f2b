"""What decides a probe's result: its metrics on a split, the split check, and the layer dev chooses (never test)."""

from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

SPLITS = ("train", "dev", "test")


def split_metrics(p: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    """n, accuracy, f1 and AUROC of probabilities against labels (None where undefined)."""
    n = int(len(y))
    if n == 0:
        return {"n": 0, "accuracy": None, "f1": None, "auroc": None}
    pred = (p > threshold).astype(int)
    auroc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None
    return {
        "n": n,
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "auroc": auroc,
    }


def check_splits(statements: pl.DataFrame) -> None:
    """Refuse statements whose splits are unknown or share a group (subject) across splits."""
    bad = sorted(set(statements["split"].unique().to_list()) - set(SPLITS))
    if bad:
        raise ValueError(f"statements have unknown splits {bad}; expected {list(SPLITS)}")
    per_group = statements.group_by("group").agg(pl.col("split").n_unique().alias("k")).filter(pl.col("k") > 1)
    if per_group.height:
        raise ValueError(
            f"{per_group.height} groups straddle splits (e.g. {per_group['group'][:3].to_list()}): "
            "train/dev/test would leak subjects"
        )


def select_best(metrics: pl.DataFrame, kind: str, position: str = "last", forced_layer: int | None = None) -> dict:
    """Best layer by dev AUROC of `kind` at `position` (ties -> smaller layer), or the forced one; never looks at
    test."""
    rows = metrics.filter((pl.col("probe") == kind) & (pl.col("position") == position) & (pl.col("split") == "dev"))
    if forced_layer is not None:
        if forced_layer not in rows["layer"].to_list():
            raise ValueError(f"probe.layer={forced_layer} has no {kind} probe at {position}; layers: "
                             f"{sorted(rows['layer'])}")
        return {"layer": forced_layer, "dev_auroc": rows.filter(pl.col("layer") == forced_layer)["auroc"][0]}
    rows = rows.filter(pl.col("auroc").is_not_null() & pl.col("auroc").is_not_nan())
    if rows.height == 0:
        raise ValueError("no dev AUROC to choose a layer with (dev needs both labels); set probe.layer instead")
    best = rows.sort(["auroc", "layer"], descending=[True, False]).row(0, named=True)
    return {"layer": int(best["layer"]), "dev_auroc": best["auroc"]}
