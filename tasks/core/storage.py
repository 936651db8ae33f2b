"""Run directories and atomic table I/O, so a crash never leaves a half-written table."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.layout import LAYOUT, artifact
from schemas.tables import TABLES

log = logging.getLogger(__name__)


def text_key(text: str) -> str:
    """Content key of a text: identical sentences share one cached activation."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    """Hash of a file's bytes, for provenance in the manifest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    """The process's umask (read once at import: reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def cache_root() -> Path:
    """Where clearflow keeps what it computes once per machine (models, stores, replies); CLEARFLOW_CACHE overrides."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clearflow"
    return Path(os.environ.get("CLEARFLOW_CACHE", default))


@contextlib.contextmanager
def key_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock file across processes while building a shared cache entry, so a second run on the
    same key waits for the first (saying so) and then finds the entry complete instead of racing it."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), is_singleton=True)  # one object per path in a process: nested holds re-enter
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another process is writing it; waiting (lock %s)", what, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it 0600: give it the mode any new file of this user gets
            tmp_path.chmod(0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def to_arrow(data: pa.Table | pl.DataFrame | list[dict], schema: pa.Schema) -> pa.Table:
    """Coerce rows or frames to exactly `schema` (column order and types), failing loudly."""
    if isinstance(data, list):
        return pa.Table.from_pylist(data, schema=schema)
    if isinstance(data, pl.DataFrame):
        data = data.to_arrow()
    missing = [n for n in schema.names if n not in data.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing} required by its schema")
    return data.select(schema.names).cast(schema)


def write_parquet(data: pa.Table | pl.DataFrame | list[dict], path: Path, schema: pa.Schema, **kwargs: Any) -> Path:
    """Write a table atomically (temp file, then rename) after casting it to its schema."""
    table = to_arrow(data, schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", **kwargs)
    return Path(path)


def write_json(obj: Any, path: Path) -> Path:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return Path(path)


def read_table(path: Path) -> pl.DataFrame:
    """Read a Parquet table (file or hive directory) as a polars frame."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes it first")
    return pl.read_parquet(path)


def read_optional_table(path: Path) -> pl.DataFrame | None:
    """A table its reader can do without (a stage that did not run), or None when it is absent."""
    return read_table(path) if Path(path).exists() else None


@dataclass(frozen=True)
class RunPaths:
    """Where each artifact of a run lives: the paths of schemas/layout.py under one run directory."""

    root: Path

    def artifact(self, name: str) -> Path:
        return self.root / artifact(name).path

    def table(self, name: str) -> Path:
        """A table's Parquet file; refuses names that are not tables (a directory or JSON file is no table)."""
        if name not in LAYOUT or LAYOUT[name].kind != "table":
            raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}")
        return self.artifact(name)

    @property
    def manifest(self) -> Path:
        return self.artifact("manifest")

    @property
    def ingest_provenance(self) -> Path:
        return self.artifact("ingest_provenance")

    @property
    def activations(self) -> Path:
        return self.artifact("activations")

    @property
    def probes(self) -> Path:
        return self.artifact("probes")

    @property
    def best_probe(self) -> Path:
        return self.artifact("best_probe")

    @property
    def adapters(self) -> Path:
        return self.artifact("adapters")

    def arm_adapter(self, arm: str) -> Path:
        """The adapter directory of one fine-tuning arm."""
        return self.adapters / arm

    @property
    def train_log(self) -> Path:
        return self.artifact("train_log")

    @property
    def quality(self) -> Path:
        return self.artifact("quality")

    @property
    def figures(self) -> Path:
        return self.artifact("figures")

    @property
    def report(self) -> Path:
        return self.artifact("report")

    @property
    def catalog(self) -> Path:
        return self.artifact("catalog")


def model_slug(name: str) -> str:
    """A filesystem- and hive-safe name for a model id or path."""
    base = Path(name).name if os.sep in name and Path(name).exists() else name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base).strip("-") or "model"
