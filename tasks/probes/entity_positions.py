"""Entity-position probing (Physics of Language Models 3.1 style): the layer curve of the conflict probe read at the
subject's last token vs at the statement's last token, on the same statements.

Allen-Zhu and Li's P-probing fits a linear probe at several token positions of a text to see where an attribute
becomes linearly readable: at the entity's own tokens (the knowledge is stored with the entity) or only just before
the attribute is stated. Asked of conflict, the question has a sharp expected answer in a causal model: every
statement template names the subject before the object, and a fact's true and counterfactual statements share one
wording, so the state at the subject's last token has not seen the object and is the same for both labels. Its
curve is the control of the `last` curve: whatever the probe reads at `last`, it reads from the object onward, not
from which subject the statement is about. Each kind of the registry is fitted as the probes stage fits it
(`train_layer`: strength on dev, metrics per split), once per position.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from threadpoolctl import threadpool_limits

from schemas.layout import analysis_path
from schemas.tables import ENTITY_POSITIONS
from tasks.activations.stage import fed_text
from tasks.activations.subject import subject_span
from tasks.core.activation_store import SUBJECT_LAST, ActivationStore
from tasks.core.figures import write_png
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths, model_slug, read_table, write_parquet
from tasks.probes.kinds import probe_kinds
from tasks.probes.selection import check_splits, select_best
from tasks.probes.stage import train_layer

log = logging.getLogger(__name__)

POSITIONS = ("last", SUBJECT_LAST)
EXTRACT = "clearflow stage activations --run {run} --activations.positions '[\"last\",\"subject_last\"]'"


def open_with_subject(cfg: RunConfig, paths: RunPaths) -> ActivationStore:
    """The run's activation store, refused with the command that adds the position when it lacks subject_last."""
    store = ActivationStore.open(paths.activations, model_slug(cfg.model.name))
    if SUBJECT_LAST not in store.positions:
        raise ValueError(f"run {paths.root.name!r} has no {SUBJECT_LAST!r} activations (positions {store.positions}):"
                         f" extract them with `{EXTRACT.format(run=paths.root.name)}`, then run this again")
    return store


def with_subject(statements: pl.DataFrame, strip_final_punct: bool) -> pl.DataFrame:
    """The statements the activations stage gave a subject_last row: those whose text as fed contains the subject."""
    found = [subject_span(fed_text(text, strip_final_punct), group) is not None
             for text, group in statements.select("text", "group").iter_rows()]
    return statements.filter(pl.Series(found, dtype=pl.Boolean))


def compare_positions(cfg: RunConfig, paths: RunPaths) -> pl.DataFrame:
    """Every configured kind fitted per layer at both positions on the same statements; metrics per split."""
    store = open_with_subject(cfg, paths)
    statements = read_table(paths.table("statements"))
    check_splits(statements)
    same = with_subject(statements, store.meta().get("strip_final_punct", True))
    keys, kinds = same["key"].to_list(), probe_kinds(cfg.probe)
    y, split = same["label"].to_numpy().astype(int), same["split"].to_numpy().astype(str)
    rows: list[dict] = []
    with threadpool_limits(limits=1):  # as in the probes stage: tiny fits, threaded BLAS only slows them
        for layer in store.layers:
            for position in POSITIONS:
                _, layer_rows = train_layer(store.vectors(layer, keys, position), y, split, kinds, cfg, layer,
                                            position)
                rows += layer_rows
    table = pl.DataFrame(rows)
    write_parquet(table, analysis_path(paths.root, "entity_positions"), ENTITY_POSITIONS)
    plot_positions(table, analysis_path(paths.root, "entity_positions_figure"))
    log.info("entity positions: %d statements with a subject of %d; %s", same.height, statements.height,
             summary(table))
    return table


def summary(table: pl.DataFrame) -> str:
    """Per kind and position, the layer dev chooses (as the probes stage does) and its test AUROC, one clause each."""
    out = []
    for kind in sorted(table["probe"].unique()):
        for position in POSITIONS:
            rows = table.filter(pl.col("position") == position)
            layer = select_best(rows, kind, position)["layer"]
            test = rows.filter((pl.col("probe") == kind) & (pl.col("layer") == layer) & (pl.col("split") == "test"))
            out.append(f"{kind} at {position}: layer {layer} (best on dev), test AUROC {_fmt(test['auroc'][0])}")
    return "; ".join(out)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plot_positions(table: pl.DataFrame, path: Path) -> Path:
    """Test AUROC per layer: one colour per kind, solid at the statement's last token, dashed at the subject's."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    test = table.filter(pl.col("split") == "test")
    for i, kind in enumerate(sorted(test["probe"].unique())):
        for position, style in zip(POSITIONS, ("-", "--")):
            part = test.filter((pl.col("probe") == kind) & (pl.col("position") == position)).sort("layer")
            auroc = part["auroc"].cast(pl.Float64).fill_null(np.nan).to_numpy()
            ax.plot(part["layer"], auroc, linestyle=style, marker=".", color=f"C{i}", label=f"{kind} at {position}")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set(xlabel="layer", ylabel="test AUROC", ylim=(0, 1.02),
           title="conflict probe at the subject's vs the statement's last token")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="lower right")
    return write_png(fig, path)
