"""The report's section on a run's probe analyses, written after the run by `clearflow transfer` and
`clearflow entity-positions` (analyses/ in the run directory): absent until one of them has run."""

from __future__ import annotations

import polars as pl

from schemas.layout import analysis_path
from tasks.core.markdown import fmt, md_table
from tasks.core.storage import RunPaths, read_table


def section_analyses(paths: RunPaths) -> str | None:
    """'## Probe analyses': each transfer target's summary and the entity-position comparison, where written."""
    transfer, positions = analysis_path(paths.root, "probe_transfer"), analysis_path(paths.root, "entity_positions")
    parts = []
    if transfer.exists():
        from tasks.probes.transfer import transfer_summary  # the analyses' modules load sklearn and torch: only here

        rows = read_table(transfer)
        parts.append("Probes on another source (`clearflow transfer`, table `probe_transfer`): AUROC on its statements"
                     " and on those whose subject and text the probe never saw.")
        for target in sorted(rows["target_run"].unique()):
            mine = rows.filter(pl.col("target_run") == target)
            lines = transfer_summary(paths, mine).splitlines()
            parts.append(f"On run `{target}` ({mine['target_dataset'][0]}):\n\n" + "\n".join(f"- {x}" for x in lines))
            parts.append(transfer_layer_table(mine))
    if positions.exists():
        from tasks.probes.entity_positions import summary as positions_summary

        figure = analysis_path(paths.root, "entity_positions_figure")
        parts.append("Probes at the statement's last token and at its subject's (`clearflow entity-positions`, table"
                     f" `entity_positions`): {positions_summary(read_table(positions))}.")
        if figure.exists():
            parts.append(f"![Test AUROC per layer at both positions]({figure.relative_to(paths.root)})")
    return "\n\n".join(["## Probe analyses", *parts]) if parts else None


def transfer_layer_table(rows: pl.DataFrame) -> str:
    """Transfer AUROC per layer (rows) of each kind's per-layer probe (fitted on train), on all statements and on
    the unseen ones (columns `<kind> all` / `<kind> unseen`)."""
    per_layer = rows.filter(pl.col("fitted_on") == "train")
    kinds = sorted(per_layer["probe"].unique().to_list())
    cell = {(r["probe"], r["layer"], r["subset"]): r["auroc"] for r in per_layer.iter_rows(named=True)}
    layers = sorted(per_layer["layer"].unique().to_list())
    header = ["layer", *[f"{k} {subset}" for k in kinds for subset in ("all", "unseen")]]
    body = [[layer, *[fmt(cell.get((k, layer, subset))) for k in kinds for subset in ("all", "unseen")]]
            for layer in layers]
    return md_table(header, body)
