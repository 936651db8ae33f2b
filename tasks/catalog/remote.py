"""`clearflow sql --store URL`: the activations views read the remote store's shards where they lie, through the
store's fsspec file system registered on DuckDB's connection, instead of the runs' local copies.

A run's `activations/model=<slug>/meta.json` names the store key its vectors came from (stores are content
addressed, so a local and a remote store of the same inputs share it); the remote view reads `<URL>/<key>/`.
Reads stay confined: the remote prefix joins DuckDB's allowed_directories, and nothing outside it can be read.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from tasks.core.activation_store import SHARD_GLOB, ActivationStore
from tasks.core.remote_store import filesystem, is_remote
from tasks.core.storage import RunPaths


def check_store_url(url: str) -> str:
    """The URL without a trailing slash, refused unless it names a remote store."""
    if not is_remote(url):
        raise ValueError(f"--store {url!r}: give a remote store URL (s3://bucket/prefix); a local store is read"
                         " through the runs that link it")
    return url.rstrip("/")


def register(con: duckdb.DuckDBPyConnection, url: str) -> None:
    """Let DuckDB read the store's URLs through its fsspec file system (before the configuration is locked)."""
    fs, _ = filesystem(url)
    con.register_filesystem(fs)


def readable_prefixes(url: str) -> list[str]:
    """The store's prefix as DuckDB may see it: as given, and as fsspec writes the paths a glob expands to."""
    fs, root = filesystem(url)
    return sorted({url.rstrip("/") + "/", fs.unstrip_protocol(root).rstrip("/") + "/"})


def run_store_globs(run_root: Path, url: str) -> list[tuple[str, str]]:
    """(model slug, shard glob under the remote store) for every model whose activations the run holds."""
    out = []
    for store in ActivationStore.tree(RunPaths(run_root).activations):
        if not store.meta_path.exists():
            continue  # an unfinished model directory: the local view skips it too (it has no shards)
        key = store.meta().get("store_key")
        if not key:
            raise ValueError(f"run {run_root.name}: its {store.key} activations predate store keys; query them"
                             " without --store")
        out.append((store.slug, f"{url}/{key}/layer=*/{SHARD_GLOB}"))
    return out
