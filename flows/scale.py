"""`--executor dask`: a stage's fanned-out jobs (tasks/core/fanout.py) as Prefect tasks on a Dask cluster.

Each job is a task run the UI shows, retried when it fails (a worker killed mid-job: Dask reschedules it, Prefect
retries it), run on a Dask worker with as many torch threads as the worker has threads, so workers never
oversubscribe the cores. The cluster is the one at --dask-address, or a LocalCluster of --dask-workers processes on
127.0.0.1 that lives as long as the stage's jobs. Nothing here starts unless a stage fans out.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from tasks.core.config import RunConfig
from tasks.core.fanout import Mapper
from tasks.core.progress import tqdm
from tasks.core.threads import set_threads, usable_cpus

log = logging.getLogger("clearflow")
CONNECT_TIMEOUT_S = 10  # an unreachable scheduler is said within this, never a hang
JOB_RETRIES = 2
# Dask's statistical profiler samples the worker's stacks every 10 ms: measured, it made a 1-thread worker extract
# ~20% slower than one local process (16.5 s vs 13.3 s for 4 shards). Off in the local cluster unless exported.
PROFILER = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"
# Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's adaptive mmap threshold:
# every tensor over 128 KiB is then mmapped and unmapped again, page faults and all. Measured: the extraction's
# forward pass 1.70 s in such a worker, 1.25 s without it, 1.19 s in a plain process. Not set unless exported.
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"


def local_cluster_config() -> dict[str, Any]:
    """The Dask config the local cluster's nannies and workers start with (what the user exported wins)."""
    config: dict[str, Any] = {}
    if PROFILER not in os.environ:
        config["distributed.worker.profile.enabled"] = False
    if MALLOC_TRIM not in os.environ:
        config[f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM}"] = None  # None: the nanny does not set it
    return config


def run_job(fn: Callable[[Any], Any], job: Any, threads: int) -> Any:
    """On the worker: torch on the worker's threads, then the job."""
    set_threads(threads)
    return fn(job)


def prefect_api_url() -> str | None:
    """The Prefect API this process reports to: the configured one, else the temporary server Prefect runs for this
    process (started now if it is not yet running, as Prefect would for its first task run); None if neither."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            return str(client.api_url)
    except ValueError:  # no API configured and temporary servers turned off
        return None


@contextmanager
def _reporting_to(api: str | None) -> Iterator[None]:
    """Name this process's API in its Prefect settings while jobs go out: each task run carries these settings to
    its worker, and a worker whose settings name no API starts a temporary server of its own (~10 s per worker,
    measured; its task runs then never reach this process's UI)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if api is None or get_current_settings().api.url:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: api}):
        yield


def _local(url: str) -> bool:
    return "127.0.0.1" in url or "localhost" in url


def _runner(cfg: RunConfig, api: str | None) -> tuple[Any, int]:
    """The DaskTaskRunner for cfg and the torch threads each of its workers gets (--threads, else the CPUs shared
    out over a local cluster's workers, else 1). The workers report their task runs to this process's Prefect API."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise RuntimeError("--executor dask needs the dask extra: pip install 'clearflow[dask]'") from err
    quiet = "DASK_LOGGING__DISTRIBUTED" not in os.environ
    if quiet:  # distributed's own INFO lines (nannies, comms) only when asked for, Dask's way; its warnings always
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if cfg.dask_address:
        if not _local(cfg.dask_address) and (api is None or _local(api)):
            log.warning("the Dask workers at %s report to the Prefect API at %s: it must be reachable from them"
                        " (set PREFECT_API_URL to a server they can reach)", cfg.dask_address, api)
        return DaskTaskRunner(address=cfg.dask_address, client_kwargs={"timeout": CONNECT_TIMEOUT_S}), cfg.threads or 1
    workers = cfg.dask_workers or usable_cpus()
    threads = cfg.threads or max(1, usable_cpus() // workers)  # --threads: per worker
    kwargs = {"n_workers": workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
              "dashboard_address": "127.0.0.1:0", "memory_limit": 0,
              "env": ({"PREFECT_API_URL": api} if api else {})
              | ({"DASK_LOGGING__DISTRIBUTED": "warning"} if quiet else {})}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs), threads


def _unreachable(address: str, err: BaseException) -> RuntimeError:
    return RuntimeError(f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT_S} s"
                        f" ({type(err).__name__}): start it (`dask scheduler`), or leave out --dask-address for a"
                        " local cluster")


def check_scheduler(cfg: RunConfig) -> None:
    """Before any flow starts: a TCP connection to --dask-address, so a wrong address is said in seconds."""
    if cfg.executor != "dask" or not cfg.dask_address:
        return
    where = urlsplit(cfg.dask_address if "://" in cfg.dask_address else f"tcp://{cfg.dask_address}")
    try:
        socket.create_connection((where.hostname, where.port or 8786), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise _unreachable(cfg.dask_address, err) from None


_STARTING = threading.Lock()  # parallel seeds start their clusters one at a time, under the same Dask config


def _start(runner: Any, cfg: RunConfig) -> Any:
    """Enter the runner (connect or start the cluster; its nannies read the local cluster's config as they are built
    and keep it for the workers they restart); an unreachable scheduler is one clear line."""
    import dask

    try:
        with _STARTING, dask.config.set(local_cluster_config()):
            started = runner.__enter__()
            started.client  # noqa: B018  (the runner connects, or starts its cluster, on first use: here)
        return started
    except (OSError, TimeoutError) as err:
        raise _unreachable(str(cfg.dask_address), err) from None


@contextmanager
def _environ_kept() -> Iterator[None]:
    """Undo what the cluster writes into this process's environment: distributed's nannies set their
    pre-spawn-environ (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, ...) in os.environ before each worker starts and leave
    it there, which would pin every later stage and child process of the command to one thread."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)


def dask_mapper(cfg: RunConfig) -> Mapper:
    """A mapper that runs each job as a Prefect task on the configured Dask cluster, results in the jobs' order."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def run(fn: Callable[[Any], Any], jobs: Sequence[Any], name: str) -> list[Any]:
        api = prefect_api_url()
        runner, threads = _runner(cfg, api)
        job_task = task(run_job, name=name, cache_policy=NO_CACHE, retries=JOB_RETRIES, retry_delay_seconds=1)
        with _environ_kept(), _reporting_to(api):
            return _map(runner, cfg, job_task, fn, jobs, name, threads)

    return run


def _map(runner: Any, cfg: RunConfig, job_task: Any, fn: Callable[[Any], Any], jobs: Sequence[Any], name: str,
         threads: int) -> list[Any]:
    """Start the runner, map the jobs over it as task runs and collect their results in order, then stop it."""
    from prefect.utilities.annotations import unmapped

    started = _start(runner, cfg)
    try:
        where = cfg.dask_address or f"a local cluster of {cfg.dask_workers or usable_cpus()} workers"
        log.info("%s: %d jobs on %s (%d torch thread(s) per worker)", name, len(jobs), where, threads)
        futures = started.map(job_task, {"fn": unmapped(fn), "job": list(jobs), "threads": unmapped(threads)})
        results = []
        with tqdm(total=len(jobs), desc=name, unit="job", dynamic_ncols=True) as bar:
            for future in futures:
                results.append(future.result())
                bar.update(1)
        return results
    finally:
        runner.__exit__(None, None, None)
