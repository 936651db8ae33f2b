"""Stage 4: a probe per layer, kind and position on the hidden states, the best layer, and sentence scores.

The kinds (how a probe is fitted, saved and reloaded) are the entries of tasks/probes/kinds/; the rows each position
trains on (statements at `last`, labelled context units at ctx_*) are tasks/probes/positions.py. This stage fits
each configured kind on the train split per layer and position, lets dev pick its strength and the layer
(tasks/probes/selection.py), reports test only, measures the flagging kind's flags on the test contexts per layer
with and without relevance pruning (tasks/probes/localisation.py), and scores every context sentence with the chosen
probe, except the train-split items' sentences (what fine-tuning reads), which cross-fitted fold probes score
(tasks/probes/crossfit.py). When the relevance filter ran, a unit it did not keep is never flagged
(tasks/core/marking.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits
from tasks.core.progress import tqdm

from schemas.tables import PROBE_LOCALISATION, PROBE_METRICS, SENTENCE_SCORES
from tasks.activations.stage import fed_text, probed_sentences
from tasks.core.activation_store import ActivationStore
from tasks.core.config import ProbeConfig, RunConfig
from tasks.core.marking import pruned
from tasks.core.storage import RunPaths, model_slug, read_table, write_json, write_parquet
from tasks.probes.crossfit import (
    FINAL,
    clear_fold_probes,
    fit_fold_probes,
    fold_label,
    fold_probe_path,
    marker_line,
    plan_folds,
)
from tasks.probes.kinds import KINDS, Probe, probe_kinds
from tasks.probes.localisation import layer_localisation
from tasks.probes.positions import check_extracted, probe_positions, probe_rows, row_vectors, unit_rows
from tasks.probes.selection import SPLITS, check_splits, select_best, split_metrics

log = logging.getLogger(__name__)

LOCALISATION_SPLIT = "test"  # the per-layer probes are fitted on train: test is the split none of them saw
NORM = partial(fed_text, strip_final_punct=True)  # "X is Y." is the statement "X is Y" (MQuAKE contexts)
BEST_KEYS = (
    "layer", "probe", "position", "l2", "fitted_on", "dev_auroc", "test_auroc", "test_accuracy",
    "test_auroc_train_only", "threshold", "model", "crossfit_folds", "crossfit_units",
)


def probe_path(paths: RunPaths, kind: str, layer: int, position: str = "last") -> Path:
    """Where the probe of one kind, layer and position lives (`last` keeps the name it had before positions)."""
    at = "" if position == "last" else f"-{position}"
    return paths.probes / f"{kind}{at}-layer{layer}.safetensors"


def _probe_layers(cfg: RunConfig, meta: dict) -> list[int]:
    """Layers to probe: the configured ones, which must have been extracted."""
    cached = meta["layers"]
    layers = sorted(set(cfg.activations.layers)) if cfg.activations.layers is not None else cached
    missing = [layer for layer in layers if layer not in cached]
    if missing:
        raise ValueError(f"layers {missing} have no cached activations (cached: {cached}): re-run activations")
    return layers


def fit_on_dev(
    kind: str, X: np.ndarray, y: np.ndarray, split: np.ndarray, cfg: ProbeConfig, seed: int
) -> tuple[Probe, float]:
    """Fit one kind on the train rows, its strength chosen on the dev rows (tasks/probes/kinds/base.py)."""
    train, dev = split == "train", split == "dev"
    return KINDS[kind].fit_on_dev(X[train], y[train], X[dev], y[dev], cfg, seed)


def train_layer(
    X: np.ndarray, y: np.ndarray, split: np.ndarray, kinds: list[str], cfg: RunConfig, layer: int, position: str
) -> tuple[dict[str, Probe], list[dict]]:
    """Fit every probe kind on one layer's train rows at one position (strength chosen on dev); metric rows on every
    split."""
    probes: dict[str, Probe] = {}
    rows: list[dict] = []
    for kind in kinds:
        probe, l2 = fit_on_dev(kind, X, y, split, cfg.probe, cfg.seed)
        metrics = {}
        for name in SPLITS:
            sel = split == name
            metrics[name] = split_metrics(probe.predict_proba(X[sel]), y[sel], cfg.probe.threshold)
            rows.append({"layer": layer, "probe": kind, "position": position, "split": name, **metrics[name]})
        probe.meta = {
            "kind": kind,
            "layer": layer,
            "model": cfg.model.name,
            "dim": int(X.shape[1]),
            "threshold": cfg.probe.threshold,
            "l2": l2,
            "seed": cfg.seed,
            "fitted_on": ["train"],
            "position": position,
            "metrics": metrics,
        }
        probes[kind] = probe
    return probes, rows


def refit_train_dev(probe: Probe, X: np.ndarray, y: np.ndarray, split: np.ndarray) -> Probe:
    """The chosen probe (layer, kind, L2 fixed on dev) refitted on train+dev; test metrics recomputed."""
    seen = np.isin(split, ["train", "dev"])
    final = KINDS[probe.meta["kind"]].fit(X[seen], y[seen], probe.meta["l2"], probe.meta["seed"])
    test = split == "test"
    metrics = dict(probe.meta["metrics"])
    metrics["test"] = split_metrics(final.predict_proba(X[test]), y[test], probe.meta["threshold"])
    final.meta = {**probe.meta, "fitted_on": ["train", "dev"], "metrics": metrics,
                  "train_only_test": probe.meta["metrics"]["test"]}
    return final


@dataclass(frozen=True)
class ProbeData:
    """What the probes read besides the vectors: the probed units, the items, the training rows of every position
    (tasks/probes/positions.py) and the test split's units, on which the flags are measured per layer."""

    units: pl.DataFrame  # the probed context units (all, or the relevant ones)
    items: pl.DataFrame
    rows: dict[str, pl.DataFrame]  # position -> its rows (ROW_COLUMNS)
    test_units: pl.DataFrame  # every unit of a test-split item, with `probed`

    @classmethod
    def load(cls, cfg: RunConfig, paths: RunPaths, statements: pl.DataFrame) -> ProbeData:
        units = probed_sentences(paths, cfg.activations.sentences)
        items = read_table(paths.table("items"))
        rows = {p: probe_rows(p, statements, units, items, NORM) for p in probe_positions(cfg.probe)}
        for position_rows in rows.values():
            check_splits(position_rows)
        test_ids = items.filter(pl.col("split") == LOCALISATION_SPLIT)["item_id"]
        probed = units.select("item_id", "sent_idx", pl.lit(True).alias("probed"))
        test_units = read_table(paths.table("sentences")).filter(pl.col("item_id").is_in(test_ids)).join(
            probed, on=["item_id", "sent_idx"], how="left", maintain_order="left").with_columns(
            pl.col("probed").fill_null(False))
        return cls(units, items, rows, test_units)


def localisation_rows(probe: Probe, data: ProbeData, U: np.ndarray) -> list[dict]:
    """probe_localisation rows of one probe: its flags on the test units (U: the probed ones' vectors)."""
    p = np.full(data.test_units.height, np.nan)
    p[data.test_units["probed"].to_numpy()] = probe.predict_proba(U)
    at = {"layer": probe.meta["layer"], "probe": probe.meta["kind"], "position": probe.meta["position"]}
    return [{**at, **row} for row in layer_localisation(data.test_units, p, probe.meta["threshold"])]


def score_sentences(
    paths: RunPaths, cfg: RunConfig, store: ActivationStore, probe: Probe, data: ProbeData, X: np.ndarray
) -> pl.DataFrame:
    """p_conflict, flag and scoring probe of every probed context unit (all, or the relevant ones).

    Units of train-split items are scored by cross-fitted fold probes (tasks/probes/crossfit.py) when
    probe.crossfit_folds > 1, every other unit by `probe`; X holds the vectors of the probe position's rows at the
    probe's layer. Sentences left out in 'relevant' mode get no row, so marking never flags them; with the relevance
    filter on, a unit it did not keep keeps its p_conflict but is not flagged.
    """
    layer, position = probe.meta["layer"], probe.meta["position"]
    probed, rows = data.units, data.rows[position]
    U = row_vectors(store, layer, position, unit_rows(probed, data.items))
    p, scored_by = probe.predict_proba(U), np.full(probed.height, FINAL, dtype=object)
    clear_fold_probes(paths.probes)
    if cfg.probe.crossfit_folds > 1:
        plan = plan_folds(rows, probed, data.items, cfg.probe.crossfit_folds, cfg.seed, NORM)
        with threadpool_limits(limits=1):  # as in train_layers
            folds = fit_fold_probes(probe, X, rows["label"].to_numpy().astype(int), rows, plan)
        for k, fold in folds.items():
            fold.save(fold_probe_path(paths.probes, k))
            sel = plan.unit_fold == k
            p[sel], scored_by[sel] = fold.predict_proba(U[sel]), fold_label(k)
    scores = probed.with_columns(
        pl.lit(layer).alias("layer"),
        pl.lit(probe.meta["kind"]).alias("probe"),
        pl.Series("p_conflict", p, dtype=pl.Float64),
        pl.Series("scored_by", scored_by.tolist(), dtype=pl.String),
    ).with_columns(pruned(pl.col("p_conflict") > probe.meta["threshold"], probed).alias("flagged"))
    scores = scores.select("item_id", "sent_idx", "key", "layer", "probe", "p_conflict", "flagged", "scored_by")
    write_parquet(scores, paths.table("sentence_scores"), SENTENCE_SCORES)
    return scores


def _split_vectors(store: ActivationStore, layer: int, position: str, *frames: pl.DataFrame) -> list[np.ndarray]:
    """The vectors of several row frames at one layer and position, read in one pass over the layer's files."""
    V = row_vectors(store, layer, position, pl.concat([f.select("key", "context_key") for f in frames]))
    bounds = np.cumsum([0, *(f.height for f in frames)])
    return [V[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def train_layers(
    cfg: RunConfig, paths: RunPaths, store: ActivationStore, data: ProbeData
) -> tuple[pl.DataFrame, dict[int, Probe]]:
    """Every kind fitted per layer and position and saved; the metrics and per-layer localisation tables, and the
    flagging kind's probe per layer at the flagging position."""
    kinds, select, flag_at = probe_kinds(cfg.probe), cfg.probe.select_kind, cfg.probe.position
    test_rows = unit_rows(data.test_units.filter(pl.col("probed")), data.items)
    rows: list[dict] = []
    local: list[dict] = []
    selected: dict[int, Probe] = {}
    # one BLAS thread: these fits are tiny, and threaded BLAS on a busy machine ran ~100x slower (measured)
    with threadpool_limits(limits=1):
        for layer in tqdm(_probe_layers(cfg, store.meta()), desc="probes", unit="layer", dynamic_ncols=True):
            for position, prows in data.rows.items():
                X, U = _split_vectors(store, layer, position, prows, test_rows)
                y, split = prows["label"].to_numpy().astype(int), prows["split"].to_numpy().astype(str)
                probes, layer_rows = train_layer(X, y, split, kinds, cfg, layer, position)
                rows.extend(layer_rows)
                for kind, probe in probes.items():
                    probe.save(probe_path(paths, kind, layer, position))
                local.extend(localisation_rows(probes[select], data, U))
                if position == flag_at:
                    selected[layer] = probes[select]
    write_parquet(local, paths.table("probe_localisation"), PROBE_LOCALISATION)
    return read_table(write_parquet(rows, paths.table("probe_metrics"), PROBE_METRICS)), selected


def run_probes(cfg: RunConfig, paths: RunPaths) -> None:
    """Train probes per layer, kind and position, pick the best layer on dev, score every sentence with it (the
    train items' sentences with cross-fitted fold probes of the same kind, layer, position and C)."""
    store = ActivationStore.open(paths.activations, model_slug(cfg.model.name))
    check_extracted(store, probe_positions(cfg.probe), paths.root.name)
    statements = read_table(paths.table("statements"))
    check_splits(statements)
    probe_kinds(cfg.probe)  # unknown kinds refused before any fit
    data = ProbeData.load(cfg, paths, statements)
    metrics, selected = train_layers(cfg, paths, store, data)

    position = cfg.probe.position
    best = select_best(metrics, cfg.probe.select_kind, position, cfg.probe.layer)
    chosen, rows = selected[best["layer"]], data.rows[position]
    X = row_vectors(store, best["layer"], position, rows)
    if cfg.probe.refit:
        chosen = refit_train_dev(chosen, X, rows["label"].to_numpy().astype(int), rows["split"].to_numpy().astype(str))
    chosen.save(paths.probes / "final.safetensors")
    scores = score_sentences(paths, cfg, store, chosen, data, X)
    test = chosen.meta["metrics"]["test"]
    best_json = {
        "layer": best["layer"],
        "probe": cfg.probe.select_kind,
        "position": position,
        "l2": chosen.meta["l2"],
        "fitted_on": chosen.meta["fitted_on"],
        "dev_auroc": _float(best["dev_auroc"]),
        "test_auroc": _float(test["auroc"]),
        "test_accuracy": _float(test["accuracy"]),
        "test_auroc_train_only": _float(selected[best["layer"]].meta["metrics"]["test"]["auroc"]),
        "threshold": cfg.probe.threshold,
        "model": cfg.model.name,
        "crossfit_folds": cfg.probe.crossfit_folds if cfg.probe.crossfit_folds > 1 else 0,
        "crossfit_units": int((scores["scored_by"] != FINAL).sum()),
    }
    write_json(best_json, paths.best_probe)
    log.info("probes: best %s at %s, layer %d (dev AUROC %.3f, test AUROC %.3f); %s", best_json["probe"], position,
             best_json["layer"], best_json["dev_auroc"] or math.nan, best_json["test_auroc"] or math.nan,
             marker_line(best_json))


def _float(x) -> float | None:
    """A JSON-safe float (None where undefined)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
