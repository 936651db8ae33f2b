"""The end-to-end pipeline: every stage flow in order, resuming where a previous try stopped."""

from __future__ import annotations

import importlib
import time

from prefect import flow

from flows.observe import pipeline_run_name
from flows.orchestrate import subflows_without_heartbeats
from flows.presets import with_preset
from flows.runner import load_manifest, now, paths_of, resolve_run
from flows.stages import ORDER
from tasks.core.config import RunConfig
from tasks.core.storage import write_json


def stage_flow(name: str):
    """The stage's Prefect flow, from flows/<name>.py (the deployments' entrypoint); importing one stage's module
    builds only that flow (each costs a parameter schema)."""
    return getattr(importlib.import_module(f"flows.{name}"), f"{name}_flow")


def stage_flows() -> dict:
    """name -> its Prefect flow, in pipeline order."""
    return {name: stage_flow(name) for name in ORDER}


def finish_run(cfg: RunConfig, seconds: float) -> None:
    """Stamp the manifest and write the run's DuckDB catalog once every stage is done."""
    from tasks.catalog.views import write_run_catalog

    paths = paths_of(cfg)
    manifest = load_manifest(paths)
    manifest.update(finished_at=now(), seconds=round(seconds, 1))
    write_json(manifest, paths.manifest)
    write_run_catalog(paths)


@flow(name="pipeline", log_prints=True, flow_run_name=pipeline_run_name)
def pipeline_flow(cfg: RunConfig = RunConfig(), force: bool = False, preset: str | None = None) -> str:
    """Ingest, decompose, activations, probes, finetune, evaluate, report (the preset's options under those `cfg`
    sets); returns the report's path."""
    cfg = resolve_run(with_preset(preset, cfg))
    t0 = time.perf_counter()
    with subflows_without_heartbeats():
        for run_stage_flow in stage_flows().values():
            run_stage_flow(cfg=cfg, force=force)
    finish_run(cfg, time.perf_counter() - t0)
    return str(paths_of(cfg).report)
