"""Where every artifact of a run lives inside its run directory, declared once.

Stages name what they read and write by these names (flows/stages.py); `RunPaths` turns a name into a path;
the runner hashes an artifact by its kind when it records it in the manifest (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from schemas.tables import ANALYSIS_TABLES, TABLES

Kind = Literal["table", "hive", "json", "file", "dir"]


@dataclass(frozen=True)
class Artifact:
    """One thing a run directory holds: a name, its path relative to the run, and what it is."""

    name: str
    path: str
    kind: Kind  # table: one Parquet file with the schema TABLES[name]; hive: partitioned Parquet directory
    doc: str
    identity: str | None = None  # glob of the files whose hashes identify a directory; None = every file

    def __post_init__(self) -> None:
        if self.kind == "table" and self.name not in TABLES and self.name not in ANALYSIS_TABLES:
            raise ValueError(f"table artifact {self.name!r} has no schema in schemas.tables.TABLES")


LAYOUT: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact("items", "items.parquet", "table", "QA examples with their split and answers"),
        Artifact("statements", "statements.parquet", "table", "labelled probe-training statements"),
        Artifact("rejects", "rejects.parquet", "table", "input records refused, with the reason"),
        Artifact("ingest_provenance", "ingest_provenance.json", "json", "input files, sha256, loader versions"),
        Artifact("sentences", "sentences.parquet", "table", "context units with offsets and labels"),
        Artifact("activations", "activations", "hive", "hidden states, model=<slug>/layer=<L>/part-*.parquet,"
                 " linked from the shared store", identity="model=*/meta.json"),  # meta names the store's content key
        Artifact("probes", "probes", "dir", "probe weights per kind and layer, and the final probe"),
        Artifact("probe_metrics", "probes/metrics.parquet", "table", "probe accuracy/F1/AUROC per layer and split"),
        Artifact("probe_localisation", "probes/localisation.parquet", "table", "flag precision/recall/F1 per layer,"
                 " position and relevance pruning"),
        Artifact("best_probe", "probes/best.json", "json", "the layer and probe chosen on dev, its test scores"),
        Artifact("sentence_scores", "sentence_scores.parquet", "table", "p_conflict and flag of every unit"),
        Artifact("adapters", "adapters", "dir", "one LoRA adapter per fine-tuning arm, adapters/<arm>/ (with its"
                 " train_log.json)", identity="*/adapter_*"),  # the weights and their config identify it
        Artifact("train_log", "adapters/train_log.json", "json", "losses and sizes of every arm's fine-tuning"),
        Artifact("predictions", "predictions.parquet", "table", "every method's answer to every item, scored"),
        Artifact("metrics", "metrics.parquet", "table", "EM/F1/p_s/p_o/MR per method with bootstrap CIs"),
        Artifact("comparisons", "comparisons.parquet", "table", "paired differences of each method against each"
                 " reference: bootstrap CIs, McNemar p"),
        Artifact("lfd_layers", "lfd_layers.parquet", "table", "LFD: internal knowledge score per layer on dev and the"
                 " fused layer (no rows when LFD is not evaluated)"),
        Artifact("insideout_scores", "insideout/scores.parquet", "table", "Inside-Out: external and internal"
                 " score of every answer candidate of the dev and test items (no rows when off)"),
        Artifact("insideout_k", "insideout/k.parquet", "table", "Inside-Out: knowledge K per item, scorer and layer"),
        Artifact("insideout_layers", "insideout/layers.parquet", "table", "Inside-Out: mean K with CIs, hidden-knowledge"
                 " share per layer, the layer chosen on dev"),
        Artifact("report", "report.md", "file", "the run's report"),
        Artifact("figures", "figures", "dir", "the report's figures"),
        Artifact("trace", "trace.html", "file", "per-item trace page: each evaluated item's units coloured by"
                 " p_conflict, the marked ones boxed, and every method's answer (opens from the file system)"),
        Artifact("quality", "quality", "dir", "Great Expectations results, one JSON per checked table"),
        Artifact("manifest", "manifest.json", "json", "config, code, environment and every stage's outputs"),
        Artifact("catalog", "catalog.duckdb", "file", "DuckDB views over the run's tables"),
    )
}

assert set(TABLES) <= {a.name for a in LAYOUT.values() if a.kind == "table"}, "every table needs a place in the run"

# What analysis commands add to a finished run (no stage writes or reads them, so no stage goes stale); the catalog
# shows each table that exists as `<name>` / `all_<name>`.
ANALYSES: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact("probe_transfer", "analyses/probe_transfer.parquet", "table", "`clearflow transfer`: this run's"
                 " probes scored on other runs' statements, AUROC per target run, probe file and subset"),
        Artifact("entity_positions", "analyses/entity_positions.parquet", "table", "`clearflow entity-positions`:"
                 " probe metrics per layer, kind and split at the subject's last token vs the statement's last token"),
        Artifact("entity_positions_figure", "analyses/entity_positions.png", "file", "the layer curves of"
                 " entity_positions (test AUROC per kind and position)"),
    )
}
assert set(ANALYSIS_TABLES) == {a.name for a in ANALYSES.values() if a.kind == "table"}, "one place per analysis table"


def analysis_path(run_dir: Path, name: str) -> Path:
    """Where an analysis artifact lives in a run directory."""
    return Path(run_dir) / ANALYSES[name].path


def artifact(name: str) -> Artifact:
    """The artifact of a name, or one error listing the names there are."""
    try:
        return LAYOUT[name]
    except KeyError:
        raise KeyError(f"unknown run artifact {name!r}; known: {sorted(LAYOUT)}") from None
