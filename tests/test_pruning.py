"""Relevance pruning: with the filter on no irrelevant unit is flagged or marked; flag precision / recall / F1 per
layer with and without pruning, against hand counts, in the table and the report."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from schemas.tables import PROBE_LOCALISATION, SENTENCE_SCORES, SENTENCES
from tasks.core.config import RunConfig
from tasks.core.marking import context_units, marked_contexts, relevance_filtered
from tasks.core.prompts import CLOSE, OPEN
from tasks.core.quality import DataQualityError, validate
from tasks.core.storage import RunPaths, write_parquet
from tasks.probes.localisation import layer_localisation, pruning_flags
from tasks.report import run_report
from tests.test_report import METHODS, _write_metrics, build_synthetic_run

# Test-split units: relevant (benchmark), truthful, is_relevant (filter), p_conflict; threshold 0.5.
UNITS = [
    (True, False, True, 0.9),  # u0 conflicting, kept, flagged
    (False, False, True, 0.8),  # u1 false but irrelevant, kept by the filter, flagged
    (False, False, False, 0.7),  # u2 false, irrelevant, pruned by both
    (True, True, True, 0.2),  # u3 true
    (True, False, False, 0.6),  # u4 conflicting, but the filter dropped it
    (True, False, True, 0.3),  # u5 conflicting, missed by the probe
    (None, False, False, 0.95),  # u6 relevance unknown: no `conflicting` label, never counted
    (False, True, False, 0.1),  # u7 true, irrelevant
]
# By hand: 7 labelled units (u6 out), conflicting u0 u4 u5 (3).
# none:   flags u0 u1 u2 u4 -> 4 flagged, 2 true (u0 u4): P 2/4, R 2/3, F1 4/7
# filter: flags u0 u1       -> 2 flagged, 1 true (u0):    P 1/2, R 1/3, F1 2/5
# gold:   flags u0 u4       -> 2 flagged, 2 true:         P 1,   R 2/3, F1 4/5
HAND = {
    "none": {"n": 7, "positives": 3, "flagged": 4, "true_flags": 2, "precision": 0.5, "recall": 2 / 3, "f1": 4 / 7},
    "filter": {"n": 7, "positives": 3, "flagged": 2, "true_flags": 1, "precision": 0.5, "recall": 1 / 3, "f1": 0.4},
    "gold": {"n": 7, "positives": 3, "flagged": 2, "true_flags": 2, "precision": 1.0, "recall": 2 / 3, "f1": 0.8},
}


def _units(is_relevant: bool = True) -> tuple[pl.DataFrame, np.ndarray]:
    rows = [{"relevant": rel, "truthful": true,
             "conflicting": None if rel is None else rel and not true,
             "is_relevant": keep if is_relevant else None} for rel, true, keep, _ in UNITS]
    schema = {"relevant": pl.Boolean, "truthful": pl.Boolean, "conflicting": pl.Boolean, "is_relevant": pl.Boolean}
    return pl.DataFrame(rows, schema=schema), np.array([p for *_, p in UNITS])


def test_layer_localisation_equals_the_hand_count():
    units, p = _units()
    got = {row.pop("pruning"): row for row in layer_localisation(units, p, 0.5)}
    assert got.keys() == HAND.keys()
    for pruning, expected in HAND.items():
        assert got[pruning] == pytest.approx(expected), pruning


def test_prunings_the_data_cannot_give_are_left_out():
    units, p = _units(is_relevant=False)  # no relevance filter ran
    assert not relevance_filtered(units)
    assert set(pruning_flags(units, p, 0.5)) == {"none", "gold"}
    units, p = _units()
    p[2] = np.nan  # u2 never scored (activations.sentences=relevant): unpruned flags are unknown
    flags = pruning_flags(units, p, 0.5)
    assert set(flags) == {"filter", "gold"} and not flags["filter"][2]
    got = {row["pruning"]: row for row in layer_localisation(units, p, 0.5)}
    assert got["filter"]["precision"] == pytest.approx(0.5) and got["gold"]["f1"] == pytest.approx(0.8)
    assert layer_localisation(units.with_columns(pl.lit(None, pl.Boolean).alias("conflicting")), p, 0.5) == []


def _marking_run(paths: RunPaths, is_relevant: list[bool | None]) -> None:
    """One item of four units, every one flagged by sentence_scores, with the filter's `is_relevant` as given."""
    texts = ["A is B.", "C is D.", "E is F.", "G is H."]
    sentences = [{"item_id": "q", "sent_idx": i, "key": f"k{i}", "text": t, "char_start": 0, "char_end": 1,
                  "is_relevant": keep} for i, (t, keep) in enumerate(zip(texts, is_relevant))]
    scores = [{"item_id": "q", "sent_idx": i, "key": f"k{i}", "layer": 0, "probe": "logistic", "p_conflict": 0.9,
               "flagged": True} for i in range(4)]
    write_parquet(sentences, paths.table("sentences"), SENTENCES)
    write_parquet(scores, paths.table("sentence_scores"), SENTENCE_SCORES)


def test_marking_never_wraps_a_unit_the_filter_dropped(tmp_path):
    """Even a sentence_scores table that flags an irrelevant unit cannot get it marked while the filter is on."""
    paths = RunPaths(tmp_path / "r")
    paths.root.mkdir(parents=True)
    _marking_run(paths, [True, False, None, True])
    assert context_units(paths)["q"].flagged == [True, False, False, True]
    assert marked_contexts(paths)["q"] == f"{OPEN} A is B. {CLOSE} C is D. E is F. {OPEN} G is H. {CLOSE}"
    _marking_run(paths, [None] * 4)  # no filter ran: nothing to prune
    assert context_units(paths)["q"].flagged == [True] * 4


LAYER_ROWS = [  # probe_localisation rows for two layers at `last`, counts as in HAND (layer 2) and another layer
    *({"layer": 2, "probe": "logistic", "position": "last", "pruning": k, **v} for k, v in HAND.items()),
    {"layer": 1, "probe": "logistic", "position": "last", "pruning": "none", "n": 7, "positives": 3, "flagged": 0,
     "true_flags": 0, "precision": None, "recall": 0.0, "f1": 0.0},
    {"layer": 1, "probe": "logistic", "position": "last", "pruning": "filter", "n": 7, "positives": 3, "flagged": 0,
     "true_flags": 0, "precision": None, "recall": 0.0, "f1": 0.0},
    {"layer": 1, "probe": "logistic", "position": "last", "pruning": "gold", "n": 7, "positives": 3, "flagged": 0,
     "true_flags": 0, "precision": None, "recall": 0.0, "f1": 0.0},
]


@pytest.fixture()
def report_run(tmp_path) -> RunPaths:
    paths = build_synthetic_run(RunPaths(tmp_path / "t"))
    _write_metrics(paths, dict.fromkeys(METHODS, 0.5), half_width=0.1)
    return paths


def test_report_shows_flags_per_layer_with_and_without_pruning(report_run):
    write_parquet(LAYER_ROWS, report_run.table("probe_localisation"), PROBE_LOCALISATION)
    assert validate("probe_localisation", report_run)["success"]
    run_report(RunConfig(run="t", runs_dir=report_run.root.parent), report_run)
    text = report_run.report.read_text()
    assert ("| position | layer | no pruning: precision | no pruning: recall | no pruning: F1 | relevance filter: "
            "precision | relevance filter: recall | relevance filter: F1 | gold relevance: precision | gold relevance:"
            " recall | gold relevance: F1 |") in text
    assert "| last | 1 | n/a | 0.000 | 0.000 | n/a | 0.000 | 0.000 | n/a | 0.000 | 0.000 |" in text
    assert "| last | **2** (best) | 0.500 | 0.667 | 0.571 | 0.500 | 0.333 | 0.400 | 1.000 | 0.667 | 0.800 |" in text
    assert "(7 labelled units, 3 conflicting)" in text and "No relevance filter in this run" not in text
    assert (report_run.figures / "localisation_layers.png").read_bytes().startswith(b"\x89PNG")


def test_report_says_which_pruning_is_missing(report_run):
    rows = [r for r in LAYER_ROWS if r["pruning"] == "gold"]
    write_parquet(rows, report_run.table("probe_localisation"), PROBE_LOCALISATION)
    run_report(RunConfig(run="t", runs_dir=report_run.root.parent), report_run)
    text = report_run.report.read_text()
    assert "No relevance filter in this run: `--decompose.relevance`" in text
    assert "No unpruned flags: the run probed only the units the relevance filter kept" in text
    assert "| last | **2** (best) | 1.000 | 0.667 | 0.800 |" in text


def test_suite_refuses_rates_that_are_not_the_counts(report_run):
    bad = [dict(LAYER_ROWS[0], precision=0.6), *LAYER_ROWS[1:]]
    write_parquet(bad, report_run.table("probe_localisation"), PROBE_LOCALISATION)
    with pytest.raises(DataQualityError, match="rates_match"):
        validate("probe_localisation", report_run)
    bad = [dict(LAYER_ROWS[0], true_flags=5), *LAYER_ROWS[1:]]
    write_parquet(bad, report_run.table("probe_localisation"), PROBE_LOCALISATION)
    with pytest.raises(DataQualityError, match="counts_nest"):
        validate("probe_localisation", report_run)

