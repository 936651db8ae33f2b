"""Thread policy of the compute libraries, set before torch loads: one busy neighbour must cost a fair share, not 18x.

OpenMP's default is to spin-wait between parallel regions. On a shared machine a spinning thread competes with
the other process for the core its partner waits on, and a SmolLM2 forward pass on 2 cores beside one busy
process ran 18x slower than alone (issue 12). Passive waiting (threads sleep instead) and a thread count taken
from the CPUs this process may actually use (its affinity mask and cgroup quota, not the host's core count)
bring that down to the fair share. Whatever the user exported (OMP_WAIT_POLICY, OMP_NUM_THREADS) wins, and
CLEARFLOW_THREAD_POLICY=default keeps the libraries' own defaults; the
`--threads N` option sets torch's thread count for a run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


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
    if os.environ.get("CLEARFLOW_THREAD_POLICY") == "default":
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus()))


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads for this run (`--threads`); None keeps the policy's count."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
