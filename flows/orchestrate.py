"""Prefect wiring shared by every stage flow: the work and its quality check as tasks."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from flows.observe import forward_logs, publish, retry_transient, stage_run_namer, watch_progress

from flows.runner import (
    is_current,
    load_manifest,
    missing_upstream,
    paths_of,
    produced,
    record_stage,
    resolve_run,
    start_manifest,
    timed,
)
from flows.stages import STAGES
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths, key_lock
from tasks.core.threads import set_threads

log = logging.getLogger("clearflow")
forward_logs()
watch_progress()
STAGE_RETRIES = 2  # a transient fault (flows/observe.py: is_transient) runs the stage again; it resumes cheaply


@task(name="stage-work", task_run_name="{stage_name}", cache_policy=NO_CACHE, retries=STAGE_RETRIES,
      retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def stage_work(stage_name: str, cfg: RunConfig) -> None:
    """The stage's plain function from tasks/, given only the config sections it declares."""
    stage = STAGES[stage_name]
    set_threads(cfg.threads)
    stage.function()(stage.view(cfg), paths_of(cfg))


@task(name="quality-check", task_run_name="quality-{stage_name}", cache_policy=NO_CACHE)
def quality_check(stage_name: str, run_dir: str) -> dict:
    """Great Expectations suites of the tables the stage declares it writes; raises DataQualityError on a failure."""
    from tasks.core.quality import validate_tables

    return validate_tables(STAGES[stage_name].suites, RunPaths(Path(run_dir)))


def run_stage(stage_name: str, cfg: RunConfig, force: bool = False) -> tuple[dict[str, str], bool]:
    """Run a stage unless its outputs are current; check them; record them in the manifest; returns their paths and
    whether the stage was skipped as current. A second process on the same run waits for the first's stage to end
    (a lock file beside the run directory)."""
    paths = paths_of(cfg)
    with key_lock(paths.root.parent / f".{paths.root.name}.lock", f"run {paths.root.name}"):
        return _run_stage_locked(stage_name, cfg, paths, force)


def _run_stage_locked(stage_name: str, cfg: RunConfig, paths: RunPaths, force: bool) -> tuple[dict[str, str], bool]:
    """run_stage's work, while this process alone writes the run directory."""
    stage = STAGES[stage_name]
    missing = missing_upstream(stage, load_manifest(paths))
    if missing:
        raise RuntimeError(
            f"stage {stage_name!r} needs {missing} first: run `clearflow stage {missing[0]} --run {cfg.run}`"
            " or the whole pipeline"
        )
    manifest = start_manifest(cfg, paths)
    if not force and is_current(stage, cfg, paths, manifest):
        log.info("%-11s up to date, skipped", stage_name)
        return {a: str(paths.artifact(a)) for a in stage.writes}, True
    log.info("%-11s %s", stage_name, stage.summary)
    _, seconds = timed(stage_work, stage_name, cfg)
    outputs = produced(stage, paths)
    quality = quality_check(stage_name, str(paths.root))
    record_stage(stage, cfg, paths, seconds, quality)
    publish(stage_name, str(cfg.run), paths, quality)
    log.info("%-11s done in %.1f s", stage_name, seconds)
    return {a: str(p) for a, p in outputs.items()}, False


def make_stage_flow(stage_name: str):
    """A Prefect flow that runs one stage of a run (resuming unless forced). A stage skipped as current ends in a
    Completed state named "Skipped", so the UI tells it from one that ran."""

    def stage_flow(cfg: RunConfig = RunConfig(), force: bool = False) -> dict[str, str] | State:
        outputs, skipped = run_stage(stage_name, resolve_run(cfg), force)
        if skipped:
            return Completed(name="Skipped", message=f"{stage_name}: outputs current, nothing to do", data=outputs)
        return outputs

    stage_flow.__doc__ = STAGES[stage_name].summary
    # Deployments locate a flow by module and name: make them those of flows/<stage>.py's attribute.
    stage_flow.__name__ = stage_flow.__qualname__ = f"{stage_name}_flow"
    stage_flow.__module__ = f"flows.{stage_name}"
    return flow(stage_flow, name=stage_name, log_prints=True, validate_parameters=True,
                flow_run_name=stage_run_namer(stage_name))
