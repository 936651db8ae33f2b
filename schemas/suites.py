"""Great Expectations suite of every table: the single source of truth of the data-quality checks.

Pure declarations: GX cannot look inside list or vector columns, so a suite may `prepare` the frame first, a
pure polars function (the table's frame and the frames it `reads` in, the frame GX checks out) that adds the
scalar columns the expectations check (answer counts, offset round-trips, row counts against the store's
meta.json). Loading the frames is the quality runner's job (tasks/core/quality.py), which summarises the
activation store into the `ACTIVATION_*` frames declared here (vector widths and finite counts come from
DuckDB, so no vector reaches GX). `great_expectations` is imported only when a suite is built (~3 s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import polars as pl

from schemas.rejects import REASONS
from schemas.tables import (
    BINARY_METRICS, CANDIDATE_SOURCES, CONDITIONS, KNOWLEDGE, PAIRED_METRICS, POSITIONS, PRUNINGS, SCORERS,
    SENTENCE_LABELS, TABLES, UNITS,
)

SPLITS = ("train", "dev", "test")
ACTIVATION_SOURCES = ("statements", "sentences")
_NON_BLANK = r"\S"  # at least one non-whitespace character


@dataclass(frozen=True)
class Suite:
    """The checks of one table: expectations, plus the pure derivation of the columns they read."""

    table: str
    build: Callable[[ModuleType], list[Any]]  # gets great_expectations.expectations, returns expectations
    prepare: Callable[..., pl.DataFrame] | None = None  # (table, *reads, *reads_if_present) -> the frame checked
    reads: tuple[str, ...] = ()  # other frames prepare takes (each must exist)
    reads_if_present: tuple[str, ...] = ()  # other frames prepare takes when they exist (None when not)

    def frame(self, df: pl.DataFrame, *others: pl.DataFrame | None) -> pl.DataFrame:
        """The table as GX will see it: derived columns added, list/vector columns dropped."""
        if self.prepare:
            df = self.prepare(df, *others)
        return df.select([c for c, t in df.schema.items() if not t.is_nested()])

    def expectation_suite(self) -> Any:
        """A fresh gx.ExpectationSuite (fresh so no run's results leak into another)."""
        import great_expectations as gx
        import great_expectations.expectations as gxe

        return gx.ExpectationSuite(name=f"clearflow.{self.table}", expectations=self.build(gxe))


# ---------------------------------------------------------------- shared expectation builders


def _unit_interval(gxe: ModuleType, *columns: str) -> list[Any]:
    """Scores and rates live in [0, 1] (nulls are left to not-null checks)."""
    return [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1) for c in columns]


def _not_null(gxe: ModuleType, *columns: str) -> list[Any]:
    """Required columns are filled."""
    return [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in columns]


def _all_true(gxe: ModuleType, *columns: str) -> list[Any]:
    """Derived boolean checks (built never null) hold on every row."""
    return [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True]) for c in columns]


def _non_blank(gxe: ModuleType, *columns: str) -> list[Any]:
    """Text columns hold some non-whitespace text."""
    return [gxe.ExpectColumnValuesToMatchRegex(column=c, regex=_NON_BLANK) for c in columns]


# ---------------------------------------------------------------- items


def _items(gxe: ModuleType) -> list[Any]:
    """Every QA example is identified, split, answerable and marked counterfactual or not."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(gxe, "item_id", "split", "group", "question", "context", "counterfactual"),
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        *_non_blank(gxe, "question", "context"),
        gxe.ExpectColumnValuesToBeBetween(column="n_answers", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="n_blank_answers", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="condition", value_set=list(CONDITIONS)),  # nulls pass
    ]


def _prepare_items(df: pl.DataFrame) -> pl.DataFrame:
    """Count answers and blank answers, which GX cannot see inside the list column."""
    answers = pl.col("answers")
    return df.with_columns(
        n_answers=answers.list.len().fill_null(0),
        n_blank_answers=answers.list.eval(pl.element().str.strip_chars().str.len_chars() == 0).list.sum().fill_null(0),
    )


# ---------------------------------------------------------------- statements


def _statements(gxe: ModuleType) -> list[Any]:
    """Probe statements are labelled 0/1 and a subject never straddles two splits (no leakage)."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(gxe, "stmt_id", "key", "text", "label", "group", "split"),
        gxe.ExpectColumnValuesToBeUnique(column="stmt_id"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        *_non_blank(gxe, "text"),
        gxe.ExpectColumnValuesToBeBetween(column="n_splits_of_group", min_value=1, max_value=1),
    ]


def _prepare_statements(df: pl.DataFrame) -> pl.DataFrame:
    """How many splits each row's group appears in (must be exactly one)."""
    return df.with_columns(n_splits_of_group=pl.col("split").n_unique().over("group"))


# ---------------------------------------------------------------- rejects


def _rejects(gxe: ModuleType) -> list[Any]:
    """Every refused record says where it came from, why (a known reason) and what it was (zero rows is fine)."""

    return [
        *_not_null(gxe, "source", "record", "reason", "raw"),
        gxe.ExpectColumnValuesToBeBetween(column="record", min_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="reason", value_set=list(REASONS)),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["source", "record"]),
    ]


# ---------------------------------------------------------------- sentences


def _sentences(gxe: ModuleType) -> list[Any]:
    """Units point back into their item's context exactly (a fact: to its source sentence's span), once each;
    their conflict label agrees with their relevance and truth labels."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(gxe, "item_id", "sent_idx", "key", "text", "char_start", "char_end"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["item_id", "sent_idx"]),
        gxe.ExpectColumnValuesToBeBetween(column="sent_idx", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="char_start", min_value=0),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="char_end", column_B="char_start", or_equal=False),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(SENTENCE_LABELS)),
        gxe.ExpectColumnValuesToBeInSet(column="unit", value_set=list(UNITS)),
        gxe.ExpectColumnValuesToBeBetween(column="source_idx", min_value=0),
        *_unit_interval(gxe, "relevance_01"),
        *_all_true(gxe, "item_known", "offset_ok", "conflict_consistent"),
    ]


def _conflict_consistent() -> pl.Expr:
    """conflicting is exactly relevant AND NOT truthful: null when either is null, never true otherwise."""
    unknown = pl.col("relevant").is_null() | pl.col("truthful").is_null()
    expected = pl.when(unknown).then(None).otherwise(pl.col("relevant") & ~pl.col("truthful"))
    return pl.col("conflicting").eq_missing(expected)


def _prepare_sentences(df: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Check each unit against its item: context[char_start:char_end] is its text (a fact's: a span inside it)."""
    items = items.select("item_id", pl.col("context").alias("_context"))
    absent = [c for c in ("truthful", "relevant", "conflicting") if c not in df.columns]  # a run before the labels
    df = df.with_columns(pl.lit(None, pl.Boolean).alias(c) for c in absent)
    joined = df.join(items, on="item_id", how="left")
    length = (pl.col("char_end").cast(pl.Int64) - pl.col("char_start")).clip(lower_bound=0)
    span = pl.col("_context").str.slice(pl.col("char_start"), length)
    inside = pl.col("char_end") <= pl.col("_context").str.len_chars()
    exact = pl.when(pl.col("unit") == "fact").then(inside).otherwise(span == pl.col("text"))
    return joined.with_columns(
        item_known=pl.col("_context").is_not_null(),
        offset_ok=pl.col("_context").is_not_null() & exact.fill_null(False),
        # cosine relevance lies in [-1, 1]: checked as (r + 1) / 2 in [0, 1]
        relevance_01=(pl.col("relevance") + 1) / 2,
        conflict_consistent=_conflict_consistent(),
    ).drop("_context")


# ---------------------------------------------------------------- activations


def _activations(gxe: ModuleType) -> list[Any]:
    """Every vector has the declared width and only finite values; each layer holds inputs x positions rows, once."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(gxe, "model", "layer", "key", "source", "position"),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=list(ACTIVATION_SOURCES)),
        gxe.ExpectColumnValuesToBeInSet(column="position", value_set=list(POSITIONS)),
        *_all_true(gxe, "has_meta", "layer_in_meta", "position_in_meta"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="dim", column_B="meta_dim"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="n_finite", column_B="dim"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="layer_rows", column_B="meta_n_rows"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="position_rows", column_B="meta_position_rows"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="n_layers", column_B="meta_n_layers"),
        gxe.ExpectColumnValuesToBeBetween(column="row_count", min_value=1, max_value=1),
    ]


# What the quality runner summarises the activation store into (no vector is loaded into GX): per stored vector its
# hive partitions (model, layer), identity and scalar facts; per model what its meta.json declares (nulls, and
# has_meta false, when it has none); per model and position the rows meta.json expects in each layer.
ACTIVATION_FACTS = {"model": pl.String, "layer": pl.Int32, "key": pl.String, "source": pl.String,
                    "position": pl.String, "context_key": pl.String, "dim": pl.Int64, "n_finite": pl.Int64}
ACTIVATION_METAS = {"model": pl.String, "has_meta": pl.Boolean, "meta_dim": pl.Int64, "meta_n_rows": pl.Int64,
                    "meta_layers": pl.List(pl.Int64)}
ACTIVATION_POSITIONS = {"model": pl.String, "position": pl.String, "meta_position_rows": pl.Int64}


def _prepare_activations(facts: pl.DataFrame, metas: pl.DataFrame, positions: pl.DataFrame) -> pl.DataFrame:
    """Count each layer's rows (per position, per identity) and set them against what meta.json declares."""
    counts = facts.with_columns(
        layer_rows=pl.len().over("model", "layer").cast(pl.Int64),
        position_rows=pl.len().over("model", "layer", "position").cast(pl.Int64),
        row_count=pl.len().over("model", "layer", "key", "position", "context_key").cast(pl.Int64),
        n_layers=pl.col("layer").n_unique().over("model").cast(pl.Int64),
    )
    per_model = counts.join(metas, on="model", how="left").with_columns(
        has_meta=pl.col("has_meta").fill_null(False),
        meta_n_layers=pl.col("meta_layers").list.len().cast(pl.Int64),
        layer_in_meta=pl.col("meta_layers").list.contains(pl.col("layer").cast(pl.Int64)).fill_null(False),
    )
    return per_model.join(positions, on=["model", "position"], how="left").with_columns(
        position_in_meta=pl.col("meta_position_rows").is_not_null(),
    ).drop("context_key", "meta_layers")


# ---------------------------------------------------------------- probe metrics


def _probe_metrics(gxe: ModuleType) -> list[Any]:
    """Probe scores are rates, one row per (layer, probe, position, split); AUROC missing only when undefined."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(gxe, "layer", "probe", "position", "split", "n", "accuracy"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["layer", "probe", "position", "split"]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToBeInSet(column="position", value_set=list(POSITIONS)),
        gxe.ExpectColumnValuesToBeBetween(column="layer", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="n", min_value=1),
        *_unit_interval(gxe, "auroc", "accuracy", "f1"),
        *_all_true(gxe, "auroc_null_ok"),
    ]


def _prepare_probe_metrics(df: pl.DataFrame, statements: pl.DataFrame | None) -> pl.DataFrame:
    """AUROC may be null only where the split's rows hold a single class (it is undefined there); the statements
    explain the rows of the statement positions, nothing here the context units' (ctx_*): their nulls pass."""
    if statements is not None:
        classes = statements.group_by("split").agg(_n_classes=pl.col("label").n_unique())
        df = df.join(classes, on="split", how="left").with_columns(
            pl.when(pl.col("position").str.starts_with("ctx_")).then(None).otherwise(pl.col("_n_classes"))
            .alias("_n_classes"))
    else:  # nothing to explain a null with: accept it rather than guess
        df = df.with_columns(_n_classes=pl.lit(None, pl.UInt32))
    single = pl.col("_n_classes").is_null() | (pl.col("_n_classes") < 2)
    return df.with_columns(auroc_null_ok=pl.col("auroc").is_not_null() | single).drop("_n_classes")


# ---------------------------------------------------------------- probe localisation


def _probe_localisation(gxe: ModuleType) -> list[Any]:
    """One row per (layer, probe, position, pruning), no rows when no unit carries a `conflicting` label; the counts
    nest (true flags within the flags and the positives, both within the labelled units) and the rates are theirs."""
    return [
        *_not_null(gxe, "layer", "probe", "position", "pruning", "n", "positives", "flagged", "true_flags"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["layer", "probe", "position", "pruning"]),
        gxe.ExpectColumnValuesToBeInSet(column="pruning", value_set=list(PRUNINGS)),
        gxe.ExpectColumnValuesToBeInSet(column="position", value_set=list(POSITIONS)),
        gxe.ExpectColumnValuesToBeBetween(column="layer", min_value=0),
        *_unit_interval(gxe, "precision", "recall", "f1"),
        *_all_true(gxe, "counts_nest", "rates_match"),
    ]


def _prepare_probe_localisation(df: pl.DataFrame) -> pl.DataFrame:
    """Whether the counts nest and precision, recall and F1 are the counts' ratios (null exactly where undefined)."""
    tp, flagged, positives = (pl.col(c).cast(pl.Float64) for c in ("true_flags", "flagged", "positives"))

    def same(column: str, num: pl.Expr, den: pl.Expr) -> pl.Expr:
        expected = pl.when(den > 0).then(num / den)
        return ((pl.col(column) - expected).abs() < 1e-9) | (pl.col(column).is_null() & expected.is_null())

    nest = (tp <= flagged) & (tp <= positives) & (flagged <= pl.col("n")) & (positives <= pl.col("n"))
    rates = same("precision", tp, flagged) & same("recall", tp, positives) & same("f1", 2 * tp, positives + flagged)
    return df.with_columns(counts_nest=nest.fill_null(False), rates_match=rates.fill_null(False))


# ---------------------------------------------------------------- sentence scores


def _sentence_scores(gxe: ModuleType) -> list[Any]:
    """One conflict probability per context sentence, and a flag decision for each; a cross-fitted fold probe
    scores only units of train-split items (dev and test keep the final probe)."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(gxe, "item_id", "sent_idx", "key", "layer", "probe", "p_conflict", "flagged"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["item_id", "sent_idx"]),
        *_unit_interval(gxe, "p_conflict"),
        gxe.ExpectColumnValuesToMatchRegex(column="scored_by", regex=r"^(final|fold-[0-9]+)$"),
        *_all_true(gxe, "fold_only_on_train"),
    ]


def _prepare_sentence_scores(df: pl.DataFrame, items: pl.DataFrame | None) -> pl.DataFrame:
    """Whether each row scored by a fold probe belongs to a train-split item (null scored_by: a table from before
    cross-fitting; no items table: nothing to check against)."""
    if "scored_by" not in df.columns:
        df = df.with_columns(scored_by=pl.lit(None, pl.String))
    if items is None:
        return df.with_columns(fold_only_on_train=pl.lit(True))
    df = df.join(items.select("item_id", pl.col("split").alias("_split")), on="item_id", how="left")
    fold = pl.col("scored_by").str.starts_with("fold-").fill_null(False)
    return df.with_columns(fold_only_on_train=~fold | (pl.col("_split") == "train").fill_null(False)).drop("_split")


# ---------------------------------------------------------------- predictions


def _predictions(gxe: ModuleType) -> list[Any]:
    """One scored prediction per (method, item); every method's row of an item says the same about `known`."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(gxe, "method", "item_id", "prompt", "prediction", "em", "f1", "ps", "po"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["method", "item_id"]),
        *_unit_interval(gxe, "em", "f1"),
        gxe.ExpectColumnValuesToBeBetween(column="known_values_of_item", min_value=1, max_value=1),
    ]


def _prepare_predictions(df: pl.DataFrame) -> pl.DataFrame:
    """How many distinct `known` values (null counts as one) each item's rows hold: one source of truth, so one."""
    if "known" not in df.columns:  # predictions written before the column existed
        df = df.with_columns(known=pl.lit(None, pl.Boolean))
    return df.with_columns(known_values_of_item=pl.col("known").n_unique().over("item_id"))


# ---------------------------------------------------------------- metrics


def _metrics(gxe: ModuleType) -> list[Any]:
    """One row per method and subset, each method with its overall row; every metric is a rate, every CI ordered,
    and p_s is missing exactly where the subset holds no counterfactual item."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(gxe, "method", "condition", "knowledge", "n", "em", "f1"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["method", "condition", "knowledge"]),
        gxe.ExpectColumnValuesToBeInSet(column="condition", value_set=["all", *CONDITIONS]),
        gxe.ExpectColumnValuesToBeInSet(column="knowledge", value_set=list(KNOWLEDGE)),
        gxe.ExpectColumnValuesToBeBetween(column="n", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="n_counterfactual", min_value=0),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="n", column_B="n_counterfactual", or_equal=True, ignore_row_if="either_value_is_missing"
        ),
        *_unit_interval(gxe, "em", "f1", "ps", "po", "mr"),
        *[
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A=f"{m}_hi", column_B=f"{m}_lo", or_equal=True, ignore_row_if="either_value_is_missing"
            )
            for m in ("em", "f1", "ps", "po", "mr")
        ],
        *_all_true(gxe, "has_overall_row", "ps_null_ok"),
    ]


def _prepare_metrics(df: pl.DataFrame) -> pl.DataFrame:
    """Whether each method has its ("all", "all") row, and whether p_s is null exactly when it has no item."""
    overall = (pl.col("condition") == "all") & (pl.col("knowledge") == "all")
    return df.with_columns(
        has_overall_row=overall.fill_null(False).any().over("method"),
        ps_null_ok=(pl.col("ps").is_null() == (pl.col("n_counterfactual") == 0)).fill_null(True),
    )


# ---------------------------------------------------------------- comparisons

_CF_METRICS = ("ps", "mr")  # over the subset's counterfactual items


def _comparisons(gxe: ModuleType) -> list[Any]:
    """One row per method, reference, subset and metric (none is fine: one method, or no reference evaluated);
    differences of rates within [-1, 1], CIs ordered, McNemar's p a probability exactly on p_s and EM, and every
    row in step with the metrics table: the same n and diff = method's value - reference's value."""
    return [
        *_not_null(gxe, "method", "reference", "condition", "knowledge", "metric", "n"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["method", "reference", "condition", "knowledge", "metric"]),
        gxe.ExpectColumnValuesToBeInSet(column="metric", value_set=list(PAIRED_METRICS)),
        gxe.ExpectColumnValuesToBeInSet(column="condition", value_set=["all", *CONDITIONS]),
        gxe.ExpectColumnValuesToBeInSet(column="knowledge", value_set=list(KNOWLEDGE)),
        gxe.ExpectColumnValuesToBeBetween(column="n", min_value=1),
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=-1, max_value=1) for c in ("diff", "lo", "hi")],
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="hi", column_B="lo", or_equal=True,
                                                    ignore_row_if="either_value_is_missing"),
        *_unit_interval(gxe, "p_mcnemar"),
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0) for c in ("n_better", "n_worse")],
        *_all_true(gxe, "not_itself", "mcnemar_iff_binary", "discordant_within_n", "n_matches_metrics",
                   "diff_matches_metrics"),
    ]


def _metrics_long(metrics: pl.DataFrame) -> pl.DataFrame:
    """The metrics table as (method, condition, knowledge, metric) -> the items it is over and its value."""
    n_cf = pl.col("n_counterfactual").fill_null(pl.col("n"))  # null: a table from before the column
    return pl.concat([
        metrics.select("method", "condition", "knowledge", pl.lit(m).alias("metric"),
                       (n_cf if m in _CF_METRICS else pl.col("n")).cast(pl.Int64).alias("n_metric"),
                       pl.col(m).cast(pl.Float64).alias("value"))
        for m in PAIRED_METRICS
    ])


def _prepare_comparisons(df: pl.DataFrame, metrics: pl.DataFrame) -> pl.DataFrame:
    """Check each row against the metrics rows of its method and its reference (a mean of per-item differences
    is the difference of the means), and that the McNemar columns are filled exactly on the binary metrics."""
    long = _metrics_long(metrics)
    keys = ["condition", "knowledge", "metric"]
    frame = df.join(long.rename({"n_metric": "_n_a", "value": "_v_a"}), on=["method", *keys], how="left").join(
        long.rename({"method": "reference", "n_metric": "_n_b", "value": "_v_b"}), on=["reference", *keys], how="left")
    filled = [pl.col(c).is_not_null() for c in ("p_mcnemar", "n_better", "n_worse")]
    binary = pl.col("metric").is_in(BINARY_METRICS)
    expected = pl.col("_v_a") - pl.col("_v_b")
    return frame.with_columns(
        not_itself=pl.col("method") != pl.col("reference"),
        mcnemar_iff_binary=(pl.all_horizontal(filled) == binary) & (pl.any_horizontal(filled) == binary),
        discordant_within_n=(pl.col("n_better") + pl.col("n_worse") <= pl.col("n")).fill_null(True),
        n_matches_metrics=((pl.col("n") == pl.col("_n_a")) & (pl.col("n") == pl.col("_n_b"))).fill_null(False),
        diff_matches_metrics=((pl.col("diff") - expected).abs() < 1e-9).fill_null(
            pl.col("diff").is_null() & expected.is_null()),
    ).drop("_n_a", "_v_a", "_n_b", "_v_b")
# ---------------------------------------------------------------- LFD layers


def _lfd_layers(gxe: ModuleType) -> list[Any]:
    """One row per layer (zero rows when LFD was not evaluated); IKS is a JSD in nats, so within [0, ln 2]; exactly
    one chosen layer, a candidate with the lowest IKS of the candidates."""
    return [
        *_not_null(gxe, "layer", "iks", "n_items", "candidate", "chosen"),
        gxe.ExpectColumnValuesToBeUnique(column="layer"),
        gxe.ExpectColumnValuesToBeBetween(column="layer", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="iks", min_value=0, max_value=0.6932),
        gxe.ExpectColumnValuesToBeBetween(column="n_items", min_value=1),
        *_all_true(gxe, "one_chosen", "chosen_is_lowest_candidate"),
    ]


def _prepare_lfd_layers(df: pl.DataFrame) -> pl.DataFrame:
    """Whether the table names exactly one chosen layer and whether that layer is a candidate of lowest IKS."""
    lowest = df.filter(pl.col("candidate"))["iks"].min()
    is_lowest = pl.lit(False) if lowest is None else pl.col("iks") == lowest  # no candidate: none may be chosen
    chosen_ok = (~pl.col("chosen") | (pl.col("candidate") & is_lowest)).fill_null(False)
    return df.with_columns(one_chosen=pl.lit(int(df["chosen"].sum()) == 1), chosen_is_lowest_candidate=chosen_ok)


# ---------------------------------------------------------------- Inside-Out

_REPORTED_SPLITS = ("dev", "test")


def _layer_iff_internal() -> pl.Expr:
    """The layer is filled exactly on internal rows (the external score has none)."""
    return pl.col("layer").is_not_null() == (pl.col("scorer") == "internal")


def _insideout_scores(gxe: ModuleType) -> list[Any]:
    """One score per candidate, scorer and layer (no rows when the stage is off); an external score is a mean
    log-probability, so never above 0; every scored item has a correct and an incorrect candidate."""
    return [
        *_not_null(gxe, "item_id", "split", "cand_idx", "answer", "correct", "source", "n_tokens", "scorer", "score"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["item_id", "cand_idx", "scorer", "layer_key"]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(_REPORTED_SPLITS)),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=list(CANDIDATE_SOURCES)),
        gxe.ExpectColumnValuesToBeInSet(column="scorer", value_set=list(SCORERS)),
        gxe.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1),
        *_all_true(gxe, "layer_iff_internal", "logprob_ok", "has_pair"),
    ]


def _prepare_insideout_scores(df: pl.DataFrame) -> pl.DataFrame:
    """The layer as a unique key, and the per-row checks the expectations read."""
    return df.with_columns(
        layer_key=pl.col("layer").fill_null(-1),
        layer_iff_internal=_layer_iff_internal(),
        logprob_ok=(pl.col("scorer") != "external") | (pl.col("score") <= 0),
        has_pair=pl.col("correct").any().over("item_id") & (~pl.col("correct")).any().over("item_id"),
    )


def _insideout_k(gxe: ModuleType) -> list[Any]:
    """K per item, scorer and layer is a share of pairs; K* is K = 1."""
    return [
        *_not_null(gxe, "item_id", "split", "scorer", "n_correct", "n_incorrect", "k", "k_star"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["item_id", "scorer", "layer_key"]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(_REPORTED_SPLITS)),
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=1) for c in ("n_correct", "n_incorrect")],
        *_unit_interval(gxe, "k"),
        *_all_true(gxe, "layer_iff_internal", "k_star_ok"),
    ]


def _prepare_insideout_k(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(layer_key=pl.col("layer").fill_null(-1), layer_iff_internal=_layer_iff_internal(),
                           k_star_ok=pl.col("k_star") == (pl.col("k") == 1.0))


def _insideout_layers(gxe: ModuleType) -> list[Any]:
    """Shares within [0, 1], the gap within [-1, 1], CIs ordered; hidden share and gap only on internal rows; one
    chosen layer, the same on both splits."""
    return [
        *_not_null(gxe, "split", "scorer", "n_items", "mean_k", "k_star", "chosen"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["split", "scorer", "layer_key"]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(_REPORTED_SPLITS)),
        gxe.ExpectColumnValuesToBeBetween(column="n_items", min_value=1),
        *_unit_interval(gxe, "mean_k", "mean_k_lo", "mean_k_hi", "k_star", "hidden_share", "hidden_share_lo",
                        "hidden_share_hi"),
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=-1, max_value=1) for c in ("gap", "gap_lo", "gap_hi")],
        *[gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A=f"{m}_hi", column_B=f"{m}_lo", or_equal=True,
                                                      ignore_row_if="either_value_is_missing")
          for m in ("mean_k", "hidden_share", "gap")],
        *_all_true(gxe, "layer_iff_internal", "hidden_iff_internal", "one_chosen_layer"),
    ]


def _prepare_insideout_layers(df: pl.DataFrame) -> pl.DataFrame:
    internal = pl.col("scorer") == "internal"
    chosen = df.filter(pl.col("chosen"))
    one = chosen["layer"].n_unique() == 1 and chosen.filter(pl.col("scorer") != "internal").height == 0
    return df.with_columns(
        layer_key=pl.col("layer").fill_null(-1), layer_iff_internal=_layer_iff_internal(),
        hidden_iff_internal=pl.col("hidden_share").is_not_null() == internal,
        one_chosen_layer=pl.lit(one or not df.filter(internal).height),
    )


SUITES: dict[str, Suite] = {
    "items": Suite("items", _items, _prepare_items),
    "statements": Suite("statements", _statements, _prepare_statements),
    "rejects": Suite("rejects", _rejects),
    "sentences": Suite("sentences", _sentences, _prepare_sentences, reads=("items",)),
    "activations": Suite("activations", _activations, _prepare_activations,
                         reads=("activation_metas", "activation_positions")),
    "probe_metrics": Suite("probe_metrics", _probe_metrics, _prepare_probe_metrics, reads_if_present=("statements",)),
    "probe_localisation": Suite("probe_localisation", _probe_localisation, _prepare_probe_localisation),
    "sentence_scores": Suite("sentence_scores", _sentence_scores, _prepare_sentence_scores,
                             reads_if_present=("items",)),
    "predictions": Suite("predictions", _predictions, _prepare_predictions),
    "metrics": Suite("metrics", _metrics, _prepare_metrics),
    "comparisons": Suite("comparisons", _comparisons, _prepare_comparisons, reads=("metrics",)),
    "lfd_layers": Suite("lfd_layers", _lfd_layers, _prepare_lfd_layers),
    "insideout_scores": Suite("insideout_scores", _insideout_scores, _prepare_insideout_scores),
    "insideout_k": Suite("insideout_k", _insideout_k, _prepare_insideout_k),
    "insideout_layers": Suite("insideout_layers", _insideout_layers, _prepare_insideout_layers),
}

assert set(SUITES) == set(TABLES) | {"activations"}, "every table needs a suite"


def suite_for(table: str) -> Suite:
    """The suite of a table, with a clear error for an unknown name."""
    try:
        return SUITES[table]
    except KeyError:
        raise KeyError(f"no quality suite for table {table!r}; known: {sorted(SUITES)}") from None
