"""Running one stage: resume check, the work, its quality checks, and the manifest's record of it."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from flows.stages import ORDER, STAGES, WRITER, Stage
from schemas.layout import LAYOUT
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths, file_sha256, write_json

log = logging.getLogger("clearflow")
REPO = Path(__file__).resolve().parents[1]
PROVENANCE = "ingest_provenance"  # the artifact whose content heads the manifest as its "inputs"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def resolve_run(cfg: RunConfig) -> RunConfig:
    """Give an unnamed run a timestamp name (its flow run's scheduled start), so every stage of it writes to one
    directory and the flow run's name says which."""
    if cfg.run:
        return cfg
    from flows.observe import run_stamp

    return cfg.model_copy(update={"run": run_stamp()})


def paths_of(cfg: RunConfig) -> RunPaths:
    """The run's directory, which must be a directory directly under --runs-dir (never outside it)."""
    if not cfg.run:
        raise ValueError("the run has no name: call resolve_run first")
    RunConfig._one_directory(cfg.run)  # a config built by model_copy skipped validation
    return RunPaths(Path(cfg.runs_dir) / cfg.run)


def load_manifest(paths: RunPaths) -> dict[str, Any]:
    if paths.manifest.exists():
        return json.loads(paths.manifest.read_text())
    return {}


def digest(path: Path, pattern: str | None = None) -> str:
    """sha256 of a file, or of a directory's (relative path, file hash) list over `pattern` (default: all files)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.glob(pattern or "**/*") if p.is_file() and not p.name.startswith(".")):
        h.update(f"{f.relative_to(path)}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def read_hashes(stage: Stage, manifest: dict[str, Any]) -> dict[str, str | None]:
    """Content hash of each artifact the stage reads, as its writer's manifest record holds it."""
    done = manifest.get("stages", {})
    return {a: done.get(WRITER[a], {}).get("outputs", {}).get(a, {}).get("sha256") for a in stage.reads}


def fingerprint(stage: Stage, cfg: RunConfig, manifest: dict[str, Any]) -> str:
    """What a stage's outputs depend on: its declared config sections, what it reads, its outside inputs."""
    blob = json.dumps(
        [stage.name, stage.view(cfg).digest(), read_hashes(stage, manifest), stage.input_fingerprint(cfg)],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_current(stage: Stage, cfg: RunConfig, paths: RunPaths, manifest: dict[str, Any]) -> bool:
    """True when the declared outputs exist and were made from the same config and inputs."""
    rec = manifest.get("stages", {}).get(stage.name)
    if not rec or rec.get("fingerprint") != fingerprint(stage, cfg, manifest):
        return False
    outputs = rec.get("outputs", {})
    return set(outputs) == set(stage.writes) and all(paths.artifact(a).exists() for a in stage.writes)


def missing_upstream(stage: Stage, manifest: dict[str, Any]) -> list[str]:
    done = manifest.get("stages", {})
    return [u for u in stage.upstream if u not in done]


def produced(stage: Stage, paths: RunPaths) -> dict[str, Path]:
    """The paths of the stage's declared outputs; a declared output it did not write is an error."""
    outputs = {a: paths.artifact(a) for a in stage.writes}
    missing = [f"{a} ({LAYOUT[a].path})" for a, p in outputs.items() if not p.exists()]
    if missing:
        raise RuntimeError(
            f"stage {stage.name!r} finished without writing {', '.join(missing)}, which its declaration in"
            " flows/stages.py says it writes"
        )
    return outputs


def code_version() -> dict[str, Any]:
    """The git commit (and whether the tree was dirty) the run was made with."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("clearflow")
    except PackageNotFoundError:
        pkg = "unknown"
    return {"package": pkg, "commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def environment() -> dict[str, Any]:
    """The software the run used. Versions come from package metadata, so a stage that needs no torch (the report)
    never imports it for its manifest; the GPU is named when torch is already loaded (by a stage that uses it)."""
    import sys
    from importlib.metadata import version

    torch = sys.modules.get("torch")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "cuda": torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None,
    }


def start_manifest(cfg: RunConfig, paths: RunPaths) -> dict[str, Any]:
    """Create or refresh the manifest's header (config, code, environment) before a stage runs."""
    manifest = load_manifest(paths)
    manifest.setdefault("created_at", now())
    manifest.update(
        run=cfg.run,
        config=cfg.model_dump(mode="json"),
        code=code_version(),
        environment=environment(),
    )
    manifest.setdefault("stages", {})
    write_json(manifest, paths.manifest)
    return manifest


def record_stage(
    stage: Stage, cfg: RunConfig, paths: RunPaths, seconds: float, quality: dict[str, Any]
) -> dict[str, Any]:
    """Write what a finished stage produced (its declared outputs, with content hashes) into the manifest."""
    manifest = load_manifest(paths)
    recorded = {
        a: {"path": LAYOUT[a].path, "sha256": digest(p, LAYOUT[a].identity)} for a, p in produced(stage, paths).items()
    }
    manifest.setdefault("stages", {})[stage.name] = {
        "fingerprint": fingerprint(stage, cfg, manifest),
        "outputs": recorded,
        "seconds": round(seconds, 2),
        "finished_at": now(),
        "quality": {t: {"success": r.get("success"), "expectations": r.get("evaluated")} for t, r in quality.items()},
    }
    if PROVENANCE in stage.writes:  # where the data came from (files, sha256, loader versions) heads the manifest
        manifest["inputs"] = json.loads(paths.artifact(PROVENANCE).read_text())
    write_json(manifest, paths.manifest)
    return manifest


def timed(fn, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def pipeline_current(cfg: RunConfig) -> bool:
    """Whether a named run finished and every stage's outputs are current for `cfg`: then a run has nothing to do,
    and the CLI says so without starting an orchestrator (the test flows/execute.py applies to each stage)."""
    if not cfg.run:
        return False
    paths = paths_of(cfg)
    manifest = load_manifest(paths)
    if not manifest.get("finished_at"):
        return False
    return all(is_current(STAGES[name], cfg, paths, manifest) for name in ORDER)
