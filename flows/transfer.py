"""`clearflow transfer` and `clearflow entity-positions`: analyses of a finished run, written into it.

transfer scores the saved probes of one run on the statements of another (tasks/probes/transfer.py); given a
dataset, it first makes that other run's ingest, decompose and activations stages with the first run's model and
activation options (the runner skips what is current, and the content-addressed store reuses what was extracted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from flows.presets import deep_update
from flows.runner import load_manifest
from tasks.core.config import IngestConfig, RunConfig
from tasks.core.storage import RunPaths

TARGET_STAGES = ("ingest", "decompose", "activations")
DATASET_OPTIONS = ("dataset", "data_path", "limit", "seed", "ingest")  # what may differ between the two runs


def saved_config(paths: RunPaths) -> dict[str, Any]:
    """A finished run's recorded config, or one line saying there is no such run."""
    config = load_manifest(paths).get("config")
    if config is None:
        raise FileNotFoundError(f"no run {paths.root.name!r} under {paths.root.parent} (no manifest.json): name a run"
                                " made by `clearflow run`")
    return config


def target_config(source: dict[str, Any], given: dict[str, Any], target: str, runs_dir: Path) -> RunConfig:
    """The statements run's config: the source run's model, activation and decomposition options, the seed, and the
    dataset options given (the others at their defaults)."""
    outside = sorted(set(given) - set(DATASET_OPTIONS))
    if outside:
        raise ValueError(f"clearflow transfer sets only the other source's dataset options"
                         f" ({', '.join(DATASET_OPTIONS)}); {outside} come from the probes' run")
    if "dataset" not in given:
        raise ValueError(f"the dataset options {sorted(given)} make the statements run: give --dataset NAME with them")
    # the source's file, record limit and reading options are not the target's: those start from the defaults
    fresh = {"data_path": None, "limit": None, "ingest": IngestConfig().model_dump(mode="json")}
    return RunConfig.model_validate(deep_update(source | fresh, given) | {"run": target, "runs_dir": str(runs_dir)})


def make_target(cfg: RunConfig) -> None:
    """The stages that give the statements run its statements and their activations (current ones are skipped)."""
    from flows.pipeline import stage_flows

    flows = stage_flows()
    for name in TARGET_STAGES:
        flows[name](cfg=cfg)


def transfer(source_run: str, target_run: str, runs_dir: Path, given: dict[str, Any]) -> tuple[Path, pl.DataFrame]:
    """Score run `source_run`'s probes on `target_run`'s statements (made first when dataset options are given)."""
    from schemas.layout import analysis_path
    from tasks.probes.transfer import run_transfer

    source, target = RunPaths(Path(runs_dir) / source_run), RunPaths(Path(runs_dir) / target_run)
    config = saved_config(source)
    if given:
        make_target(target_config(config, given, target_run, Path(runs_dir)))
    rows = run_transfer(source, target)
    _refresh_catalog(source)
    return analysis_path(source.root, "probe_transfer"), rows


def entity_positions(run: str, runs_dir: Path) -> tuple[Path, pl.DataFrame]:
    """The subject_last vs last layer curves of a run, with its recorded probe and model options."""
    from schemas.layout import analysis_path
    from tasks.probes.entity_positions import compare_positions

    paths = RunPaths(Path(runs_dir) / run)
    cfg = RunConfig.model_validate(saved_config(paths) | {"run": run, "runs_dir": str(runs_dir)})
    table = compare_positions(cfg, paths)
    _refresh_catalog(paths)
    return analysis_path(paths.root, "entity_positions"), table


def _refresh_catalog(paths: RunPaths) -> None:
    """A finished run's own catalog.duckdb gains the new table's views (`clearflow sql` rebuilds its own)."""
    if paths.catalog.exists():
        from tasks.catalog.views import write_run_catalog

        write_run_catalog(paths)


def summary_lines(source: RunPaths, rows: pl.DataFrame) -> str:
    """Per kind, the transfer of the layer the source's dev chose (as its probes stage chose), then the final probe."""
    from tasks.core.storage import read_table
    from tasks.probes.stage import select_best

    metrics = read_table(source.table("probe_metrics"))
    lines = []
    for kind in sorted(rows["probe"].unique()):
        if kind not in metrics["probe"].to_list():
            continue
        layer = select_best(metrics, kind)["layer"]
        files = rows.filter((pl.col("probe") == kind) & (pl.col("layer") == layer) & (pl.col("fitted_on") == "train"))
        lines.append(f"{kind} layer {layer} (dev's choice): {_subsets(files)}")
    final = rows.filter(pl.col("probe_file") == "final.safetensors")
    if final.height:
        lines.append(f"final probe ({final['probe'][0]} layer {final['layer'][0]}, train+dev): {_subsets(final)}")
    return "\n".join(lines)


def _subsets(rows: pl.DataFrame) -> str:
    """'transfer AUROC a on all n statements, b on the m unseen (own test AUROC c)' for one probe file's rows."""
    by = {r["subset"]: r for r in rows.iter_rows(named=True)}
    words = {"all": "on all {n} statements", "unseen": "on the {n} unseen"}
    parts = [f"{_fmt(r['auroc'])} {words[s].format(n=r['n'])}" for s, r in by.items()]
    own = next(iter(by.values()))["source_test_auroc"] if by else None
    return "transfer AUROC " + ", ".join(parts) + f" (own test AUROC {_fmt(own)})"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
