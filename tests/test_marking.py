"""Which units of a context are marked, read from hand-written sentences and sentence_scores tables: units in their
order, unscored units unflagged, and, once the relevance filter ran, no unit it dropped ever flagged."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from schemas.tables import SENTENCE_SCORES, SENTENCES
import polars as pl

from tasks.core.marking import context_units, marked_contexts, pruned
from tasks.core.storage import RunPaths, text_key, write_parquet

# (item, sent_idx, text, conflicting, kept by the relevance filter, probe flag or None where unscored), written in
# an order that is neither the items' nor the units' own
UNITS = [
    ("b", 1, "B two.", None, True, True),
    ("a", 2, "A three.", True, False, True),  # flagged, but the relevance filter dropped it
    ("b", 0, "B one.", False, True, False),
    ("a", 0, "A one.", False, True, None),  # never scored
    ("a", 1, "A two.", True, True, True),
]


def _write(paths: RunPaths, relevance: bool) -> None:
    sentences = [{"item_id": i, "sent_idx": j, "key": text_key(t), "text": t, "char_start": 0, "char_end": len(t),
                  "conflicting": c, **({"is_relevant": r} if relevance else {})} for i, j, t, c, r, _ in UNITS]
    scores = [{"item_id": i, "sent_idx": j, "key": text_key(t), "layer": 1, "probe": "logistic",
               "p_conflict": 0.9 if f else 0.1, "flagged": f} for i, j, t, _, _, f in UNITS if f is not None]
    write_parquet(sentences, paths.table("sentences"), SENTENCES)
    write_parquet(scores, paths.table("sentence_scores"), SENTENCE_SCORES)


@pytest.fixture()
def paths(tmp_path) -> RunPaths:
    return RunPaths(tmp_path / "run")


def test_units_come_in_order_with_their_flags_and_labels(paths):
    _write(paths, relevance=False)
    units = context_units(paths)
    assert sorted(units) == ["a", "b"]
    assert units["a"].texts == ["A one.", "A two.", "A three."]
    assert units["a"].flagged == [False, True, True]  # the unscored unit is False, not missing
    assert units["a"].conflicting == [False, True, True] and units["a"].labelled
    assert units["b"].texts == ["B one.", "B two."] and units["b"].flagged == [False, True]
    assert units["b"].conflicting == [False, None] and not units["b"].labelled
    assert marked_contexts(paths) == {"a": "A one. <conflict> A two. </conflict> <conflict> A three. </conflict>",
                                      "b": "B one. <conflict> B two. </conflict>"}


def test_a_unit_the_relevance_filter_dropped_is_never_flagged(paths):
    _write(paths, relevance=True)
    units = context_units(paths)
    assert units["a"].flagged == [False, True, False]
    assert units["b"].flagged == [False, True]
    assert marked_contexts(paths)["a"] == "A one. <conflict> A two. </conflict> A three."


def test_a_sentences_table_from_before_the_relevance_filter_still_marks(paths):
    """Tables written before `is_relevant` existed lack the column: every probe flag then stands."""
    _write(paths, relevance=False)
    sentences = paths.table("sentences")
    pq.write_table(pq.read_table(sentences).drop_columns(["is_relevant"]), sentences)
    assert context_units(paths)["a"].flagged == [False, True, True]


def test_a_unit_the_filter_has_no_verdict_on_is_not_flagged():
    sentences = pl.DataFrame({"is_relevant": [True, None, False], "flagged": [True, True, True]})
    assert sentences.select(pruned(pl.col("flagged"), sentences))["flagged"].to_list() == [True, False, False]
