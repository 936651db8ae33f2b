"""`clearflow transfer` and `clearflow entity-positions`: analyses of a finished run, written into it.

transfer scores the saved probes of one run on the statements of another (tasks/probes/transfer.py); given a
dataset, it first makes that other run's ingest, decompose and activations stages with the first run's model and
activation options (the runner skips what is current, and the content-addressed store reuses what was extracted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from flows.presets import deep_update, without_remote_code
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
    return without_remote_code(config)


def recorded_config(paths: RunPaths) -> RunConfig:
    """A finished run's config as its manifest records it, placed where the run directory is."""
    return RunConfig.model_validate(saved_config(paths) | {"run": paths.root.name, "runs_dir": str(paths.root.parent)})


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
    _refresh_report(source)
    return analysis_path(source.root, "probe_transfer"), rows


def entity_positions(run: str, runs_dir: Path) -> tuple[Path, pl.DataFrame]:
    """The subject_last vs last layer curves of a run, with its recorded probe and model options."""
    from schemas.layout import analysis_path
    from tasks.probes.entity_positions import compare_positions

    paths = RunPaths(Path(runs_dir) / run)
    table = compare_positions(recorded_config(paths), paths)
    _refresh_catalog(paths)
    _refresh_report(paths)
    return analysis_path(paths.root, "entity_positions"), table


def _refresh_report(paths: RunPaths) -> None:
    """A run that has a report gets the new analysis in it: its report stage runs again in place and is recorded in
    the manifest as the runner records it (no Prefect server needed)."""
    if not paths.report.exists():
        return
    from flows.runner import record_stage, timed
    from flows.stages import STAGES

    cfg, stage = recorded_config(paths), STAGES["report"]
    _, seconds = timed(stage.function(), stage.view(cfg), paths)
    record_stage(stage, cfg, paths, seconds, {})


def _refresh_catalog(paths: RunPaths) -> None:
    """A finished run's own catalog.duckdb gains the new table's views (`clearflow sql` rebuilds its own)."""
    if paths.catalog.exists():
        from tasks.catalog.views import write_run_catalog

        write_run_catalog(paths)
