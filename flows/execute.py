"""Running one stage: the lock on the run, the resume check, the work, its quality checks and the manifest record.

Prefect-free, so `clearflow stage` without a server runs a stage with no orchestrator to import or start;
flows/orchestrate.py passes its Prefect tasks (retried work, checked tables, published artifacts) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.runner import is_current, load_manifest, missing_upstream, paths_of, produced, record_stage, \
    start_manifest, timed
from flows.stages import STAGES
from tasks.core.config import RunConfig
from tasks.core.fanout import Mapper, mapping_with
from tasks.core.storage import RunPaths, key_lock
from tasks.core.threads import set_threads

log = logging.getLogger("clearflow")


def fanout_mapper(cfg: RunConfig) -> Mapper | None:
    """Where the stage's fanned-out jobs run: here (None), or on Dask (flows/scale.py, imported only then)."""
    if cfg.executor == "local":
        return None
    from flows.scale import dask_mapper

    return dask_mapper(cfg)


def do_stage_work(stage_name: str, cfg: RunConfig) -> None:
    """The stage's plain function from tasks/, given only the config sections it declares."""
    stage = STAGES[stage_name]
    set_threads(cfg.threads)
    with mapping_with(fanout_mapper(cfg)):
        stage.function()(stage.view(cfg), paths_of(cfg))


def do_quality_check(stage_name: str, run_dir: str) -> dict:
    """Great Expectations suites of the tables the stage declares it writes; raises DataQualityError on a failure."""
    from tasks.core.quality import validate_tables

    return validate_tables(STAGES[stage_name].suites, RunPaths(Path(run_dir)))


def run_stage_with(stage_name: str, cfg: RunConfig, force: bool, work: Callable[[str, RunConfig], Any] = do_stage_work,
                   check: Callable[[str, str], dict] = do_quality_check,
                   after: Callable[[RunPaths, dict], None] | None = None) -> tuple[dict[str, str], bool]:
    """Run a stage unless its outputs are current; check them; record them in the manifest; returns their paths and
    whether the stage was skipped as current. A second process on the same run waits for the first's stage to end
    (a lock file beside the run directory)."""
    paths = paths_of(cfg)
    with key_lock(paths.root.parent / f".{paths.root.name}.lock", f"run {paths.root.name}"):
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
        _, seconds = timed(work, stage_name, cfg)
        outputs = produced(stage, paths)
        quality = check(stage_name, str(paths.root))
        record_stage(stage, cfg, paths, seconds, quality)
        if after is not None:
            after(paths, quality)
        log.info("%-11s done in %.1f s", stage_name, seconds)
        return {a: str(p) for a, p in outputs.items()}, False
