"""An activation store on object storage (`--activations.store s3://bucket/prefix`, or any fsspec URL), mirrored in
a local cache.

The remote copy is what machines share; the mirror (``<cache>/remote/<protocol>/<bucket>/<prefix>``) is what probes,
runs and DuckDB read, with the local store's layout, so nothing downstream knows the difference. The guarantees are
the local store's: a shard file is uploaded to a temporary key and then moved to its name, so a reader never sees
half of one; `meta.json` is uploaded last, only after the remote listing has been checked against the finished local
store (every file there, same size); a killed run resumes from the shards either copy holds.

The endpoint and credentials come from the environment, the AWS SDK's way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY or AWS_PROFILE); an unreachable endpoint, missing credentials and a missing bucket are each one
clear line within seconds (`check_remote`), before any flow starts.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.core.storage import atomic_path, cache_root

log = logging.getLogger(__name__)
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}  # no hang on a dead endpoint
CHECK_READ_TIMEOUT = 5  # the first contact: an endpoint that accepts but never answers is said in ~10 s
META = "meta.json"
TEMP = ".tmp"  # the prefix, inside a store, of uploads not yet published
_UPLOADER: ThreadPoolExecutor | None = None  # one upload thread per process, started by the first upload
_PENDING: dict[str, list[Future]] = {}  # per remote store directory, its queued uploads


def is_remote(store: str | Path | None) -> bool:
    """Whether a configured store is a URL of a remote file system (file:// and plain paths are local)."""
    return store is not None and "://" in str(store) and not str(store).startswith("file://")


def mirror_root(url: str) -> Path:
    """The local directory that mirrors a remote store root."""
    parts = urlsplit(url)
    return cache_root() / "remote" / parts.scheme / parts.netloc / parts.path.strip("/")


@lru_cache(maxsize=8)
def _filesystem(url: str, read_timeout: int | None = None) -> tuple[Any, str]:
    """The fsspec file system of a URL (the dependency is the s3 extra's) and the root path in it; a read_timeout
    also turns off s3fs's own retries (for the first contact)."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as err:  # pragma: no cover - fsspec comes with the s3 extra
        raise RuntimeError(f"{url}: a remote store needs the s3 extra: pip install 'clearflow[s3]'") from err
    s3 = urlsplit(url).scheme in ("s3", "s3a")
    config = S3_CONFIG | ({"read_timeout": read_timeout} if read_timeout else {})
    try:
        fs, root = url_to_fs(url, **({"config_kwargs": config} if s3 else {}))
    except ImportError as err:
        raise RuntimeError(f"{url}: {err} (the s3 extra: pip install 'clearflow[s3]')") from None
    if s3 and read_timeout:
        fs.retries = 1
    return fs, root.rstrip("/")


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system a remote store URL lives on, and the store root's path in it."""
    return _filesystem(url)


def remote_error(url: str, err: BaseException) -> RuntimeError:
    """One line that says what is wrong with a remote store and what to do."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        why = "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    elif names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ConnectionRefusedError"}:
        why = f"cannot reach the endpoint ({_endpoint()}; set AWS_ENDPOINT_URL for another)"
    elif names & {"ReadTimeoutError", "SocketTimeoutError", "TimeoutError", "FSTimeoutError"}:
        why = f"the endpoint ({_endpoint()}) accepts connections but does not answer: is it an S3 server?"
    elif isinstance(err, FileNotFoundError):
        why = f"bucket {urlsplit(url).netloc!r} does not exist: create it, or name another"
    elif isinstance(err, PermissionError):
        why = "access denied: check the credentials' rights on the bucket"
    else:
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return RuntimeError(f"activation store {url}: {why}")


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default"


def check_remote(url: str) -> None:
    """Reach the store's bucket once, before any work, so a wrong endpoint, key or bucket is said at once."""
    fs, root = _filesystem(url, CHECK_READ_TIMEOUT)
    bucket = root.split("/", 1)[0]
    try:
        if hasattr(fs, "call_s3"):
            fs.call_s3("head_bucket", Bucket=bucket)
        else:
            fs.ls(bucket)
    except Exception as err:  # noqa: BLE001 - every failure becomes the one line below
        raise remote_error(url, _unwrap(err)) from None


def _unwrap(err: BaseException) -> BaseException:
    """s3fs raises some botocore errors as OSError with the cause attached: the cause names the problem."""
    cause = err.__cause__ or err.__context__
    return cause if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, PermissionError)) and cause \
        else err


class Remote:
    """The remote copy of one store directory, `<url>/<key>`, and its local mirror `local_dir`."""

    def __init__(self, url: str, key: str, local_dir: Path):
        self.url, self.key, self.local_dir = url.rstrip("/"), key, Path(local_dir)
        self.fs, root = _filesystem(self.url)
        self.dir = f"{root}/{key}"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise RuntimeError(f"{remote_error(self.url, _unwrap(err))} (while {what})") from err

    def listing(self) -> dict[str, int]:
        """Relative path -> size of every finished file of the remote store (temporary keys left out), as the
        server has it now (not fsspec's cached listing: other processes write here too)."""
        self.fs.invalidate_cache(self.dir)
        if not self._call("listing", self.fs.exists, self.dir):
            return {}
        found = self._call("listing", self.fs.find, self.dir, detail=True)
        relative = {path[len(self.dir) + 1:]: int(info["size"]) for path, info in found.items()}
        return {path: size for path, size in relative.items() if not path.startswith(f"{TEMP}/")}

    def complete(self) -> bool:
        self.fs.invalidate_cache(self.dir)
        return bool(self._call("checking", self.fs.exists, f"{self.dir}/{META}"))

    def push(self, *relatives: str) -> None:
        """Upload local files: each under the temporary prefix `.tmp/`, then copied to its name (a reader never sees
        a part); the files go together (s3fs sends them concurrently, and deletes the temporary keys in one request).
        fsspec pairs list arguments after sorting them, so the lists are sorted and share their order."""
        relatives = sorted(relatives)
        targets = [f"{self.dir}/{r}" for r in relatives]
        temps = [f"{self.dir}/{TEMP}/{r}" for r in relatives]
        what = relatives[0] if len(relatives) == 1 else f"{len(relatives)} files"
        self._call(f"uploading {what}", self.fs.put, [str(self.local_dir / r) for r in relatives], temps)
        self._call(f"publishing {what}", self.fs.copy, temps, targets)
        self._call(f"publishing {what}", self.fs.rm, temps)

    def push_later(self, *relatives: str) -> None:
        """`push` on this process's upload thread, so the next shard's forward passes overlap the upload; `wait`
        collects it."""
        global _UPLOADER
        _UPLOADER = _UPLOADER or ThreadPoolExecutor(1, thread_name_prefix="clearflow-upload")
        _PENDING.setdefault(self.dir, []).append(_UPLOADER.submit(self.push, *relatives))

    def wait(self) -> None:
        """Until every upload `push_later` queued for this store is done; the first failure is raised."""
        for future in _PENDING.pop(self.dir, []):
            future.result()

    def pull(self) -> int:
        """Download every finished remote file the mirror lacks (meta.json only once all the rest are here)."""
        listing = self.listing()
        files = sorted((p for p in listing if p != META and not (self.local_dir / p).exists()))
        for relative in files + ([META] if META in listing and not (self.local_dir / META).exists() else []):
            with atomic_path(self.local_dir / relative) as tmp:
                self._call(f"downloading {relative}", self.fs.get_file, f"{self.dir}/{relative}", str(tmp))
        if files:
            log.info("activations: %d shard files pulled from %s/%s", len(files), self.url, self.key)
        return len(files)

    def publish(self) -> None:
        """Upload what the remote copy lacks of the finished local store, check the listing, then meta.json."""
        local = {str(p.relative_to(self.local_dir)): p.stat().st_size for p in self.local_dir.rglob("*.parquet")}
        remote = self.listing()
        if missing := sorted(p for p, size in local.items() if remote.get(p) != size):
            self.push(*missing)
        remote = self.listing()
        wrong = sorted(p for p, size in local.items() if remote.get(p) != size)
        if wrong:
            raise RuntimeError(f"activation store {self.url}/{self.key}: {len(wrong)} files missing or of another size"
                               f" after upload (e.g. {wrong[:3]}): run again")
        self.push(META)
        log.info("activations: store %s published to %s (%d files)", self.key, self.url, len(local))
