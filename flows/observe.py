"""What a Prefect user sees of a run: the stages' own log lines in the run's logs, flow runs named after the run
directory and stage, artifacts (metrics, probe layers, data quality, the report), and which faults are retried.

Everything here reads the run directory or the configuration; nothing changes what a stage computes.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import re
import time
from pathlib import Path
from typing import Any

import polars as pl

from tasks.core.storage import RunPaths

OUR_LOGGERS = ("clearflow", "tasks", "flows")  # the stages log through these (plain `logging`)
_MAX_ROWS = 200  # rows of a table artifact: the UI shows a page, the file keeps the rest
_STAMP = "%Y%m%d-%H%M%S"


def watch_progress() -> None:
    """Progress artifacts for the stages' progress bars (tasks/core/progress.py)."""
    from tasks.core.progress import add_listener

    add_listener(_PROGRESS)


def forward_logs() -> None:
    """Send the stages' INFO lines to the Prefect API with the flow or task run they belong to, however Prefect was
    started (CLI, `serve`, a worker's flow-run process, which imports Prefect before clearflow)."""
    from prefect.logging.handlers import APILogHandler

    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            logger.addHandler(APILogHandler())


def run_stamp() -> str:
    """The name an unnamed run gets: its flow run's scheduled start (so a scheduled run's directory says when it was
    due, and the flow run's name and its directory agree), or now outside a flow run."""
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time if flow_run.id else None
    moment = when.astimezone() if isinstance(when, dt.datetime) else dt.datetime.now()
    return moment.strftime(_STAMP)


def _given_run() -> str:
    """The run directory named by the current flow run's `cfg` parameter, or its stamp when none is named."""
    from prefect.runtime import flow_run

    cfg = flow_run.parameters.get("cfg")
    run = cfg.get("run") if isinstance(cfg, dict) else getattr(cfg, "run", None)
    return run or run_stamp()


def pipeline_run_name() -> str:
    return f"{_given_run()}: pipeline"


def stage_run_namer(stage: str):
    """A flow-run name function for a stage flow: '<run directory>: <stage>'."""
    def name() -> str:
        return f"{_given_run()}: {stage}"

    return name


# ---------------------------------------------------------------- progress

class ProgressArtifacts:
    """A Prefect progress artifact per progress bar of a stage task (activations, fine-tuning steps, generation),
    updated at most every `every` seconds and when the bar ends: the UI shows how far a long stage is."""

    def __init__(self, every: float = 2.0):
        self.every = every
        self.ids: dict[tuple[str, str], Any] = {}
        self.last: dict[tuple[str, str], float] = {}

    def __call__(self, what: str, done: float, finished: bool) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
        if ctx is None:  # a bar outside a stage task (a test, a script): nothing to show it in
            return
        key, now = (str(ctx.task_run.id), what), time.monotonic()
        if not finished and now - self.last.get(key, -self.every) < self.every:
            return
        self.last[key] = now
        if key in self.ids:
            update_progress_artifact(self.ids[key], progress=100 * done)
        else:
            self.ids[key] = create_progress_artifact(100 * done, description=f"{ctx.task_run.name}: {what}")


# ---------------------------------------------------------------- retries

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ESTALE, errno.ETIMEDOUT,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}


def is_transient(exc: BaseException) -> bool:
    """A fault that may pass if the stage runs again (a dropped connection, a timeout, a busy or flaky disk); never
    a data-quality failure, a bad option or missing input, which fail the same way every time."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    try:
        import httpx
    except ImportError:  # pragma: no cover - httpx comes with Prefect
        return False
    return isinstance(exc, httpx.TransportError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition for the stage task."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the stage's own exception, to classify
        return is_transient(exc)
    return False


# ---------------------------------------------------------------- artifacts

def _key(*parts: str) -> str:
    """An artifact key Prefect accepts (lowercase letters, digits, dashes), stable per run and stage: the UI keeps
    one artifact per key and shows its versions over time."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def _rows(path: Path, where: pl.Expr | None = None) -> list[dict[str, Any]]:
    """A table's rows as plain values, floats rounded for reading, at most _MAX_ROWS."""
    frame = pl.read_parquet(path)
    if where is not None:
        frame = frame.filter(where)
    frame = frame.select(c for c in frame.columns if frame[c].dtype != pl.List)  # no vectors in the UI
    frame = frame.with_columns(pl.col(pl.Float32, pl.Float64).round(4))
    return frame.head(_MAX_ROWS).to_dicts()


def _quality_rows(quality: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"table": table, "success": bool(r.get("success")), "expectations": r.get("evaluated"),
             "failed": r.get("failed")} for table, r in sorted(quality.items())]


def publish(stage: str, run: str, paths: RunPaths, quality: dict[str, Any]) -> list[str]:
    """The artifacts of a finished stage in its flow run: its data-quality results, and the table or report it is
    read for. Returns their keys."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:  # a stage function called directly (tests, scripts): no run to attach them to
        return []
    keys = []
    if quality:
        key = _key(run, stage, "quality")
        create_table_artifact(_quality_rows(quality), key=key,
                              description=f"{run} / {stage}: Great Expectations results per table")
        keys.append(key)
    if stage == "probes":
        key = _key(run, "probe-layers")
        create_table_artifact(_rows(paths.artifact("probe_metrics")), key=key,
                              description=f"{run}: probe accuracy / F1 / AUROC per kind, layer and split")
        keys.append(key)
    if stage == "evaluate":
        overall = (pl.col("condition") == "all") & (pl.col("knowledge") == "all")
        key = _key(run, "metrics")
        create_table_artifact(_rows(paths.artifact("metrics"), overall), key=key,
                              description=f"{run}: EM / F1 / p_s / p_o / MR per method over all items, with CIs")
        keys.append(key)
    if stage == "report":
        report = paths.artifact("report")
        key = _key(run, "report")
        create_markdown_artifact(report.read_text(encoding="utf-8"), key=key, description=f"{run}: report.md")
        create_link_artifact(report.resolve().as_uri(), link_text=str(report.resolve()), key=_key(run, "report-file"),
                             description=f"{run}: the report's file (its figures lie beside it)")
        keys += [key, _key(run, "report-file")]
    return keys


_PROGRESS = ProgressArtifacts()
