"""The comparison over several fine-tuning seeds: one run per seed under a sweep directory, every stage a seed does
not change computed once and shared, then the aggregate over the seeds.

The first seed's run computes every stage. Each later seed's run first takes over each stage of the first run whose
recorded fingerprint equals the one the stage has under the later seed's config (the runner's own staleness test:
ingest, decompose, activations and probes, which no fine-tuning option reaches): its outputs are hard-linked and
its manifest record copied (marked `shared_from`), so the pipeline then skips it as up to date. Fine-tuning,
evaluation and the report run per seed; the base model's answers come from the sweep's answer cache
(tasks/evaluate/answer_cache.py) after the first seed. Running the same sweep again resumes every seed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.orchestrate import subflows_without_heartbeats
from flows.pipeline import pipeline_flow
from flows.presets import with_preset
from flows.runner import PROVENANCE, fingerprint, is_current, load_manifest, now, paths_of, resolve_run, start_manifest
from flows.stages import ORDER, STAGES, Stage
from schemas.layout import LAYOUT
from tasks.core.config import MAX_SEED, RunConfig
from tasks.core.storage import RunPaths, write_json
from tasks.core.threads import usable_cpus
from tasks.evaluate.seeds import SweepPaths, write_aggregate

log = logging.getLogger("clearflow")
DEFAULT_SEEDS = (0, 1, 2)


def check_seeds(seeds: list[int]) -> list[int]:
    """The seeds of a sweep: at least one, none twice."""
    if not seeds:
        raise ValueError("a sweep needs at least one seed: give --seeds 0 1 2")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {list(seeds)}; give each seed once")
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"--seeds must lie in 0..{MAX_SEED}: got {list(seeds)}")
    return list(seeds)


def check_parallel(parallel: int, cfg: RunConfig) -> int:
    """How many seeds may run at once: refused where concurrent seeds would not give the sequential tables."""
    if parallel < 1:
        raise ValueError(f"--parallel must be at least 1: got {parallel}")
    if parallel > 1 and cfg.finetune.lora_dropout > 0:
        raise ValueError("--parallel with --finetune.lora-dropout > 0: dropout draws from torch's process-wide random"
                         " generator, which seeds trained at once would share (their adapters would depend on timing);"
                         " run the seeds one at a time")
    return parallel


def seed_config(cfg: RunConfig, sweep: SweepPaths, seed: int) -> RunConfig:
    """A seed's run: the sweep's options with this fine-tuning seed, in the sweep directory, with its answer cache."""
    return cfg.model_copy(update={
        "runs_dir": sweep.root,
        "run": sweep.run_name(seed),
        "finetune": cfg.finetune.model_copy(update={"seed": seed}),
        "evaluate": cfg.evaluate.model_copy(update={"answer_cache": cfg.evaluate.answer_cache or sweep.answers}),
    })


# ---------------------------------------------------------------- sharing a stage's outputs


def _link(src: str | Path, dst: str | Path) -> None:
    """A file hard-linked (copied across file systems): stages replace files by renaming, so a link stays intact."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_artifact(src: Path, dst: Path) -> None:
    """Make dst hold src's content (a file or a directory tree), built beside dst and swapped in whole."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.shared-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=_link)
        shutil.rmtree(dst, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
        _link(src, tmp)
    os.replace(tmp, dst)


def _top_outputs(stage: Stage) -> list[str]:
    """The stage's outputs that no other of its outputs contains (probes/ holds probe_metrics)."""
    paths = {a: LAYOUT[a].path for a in stage.writes}
    return [a for a, p in paths.items() if not any(p.startswith(q + "/") for q in paths.values())]


def copy_stage(stage: Stage, donor: RunPaths, paths: RunPaths) -> None:
    """Link a stage's outputs and their quality results from the donor run into another run."""
    for name in _top_outputs(stage):
        link_artifact(donor.artifact(name), paths.artifact(name))
    for table in stage.suites:
        result = donor.quality / f"{table}.json"
        if result.exists():
            link_artifact(result, paths.quality / result.name)


@task(name="share-stages", cache_policy=NO_CACHE)
def share_stages(donor_dir: str, cfg: RunConfig, force: bool = False) -> list[str]:
    """Give the run of `cfg` every stage of the donor run it would compute identically; returns their names.

    A stage is shared when the donor's record has the fingerprint the stage has under `cfg` given what this run holds
    so far (shared stages first, in pipeline order) and its outputs exist. With `force` (the donor was just forced)
    every shared stage is linked again and every other stage's record is dropped, so the pipeline recomputes it.
    """
    donor, paths = RunPaths(Path(donor_dir)), paths_of(cfg)
    theirs = load_manifest(donor)
    manifest = start_manifest(cfg, paths)
    shared: list[str] = []
    for name in ORDER:
        stage, record = STAGES[name], theirs.get("stages", {}).get(name)
        same = (record is not None and record.get("fingerprint") == fingerprint(stage, cfg, manifest)
                and all(donor.artifact(a).exists() for a in stage.writes))
        if not same:
            if force:
                manifest["stages"].pop(name, None)
            continue
        shared.append(name)
        if force or not is_current(stage, cfg, paths, manifest):
            copy_stage(stage, donor, paths)
            manifest["stages"][name] = {**record, "shared_from": donor.root.name}
            if PROVENANCE in stage.writes:
                manifest["inputs"] = theirs.get("inputs")
    write_json(manifest, paths.manifest)
    log.info("%s: shares %s with %s", cfg.run, ", ".join(shared) or "no stage", donor.root.name)
    return shared


# ---------------------------------------------------------------- the sweep


def _metrics_hash(paths: RunPaths) -> str | None:
    """The content hash of a run's metrics table, as its manifest records it."""
    stages = load_manifest(paths).get("stages", {})
    return stages.get("evaluate", {}).get("outputs", {}).get("metrics", {}).get("sha256")


def start_sweep(sweep: SweepPaths, cfg: RunConfig, seeds: list[int], preset: str | None) -> dict:
    """Create or refresh sweep.json: what the sweep runs (its aggregate's record is kept for resuming)."""
    record = json.loads(sweep.record.read_text()) if sweep.record.exists() else {}
    record.setdefault("created_at", now())
    record.update(sweep=cfg.run, seeds=seeds, preset=preset, runs={str(s): sweep.run_name(s) for s in seeds},
                  config=cfg.model_dump(mode="json"), started_at=now())
    write_json(record, sweep.record)
    return record


@task(name="sweep-aggregate", cache_policy=NO_CACHE)
def aggregate(sweep_dir: str, seeds: list[int]) -> bool:
    """Write sweep_metrics.parquet and sweep_report.md unless they were made from the same seed metrics; True if
    written."""
    sweep = SweepPaths(Path(sweep_dir))
    record = json.loads(sweep.record.read_text())
    inputs = {str(s): _metrics_hash(sweep.run(s)) for s in sorted(seeds)}
    done = record.get("aggregate", {})
    if done.get("inputs") == inputs and all(p.exists() for p in (sweep.metrics, sweep.comparisons, sweep.report)):
        log.info("aggregate   up to date, skipped")
        return False
    evaluate = RunConfig.model_validate(record["config"]).evaluate
    write_aggregate(sweep, seeds, f"Sweep {record['sweep']}", evaluate.references, evaluate.bootstrap,
                    record["config"]["seed"])
    record.update(aggregate={"inputs": inputs, "finished_at": now()}, finished_at=now())
    write_json(record, sweep.record)
    return True


def _seed_run(cfg: RunConfig, sweep: SweepPaths, seed: int, donor: RunPaths | None, force: bool) -> RunPaths:
    """One seed's pipeline (a sub-flow), after taking over what it shares with the donor (the first seed's run)."""
    seed_cfg = seed_config(cfg, sweep, seed)
    if donor is not None:
        share_stages(str(donor.root), seed_cfg, force)
    with subflows_without_heartbeats():
        pipeline_flow(cfg=seed_cfg, force=force and donor is None)
    return paths_of(seed_cfg)


@task(name="seed", cache_policy=NO_CACHE)
def seed_task(cfg: RunConfig, sweep_dir: str, seed: int, donor_dir: str, force: bool) -> str:
    """A later seed's run as a task, so that several run at once (each its own pipeline sub-flow)."""
    return str(_seed_run(cfg, SweepPaths(Path(sweep_dir)), seed, RunPaths(Path(donor_dir)), force).root)


def _parallel_seeds(cfg: RunConfig, sweep: SweepPaths, seeds: list[int], donor: RunPaths, parallel: int,
                    force: bool) -> None:
    """The later seeds, `parallel` at a time, torch's threads shared out between them (unless --threads is given)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    at_once = min(parallel, len(seeds))
    cfg = cfg.model_copy(update={"threads": cfg.threads or max(1, usable_cpus() // at_once)})
    log.info("seeds %s: %d at a time, %d torch thread(s) each", seeds, at_once, cfg.threads)
    with ThreadPoolTaskRunner(max_workers=at_once) as runner:
        futures = [runner.submit(seed_task, {"cfg": cfg, "sweep_dir": str(sweep.root), "seed": seed,
                                             "donor_dir": str(donor.root), "force": force}) for seed in seeds]
        for future in futures:
            future.result()  # a failed seed raises here, after the others have finished


@flow(name="sweep", log_prints=True)
def sweep_flow(cfg: RunConfig = RunConfig(), seeds: list[int] | None = None, preset: str | None = None,
               force: bool = False, parallel: int = 1) -> str:
    """The pipeline once per fine-tuning seed (default 0, 1, 2), sharing the stages a seed does not change, and the
    aggregate over the seeds; `cfg.run` names the sweep. The first seed computes every stage; with `parallel` > 1
    the later seeds then run that many at a time. Returns the sweep report's path."""
    cfg = resolve_run(with_preset(preset, cfg))
    seeds = check_seeds(list(DEFAULT_SEEDS) if seeds is None else seeds)
    check_parallel(parallel, cfg)
    sweep = SweepPaths(Path(cfg.runs_dir) / cfg.run)
    start_sweep(sweep, cfg, seeds, preset)
    donor = _seed_run(cfg, sweep, seeds[0], None, force)
    if parallel > 1 and len(seeds) > 2:
        _parallel_seeds(cfg, sweep, seeds[1:], donor, parallel, force)
    else:
        for seed in seeds[1:]:
            _seed_run(cfg, sweep, seed, donor, force)
    aggregate(str(sweep.root), seeds)
    return str(sweep.report)
