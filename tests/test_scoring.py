"""Hand cases for every scoring rule of the reference protocol, and the bootstrap metrics table."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from schemas.tables import METRICS
from tasks.evaluate.scoring import (
    iter_subsets,
    resample_indices,
    bootstrap_cis,
    contains_answer,
    exact_match,
    f1_score,
    faithfulness,
    has_negation,
    memorisation_ratio,
    method_metrics,
    score_prediction,
)
from tasks.core.text import normalize


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an   apple  ", "apple"),
        ("A Tale of Two Cities", "tale of two cities"),
        ("Paris, France.", "paris france"),
        ("U.S.A.", "usa"),  # punctuation is deleted, not spaced (SQuAD)
        ("«Théâtre»!", "théâtre"),  # Unicode punctuation too
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("Tab\tand\nnewline", "tab and newline"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_exact_match_articles_punctuation_case():
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert exact_match("paris", ["Paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0  # EM is equality, not containment


def test_exact_match_takes_max_over_aliases():
    assert exact_match("NYC", ["New York City", "NYC"]) == 1.0
    assert exact_match("Boston", ["New York City", "NYC"]) == 0.0
    assert exact_match("anything", []) == 0.0
    assert exact_match("", ["!!"]) == 0.0  # an alias that normalises to nothing matches nothing


def test_negation_zeroes_em_only_on_counterfactual_items():
    # "none" is both the gold and a negation word: the rule applies to counterfactual data only.
    assert exact_match("None", ["none"], counterfactual=True) == 0.0
    assert exact_match("None", ["none"], counterfactual=False) == 1.0
    assert exact_match("None", ["none"]) == 1.0  # an item is not counterfactual unless said
    assert has_negation("It is not Paris")
    assert has_negation("Nobody knows")
    assert has_negation("cannot say")
    assert not has_negation("Nothingham")  # whole words only
    assert not has_negation("Norway")


def test_f1_partial_overlap_and_aliases():
    assert f1_score("Paris, France", ["Paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("Paris", ["Paris"]) == 1.0
    assert f1_score("London", ["Paris"]) == 0.0
    assert f1_score("the big apple", ["New York", "Big Apple"]) == 1.0
    assert f1_score("", ["Paris"]) == 0.0
    # by hand: precision = common / predicted tokens, recall = common / gold tokens, F1 = 2PR / (P + R)
    assert f1_score("Paris", ["Paris France"]) == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert f1_score("red green blue", ["red yellow"]) == pytest.approx(0.4)  # P = 1/3, R = 1/2: (1/3) / (5/6)
    assert f1_score("a b b", ["b b c d"]) == pytest.approx(2 / 3)  # "a" is an article: P = 2/2, R = 2/4
    assert f1_score("b b e", ["b c d"]) == pytest.approx(1 / 3)  # "b" counts once in common: P = R = 1/3
    # no gold alias left after normalising (articles, punctuation): nothing to match, F1 0 (not undefined)
    assert f1_score("Paris", []) == 0.0
    assert f1_score("Paris", ["the", "?!"]) == 0.0


def test_contains_answer_on_word_boundaries():
    assert contains_answer("It is in Paris, France.", ["Paris"])
    assert not contains_answer("Parisian food", ["Paris"])
    assert contains_answer("The capital is New York City", ["NYC", "new york city"])
    assert not contains_answer("Paris", None)


def test_ps_requires_context_answer_without_negation_or_original():
    assert faithfulness("Paris, France", ["Paris"], ["London"]) == (True, False)
    assert faithfulness("not Paris", ["Paris"], ["London"]) == (False, False)  # negated
    assert faithfulness("Paris or London", ["Paris"], ["London"]) == (False, True)  # original also present
    assert faithfulness("London", ["Paris"], ["London"]) == (False, True)
    assert faithfulness("Berlin", ["Paris"], ["London"]) == (False, False)
    assert faithfulness("Paris", ["Paris"], None) == (True, False)  # no memorised answer known


def test_score_prediction_row():
    assert score_prediction("The Paris", ["Paris"], ["Rome"], True) == {"em": 1.0, "f1": 1.0, "ps": True, "po": False}
    # a title with a negation word: EM counts it only where the item is not counterfactual (the rule's known cost)
    title = "Never Let Me Go"
    assert score_prediction(title, [title], None, True) == {"em": 0.0, "f1": 1.0, "ps": False, "po": False}
    assert score_prediction(title, [title], None, False)["em"] == 1.0


def test_memorisation_ratio():
    assert memorisation_ratio(0.6, 0.2) == pytest.approx(0.25)
    assert memorisation_ratio(0.0, 0.0) is None


def _preds(method: str, em, f1, ps, po) -> pl.DataFrame:
    return pl.DataFrame({"method": method, "em": em, "f1": f1, "ps": ps, "po": po})


def test_method_metrics_point_values_and_schema():
    preds = pl.concat(
        [
            _preds("a", [1.0, 0.0, 1.0, 0.0], [1.0, 0.5, 1.0, 0.0], [True, False, True, False], [False, True, False, False]),
            _preds("b", [0.0, 0.0], [0.0, 0.0], [False, False], [False, False]),
        ]
    )
    m = method_metrics(preds, n_boot=200, seed=0)
    assert m.columns == METRICS.names
    assert m.schema == pl.from_arrow(METRICS.empty_table()).schema  # the table's own types, not inferred ones
    narrow = method_metrics(preds, n_boot=200, seed=0, level=0.5).row(0, named=True)
    wide = m.row(0, named=True)
    assert wide["f1_lo"] < narrow["f1_lo"] <= narrow["f1_hi"] < wide["f1_hi"]  # the level reaches the interval
    assert m["method"].to_list() == ["a", "b"]  # order of appearance
    a = m.row(0, named=True)
    assert a["n"] == 4
    assert a["em"] == 0.5 and a["f1"] == pytest.approx(0.625)
    assert a["ps"] == 0.5 and a["po"] == 0.25
    assert a["mr"] == pytest.approx(0.25 / 0.75)
    for name in ("em", "f1", "ps", "po", "mr"):
        assert 0.0 <= a[f"{name}_lo"] <= a[name] <= a[f"{name}_hi"] <= 1.0
    b = m.row(1, named=True)
    assert b["mr"] is None and b["mr_lo"] is None and b["mr_hi"] is None  # MR undefined when p_s = p_o = 0


def test_bootstrap_is_seeded_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, size=(20, 4)).astype(float)
    large = np.tile(small, (25, 1))
    assert bootstrap_cis(small, 300, seed=7) == bootstrap_cis(small, 300, seed=7)
    lo_s, hi_s = bootstrap_cis(small, 300, seed=7)["em"]
    lo_l, hi_l = bootstrap_cis(large, 300, seed=7)["em"]
    assert hi_l - lo_l < hi_s - lo_s
    assert bootstrap_cis(small, 0, seed=7)["em"] == (None, None)


def test_constant_column_has_degenerate_ci():
    m = method_metrics(_preds("x", [1.0] * 5, [1.0] * 5, [True] * 5, [False] * 5), n_boot=100, seed=0)
    row = m.row(0, named=True)
    assert row["em_lo"] == row["em_hi"] == 1.0
    assert row["mr"] == 0.0 and not math.isnan(row["mr_hi"])


def _percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """A 95% percentile interval written out by hand: the 2.5th and 97.5th percentiles of the samples."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def test_intervals_equal_a_second_implementation_at_95_percent():
    """Every interval of the metrics table, by default, is the 95% percentile interval of the item resamples'
    means, recomputed here from resamples drawn by numpy itself (a 90% level, or another statistic, fails)."""
    rng = np.random.default_rng(3)
    n, n_boot, seed = 60, 500, 11
    em, ps = rng.integers(0, 2, n).astype(float), rng.integers(0, 2, n).astype(float)
    po = np.where(ps == 1, 0.0, rng.integers(0, 2, n)).astype(float)
    f1 = np.round(rng.random(n), 3)
    cf = rng.random(n) < 0.7
    preds = pl.DataFrame({"method": "a", "em": em, "f1": f1, "ps": ps.astype(bool), "po": po.astype(bool),
                          "counterfactual": cf})
    row = method_metrics(preds, n_boot=n_boot, seed=seed).row(0, named=True)  # the default level

    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # the same draws, made here
    weights = cf[idx].astype(float)
    want = {"em": em[idx].mean(axis=1), "f1": f1[idx].mean(axis=1),
            "ps": (ps[idx] * weights).sum(axis=1) / weights.sum(axis=1),
            "po": (po[idx] * weights).sum(axis=1) / weights.sum(axis=1)}
    want["mr"] = want["po"] / (want["ps"] + want["po"])
    for name, samples in want.items():
        assert np.isfinite(samples).all()  # 42 counterfactual items: every resample defines every metric
        assert (row[f"{name}_lo"], row[f"{name}_hi"]) == pytest.approx(_percentile_interval(samples), abs=1e-12), name
    # and the point values are the plain means over the items (p_s, p_o over the counterfactual ones)
    assert (row["em"], row["ps"], row["po"]) == pytest.approx((em.mean(), ps[cf].mean(), po[cf].mean()))


def test_intervals_agree_with_scipy_bootstrap():
    """An independent route: scipy's own percentile bootstrap (its own resamples) gives the same 95% interval of
    EM within the resampling noise of 20,000 draws; a 90% interval would sit ~0.013 inside on each side."""
    from scipy.stats import bootstrap

    em = np.array([1.0] * 90 + [0.0] * 110)
    ours = bootstrap_cis(np.column_stack([em, em, em, 1 - em]), 20_000, seed=5)["em"]
    theirs = bootstrap((em,), np.mean, n_resamples=20_000, method="percentile", confidence_level=0.95,
                       random_state=np.random.default_rng(6)).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.005)


def test_bootstrap_edge_cases_by_hand():
    one = np.array([[1.0, 0.5, 1.0, 0.0]])  # a single item: every resample is that item, so each interval is a point
    cis = bootstrap_cis(one, 10, 0)
    assert cis == {"em": (1.0, 1.0), "f1": (0.5, 0.5), "ps": (1.0, 1.0), "po": (0.0, 0.0), "mr": (0.0, 0.0)}
    assert bootstrap_cis(one, 1, 0)["f1"] == (0.5, 0.5)  # one resample is an interval too
    none = {m: (None, None) for m in ("em", "f1", "ps", "po", "mr")}
    assert bootstrap_cis(np.empty((0, 4)), 10, 0) == none and bootstrap_cis(one, 0, 0) == none


def test_p_s_intervals_over_few_counterfactual_items_by_a_loop():
    """Six items, two counterfactual (p_s 1 and 0): resamples hold 0, 1 or more of them. Each resample's p_s is the
    mean over the counterfactual items it holds, even one; a resample holding none is skipped. Recomputed here with
    a plain loop over the same resamples and numpy's percentiles."""
    values = np.array([[0, 0, 1, 0], [0, 0, 0, 0]] + [[1, 1, 0, 0]] * 4, dtype=float)
    cf = np.array([True, True, False, False, False, False])
    idx = resample_indices(6, 400, 9)
    means = []
    for row in idx:
        held = [values[i, 2] for i in row if cf[i]]
        if held:
            means.append(sum(held) / len(held))
    assert 0 < len(means) < 400 and any(sum(cf[row]) == 1 for row in idx)  # both edge cases arise
    for level in (0.95, 0.5):
        lo, hi = np.percentile(means, [50 - 50 * level, 50 + 50 * level])
        assert bootstrap_cis(values, 400, 9, level, counterfactual=cf)["ps"] == (pytest.approx(lo), pytest.approx(hi))


def test_a_single_row_is_a_subset():
    frame = pl.DataFrame({"em": [1.0], "condition": ["counterfactual"], "known": [True]})
    assert [(c, k, part.height) for c, k, part in iter_subsets(frame)] == [
        ("all", "all", 1), ("all", "known", 1), ("counterfactual", "all", 1), ("counterfactual", "known", 1)]
