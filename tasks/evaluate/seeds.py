"""A sweep over fine-tuning seeds: where its files live, its seed runs' metrics aggregated, and the report showing them.

A sweep directory holds one run directory per seed (`seed-<k>/`, an ordinary run), `sweep.json` (what ran),
`sweep_metrics.parquet` (the aggregate: mean and sample sd over the seeds of every metric of every method and
subset, with the per-seed values) and `sweep_report.md`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from schemas.tables import SWEEP_METRICS
from tasks.core.markdown import md_table, missing
from tasks.core.storage import RunPaths, atomic_path, read_table, write_parquet
from tasks.evaluate.comparison import METRIC_LABELS, with_subset_columns
from tasks.evaluate.methods import method_label as label
from tasks.evaluate.scoring import ALL

KEYS = ("method", "condition", "knowledge")


@dataclass(frozen=True)
class SweepPaths:
    """Where each file of a sweep lives under its directory."""

    root: Path

    @staticmethod
    def run_name(seed: int) -> str:
        """The run directory of a seed inside the sweep."""
        return f"seed-{seed}"

    def run(self, seed: int) -> RunPaths:
        return RunPaths(self.root / self.run_name(seed))

    @property
    def record(self) -> Path:
        return self.root / "sweep.json"

    @property
    def metrics(self) -> Path:
        return self.root / "sweep_metrics.parquet"

    @property
    def report(self) -> Path:
        return self.root / "sweep_report.md"

    @property
    def answers(self) -> Path:
        """The seeds' shared cache of base-model answers (tasks/evaluate/answer_cache.py)."""
        return self.root / "answers"


def aggregate_seeds(metrics: Mapping[int, pl.DataFrame]) -> pl.DataFrame:
    """One SWEEP_METRICS row per method x subset x metric: mean, sample sd and count over the seeds where the metric
    is defined, and every seed's value (rows in the first seed's order, metrics in METRICS' column order)."""
    if not metrics:
        raise ValueError("no seed metrics to aggregate")
    long = pl.concat(
        [with_subset_columns(m).select(*KEYS, *METRIC_LABELS).with_columns(seed=pl.lit(s, pl.Int64))
         for s, m in metrics.items()], how="vertical_relaxed"
    ).unpivot(index=[*KEYS, "seed"], on=list(METRIC_LABELS), variable_name="metric", value_name="value")
    key_rank = long.select(KEYS).unique(maintain_order=True).with_row_index("key_rank")
    metric_rank = pl.col("metric").replace_strict({m: i for i, m in enumerate(METRIC_LABELS)}, return_dtype=pl.Int32)
    value = pl.col("value")
    return (
        long.join(key_rank, on=list(KEYS))
        .sort("key_rank", metric_rank, "seed")
        .group_by([*KEYS, "metric"], maintain_order=True)
        .agg(mean=value.mean(), sd=pl.when(value.count() >= 2).then(value.std(ddof=1)),
             n_seeds=value.count().cast(pl.Int32), seeds=pl.col("seed"), values=value)
        .select(SWEEP_METRICS.names)
    )


def write_aggregate(sweep: SweepPaths, seeds: list[int], title: str) -> pl.DataFrame:
    """Aggregate the seed runs' metrics tables into sweep_metrics.parquet and write sweep_report.md."""
    table = aggregate_seeds({s: read_table(sweep.run(s).table("metrics")) for s in sorted(seeds)})
    write_parquet(table, sweep.metrics, SWEEP_METRICS)
    with atomic_path(sweep.report) as tmp:
        tmp.write_text(f"# {title}\n\n" + sweep_section(table, sorted(seeds)) + "\n")
    return table


def mean_sd(mean: float | None, sd: float | None) -> str:
    """A fraction's mean over seeds and its sd as percentages: '45.0 ± 2.1' ('45.0' with one seed)."""
    if missing(mean):
        return "n/a"
    return f"{100 * mean:.1f}" + ("" if missing(sd) else f" ± {100 * sd:.1f}")


def _per_seed(values: list[float | None]) -> str:
    """Each seed's value as a percentage, in seed order."""
    return " / ".join("n/a" if missing(v) else f"{100 * v:.1f}" for v in values)


def _wide(table: pl.DataFrame, cell) -> list[dict]:
    """One row per (method, condition, knowledge) with one formatted cell per metric."""
    rows: dict[tuple, dict] = {}
    for r in table.iter_rows(named=True):
        row = rows.setdefault(tuple(r[k] for k in KEYS), {k: r[k] for k in KEYS})
        row[r["metric"]] = cell(r)
    return list(rows.values())


def sweep_section(table: pl.DataFrame, seeds: list[int]) -> str:
    """The report section of a sweep: mean ± sd over seeds overall and per subset, and every seed's values."""
    names = list(METRIC_LABELS.values())
    overall = table.filter((pl.col("condition") == ALL) & (pl.col("knowledge") == ALL))
    means = _wide(overall, lambda r: mean_sd(r["mean"], r["sd"]))
    per_seed = _wide(overall, lambda r: _per_seed(r["values"]))
    parts = [
        "## Over fine-tuning seeds",
        f"{len(seeds)} fine-tuning seeds ({', '.join(map(str, seeds))}), one run each (`seed-<k>/`): the stages"
        " before fine-tuning ran once and are shared, every seed fine-tunes its own adapter and evaluates it. Values"
        " are percentages, mean ± sample sd over the seeds (`sweep_metrics.parquet`); methods on the base model"
        " answer the same in every seed (sd 0).",
        md_table(["method", *names], [[label(r["method"]), *(r[m] for m in METRIC_LABELS)] for r in means]),
        f"Per seed ({' / '.join(map(str, seeds))}), every item:",
        md_table(["method", *names], [[label(r["method"]), *(r[m] for m in METRIC_LABELS)] for r in per_seed]),
    ]
    subsets = table.filter((pl.col("condition") != ALL) | (pl.col("knowledge") != ALL))
    for condition in subsets["condition"].unique(maintain_order=True).to_list():
        rows = _wide(subsets.filter(pl.col("condition") == condition), lambda r: mean_sd(r["mean"], r["sd"]))
        parts += [f"### Condition: {condition}",
                  md_table(["method", "knowledge", *names],
                           [[label(r["method"]), r["knowledge"], *(r[m] for m in METRIC_LABELS)] for r in rows])]
    return "\n\n".join(parts)
