"""Where ingested data came from, and a content-addressed cache so the same file is never parsed twice.

The cache key is the sha256 of every input file plus the loader versions and every option that changes the
tables (limit, seed, context budget, truncation, the model whose window bounds a context). A hit copies the
three ingest tables from `<cache>/ingest/<key>/` into the run: no file is parsed, no model is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.config import RunConfig
from tasks.core.models import cache_root
from tasks.core.storage import atomic_path, file_sha256, write_json

PROMPT_RESERVE = 256  # tokens of the model's window left for the system line, question and answer


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """A file's sha256, hashed once per version of the file: a run checks its inputs' hashes several times
    (stage fingerprint before and after, provenance), and an edit changes size or mtime."""
    return file_sha256(Path(path))


def file_record(path: Path, role: str) -> dict[str, Any]:
    """Provenance of one input file: its resolved path, size and sha256."""
    path = Path(path).expanduser()
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


def loader_code_digest() -> str:
    """Hash of the readers' source and the table schemas: an edited reader never serves a stale cache entry."""
    import schemas.rejects
    import schemas.tables
    import tasks.core.splitter
    import tasks.core.text

    shared = [schemas.tables, schemas.rejects, tasks.core.splitter, tasks.core.text]  # what the readers build on
    sources = sorted((Path(__file__).resolve().parent / "formats").glob("*.py")) + [Path(m.__file__) for m in shared]
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
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


# Datasets whose reader yields probe statements; any other dataset borrows them from one of these.
PROBE_SOURCES = ("known-facts", "mquake")


def reader_for(name: str):
    """The registered reader of a dataset name, or one clear error listing the names there are."""
    from tasks.ingest.formats import READERS

    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; supported datasets: {', '.join(sorted(READERS))}")
    return READERS[name]


def probe_source(cfg: RunConfig) -> tuple[str, Path | None] | None:
    """(dataset, path) whose statements train the probes, or None when the main dataset supplies its own."""
    name = cfg.ingest.probe_dataset
    if name is None:
        return None if cfg.dataset in PROBE_SOURCES else ("known-facts", None)
    if name not in PROBE_SOURCES:
        raise ValueError(f"ingest.probe_dataset {name!r} has no probe statements; use one of {list(PROBE_SOURCES)}")
    if name == cfg.dataset and cfg.ingest.probe_data_path in (None, cfg.data_path):
        return None
    return name, cfg.ingest.probe_data_path


def input_files(cfg: RunConfig) -> list[dict[str, Any]]:
    """Provenance records of every file the ingest reads: the dataset's, then the probe statements' source."""
    reader = reader_for(cfg.dataset)
    if reader.needs_path and cfg.data_path is None:
        raise ValueError(f"dataset {cfg.dataset!r} needs --data-path (get it from {reader.source})")
    records = [file_record(p, "data") for p in reader.files(cfg.data_path)]
    probe = probe_source(cfg)
    if probe is not None:
        probe_reader = reader_for(probe[0])
        if probe_reader.needs_path and probe[1] is None:
            raise ValueError(f"ingest.probe_dataset {probe[0]!r} needs --ingest.probe-data-path")
        records += [file_record(p, "probe") for p in probe_reader.files(probe[1])]
    return records


def input_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The ingest stage's outside inputs: file contents and the model window that bounds a context."""
    return {"files": [(f["role"], f["sha256"]) for f in input_files(cfg)], "budget": budget_options(cfg)}
