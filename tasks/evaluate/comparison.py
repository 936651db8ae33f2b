"""The method comparison the report shows: overall rows, the headline MR, per-subset tables, paired differences.

Two methods answer the same items, so their difference is judged on per-item differences (a paired
bootstrap), which is tighter than comparing two separate intervals and is what "no measurable effect" means
in the report: the 95% interval of the mean per-item difference contains 0.
"""

from __future__ import annotations

import polars as pl

from schemas.tables import KNOWLEDGE
from tasks.core.markdown import md_table, pct_ci
from tasks.evaluate.knowledge import with_item_columns
from tasks.evaluate.methods import method_label as label
from tasks.evaluate.scoring import ALL, iter_subsets, paired_bootstrap

METRIC_LABELS = {"em": "EM", "f1": "F1", "ps": "p_s", "po": "p_o", "mr": "MR"}

PAIRED_SCHEMA = {"condition": pl.String, "knowledge": pl.String, "metric": pl.String, "n": pl.Int64,
                 "diff": pl.Float64, "lo": pl.Float64, "hi": pl.Float64}


def with_subset_columns(metrics: pl.DataFrame) -> pl.DataFrame:
    """Metrics with `condition` and `knowledge` filled: a run written before the subsets has overall rows only."""
    for col in ("condition", "knowledge"):
        filled = pl.col(col).fill_null(ALL) if col in metrics.columns else pl.lit(ALL)
        metrics = metrics.with_columns(filled.alias(col))
    return metrics


def overall(metrics: pl.DataFrame) -> pl.DataFrame:
    """One row per method over every evaluated item: the ("all", "all") rows."""
    metrics = with_subset_columns(metrics)
    return metrics.filter((pl.col("condition") == ALL) & (pl.col("knowledge") == ALL))


def _scores(scored: pl.DataFrame, method: str, suffix: str) -> pl.DataFrame:
    """A method's p_s and EM per item, as columns ps_<suffix>, em_<suffix>."""
    return scored.filter(pl.col("method") == method).select(
        "item_id", pl.col("ps").cast(pl.Float64).alias(f"ps_{suffix}"), pl.col("em").alias(f"em_{suffix}"))


def _paired_frame(predictions: pl.DataFrame, items: pl.DataFrame, a: str, b: str) -> pl.DataFrame:
    """One row per item both methods answered: their p_s and EM side by side, with the item's subset columns."""
    scored = with_item_columns(predictions, items)
    keep = [c for c in ("item_id", "condition", "counterfactual", "known") if c in scored.columns]
    first = scored.filter(pl.col("method") == a).select(keep)
    return first.join(_scores(scored, a, "a"), on="item_id").join(_scores(scored, b, "b"), on="item_id").sort("item_id")


def paired_differences(
    predictions: pl.DataFrame | None, items: pl.DataFrame, a: str, b: str, n_boot: int, seed: int
) -> pl.DataFrame:
    """Per subset (as in the metrics table): the mean per-item difference a - b and its paired 95% CI.

    The metric is p_s on the subset's counterfactual items (where p_s is defined), else EM on all of them.
    Empty when either method was not evaluated (or no predictions table exists).
    """
    if predictions is None:
        return pl.DataFrame(schema=PAIRED_SCHEMA)
    wide = _paired_frame(predictions, items, a, b)
    rows = []
    for condition, knowledge, part in iter_subsets(wide):
        cf = part.filter(pl.col("counterfactual")) if "counterfactual" in part.columns else part
        metric, rows_used = ("ps", cf) if cf.height else ("em", part)
        diff, lo, hi = paired_bootstrap(rows_used[f"{metric}_a"].to_numpy(), rows_used[f"{metric}_b"].to_numpy(),
                                        n_boot, seed)
        rows.append({"condition": condition, "knowledge": knowledge, "metric": metric, "n": rows_used.height,
                     "diff": diff, "lo": lo, "hi": hi})
    return pl.DataFrame(rows, schema=PAIRED_SCHEMA)


def no_effect_subsets(paired: pl.DataFrame) -> tuple[list[str], list[str]]:
    """(subsets whose paired CI contains 0, subsets whose CI excludes it), as "condition/knowledge (metric)";
    subsets without an interval (bootstrap off) are in neither."""
    none, some = [], []
    for r in paired.iter_rows(named=True):
        if r["lo"] is None or r["hi"] is None:
            continue
        name = f"{r['condition']}/{r['knowledge']} ({'p_s' if r['metric'] == 'ps' else 'EM'})"
        (none if r["lo"] <= 0 <= r["hi"] else some).append(name)
    return none, some


# ---------------------------------------------------------------- text


def capitalised(text: str) -> str:
    """Capitalise the first letter (method names like 'full context' start lower case)."""
    return text[:1].upper() + text[1:]


def metric_cells(r: dict) -> list[str]:
    """A metrics row's EM, F1, p_s, p_o, MR cells with their CIs."""
    return [pct_ci(r[m], r[f"{m}_lo"], r[f"{m}_hi"]) for m in METRIC_LABELS]


def headline_mr(metrics: pl.DataFrame) -> str:
    """MR on known items, per method: only where the model's memory holds the fact is a memorised answer memory."""
    known = with_subset_columns(metrics).filter((pl.col("condition") == ALL) & (pl.col("knowledge") == "known"))
    if known.height == 0:
        return ("Headline MR (known items): not available; no item is known or unknown (closed book was not "
                "evaluated, or the run predates the split).")
    per_method = "; ".join(f"{label(r['method'])} {pct_ci(r['mr'], r['mr_lo'], r['mr_hi'])} (n = {r['n']})"
                           for r in known.iter_rows(named=True))
    return ("**Headline MR, on known items** (the closed-book answer states the true answer; on unknown items a "
            f"memorised answer is a guess, not memory): {per_method}.")


def paired_statement(paired: pl.DataFrame, a: str = "clear", b: str = "full_context") -> str:
    """One plain line: the subsets where a and b differ by no measurable amount (paired CI of the difference holds 0)."""
    if paired.height == 0:
        return f"{capitalised(label(a))} vs {label(b)}: not compared (not both evaluated)."
    none, some = no_effect_subsets(paired)
    if not none and not some:
        return f"{capitalised(label(a))} vs {label(b)}: no intervals (bootstrap off), so no statement."
    parts = ([f"no measurable effect on {', '.join(none)}"] if none else []) + (
        [f"a measurable difference on {'' if none else 'every subset: '}{', '.join(some)}"] if some else [])
    return f"{capitalised(label(a))} vs {label(b)}, paired per-item difference: {'; '.join(parts)}."


def _subset_tables(metrics: pl.DataFrame) -> list[str]:
    """One heading and table per condition: every method's rows, known/unknown (and all, except under "all",
    whose overall rows the method table shows)."""
    parts = []
    for (condition,), part in with_subset_columns(metrics).group_by("condition", maintain_order=True):
        rows = [[label(r["method"]), r["knowledge"], r["n"], *metric_cells(r)] for k in KNOWLEDGE
                for r in part.iter_rows(named=True) if r["knowledge"] == k and (condition, k) != (ALL, ALL)]
        if rows:
            parts += [f"### Condition: {condition}", md_table(["method", "knowledge", "n", *METRIC_LABELS.values()], rows)]
    return parts


def section_subsets(metrics: pl.DataFrame, paired: pl.DataFrame) -> str:
    """Every method per context condition and per known/unknown item, with counts and CIs, and where CLEAR and
    full context differ, judged per item."""
    tables = _subset_tables(metrics) or ["No subsets: the items carry no condition and none is known or unknown."]
    diffs = [[r["condition"], r["knowledge"], METRIC_LABELS[r["metric"]], r["n"], pct_ci(r["diff"], r["lo"], r["hi"])]
             for r in paired.iter_rows(named=True)]
    paired_parts = [
        "CLEAR minus full context: mean per-item difference (percentage points) with its paired 95% bootstrap CI; "
        "p_s on the subset's counterfactual items, EM where it has none.",
        md_table(["condition", "knowledge", "metric", "n", "difference"], diffs),
    ] if diffs else []
    return "\n\n".join([
        "## Methods per condition and per knowledge",
        "*known*: the closed-book answer states the item's true answer; *unknown*: it does not. Each row is over "
        "its n items, p_s / p_o / MR over the counterfactual ones among them (n/a where there are none); items "
        "without a condition count under *all* only.",
        *tables, *paired_parts, paired_statement(paired),
    ])
