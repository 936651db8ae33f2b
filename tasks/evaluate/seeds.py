"""A sweep over fine-tuning seeds: where its files live, its seed runs' metrics aggregated, and the report showing them.

A sweep directory holds one run directory per seed (`seed-<k>/`, an ordinary run), `sweep.json` (what ran),
`sweep_metrics.parquet` (the aggregate: mean and sample sd over the seeds of every metric of every method and
subset, with the per-seed values), `sweep_comparisons.parquet` (paired comparisons with the seeds' answers taken
together: tasks/evaluate/seed_pairs.py) and `sweep_report.md`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from schemas.tables import SWEEP_COMPARISONS, SWEEP_METRICS
from tasks.core.markdown import md_table, missing
from tasks.core.storage import RunPaths, atomic_path, read_table, write_parquet
from tasks.evaluate.comparison import (
    METRIC_LABELS, against_reference, against_reference_by_subset, p_value, with_subset_columns,
)
from tasks.evaluate.methods import method_label as label
from tasks.evaluate.scoring import ALL
from tasks.evaluate.seed_pairs import sweep_comparisons

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
    def comparisons(self) -> Path:
        return self.root / "sweep_comparisons.parquet"

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


def write_aggregate(sweep: SweepPaths, seeds: list[int], title: str, references: Sequence[str] = (),
                    n_boot: int = 0, boot_seed: int = 0) -> pl.DataFrame:
    """Aggregate the seed runs' metrics tables into sweep_metrics.parquet, pair their predictions into
    sweep_comparisons.parquet (against `references`, with `n_boot` bootstrap resamples), and write
    sweep_report.md."""
    seeds = sorted(seeds)
    table = aggregate_seeds({s: read_table(sweep.run(s).table("metrics")) for s in seeds})
    paired = sweep_comparisons({s: read_table(sweep.run(s).table("predictions")) for s in seeds},
                               {s: read_table(sweep.run(s).table("comparisons")) for s in seeds},
                               read_table(sweep.run(seeds[0]).table("items")), references, n_boot, boot_seed)
    write_parquet(table, sweep.metrics, SWEEP_METRICS)
    write_parquet(paired, sweep.comparisons, SWEEP_COMPARISONS)
    with atomic_path(sweep.report) as tmp:
        tmp.write_text(f"# {title}\n\n" + sweep_section(table, seeds) + "\n\n" + paired_section(paired, seeds) + "\n")
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


PAIRED_OVER_SEEDS = (
    "Each method against each reference on the same test items, every seed's answer to an item taken together: a "
    "method's score on an item is its mean over the seeds, the difference is the mean per-item difference "
    "(percentage points), its 95% interval the paired bootstrap over items (an item's seeds resampled together), "
    "and p (p_s, EM) the exact sign-flip test over items (McNemar's exact test when there is one seed). A verdict "
    "says *no measurable effect* exactly where the interval contains 0. The last column gives each seed's own "
    "difference and McNemar p. Table: `sweep_comparisons.parquet`."
)


def _seed_cells(rows: pl.DataFrame) -> dict[str, str]:
    """method -> each seed's headline difference (p_s where defined, else EM) with its McNemar p."""
    out: dict[str, str] = {}
    for r in rows.filter(pl.col("metric").is_in(["ps", "em"])).iter_rows(named=True):
        if r["method"] in out and r["metric"] == "em":
            continue
        cells = [("n/a" if missing(d) else f"{100 * d:+.1f}") + (f" ({p_value(p)})" if not missing(p) else "")
                 for d, p in zip(r["seed_diffs"], r["seed_p_mcnemar"])]
        out[r["method"]] = f"{METRIC_LABELS[r['metric']]}: " + " / ".join(cells)
    return out


def paired_section(paired: pl.DataFrame, seeds: list[int]) -> str:
    """Per reference: every method's paired differences over the seeds (overall, with verdicts and each seed's
    difference), then per condition and knowledge."""
    parts = ["## Paired comparisons over seeds", PAIRED_OVER_SEEDS]
    if paired.height == 0:
        return "\n\n".join([*parts, "No reference was evaluated, so nothing is compared."])
    renamed = paired.rename({"p_exact": "p_mcnemar"})  # the run report's table layout, read by its helpers
    for reference in paired["reference"].unique(maintain_order=True).to_list():
        rows = renamed.filter(pl.col("reference") == reference)
        overall = rows.filter((pl.col("condition") == ALL) & (pl.col("knowledge") == ALL))
        per_seed = _seed_cells(overall)
        parts += against_reference(rows, reference, test="sign-flip")
        parts.append(f"Each seed ({' / '.join(map(str, seeds))}), against {label(reference)}:")
        parts.append(md_table(["method", "difference per seed (McNemar p)"],
                              [[label(m), cell] for m, cell in per_seed.items()]))
        parts += against_reference_by_subset(rows, reference)
    return "\n\n".join(parts)
