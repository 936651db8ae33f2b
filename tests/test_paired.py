"""The comparisons table (tasks/evaluate/paired.py) and the verdicts the report reads from it, against hand
computations: McNemar's p by the binomial definition, MR differences by hand, the bootstrap against the normal
approximation, and the words "no measurable effect" exactly where the paired interval contains 0."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import polars as pl
import pytest

from schemas.tables import COMPARISONS, METRICS, PAIRED_METRICS
from tasks.core.storage import RunPaths, write_parquet
from tasks.evaluate.comparison import METRIC_LABELS, metric_verdict, section_paired
from tasks.evaluate.knowledge import with_item_columns
from tasks.evaluate.methods import method_label as label
from tasks.evaluate.paired import PAIR_COLUMNS, comparisons, metric_rows, paired_differences
from tasks.evaluate.scoring import mcnemar_exact, method_metrics, paired_bootstrap, resample_indices


def _items(n_cf: int, n_plain: int = 0) -> pl.DataFrame:
    """n_cf counterfactual items, then n_plain items that are not (no condition, no known flag)."""
    return pl.DataFrame({"item_id": [f"i{k:03d}" for k in range(n_cf + n_plain)],
                         "counterfactual": [True] * n_cf + [False] * n_plain})


def _method(name: str, items: pl.DataFrame, em, ps, po=None, f1=None) -> pl.DataFrame:
    """One method's scored predictions, item by item in `items` order."""
    n = items.height
    return pl.DataFrame({
        "method": [name] * n, "item_id": items["item_id"], "em": np.asarray(em, dtype=float),
        "f1": np.asarray(em if f1 is None else f1, dtype=float), "ps": np.asarray(ps, dtype=bool),
        "po": np.zeros(n, bool) if po is None else np.asarray(po, dtype=bool),
    })


def _pattern(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[int], list[int]]:
    """Two 0/1 outcome vectors with the given counts of (1, 1), (1, 0), (0, 1), (0, 0) items."""
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return a, b


def _binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial test at 1/2 by its definition: the probability of every outcome no more likely
    than the one observed, summed with math.comb."""
    observed = math.comb(n, k)
    return float(Fraction(sum(math.comb(n, i) for i in range(n + 1) if math.comb(n, i) <= observed), 2**n))


def _row(table: pl.DataFrame, method: str, reference: str, metric: str) -> dict:
    return table.filter((pl.col("method") == method) & (pl.col("reference") == reference)
                        & (pl.col("condition") == "all") & (pl.col("knowledge") == "all")
                        & (pl.col("metric") == metric)).row(0, named=True)


# ---------------------------------------------------------------- McNemar


def test_mcnemar_p_equals_the_binomial_definition_on_a_prediction_table():
    items = _items(30)
    em_a, em_b = _pattern(8, 9, 3, 10)  # discordant 9 vs 3
    ps_a, ps_b = _pattern(5, 7, 1, 17)  # discordant 7 vs 1
    predictions = pl.concat([_method("clear", items, em_a, ps_a), _method("full_context", items, em_b, ps_b)])
    table = comparisons(predictions, items, ["full_context"], 200, 0)
    em, ps = _row(table, "clear", "full_context", "em"), _row(table, "clear", "full_context", "ps")
    assert (em["n_better"], em["n_worse"], ps["n_better"], ps["n_worse"]) == (9, 3, 7, 1)
    assert em["p_mcnemar"] == pytest.approx(_binomial_two_sided(9, 12), rel=1e-12)  # 598 / 4096
    assert em["p_mcnemar"] == pytest.approx(598 / 4096, rel=1e-12)
    assert ps["p_mcnemar"] == pytest.approx(_binomial_two_sided(7, 8), rel=1e-12)  # 18 / 256
    assert em["diff"] == pytest.approx((9 - 3) / 30) and ps["diff"] == pytest.approx((7 - 1) / 30)
    for metric in ("f1", "mr"):  # not binary: no McNemar columns
        row = _row(table, "clear", "full_context", metric)
        assert row["p_mcnemar"] is row["n_better"] is row["n_worse"] is None


@pytest.mark.parametrize(("better", "worse"), [(0, 0), (5, 5), (6, 0), (0, 6), (1, 14), (20, 13)])
def test_mcnemar_exact_against_the_definition(better, worse):
    a, b = _pattern(4, better, worse, 3)
    p, n_better, n_worse = mcnemar_exact(np.array(a), np.array(b))
    assert (n_better, n_worse) == (better, worse)
    expected = 1.0 if better + worse == 0 else _binomial_two_sided(better, better + worse)
    assert p == pytest.approx(expected, rel=1e-12)


def test_mcnemar_refuses_scores_that_are_not_outcomes():
    with pytest.raises(ValueError, match="^McNemar's test needs two 0/1 outcome vectors over the same items$"):
        mcnemar_exact(np.array([0.5, 1.0]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="two 0/1 outcome vectors over the same items"):
        mcnemar_exact(np.array([0, 1, 1]), np.array([0, 1]))


# ---------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_edge_cases():
    a, b = np.array([1.0, 0.0, 1.0]), np.array([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"^paired scores must cover the same items: shapes \(3, 1\) and \(2, 1\)$"):
        paired_bootstrap(a, b[:2], 10, 0)
    assert paired_bootstrap(a, b, 0, 0) == (pytest.approx(1 / 3), None, None)  # no resample, no interval
    (row,) = resample_indices(3, 1, 5)  # one resample: the interval is its difference at both ends
    one = float(a[row].mean() - b[row].mean())
    assert paired_bootstrap(a, b, 1, 5) == (pytest.approx(1 / 3), pytest.approx(one), pytest.approx(one))


def test_paired_bootstrap_is_seeded_and_covers_the_true_difference():
    """400 items, a right and b wrong on 60, the reverse on 20: the difference is 0.1 exactly. The percentile
    interval holds it, excludes 0 and matches the normal approximation mean +- 1.96 sd / sqrt(n)."""
    a, b = _pattern(100, 60, 20, 220)
    first = paired_bootstrap(np.array(a), np.array(b), 4000, seed=7)
    assert first == paired_bootstrap(np.array(a), np.array(b), 4000, seed=7)
    other = paired_bootstrap(np.array(a), np.array(b), 30, seed=8)  # another seed: other resamples, same point
    assert other[0] == first[0] and other[1:] != paired_bootstrap(np.array(a), np.array(b), 30, seed=9)[1:]
    diff, lo, hi = first
    assert diff == pytest.approx(0.1) and lo < 0.1 < hi and lo > 0
    d = np.array(a, float) - np.array(b, float)
    half = 1.96 * math.sqrt((80 / 400 - 0.1**2) / 400)  # sd of the per-item differences by hand
    assert lo == pytest.approx(0.1 - half, abs=0.008) and hi == pytest.approx(0.1 + half, abs=0.008)
    assert half == pytest.approx(1.96 * d.std() / math.sqrt(len(d)))


def test_paired_interval_equals_a_second_implementation_at_95_percent():
    """The paired interval by default is the 2.5th/97.5th percentile of the mean per-item difference over item
    resamples drawn here by numpy itself (the same draws): a 90% level, or resampling each method on its own, fails."""
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 2, 80).astype(float), rng.integers(0, 2, 80).astype(float)
    idx = np.random.default_rng(21).integers(0, 80, size=(700, 80))
    lo, hi = np.percentile(a[idx].mean(axis=1) - b[idx].mean(axis=1), [2.5, 97.5])
    assert paired_bootstrap(a, b, 700, seed=21) == pytest.approx((a.mean() - b.mean(), lo, hi), abs=1e-12)


def test_metric_rows_count_p_s_and_mr_on_counterfactual_items_only():
    """Rows 0-1 counterfactual, row 2 not, row 3 unknown (null: not counterfactual). p_s and MR see rows 0-1."""
    part = pl.DataFrame({"counterfactual": [True, True, False, None],
                         **{f"{m}_{s}": [1.0, 0.0, 1.0, 1.0] if s == "a" else [0.0, 0.0, 0.0, 0.0]
                            for m in ("em", "f1", "ps") for s in "ab"},
                         "po_a": [0.0] * 4, "po_b": [1.0, 1.0, 0.0, 0.0]})
    rows = {r["metric"]: r for r in metric_rows(part, 200, 0)}
    assert {m: rows[m]["n"] for m in PAIRED_METRICS} == {"ps": 2, "em": 4, "f1": 4, "mr": 2}
    assert rows["ps"]["diff"] == 0.5 and rows["em"]["diff"] == 0.75 and rows["mr"]["diff"] == -1.0
    assert all(r.keys() == set(PAIR_COLUMNS) - {"condition", "knowledge"} for r in rows.values())
    assert (rows["f1"]["p_mcnemar"], rows["f1"]["n_better"], rows["mr"]["p_mcnemar"]) == (None, None, None)
    assert (rows["em"]["n_better"], rows["em"]["n_worse"]) == (3, 0)
    narrow = {r["metric"]: r for r in metric_rows(part, 200, 0, level=0.5)}["em"]
    assert rows["em"]["lo"] < narrow["lo"] <= narrow["hi"] <= rows["em"]["hi"]
    no_flag = {r["metric"]: r["n"] for r in metric_rows(part.drop("counterfactual"), 50, 0)}
    assert no_flag == {"ps": 4, "em": 4, "f1": 4, "mr": 4}  # without the column every item is counterfactual


def test_comparisons_keep_the_evaluation_order_and_the_table_schema():
    items = _items(6)
    preds = pl.concat([_method(m, items, em=[k % 2] * 6, ps=[k % 2] * 6) for k, m in enumerate(["zeta", "alpha", "mid"])])
    table = comparisons(preds, items, ["mid"], 20, 0)
    assert table["method"].unique(maintain_order=True).to_list() == ["zeta", "alpha"]
    want = pl.from_arrow(COMPARISONS.empty_table()).select(PAIR_COLUMNS).schema
    assert paired_differences(preds, items, "zeta", "mid", 20, 0).schema == want
    assert paired_differences(None, items, "zeta", "mid", 20, 0).schema == want


def test_comparisons_table_is_deterministic_under_the_seed():
    rng = np.random.default_rng(1)
    items = _items(50, 10)
    predictions = pl.concat([_method(m, items, rng.integers(0, 2, 60), rng.random(60) < 0.5,
                                     rng.random(60) < 0.3, rng.random(60)) for m in ("clear", "full_context")])
    once = comparisons(predictions, items, ["full_context"], 300, 5)
    assert once.equals(comparisons(predictions, items, ["full_context"], 300, 5))
    assert not once.equals(comparisons(predictions, items, ["full_context"], 300, 6))
    assert once.columns == COMPARISONS.names and set(once["metric"]) == set(PAIRED_METRICS)


# ---------------------------------------------------------------- MR


def test_mr_difference_by_hand_over_counterfactual_items_only():
    """On 10 counterfactual items CLEAR states the context answer on 6, the memorised one on 2 (MR 2/8), full
    context 3 and 3 (MR 3/6); on the 4 other items CLEAR states the memorised answer everywhere, which must not
    count. MR difference -0.25 over n = 10; each resample recomputes both MRs."""
    items = _items(10, 4)
    ps_a = [1] * 6 + [0] * 8
    po_a = [0] * 6 + [1, 1] + [0, 0] + [1] * 4
    ps_b = [1] * 3 + [0] * 11
    po_b = [0] * 3 + [1] * 3 + [0] * 8
    predictions = pl.concat([_method("clear", items, ps_a, ps_a, po_a), _method("full_context", items, ps_b, ps_b,
                                                                                 po_b)])
    table = comparisons(predictions, items, ["full_context"], 500, 3)
    mr = _row(table, "clear", "full_context", "mr")
    assert mr["n"] == 10 and mr["diff"] == pytest.approx(2 / 8 - 3 / 6)
    assert _row(table, "clear", "full_context", "em")["n"] == 14  # EM over every item

    resampled = []
    for idx in resample_indices(10, 500, 3):  # the same resamples, MR recomputed by plain sums
        mrs = []
        for ps, po in ((ps_a, po_a), (ps_b, po_b)):
            s, o = sum(ps[i] for i in idx), sum(po[i] for i in idx)
            mrs.append(o / (s + o) if s + o else math.nan)
        resampled.append(mrs[0] - mrs[1])
    lo, hi = np.nanpercentile(resampled, [2.5, 97.5])
    assert (mr["lo"], mr["hi"]) == (pytest.approx(lo), pytest.approx(hi))


def test_mr_difference_undefined_when_a_method_states_neither_answer():
    items = _items(6)
    predictions = pl.concat([_method("clear", items, [0] * 6, [0] * 6),
                             _method("full_context", items, [1] * 6, [1] * 6, [1, 0, 0, 0, 0, 0])])
    mr = _row(comparisons(predictions, items, ["full_context"], 100, 0), "clear", "full_context", "mr")
    assert mr["diff"] is mr["lo"] is mr["hi"] is None
    assert metric_verdict(mr) == "MR not defined (one of the two states neither answer on every item)"


# ---------------------------------------------------------------- references and verdicts


def _three_methods(n: int = 40, seed: int = 2) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(seed)
    items = _items(n - 8, 8)
    frames = [_method(m, items, rng.integers(0, 2, n), rng.random(n) < p, rng.random(n) < 0.3, rng.random(n))
              for m, p in (("closed_book", 0.2), ("full_context", 0.5), ("clear", 0.8))]
    return pl.concat(frames), items


def test_a_reference_not_evaluated_is_skipped_and_the_report_says_so():
    predictions, items = _three_methods()
    table = comparisons(predictions, items, ["full_context", "sft"], 200, 0)
    assert set(table["reference"]) == {"full_context"}
    assert set(table["method"]) == {"closed_book", "clear"}  # never a method against itself
    evaluated = ["closed_book", "full_context", "clear"]
    text = section_paired(table, evaluated, ["full_context", "sft"])
    named = f"{label('sft')} (`sft`)" if label("sft") != "sft" else "`sft`"  # registered or not: both work
    assert f"Skipped references (not evaluated in this run): {named}. Add them to `--evaluate.methods`" in text
    assert f"### Against {label('full_context')}" in text and f"### Against {label('sft')}" not in text
    assert "Skipped" not in section_paired(table, evaluated, ["full_context"])
    none = section_paired(comparisons(predictions, items, ["sft"], 200, 0), evaluated, ["sft"])
    assert "No reference was evaluated (references: `sft`), so nothing is compared." in none


def test_references_default_and_a_reference_named_twice_is_refused():
    from tasks.core.config import RunConfig

    assert RunConfig().evaluate.references == ["full_context", "sft", "clear"]
    with pytest.raises(ValueError, match=r"evaluate.references names \['full_context'\] more than once; give each"):
        RunConfig.model_validate({"evaluate": {"references": ["full_context", "sft", "full_context"]}})


@pytest.mark.parametrize(
    ("lo", "hi", "contains"),
    [(-0.1, 0.2, True), (0.0, 0.1, True), (-0.2, 0.0, True), (0.0, 0.0, True), (0.01, 0.2, False),
     (-0.3, -0.02, False)],
)
def test_no_measurable_effect_exactly_when_the_interval_contains_zero(lo, hi, contains):
    row = {"metric": "ps", "n": 40, "diff": (lo + hi) / 2, "lo": lo, "hi": hi, "p_mcnemar": 0.04}
    words = metric_verdict(row)
    assert ("no measurable effect" in words) == contains
    if not contains:
        direction = "higher" if lo > 0 else "lower"
        assert words.startswith(f"p_s {direction} by {abs(100 * (lo + hi) / 2):.1f} points")
        assert words.endswith("McNemar p = 0.040")


def test_no_interval_is_never_called_no_effect():
    row = {"metric": "em", "n": 40, "diff": 0.0, "lo": None, "hi": None, "p_mcnemar": 1.0}
    assert metric_verdict(row) == "EM +0.0 (no interval: bootstrap off)"


def test_every_verdict_line_reads_the_comparisons_table():
    """Over a real table: each method's line says "no measurable effect on <metric>" for exactly the metrics whose
    paired CI contains 0, whatever the per-method intervals say."""
    predictions, items = _three_methods(n=60)
    table = comparisons(predictions, items, ["full_context"], 300, 1)
    lines = {ln.split("**")[1]: ln for ln in section_paired(table, ["closed_book", "full_context", "clear"],
                                                          ["full_context"]).splitlines() if ln.startswith("- **")}
    overall = table.filter((pl.col("condition") == "all") & (pl.col("knowledge") == "all"))
    checked = 0
    for r in overall.iter_rows(named=True):
        line = lines[f"{label(r['method'])[:1].upper()}{label(r['method'])[1:]} vs {label('full_context')}"]
        assert (f"no measurable effect on {METRIC_LABELS[r['metric']]} " in line) == (r["lo"] <= 0 <= r["hi"])
        checked += 1
    assert checked == 2 * len(PAIRED_METRICS)
    contains = [r["lo"] <= 0 <= r["hi"] for r in overall.iter_rows(named=True)]
    assert any(contains) and not all(contains)  # both kinds occur


# ---------------------------------------------------------------- quality suite


def test_suite_passes_the_table_and_catches_one_out_of_step_with_metrics(tmp_path):
    from tasks.core.quality import DataQualityError, validate

    paths = RunPaths(tmp_path / "r")
    predictions, items = _three_methods()
    write_parquet(method_metrics(with_item_columns(predictions, items), 100, 0), paths.table("metrics"), METRICS)
    table = comparisons(predictions, items, ["full_context", "clear"], 100, 0)
    write_parquet(table, paths.table("comparisons"), COMPARISONS)
    assert validate("comparisons", paths)["success"]
    off = pl.col("metric") == "f1"
    write_parquet(table.with_columns(diff=pl.when(off).then(pl.col("diff") + 0.01).otherwise(pl.col("diff"))),
                  paths.table("comparisons"), COMPARISONS)
    with pytest.raises(DataQualityError, match="diff_matches_metrics"):
        validate("comparisons", paths)
    write_parquet(table.with_columns(p_mcnemar=pl.lit(0.5)), paths.table("comparisons"), COMPARISONS)
    with pytest.raises(DataQualityError, match="mcnemar_iff_binary"):
        validate("comparisons", paths)
