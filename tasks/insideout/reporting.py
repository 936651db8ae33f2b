"""The report's Inside-Out section and figure, from the insideout_layers table alone (tasks/report.py places them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from tasks.core.markdown import fmt, md_table
from tasks.insideout.ranking import EXTERNAL, INTERNAL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE = "insideout.png"
SPLIT = "test"


def _ci(row: dict, name: str) -> str:
    """'value [lo, hi]' of a column and its interval."""
    return f"{fmt(row[name])} [{fmt(row[f'{name}_lo'])}, {fmt(row[f'{name}_hi'])}]"


def section_insideout(layers: pl.DataFrame | None) -> str:
    """Mean external and internal K on the test items with CIs, and the hidden-knowledge share, at the layer chosen
    on dev; every layer is in the figure and the table."""
    head = "## Inside-Out: hidden knowledge"
    test = None if layers is None else layers.filter(pl.col("split") == SPLIT)
    if test is None or test.height == 0:
        return f"{head}\n\nNot computed in this run (`--insideout.enabled`, or `--preset full`, computes it)."
    ext = test.filter(pl.col("scorer") == EXTERNAL).row(0, named=True)
    chosen = test.filter(pl.col("chosen"))
    rows = [["external: mean log-prob of the answer", "", ext["n_items"], _ci(ext, "mean_k"), fmt(ext["k_star"]),
             "", ""]]
    for r in chosen.iter_rows(named=True):
        rows.append([f"internal: logistic probe (C={r['l2']})", f"{r['layer']} (chosen on dev)", r["n_items"],
                     _ci(r, "mean_k"), fmt(r["k_star"]), _ci(r, "hidden_share"), _ci(r, "gap")])
    return "\n\n".join([
        head,
        "Gekhman et al. 2025: per test item, K is the share of (correct, incorrect) answer pairs whose correct answer "
        "scores strictly higher (ties count as wrong); external scores are the model's mean token log-probability of "
        "the answer after the closed-book question, internal ones a logistic probe on the answer's last-token hidden "
        "state (fitted on train items' candidates, C and layer chosen on dev). Hidden knowledge: internal K above "
        "external K on the same item. 95% bootstrap CIs over items; the gap is paired.",
        md_table(["scorer", "layer", "items", "mean K [95% CI]", "K = 1", "hidden share [95% CI]",
                  "internal - external [95% CI]"], rows),
        "Every layer, both splits: table `insideout_layers` (per item: `insideout_k`; per candidate: "
        "`insideout_scores`).",
        f"![Mean K per layer, internal vs external](figures/{FIGURE})",
    ])


def _band(ax, x: np.ndarray, part: pl.DataFrame, column: str, label: str, colour: str) -> None:
    """A line of a column with its CI as a shaded band."""
    ax.plot(x, part[column].to_numpy(), marker=".", color=colour, label=label)
    ax.fill_between(x, part[f"{column}_lo"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
                    part[f"{column}_hi"].cast(pl.Float64).fill_null(np.nan).to_numpy(), color=colour, alpha=0.2)


def plot_insideout(layers: pl.DataFrame) -> Figure:
    """Test-split mean K per layer (internal, CI band) against the external K (a line with its band), and the
    hidden-knowledge share per layer; the layer chosen on dev marked."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    test = layers.filter(pl.col("split") == SPLIT)
    internal = test.filter(pl.col("scorer") == INTERNAL).sort("layer")
    ext = test.filter(pl.col("scorer") == EXTERNAL).row(0, named=True)
    x = internal["layer"].to_numpy()
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2, sharex=True)
    _band(left, x, internal, "mean_k", "internal (probe)", "C0")
    left.axhline(ext["mean_k"], color="C1", label="external (log-prob)")
    if ext["mean_k_lo"] is not None and ext["mean_k_hi"] is not None:
        left.axhspan(ext["mean_k_lo"], ext["mean_k_hi"], color="C1", alpha=0.15)
    left.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    _band(right, x, internal, "hidden_share", "internal K > external K", "C2")
    for ax, title in ((left, f"mean K per layer ({SPLIT})"), (right, f"hidden-knowledge share ({SPLIT})")):
        chosen = internal.filter(pl.col("chosen"))["layer"]
        if chosen.len():
            ax.axvline(chosen[0], color="black", linewidth=0.8, linestyle=":", label=f"chosen on dev: {chosen[0]}")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    return fig
