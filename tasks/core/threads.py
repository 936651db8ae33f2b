"""Thread policy of the compute libraries: one busy neighbour must cost a fair share, not 18x.

OpenMP's default is to spin-wait between parallel regions, and every parallel region waits for its slowest
thread. On a shared machine the scheduler parks one of them for the neighbour, and a SmolLM2 forward pass on 2
cores beside one busy process ran 18x slower than alone (issue 12). So, before torch loads, clearflow sets passive
waiting (threads sleep instead of spinning) and a thread count from the CPUs this process may use (its affinity
mask and cgroup quota, not the host's core count); and when a stage starts it uses as many threads as CPUs the
other processes leave free at that moment (`set_threads`; a reading under 5 s old is reused). Whatever the user
exported (OMP_WAIT_POLICY, OMP_NUM_THREADS) wins, `--threads N` fixes the count for a run, and
CLEARFLOW_THREAD_POLICY=default keeps the libraries' own defaults.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
_user_set_threads = False  # OMP_NUM_THREADS was exported before clearflow set it: the user's count stands
READING_REUSE_S = 5.0  # a stage starting this soon after the last load reading takes it (no new 0.2 s sample)
_last_reading: tuple[float, int] | None = None  # (_clock() when sampled, free CPUs)
_clock = time.monotonic


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, lowered to the cgroup v2 CPU quota where one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def apply_env_policy() -> None:
    """Passive OpenMP waiting and a thread count that fits the process's CPUs, unless the user set them (or set
    CLEARFLOW_THREAD_POLICY=default: the libraries' own defaults); must run before torch (or anything else that
    loads OpenMP) is imported to take effect."""
    global _user_set_threads
    _user_set_threads = "OMP_NUM_THREADS" in os.environ
    if os.environ.get("CLEARFLOW_THREAD_POLICY") == "default":
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus()))


def free_cpus(sample_seconds: float = 0.2) -> int:
    """CPUs of this process's share that other processes are not keeping busy right now (at least one)."""
    import psutil

    others = [p for p in psutil.process_iter() if p.pid != os.getpid()]
    for p in others:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)  # starts each process's sample
    time.sleep(sample_seconds)
    busy = 0.0
    for p in others:
        with contextlib.suppress(psutil.Error):
            busy += p.cpu_percent(None) / 100
    return max(1, usable_cpus() - round(busy))


def recent_free_cpus() -> int:
    """free_cpus(), or the reading taken under READING_REUSE_S ago: stages that start in quick succession (small
    ones, a pipeline on few items) would otherwise each sleep 0.2 s to learn what the last one just measured."""
    global _last_reading
    now = _clock()
    if _last_reading is None or now - _last_reading[0] > READING_REUSE_S:
        _last_reading = (now, free_cpus())
    return _last_reading[1]


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads for the work about to start: `--threads` when given, else (unless
    CLEARFLOW_THREAD_POLICY=default, or OMP_NUM_THREADS was exported) the CPUs other processes leave free now:
    threads that must meet at every parallel region run at the pace of the one the scheduler parks."""
    if threads is None and os.environ.get("CLEARFLOW_THREAD_POLICY") != "default" and not _user_set_threads:
        threads = recent_free_cpus()
        if threads < current_threads():
            log.info("threads: %d (other processes keep %d of %d CPUs busy)", threads, usable_cpus() - threads,
                     usable_cpus())
    if threads is not None:
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        else:  # torch reads it when it loads: a stage that never needs torch (the report) does not pay its import
            os.environ["OMP_NUM_THREADS"] = str(threads)
    return current_threads()


def current_threads() -> int:
    """torch's intra-op thread count, or the count it will take when it loads."""
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    return int(os.environ.get("OMP_NUM_THREADS") or usable_cpus())
