"""The copy baseline, knowledge conditioning, metrics per (condition, knowledge) subset and paired differences,
each checked against answers written by hand or computed by a separate route (plain numpy / Python loops)."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest

from schemas.tables import METRICS
from tasks.evaluate.comparison import no_effect_subsets, paired_statement
from tasks.evaluate.knowledge import known_by_item, true_answers, with_item_columns
from tasks.evaluate.methods import REGISTRY, Method
from tasks.evaluate.methods.lexical_copy import lexical_copy
from tasks.evaluate.paired import paired_differences
from tasks.evaluate.scoring import method_metrics, paired_bootstrap

# ---------------------------------------------------------------- lexical_copy


@pytest.mark.parametrize(
    ("question", "context", "expected"),
    [
        # the sentence naming subject and relation wins over one sharing the relation only
        ("What is the official language of Helsinki?",
         "Cats are mammals. The official language of Finland is Finnish. The official language of Helsinki is "
         "Bulgarian.", "Bulgarian"),
        # a tie (both share "Hamlet") goes to the first sentence; the leading "was" is trimmed, the inner "by" kept
        ("Who wrote Hamlet?", "Hamlet was written by Marlowe. Hamlet was written by Shakespeare.",
         "written by Marlowe"),
        # a possessive counts as its word, punctuation does not count at all
        ("Where was Ada Lovelace born?", "Paris is big. Ada Lovelace's birthplace: London!", "birthplace London"),
        # no sentence shares a content word: the first sentence, minus the question's words
        ("Who is it?", "Rome is old. Oslo is cold.", "Rome old"),
        # a dash is no word: it does not count as one both share (else the second sentence would win)
        ("Who \u2014 wrote it?", "Alice wrote poems. Bob wrote \u2014 novels.", "Alice poems"),
        ("Where is the Eiffel Tower?", "", ""),
        ("Where is the Eiffel Tower?", None, ""),
        ("Where is the Eiffel Tower?", "  \n ", ""),  # a context with no sentence
    ],
)
def test_lexical_copy_answers(question, context, expected):
    assert lexical_copy(question, context) == expected


def test_lexical_copy_is_a_model_free_method():
    method = REGISTRY["lexical_copy"]
    assert method.model == "none" and method.messages is None and method.answer is lexical_copy
    assert method.context == "plain"
    with pytest.raises(ValueError, match="give `messages` with model 'base'/'finetuned', or `answer`"):
        Method("x", "x", "x", None, context="plain", model="base")
    with pytest.raises(ValueError, match="or `answer` with model 'none'"):
        Method("x", "x", "x", lambda q, c: [], context="plain", model="none", answer=lexical_copy)


# ---------------------------------------------------------------- known / unknown


def _item(item_id: str, answers, orig, counterfactual=True, instruction=None, condition=None) -> dict:
    return {"item_id": item_id, "answers": answers, "orig_answers": orig, "counterfactual": counterfactual,
            "instruction": instruction, "condition": condition}


KNOWLEDGE_ITEMS = pl.DataFrame([
    _item("a", ["Rome"], ["Paris", "City of Light"]),  # closed book names an alias
    _item("b", ["Rome"], ["Paris"]),  # closed book names another city
    _item("c", ["Rome"], ["Paris"]),  # "Parisian" is not "Paris" (word boundaries)
    _item("d", ["Rome"], None),  # counterfactual without a memorised answer: no true answer
    _item("e", ["Rome"], None, counterfactual=False),  # plain QA: the answer is the true one
    _item("f", ["unknown"], None, counterfactual=False, instruction="Say unknown."),  # a fixed word, not a fact
    _item("g", ["Oslo"], ["Oslo"], counterfactual=False, condition="aligned"),
    _item("h", ["Rome"], ["Paris"]),  # closed book never answered it
])  # fmt: skip
CLOSED_BOOK = {"a": "the city of light", "b": "Lyon", "c": "Parisian cuisine", "d": "Paris", "e": "Rome.",
               "f": "unknown", "g": "It is Oslo"}


def test_true_answers_follow_the_convention():
    rows = {r["item_id"]: r for r in KNOWLEDGE_ITEMS.iter_rows(named=True)}
    assert true_answers(rows["a"]) == ["Paris", "City of Light"]
    assert true_answers(rows["d"]) is None and true_answers(rows["f"]) is None
    assert true_answers(rows["e"]) == ["Rome"] and true_answers(rows["g"]) == ["Oslo"]


def test_known_from_a_hand_made_closed_book_table():
    assert known_by_item(KNOWLEDGE_ITEMS, CLOSED_BOOK) == {
        "a": True, "b": False, "c": False, "d": None, "e": True, "f": None, "g": True, "h": None}
    assert set(known_by_item(KNOWLEDGE_ITEMS, None).values()) == {None}  # closed book not evaluated


# ---------------------------------------------------------------- subset metrics


def _random_run(seed: int = 3, n_items: int = 60) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Items with every condition (and none), counterfactual exactly for condition counterfactual or null, known
    True/False/None, and two methods' random scores."""
    rng = np.random.default_rng(seed)
    conditions = rng.choice(np.array(["counterfactual", "aligned", "irrelevant", None], dtype=object), n_items)
    items = pl.DataFrame({
        "item_id": [f"i{k:02d}" for k in range(n_items)],
        "condition": list(conditions),
        "counterfactual": [c in ("counterfactual", None) for c in conditions],
    }, schema_overrides={"condition": pl.String})
    known = rng.choice(np.array([True, False, None], dtype=object), n_items)
    frames = []
    for method in ("m1", "m2"):
        frames.append(pl.DataFrame({
            "method": method, "item_id": items["item_id"], "em": rng.integers(0, 2, n_items).astype(float),
            "f1": rng.random(n_items), "ps": rng.random(n_items) < 0.5, "po": rng.random(n_items) < 0.3,
            "known": list(known),
        }, schema_overrides={"known": pl.Boolean}))
    return pl.concat(frames), items


def test_subset_metrics_equal_a_direct_computation():
    predictions, items = _random_run()
    metrics = method_metrics(with_item_columns(predictions, items), n_boot=200, seed=0)
    assert metrics.columns == METRICS.names
    cond = items["condition"].to_numpy()
    cf = items["counterfactual"].to_numpy()
    expected = set()
    for method in ("m1", "m2"):
        p = predictions.filter(pl.col("method") == method)  # same item order as `items`
        known = p["known"].to_numpy()
        for c, k in itertools.product(["all", "counterfactual", "aligned", "irrelevant"], ["all", "known", "unknown"]):
            mask = np.ones(len(cond), bool) if c == "all" else np.array([x == c for x in cond])
            if k != "all":
                mask &= np.array([x is (k == "known") for x in known])
            if not mask.any():
                continue
            expected.add((method, c, k))
            row = metrics.filter((pl.col("method") == method) & (pl.col("condition") == c)
                                 & (pl.col("knowledge") == k)).row(0, named=True)
            assert row["n"] == mask.sum() and row["n_counterfactual"] == (mask & cf).sum()
            assert row["em"] == pytest.approx(p["em"].to_numpy()[mask].mean())
            assert row["f1"] == pytest.approx(p["f1"].to_numpy()[mask].mean())
            if (mask & cf).any():
                ps, po = p["ps"].to_numpy()[mask & cf].mean(), p["po"].to_numpy()[mask & cf].mean()
                assert row["ps"] == pytest.approx(ps) and row["po"] == pytest.approx(po)
                assert row["mr"] == (pytest.approx(po / (ps + po)) if ps + po else None)
                assert row["ps_lo"] <= row["ps"] <= row["ps_hi"]
            else:  # aligned / irrelevant subsets: p_s, p_o, MR undefined
                assert row["ps"] is row["po"] is row["mr"] is row["ps_lo"] is None
            assert row["em_lo"] <= row["em"] <= row["em_hi"]
    assert set(metrics.select("method", "condition", "knowledge").iter_rows()) == expected
    assert metrics.height == len(expected)  # one row each, and every subset with n > 0 is there


def test_null_condition_and_known_count_in_all_only():
    predictions, items = _random_run()
    metrics = method_metrics(with_item_columns(predictions, items), n_boot=0, seed=0)
    n_items = items.height
    overall = metrics.filter((pl.col("condition") == "all") & (pl.col("knowledge") == "all"))
    assert overall["n"].to_list() == [n_items, n_items]
    per_condition = metrics.filter((pl.col("condition") != "all") & (pl.col("knowledge") == "all"))
    assert per_condition.group_by("method").agg(pl.col("n").sum())["n"].to_list() == \
        [items["condition"].is_not_null().sum()] * 2
    known_or_not = metrics.filter((pl.col("condition") == "all") & (pl.col("knowledge") != "all"))
    n_flagged = predictions.filter(pl.col("method") == "m1")["known"].is_not_null().sum()
    assert known_or_not.group_by("method").agg(pl.col("n").sum())["n"].to_list() == [n_flagged] * 2


def test_without_item_columns_only_overall_rows_as_before():
    predictions, _ = _random_run()
    metrics = method_metrics(predictions.drop("known"), n_boot=50, seed=0)
    assert metrics.select("condition", "knowledge").unique().rows() == [("all", "all")]
    m1 = predictions.filter(pl.col("method") == "m1")
    assert metrics.row(0, named=True)["ps"] == pytest.approx(m1["ps"].mean())  # every item counts as counterfactual


# ---------------------------------------------------------------- paired differences


def test_paired_bootstrap_identical_and_clearly_better():
    rng = np.random.default_rng(0)
    a = (rng.random(40) < 0.5).astype(float)
    diff, lo, hi = paired_bootstrap(a, a, 500, seed=1)
    assert (diff, lo, hi) == (0.0, 0.0, 0.0)
    better = a.copy()
    better[a == 0] = rng.random(int((a == 0).sum())) < 0.8  # right on most items a gets wrong, wrong on none
    diff, lo, hi = paired_bootstrap(better, a, 500, seed=1)
    assert diff == pytest.approx(better.mean() - a.mean()) and 0 < lo <= diff <= hi
    assert paired_bootstrap(a, a, 0, seed=1)[1:] == (None, None) and paired_bootstrap(a[:0], a[:0], 9, 1)[0] is None


def test_paired_differences_per_subset_and_the_plain_statement():
    predictions, items = _random_run(n_items=80)
    same = predictions.filter(pl.col("method") == "m1")
    twin = same.with_columns(method=pl.lit("clear"))
    better = same.with_columns(method=pl.lit("full_context"), ps=pl.lit(True), em=pl.lit(1.0))
    identical = paired_differences(pl.concat([same.with_columns(method=pl.lit("full_context")), twin]), items,
                                   "clear", "full_context", 300, 0)
    defined = identical.filter(pl.col("diff").is_not_null())  # MR is undefined where m1 states neither answer
    assert defined["diff"].to_list() == [0.0] * defined.height
    assert identical.filter(pl.col("metric") != "mr")["diff"].null_count() == 0
    binary = identical.filter(pl.col("metric").is_in(["ps", "em"]))
    assert set(binary["p_mcnemar"]) == {1.0} and set(binary["n_better"]) == set(binary["n_worse"]) == {0}
    none, some = no_effect_subsets(identical)
    n_subsets = identical.select("condition", "knowledge").unique().height
    assert some == [] and len(none) == n_subsets and "all/all (p_s)" in none and "aligned/all (EM)" in none
    assert paired_statement(identical).startswith("CLEAR vs full context, paired per-item difference: no measurable")

    worse = paired_differences(pl.concat([twin, better]), items, "clear", "full_context", 300, 0)
    overall = worse.filter((pl.col("condition") == "all") & (pl.col("knowledge") == "all"))
    ps_row = overall.filter(pl.col("metric") == "ps").row(0, named=True)
    cf = items["counterfactual"].to_numpy()
    assert ps_row["n"] == cf.sum() and overall.filter(pl.col("metric") == "em")["n"].item() == items.height
    assert ps_row["diff"] == pytest.approx(same["ps"].to_numpy()[cf].mean() - 1.0)
    assert ps_row["hi"] < 0  # full context right on every item: clear measurably behind
    assert ps_row["n_better"] == 0 and ps_row["n_worse"] == (~same["ps"].to_numpy()[cf]).sum()
    assert "all/all (p_s)" in no_effect_subsets(worse)[1]
    assert paired_differences(predictions, items, "clear", "m1", 10, 0).height == 0  # clear not evaluated
    assert "not compared" in paired_statement(paired_differences(None, items, "clear", "full_context", 10, 0))


# ---------------------------------------------------------------- quality suites


def test_suites_pass_real_subset_tables_and_refuse_broken_ones(run_paths):
    from schemas.tables import PREDICTIONS
    from tasks.core.quality import DataQualityError, validate
    from tasks.core.storage import write_parquet

    predictions, items = _random_run()
    predictions = predictions.with_columns(prompt=pl.lit("p"), prediction=pl.lit("a"))
    metrics = method_metrics(with_item_columns(predictions, items), n_boot=50, seed=0)
    write_parquet(predictions, run_paths.table("predictions"), PREDICTIONS)
    write_parquet(metrics, run_paths.table("metrics"), METRICS)
    assert validate("predictions", run_paths)["success"] and validate("metrics", run_paths)["success"]

    # one method's row of an item disagrees about `known`
    flipped = predictions.with_columns(known=pl.when((pl.col("method") == "m2") & (pl.col("item_id") == "i00"))
                                       .then(pl.col("known").is_null() | ~pl.col("known")).otherwise(pl.col("known")))
    write_parquet(flipped, run_paths.table("predictions"), PREDICTIONS)
    with pytest.raises(DataQualityError, match="known_values_of_item"):
        validate("predictions", run_paths)

    # a method without its overall row; p_s on a subset without counterfactual items
    broken = metrics.filter(~((pl.col("method") == "m1") & (pl.col("condition") == "all") & (pl.col("knowledge") == "all")))
    broken = broken.with_columns(ps=pl.when(pl.col("n_counterfactual") == 0).then(0.5).otherwise(pl.col("ps")))
    write_parquet(broken, run_paths.table("metrics"), METRICS)
    with pytest.raises(DataQualityError, match=r"has_overall_row[\s\S]*ps_null_ok|ps_null_ok[\s\S]*has_overall_row"):
        validate("metrics", run_paths)
    write_parquet(pl.concat([metrics, metrics.head(1)]), run_paths.table("metrics"), METRICS)
    with pytest.raises(DataQualityError, match="method, condition, knowledge"):
        validate("metrics", run_paths)
