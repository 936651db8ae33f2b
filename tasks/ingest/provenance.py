"""Where ingested data came from, and a content-addressed cache so the same file is never parsed twice.

The cache key is the sha256 of every input file plus the loader versions and every option that changes the
tables (limit, seed, context budget, truncation, the model whose window bounds a context). A hit copies the
three ingest tables from `<cache>/ingest/<key>/` into the run: no file is parsed, no model is loaded.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.config import RunConfig
from tasks.core.storage import cache_root
from tasks.core.storage import atomic_path, file_sha256, write_json
from tasks.ingest.formats import known_facts_options
from tasks.ingest.sources import Source, run_sources

PROMPT_RESERVE = 256  # tokens of the model's window left for the system line, question and answer


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """A file's sha256, hashed once per version of the file: a run checks its inputs' hashes several times
    (stage fingerprint before and after, provenance), and an edit changes size or mtime."""
    return file_sha256(Path(path))


def file_record(path: Path, role: str) -> dict[str, Any]:
    """Provenance of one input file: its resolved path, size and sha256."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FileNotFoundError(f"{role} file {path} is a directory: give the dataset's file itself")
    if not path.is_file():
        raise FileNotFoundError(f"{role} file {path} does not exist")
    st = path.stat()
    sha = _sha256_of(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    return {"role": role, "path": str(path.resolve()), "bytes": st.st_size, "sha256": sha}


def budget_options(cfg: RunConfig) -> dict[str, Any]:
    """The context-budget options as they enter the cache key (the model matters only without an explicit budget)."""
    opts: dict[str, Any] = {"max_context_tokens": cfg.ingest.max_context_tokens, "truncation": cfg.ingest.truncation}
    if cfg.ingest.max_context_tokens is None:
        opts["window_of"] = {"model": cfg.model.name, "revision": cfg.model.revision}
    return opts


# The readers' code: the formats package and the project modules it imports (see loader_code_files).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("schemas", "tasks")
FORMATS_DIR = Path(__file__).resolve().parent / "formats"


def _project_imports(path: Path) -> list[Path]:
    """Source files of this project that a module imports (absolute `schemas.*` / `tasks.*` imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from schemas import rejects`
    files = []
    for name in names:
        if name.split(".")[0] in PROJECT_PACKAGES:
            base = PROJECT_ROOT.joinpath(*name.split("."))
            files += [f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()]
    return files


def loader_code_files() -> list[Path]:
    """The readers' source files and every project module they build on, followed import by import."""
    todo, seen = sorted(FORMATS_DIR.glob("*.py")), set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += _project_imports(path)
    return sorted(seen)


def loader_code_digest() -> str:
    """Hash of the readers' source and what they import: an edited reader never serves a stale cache entry."""
    h = hashlib.sha256()
    for src in loader_code_files():
        h.update(src.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0" + src.read_bytes())
    return h.hexdigest()[:16]


def cache_key(provenance: dict[str, Any]) -> str:
    """Content address of an ingest: input bytes, loaders (version and code) and options, never paths or times."""
    keyed = {
        "files": sorted((f["role"], f["sha256"]) for f in provenance["files"]),
        "loaders": provenance["loaders"],
        "options": provenance["options"],
        "code": provenance["loader_code"],
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:24]


def ingest_cache_dir() -> Path:
    """Root of the ingest cache (under CLEARFLOW_CACHE, like the converted models)."""
    return cache_root() / "ingest"


@dataclass(frozen=True)
class IngestCache:
    """One cache entry: the ingest tables and the summary lines of one key."""

    key: str
    root: Path

    @classmethod
    def for_key(cls, key: str) -> IngestCache:
        return cls(key, ingest_cache_dir() / key)

    def tables(self) -> list[str]:
        """The tables the entry holds, as its summary (written last, so only when complete) names them."""
        path = self.root / "summary.json"
        return json.loads(path.read_text()).get("tables", []) if path.exists() else []

    def hit(self) -> bool:
        """A complete entry: an entry from before tables were named in the summary is read again."""
        tables = self.tables()
        return bool(tables) and all((self.root / f"{t}.parquet").exists() for t in tables)

    def summary(self) -> dict[str, Any]:
        return json.loads((self.root / "summary.json").read_text())

    def restore(self, targets: dict[str, Path]) -> None:
        """Copy the cached tables to the run atomically."""
        for table, target in targets.items():
            with atomic_path(target) as tmp:
                shutil.copyfile(self.root / f"{table}.parquet", tmp)

    def store(self, tables: dict[str, Path], summary: dict[str, Any]) -> None:
        """Copy freshly written run tables into the cache, the summary last (it marks the entry complete)."""
        for table, source in tables.items():
            with atomic_path(self.root / f"{table}.parquet") as tmp:
                shutil.copyfile(source, tmp)
        write_json({**summary, "tables": sorted(tables)}, self.root / "summary.json")


def input_files(sources: list[Source]) -> list[dict[str, Any]]:
    """Provenance records of every file the ingest reads: the dataset's, then the probe statements' source."""
    return [file_record(path, src.role) for src in sources for path in src.files()]


def input_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The ingest stage's outside inputs: file contents and the model window that bounds a context."""
    return {"files": [(f["role"], f["sha256"]) for f in input_files(run_sources(cfg))], "budget": budget_options(cfg)}


def provenance_of(cfg: RunConfig, sources: list[Source]) -> dict[str, Any]:
    """Input files with their sha256, loader versions and the options that shape the tables."""
    loaders = {src.role: {"dataset": src.dataset, "version": src.reader.loader_version(cfg.ingest)} for src in sources}
    options = {"limit": cfg.limit, "seed": cfg.seed, "n_distractors": cfg.ingest.n_distractors, **budget_options(cfg),
               "known_facts": known_facts_options.provenance_options(cfg.ingest)}
    prov = {"dataset": cfg.dataset, "files": input_files(sources), "loaders": loaders,
            "loader_code": loader_code_digest(), "options": options}
    prov["cache_key"] = cache_key(prov)
    return prov
