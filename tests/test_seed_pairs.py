"""Paired comparisons over seeds (tasks/evaluate/seed_pairs.py) and the exact sign-flip test behind them, against
independent routes: every sign pattern enumerated, the binomial definition of McNemar's test, and small tables
worked by hand."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import polars as pl
import pytest

from schemas.tables import SWEEP_COMPARISONS
from tasks.evaluate.scoring import mcnemar_exact, sign_flip_exact
from tasks.evaluate.seed_pairs import sweep_comparisons
from tests.test_paired import _binomial_two_sided, _pattern


def _enumerated(d: list[Fraction]) -> Fraction:
    """P(|sum of ±d_i| >= |sum d_i|) over all 2^n equally likely sign patterns, in exact fractions."""
    observed = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed
               for signs in itertools.product((1, -1), repeat=len(d)))
    return Fraction(hits, 2 ** len(d))


@pytest.mark.parametrize("seeds", [1, 2, 3])
def test_sign_flip_equals_enumerating_every_sign_pattern(seeds):
    rng = np.random.default_rng(seeds)
    for _ in range(20):
        n = int(rng.integers(1, 11))
        a = rng.integers(0, seeds + 1, n) / seeds  # per-item means of 0/1 outcomes over the seeds
        b = rng.integers(0, seeds + 1, n) / seeds
        p, better, worse = sign_flip_exact(a, b, seeds)
        d = [Fraction(int(round(x * seeds)) - int(round(y * seeds)), seeds) for x, y in zip(a, b)]
        assert p == pytest.approx(float(_enumerated(d)), abs=1e-12)
        assert (better, worse) == (sum(x > 0 for x in d), sum(x < 0 for x in d))


def test_sign_flip_with_one_seed_is_mcnemar():
    for counts in [(3, 5, 1, 2), (0, 9, 2, 4), (10, 0, 0, 3), (2, 30, 20, 1)]:
        a, b = _pattern(*counts)
        p, better, worse = sign_flip_exact(np.array(a), np.array(b), 1)
        assert (better, worse) == counts[1:3]
        assert p == pytest.approx(_binomial_two_sided(counts[1], counts[1] + counts[2]), abs=1e-12)
        assert p == pytest.approx(mcnemar_exact(a, b)[0], abs=1e-12)


def test_sign_flip_on_many_items_stays_exact():
    """Thousands of items take the FFT path: against the normal approximation of the same sum (large n)."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 3000) / 3, rng.integers(0, 4, 3000) / 3
    p, _, _ = sign_flip_exact(a, b, 3)
    d = a - b
    z = abs(d.sum()) / np.sqrt((d ** 2).sum())
    from scipy.stats import norm
    assert p == pytest.approx(2 * norm.sf(z), abs=0.01)


def test_sign_flip_refuses_scores_that_are_not_seed_means():
    with pytest.raises(ValueError, match="means of 0/1 outcomes over 2 seeds"):
        sign_flip_exact(np.array([0.3, 1.0]), np.array([0.0, 0.0]), 2)


def _predictions(method_ps: dict[str, list[int]]) -> pl.DataFrame:
    """Scored predictions of 4 counterfactual items: p_s (and EM, F1) per method as given, p_o never."""
    rows = []
    for method, ps in method_ps.items():
        for i, v in enumerate(ps):
            rows.append({"method": method, "item_id": f"i{i}", "em": float(v), "f1": float(v), "ps": bool(v),
                         "po": False, "known": None})
    return pl.DataFrame(rows)


def test_sweep_comparison_worked_by_hand():
    """Two seeds, 4 items: CLEAR right on items 0,1 (seed 0) and 0 (seed 1); the reference never. Per-item seed
    means differ by 1, 1/2, 0, 0: difference 3/8; sign patterns of (1, 1/2): |±1 ± 1/2| >= 3/2 in 2 of 4: p = 1/2."""
    items = pl.DataFrame({"item_id": [f"i{i}" for i in range(4)], "counterfactual": [True] * 4})
    predictions = {0: _predictions({"clear": [1, 1, 0, 0], "full_context": [0, 0, 0, 0]}),
                   1: _predictions({"clear": [1, 0, 0, 0], "full_context": [0, 0, 0, 0]})}
    per_seed = {s: pl.DataFrame({"method": ["clear"], "reference": ["full_context"], "condition": ["all"],
                                 "knowledge": ["all"], "metric": ["ps"], "diff": [d], "p_mcnemar": [p]})
                for s, d, p in [(0, 0.5, 0.5), (1, 0.25, 1.0)]}
    table = sweep_comparisons(predictions, per_seed, items, ["full_context"], n_boot=200, seed=0)
    assert table.columns == SWEEP_COMPARISONS.names
    row = table.filter((pl.col("metric") == "ps") & (pl.col("condition") == "all")).row(0, named=True)
    assert (row["method"], row["reference"], row["n"], row["n_seeds"]) == ("clear", "full_context", 4, 2)
    assert row["diff"] == pytest.approx(3 / 8) and row["p_exact"] == pytest.approx(0.5)
    assert (row["n_better"], row["n_worse"]) == (2, 0)
    assert row["lo"] <= row["diff"] <= row["hi"]
    assert row["seed_diffs"] == [0.5, 0.25] and row["seed_p_mcnemar"] == [0.5, 1.0]
    f1 = table.filter(pl.col("metric") == "f1").row(0, named=True)
    assert f1["p_exact"] is None and f1["seed_diffs"] == []  # no per-seed row given for F1: empty, not null
    assert set(table["method"]) == {"clear"}  # the reference is not compared with itself
