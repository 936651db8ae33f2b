"""Prefect wiring shared by every stage flow: the work and its quality check as tasks (flows/execute.py has the
plain versions), the stage flows, what the UI shows of them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Completed, State

from flows.execute import do_quality_check, do_stage_work, run_stage_with
from flows.observe import forward_logs, publish, retry_transient, stage_run_namer, watch_progress
from flows.runner import resolve_run
from flows.stages import STAGES
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths

log = logging.getLogger("clearflow")
forward_logs()
watch_progress()
STAGE_RETRIES = 2  # a transient fault (flows/observe.py: is_transient) runs the stage again; it resumes cheaply


@task(name="stage-work", task_run_name="{stage_name}", cache_policy=NO_CACHE, retries=STAGE_RETRIES,
      retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def stage_work(stage_name: str, cfg: RunConfig) -> None:
    """The stage's plain function from tasks/, given only the config sections it declares."""
    do_stage_work(stage_name, cfg)


@task(name="quality-check", task_run_name="quality-{stage_name}", cache_policy=NO_CACHE)
def quality_check(stage_name: str, run_dir: str) -> dict:
    """Great Expectations suites of the tables the stage declares it writes; raises DataQualityError on a failure."""
    return do_quality_check(stage_name, run_dir)


def run_stage(stage_name: str, cfg: RunConfig, force: bool = False) -> tuple[dict[str, str], bool]:
    """run_stage_with (flows/execute.py) through Prefect: the work and the check as task runs (the work retried on
    a transient fault), and the stage's artifacts published."""
    def published(paths: RunPaths, quality: dict) -> None:
        publish(stage_name, str(cfg.run), paths, quality)

    return run_stage_with(stage_name, cfg, force, stage_work, quality_check, published)


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


@contextmanager
def subflows_without_heartbeats() -> Iterator[None]:
    """Flows called in here (a pipeline's stages, a sweep's seeds) send no heartbeats of their own: the calling
    flow's heartbeat already says this process lives, and Prefect's heartbeat thread holds every flow run's end for
    up to a second (it sleeps in one-second steps and is joined): a trivial flow run took 1.2 s with it, 0.35 s
    without, measured; a pipeline has eight stage flows."""
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
