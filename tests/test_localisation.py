"""Localisation metrics of the probe's flags and p_conflict against `conflicting` and `not truthful`."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from schemas.tables import SENTENCE_SCORES, SENTENCES
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths, read_table, write_parquet
from tasks.probes.localisation import LOCALISATION_SQL, localisation_by_target, localisation_metrics, localisation_units
from tasks.report import run_report
from tests.test_report import METHODS, _write_metrics, build_synthetic_run

METHOD_DOC = Path(__file__).resolve().parents[1] / "docs" / "METHOD.md"

# Test-split units (item, sentence): truthful, relevant, p_conflict (None: not scored), flagged.
UNITS = {
    ("q0", 0): (False, True, 0.9, True), ("q0", 1): (True, False, 0.2, False), ("q0", 2): (False, True, 0.4, False),
    ("q1", 0): (False, True, 0.8, True), ("q1", 1): (True, False, 0.7, True), ("q1", 2): (False, None, 0.3, False),
    ("q2", 0): (False, True, 0.6, True), ("q2", 1): (None, False, 0.1, False), ("q2", 2): (False, False, 0.55, True),
    ("q3", 0): (False, True, None, None), ("q3", 1): (True, None, 0.5, False), ("q3", 2): (True, True, 0.35, False),
}
# Counted by hand from UNITS (conflicting = relevant and not truthful, null when either is):
# conflicting: 9 labelled, 5 positive, 5 flagged, 3 true flags; scored pairs 13 of 16 ordered right.
# not truthful: 11 labelled, 7 positive, 5 flagged, 4 true flags; scored pairs 17 of 24 ordered right.
HAND = {
    "conflicting": {"n": 9, "positives": 5, "flagged": 5, "true_flags": 3, "precision": 3 / 5, "recall": 3 / 5,
                    "f1": 6 / 10, "n_scored": 8, "auroc": 13 / 16},
    "not truthful": {"n": 11, "positives": 7, "flagged": 5, "true_flags": 4, "precision": 4 / 5, "recall": 4 / 7,
                     "f1": 8 / 12, "n_scored": 10, "auroc": 17 / 24},
}


def _conflicting(relevant: bool | None, truthful: bool | None) -> bool | None:
    return None if relevant is None or truthful is None else relevant and not truthful


@pytest.fixture()
def labelled_run(tmp_path) -> RunPaths:
    """The report's synthetic run with the test split's units relabelled and rescored as UNITS says (train kept)."""
    paths = RunPaths(tmp_path / "runs" / "t")
    paths.root.mkdir(parents=True)
    build_synthetic_run(paths)
    scores = {(r["item_id"], r["sent_idx"]): r for r in read_table(paths.table("sentence_scores")).iter_rows(named=True)}
    rows, score_rows = [], []
    for s in read_table(paths.table("sentences")).iter_rows(named=True):
        at = (s["item_id"], s["sent_idx"])
        if at not in UNITS:  # a train unit: its truth label and flag stay, and must not count
            rows.append(s)
            score_rows.append(scores[at])
            continue
        truthful, relevant, p, flagged = UNITS[at]
        rows.append({**s, "truthful": truthful, "relevant": relevant, "conflicting": _conflicting(relevant, truthful)})
        if p is not None:
            score_rows.append({**scores[at], "p_conflict": p, "flagged": flagged})
    write_parquet(rows, paths.table("sentences"), SENTENCES)
    write_parquet(score_rows, paths.table("sentence_scores"), SENTENCE_SCORES)
    _write_metrics(paths, dict.fromkeys(METHODS, 0.5), half_width=0.1)
    return paths


def _test_units(paths: RunPaths) -> pl.DataFrame:
    units = localisation_units(read_table(paths.table("sentences")), read_table(paths.table("sentence_scores")),
                               read_table(paths.table("items")))
    return units.filter(pl.col("split") == "test")


def test_metrics_equal_the_hand_count(labelled_run):
    got = localisation_by_target(_test_units(labelled_run))
    assert got.keys() == HAND.keys()
    for target, expected in HAND.items():
        assert got[target] == pytest.approx(expected), target


def test_report_rows_equal_the_hand_count(labelled_run):
    run_report(RunConfig(run="t", runs_dir=labelled_run.root.parent), labelled_run)
    text = labelled_run.report.read_text()
    assert "| conflicting | 9 | 5 | 5 | 0.600 | 0.600 | 0.600 | 8 | 0.812 |" in text
    assert "| not truthful | 11 | 7 | 5 | 0.800 | 0.571 | 0.667 | 10 | 0.708 |" in text
    assert "`conflicting`: 9 of 12 test-split units carry the label" in text and "No `" not in text
    assert "| 0 | conflict | False | True | True | 0.900 | yes | Fact 0 is in Rome. |" in text  # an example row


def test_sql_gives_the_same_counts(labelled_run):
    """LOCALISATION_SQL over the run's tables (the catalog's views) agrees with the function: an independent route."""
    con = duckdb.connect()
    for table in ("sentences", "sentence_scores", "items"):
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{labelled_run.table(table)}')")
    rows = con.execute(LOCALISATION_SQL).fetchall()
    assert [r[0] for r in rows] == ["conflicting", "not truthful"]
    for target, n, positives, flagged, precision, recall, f1 in rows:
        hand = HAND[target]
        assert (n, positives, flagged) == (hand["n"], hand["positives"], hand["flagged"])
        assert (precision, recall, f1) == pytest.approx((hand["precision"], hand["recall"], hand["f1"]))


def test_method_doc_quotes_the_sql():
    assert LOCALISATION_SQL in METHOD_DOC.read_text()


def _pairwise_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Share of (positive, negative) pairs the score orders right, ties counting half (Mann-Whitney)."""
    pos, neg = p[y], p[~y]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg)) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn_and_pairwise_auroc(seed):
    rng = np.random.default_rng(seed)
    n = 60
    y = rng.random(n) < 0.3
    flagged = rng.random(n) < 0.4
    p = np.round(rng.random(n), 1)  # rounded: ties between classes
    p[rng.random(n) < 0.2] = np.nan  # unscored units
    flagged[np.isnan(p)] = False
    s = localisation_metrics(y, flagged, p)
    assert s["precision"] == pytest.approx(precision_score(y, flagged))
    assert s["recall"] == pytest.approx(recall_score(y, flagged))
    assert s["f1"] == pytest.approx(f1_score(y, flagged))
    scored = ~np.isnan(p)
    assert s["auroc"] == pytest.approx(_pairwise_auroc(y[scored], p[scored]))
    assert (s["n"], s["positives"], s["flagged"], s["n_scored"]) == (n, y.sum(), flagged.sum(), scored.sum())


def test_undefined_metrics_are_none_not_zero():
    none_flagged = localisation_metrics(np.array([True, False]), np.array([False, False]), np.array([0.3, 0.2]))
    assert none_flagged["precision"] is None and none_flagged["recall"] == 0.0 and none_flagged["f1"] == 0.0
    assert none_flagged["auroc"] == 1.0
    no_positive = localisation_metrics(np.array([False, False]), np.array([True, False]), np.array([0.9, np.nan]))
    assert no_positive["recall"] is None and no_positive["auroc"] is None and no_positive["precision"] == 0.0
    empty = localisation_metrics(np.array([], bool), np.array([], bool), np.array([], float))
    assert empty["n"] == 0 and all(empty[k] is None for k in ("precision", "recall", "f1", "auroc"))


def test_no_labels_is_said_plainly(tmp_path):
    """A run whose sentences carry no relevance (or predate the labels): the conflicting row says it is missing."""
    paths = build_synthetic_run(RunPaths(tmp_path / "t"))
    sents = read_table(paths.table("sentences")).drop("relevant", "conflicting", "truthful")
    sents.write_parquet(paths.table("sentences"))  # an old run's table, without the label columns
    _write_metrics(paths, dict.fromkeys(METHODS, 0.5), half_width=0.1)
    run_report(RunConfig(run="t", runs_dir=tmp_path), paths)
    text = paths.report.read_text()
    assert "**No `conflicting` labels**: none of the 12 test-split units has one" in text
    assert "**No `not truthful` labels**" in text
    assert "| not truthful | 0 | 0 | 0 | n/a | n/a | n/a | 0 | n/a |" in text
