"""The method comparison the report shows: overall rows, the headline MR, per-subset tables, and the paired
comparisons with their verdicts.

Two methods answer the same items, so their difference is judged on the items jointly (the comparisons table of
tasks/evaluate/paired.py: paired bootstrap, McNemar's exact test), which is tighter than comparing two separate
intervals. Every verdict here reads that table: "no measurable effect" means that the paired 95% interval of the
difference contains 0, and nothing is ever concluded from whether two per-method intervals overlap.
"""

from __future__ import annotations

import polars as pl

from schemas.tables import CONDITIONS, KNOWLEDGE, PAIRED_METRICS
from tasks.core.markdown import md_table, missing, pct_ci
from tasks.evaluate.methods import method_label as label
from tasks.evaluate.paired import missing_references
from tasks.evaluate.scoring import ALL

METRIC_LABELS = {"em": "EM", "f1": "F1", "ps": "p_s", "po": "p_o", "mr": "MR"}


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


def section_subsets(metrics: pl.DataFrame) -> str:
    """Every method per context condition and per known/unknown item, with counts and CIs."""
    tables = _subset_tables(metrics) or ["No subsets: the items carry no condition and none is known or unknown."]
    return "\n\n".join([
        "## Methods per condition and per knowledge",
        "*known*: the closed-book answer states the item's true answer; *unknown*: it does not. Each row is over "
        "its n items, p_s / p_o / MR over the counterfactual ones among them (n/a where there are none); items "
        "without a condition count under *all* only. Whether two methods differ: *Paired comparisons*.",
        *tables,
    ])


# ---------------------------------------------------------------- paired comparisons (the comparisons table)

PAIRED_INTRO = (
    "Each method minus the reference on the same items, in percentage points: the mean per-item difference (for MR "
    "the difference of the two MRs over the counterfactual items), its paired bootstrap 95% CI (items resampled "
    "for both methods at once) and, for p_s and EM, McNemar's exact two-sided p (the items only one of the two gets "
    "right). p_s, EM, F1: higher is better; MR: lower is more faithful to the context. A verdict says *no measurable "
    "effect* exactly where the paired CI contains 0. Table: `comparisons.parquet`."
)


def signed_points(diff: float | None, lo: float | None, hi: float | None) -> str:
    """A difference of two rates and its CI in percentage points: '+12.5 [+4.0, +21.0]'; 'n/a' when undefined."""
    if missing(diff):
        return "n/a"
    ci = "" if missing(lo) or missing(hi) else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{100 * diff:+.1f}{ci}"


def p_value(p: float | None) -> str:
    """McNemar's p for a cell or a sentence ('' when the metric has none)."""
    if missing(p):
        return ""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def comparison_cell(row: dict | None) -> str:
    """One comparisons row as a table cell: the signed difference, its CI and McNemar's p where there is one."""
    if row is None:
        return "n/a"
    test = p_value(row["p_mcnemar"])
    return signed_points(row["diff"], row["lo"], row["hi"]) + (f", {test}" if test else "")


def metric_verdict(row: dict, test: str = "McNemar") -> str:
    """The words for one metric of one pair, from its paired CI only: 'no measurable effect' exactly when it
    contains 0, else the direction and the size (with the named paired test's p)."""
    name, points = METRIC_LABELS[row["metric"]], signed_points(row["diff"], row["lo"], row["hi"])
    if missing(row["diff"]):
        return f"{name} not defined (one of the two states neither answer on every item)"
    if missing(row["lo"]) or missing(row["hi"]):
        return f"{name} {points} (no interval: bootstrap off)"
    if row["lo"] <= 0 <= row["hi"]:
        return f"no measurable effect on {name} ({points})"
    p = p_value(row["p_mcnemar"])
    direction = "higher" if row["lo"] > 0 else "lower"
    return (f"{name} {direction} by {abs(100 * row['diff']):.1f} points "
            f"[{100 * row['lo']:+.1f}, {100 * row['hi']:+.1f}]" + (f", {test} {p}" if p else ""))


def _by_metric(rows: pl.DataFrame) -> dict[tuple, dict[str, dict]]:
    """(method, condition, knowledge) -> metric -> comparisons row, in table order."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in rows.iter_rows(named=True):
        out.setdefault((r["method"], r["condition"], r["knowledge"]), {})[r["metric"]] = r
    return out


def verdict_line(method: str, reference: str, metrics: dict[str, dict], test: str = "McNemar") -> str:
    """One bullet: method vs reference over every item, each metric's verdict in PAIRED_METRICS order."""
    n = metrics.get("em", next(iter(metrics.values())))["n"]  # EM is over every item of the subset
    words = "; ".join(metric_verdict(metrics[m], test) for m in PAIRED_METRICS if m in metrics)
    return f"- **{capitalised(label(method))} vs {label(reference)}** (n = {n}): {words}."


def _cells(metrics: dict[str, dict]) -> list[str]:
    """The n, counterfactual n and per-metric cells of one (method, subset) of the comparisons table."""
    n_cf = metrics["ps"]["n"] if "ps" in metrics else 0
    n = metrics["em"]["n"] if "em" in metrics else n_cf
    return [n, n_cf, *(comparison_cell(metrics.get(m)) for m in PAIRED_METRICS)]


HEADER = ["n", "n cf", *(METRIC_LABELS[m] for m in PAIRED_METRICS)]


def against_reference(comparisons: pl.DataFrame, reference: str, test: str = "McNemar") -> list[str]:
    """Heading, table and verdict lines of every method against one reference, over every item."""
    rows = comparisons.filter((pl.col("reference") == reference) & (pl.col("condition") == ALL)
                              & (pl.col("knowledge") == ALL))
    pairs = _by_metric(rows)
    if not pairs:
        return [f"### Against {label(reference)}", "No other method was evaluated: nothing to compare with."]
    table = md_table(["method", *HEADER], [[label(m), *_cells(v)] for (m, _, _), v in pairs.items()])
    return [f"### Against {label(reference)}", table,
            "\n".join(verdict_line(m, reference, v, test) for (m, _, _), v in pairs.items())]


def skipped_note(evaluated: list[str], references: list[str]) -> str | None:
    """Which references were skipped because the run did not evaluate them, and how to include them."""
    skipped = missing_references(evaluated, references)
    if not skipped:
        return None
    names = ", ".join(f"{label(r)} (`{r}`)" if label(r) != r else f"`{r}`" for r in skipped)
    return (f"Skipped references (not evaluated in this run): {names}. Add them to `--evaluate.methods` to compare "
            "every method with them.")


def section_paired(comparisons: pl.DataFrame | None, evaluated: list[str], references: list[str]) -> str:
    """The verdicts: per reference, every method's paired differences over every item, with one line per method."""
    head = "## Paired comparisons"
    if comparisons is None:
        return (f"{head}\n\nNo `comparisons` table: the run's evaluate stage predates it; run "
                "`clearflow stage evaluate --run <run>` to write it.")
    present = [r for r in references if r in evaluated]
    parts = [head, PAIRED_INTRO, *filter(None, [skipped_note(evaluated, references)])]
    if not present:
        parts.append(f"No reference was evaluated (references: {', '.join(f'`{r}`' for r in references) or 'none'}),"
                     " so nothing is compared.")
    for reference in present:
        parts += against_reference(comparisons, reference)
    return "\n\n".join(parts)


def headline_rows(paired: pl.DataFrame) -> list[dict]:
    """One row per subset of one pair: p_s where the subset has counterfactual items, else EM."""
    chosen: dict[tuple, dict] = {}
    for r in paired.filter(pl.col("metric").is_in(["ps", "em"])).iter_rows(named=True):
        key = (r["condition"], r["knowledge"])
        if key not in chosen or r["metric"] == "ps":
            chosen[key] = r
    return list(chosen.values())


def no_effect_subsets(paired: pl.DataFrame) -> tuple[list[str], list[str]]:
    """(subsets whose paired CI contains 0, subsets whose CI excludes it), as "condition/knowledge (metric)", over the
    headline metric of each subset; subsets without an interval (bootstrap off) are in neither."""
    none, some = [], []
    for r in headline_rows(paired):
        if missing(r["lo"]) or missing(r["hi"]):
            continue
        name = f"{r['condition']}/{r['knowledge']} ({METRIC_LABELS[r['metric']]})"
        (none if r["lo"] <= 0 <= r["hi"] else some).append(name)
    return none, some


def paired_statement(paired: pl.DataFrame, a: str = "clear", b: str = "full_context") -> str:
    """One plain line for one pair's rows: the subsets where a and b differ by no measurable amount (the paired CI
    of the difference holds 0) and those where they do."""
    if paired.height == 0:
        return f"{capitalised(label(a))} vs {label(b)}: not compared (not both evaluated)."
    none, some = no_effect_subsets(paired)
    if not none and not some:
        return f"{capitalised(label(a))} vs {label(b)}: no intervals (bootstrap off), so no statement."
    parts = ([f"no measurable effect on {', '.join(none)}"] if none else []) + (
        [f"a measurable difference on {'' if none else 'every subset: '}{', '.join(some)}"] if some else [])
    return f"{capitalised(label(a))} vs {label(b)}, paired per-item difference: {'; '.join(parts)}."


def against_reference_by_subset(comparisons: pl.DataFrame, reference: str) -> list[str]:
    """Heading, per-subset table and per-method subset statements of every method against one reference."""
    rows = comparisons.filter(pl.col("reference") == reference)
    subsets = {k: v for k, v in _by_metric(rows).items() if (k[1], k[2]) != (ALL, ALL)}
    if not subsets:
        return []
    conditions = [ALL, *CONDITIONS]
    order = sorted(subsets, key=lambda k: (conditions.index(k[1]), KNOWLEDGE.index(k[2])))  # stable: methods in order
    table = md_table(["condition", "knowledge", "method", *HEADER],
                     [[c, k, label(m), *_cells(subsets[(m, c, k)])] for m, c, k in order])
    statements = [paired_statement(rows.filter(pl.col("method") == m), m, reference)
                  for m in rows["method"].unique(maintain_order=True)]
    return [f"### Against {label(reference)}, per condition and knowledge", table,
            "\n".join(f"- {s}" for s in statements)]


def section_paired_subsets(comparisons: pl.DataFrame | None, references: list[str]) -> str | None:
    """The same paired differences per condition x knowledge subset (None when there are no subsets)."""
    if comparisons is None:
        return None
    parts = [p for r in references for p in against_reference_by_subset(comparisons, r)]
    if not parts:
        return None
    return "\n\n".join(["## Paired comparisons per condition and knowledge",
                        "As in *Paired comparisons*, on each subset's items; the statements name, per subset, the "
                        "headline metric (p_s where the subset has counterfactual items, else EM).", *parts])
