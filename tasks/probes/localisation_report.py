"""The report's view of the probe_localisation table: the flagging kind's flags on the test contexts at every layer,
against `conflicting`, with and without relevance pruning, as a table and a figure (tasks/report.py places them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from schemas.tables import PRUNINGS
from tasks.core.markdown import fmt, md_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PRUNING_LABELS = {"none": "no pruning", "filter": "relevance filter", "gold": "gold relevance"}
PRUNING_STYLES = {"none": "-", "filter": "--", "gold": ":"}
RATES = ("precision", "recall", "f1")


def _prunings(table: pl.DataFrame) -> list[str]:
    """The prunings the table holds, in PRUNINGS order."""
    present = set(table["pruning"])
    return [p for p in PRUNINGS if p in present]


def _absent_lines(table: pl.DataFrame) -> list[str]:
    """Why a pruning has no column: said plainly, with the option that gives it."""
    present = set(table["pruning"])
    lines = []
    if "none" not in present:
        lines.append("No unpruned flags: the run probed only the units the relevance filter kept"
                     " (`--activations.sentences relevant`), so the others have no score.")
    if "filter" not in present:
        lines.append("No relevance filter in this run: `--decompose.relevance` scores the units against the question"
                     " and then only the units it keeps can be flagged.")
    return lines


def section_layer_localisation(table: pl.DataFrame | None, best: dict | None) -> str:
    """Flag precision / recall / F1 against `conflicting` per layer and position, one column group per pruning."""
    head = "### Flags per layer, with and without relevance pruning"
    if table is None:
        return f"{head}\n\nThe probes stage of this run predates the table (`probes/localisation.parquet`)."
    if table.height == 0:
        return f"{head}\n\nNo test-split unit carries a `conflicting` label, so the flags cannot be scored per layer."
    prunings = _prunings(table)
    wide = table.pivot(on="pruning", index=["probe", "position", "layer"], values=list(RATES))
    best_at = None if best is None else (best.get("position", "last"), best["layer"])
    rows = []
    for r in wide.sort("position", "layer").iter_rows(named=True):
        layer = f"**{r['layer']}** (best)" if (r["position"], r["layer"]) == best_at else r["layer"]
        rows.append([r["position"], layer, *(fmt(r[f"{rate}_{p}"]) for p in prunings for rate in RATES)])
    header = ["position", "layer", *(f"{PRUNING_LABELS[p]}: {rate.replace('f1', 'F1')}" for p in prunings
                                     for rate in RATES)]
    counts = table.filter(pl.col("pruning") == prunings[0]).row(0, named=True)
    return "\n\n".join([
        head,
        f"The {table['probe'][0]} probe of every layer (fitted on train, as in the table above, so not the refitted"
        f" probe that marks) flags the `test` split's context units at p_conflict > threshold; precision, recall and"
        f" F1 against `conflicting` ({counts['n']} labelled units, {counts['positives']} conflicting). Pruning: *no"
        " pruning* lets every scored unit be flagged; *relevance filter* only the units `--decompose.relevance`"
        " kept (what the pipeline marks when it is on); *gold relevance* only the units the benchmark labels"
        " relevant, what a perfect filter would give.",
        *_absent_lines(table),
        md_table(header, rows),
        "![Flag precision, recall and F1 per layer](figures/localisation_layers.png)",
    ])


def layer_localisation_figure(table: pl.DataFrame, best: dict | None) -> Figure:
    """Precision, recall and F1 per layer: one colour per position, one line style per pruning."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3, sharex=True)
    colours = dict(zip(sorted(set(table["position"])), [f"C{i}" for i in range(10)]))
    for ax, rate in zip(axes, RATES):
        for (position, pruning), part in sorted(table.group_by("position", "pruning"), key=lambda g: g[0]):
            part = part.sort("layer")
            ax.plot(part["layer"], part[rate].cast(pl.Float64).fill_null(float("nan")), marker=".",
                    color=colours[position], linestyle=PRUNING_STYLES[pruning],
                    label=f"{position}, {PRUNING_LABELS[pruning]}")
        if best is not None:
            ax.axvline(best["layer"], color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"flag {rate.replace('f1', 'F1')} vs conflicting")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
