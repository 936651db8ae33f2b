"""Child processes that end with the clearflow process that started them, however it ends.

Prefect starts a temporary API server (uvicorn) in a child process for every CLI call that runs a flow, and stops
it from an `atexit` hook. SIGTERM (turned into an exception by the CLI) runs that hook; `kill -9` runs nothing,
and the server would live on, holding its port. On Linux the server is therefore started with the parent-death
signal set (prctl PR_SET_PDEATHSIG): the kernel sends it SIGTERM the moment its parent dies.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM to it when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _with_parent_death(start: Callable[..., subprocess.Popen]) -> Callable[..., subprocess.Popen]:
    """Wrap a method that starts a child with `subprocess.Popen` so that the child gets the parent-death signal."""

    @wraps(start)
    def run(*args: Any, **kwargs: Any) -> subprocess.Popen:
        popen = subprocess.Popen

        def popen_dying_with_parent(*a: Any, **kw: Any) -> subprocess.Popen:
            kw.setdefault("preexec_fn", _die_with_parent)
            return popen(*a, **kw)

        subprocess.Popen = popen_dying_with_parent  # the method calls subprocess.Popen once, right now
        try:
            return start(*args, **kwargs)
        finally:
            subprocess.Popen = popen

    run.__clearflow_parent_death__ = True
    return run


def tie_prefect_server_to_this_process() -> None:
    """Make the temporary Prefect server that this process may start die with it (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    start = SubprocessASGIServer._run_uvicorn_command
    if not getattr(start, "__clearflow_parent_death__", False):
        SubprocessASGIServer._run_uvicorn_command = _with_parent_death(start)


def prepare_orchestrator() -> None:
    """Call before the first flow of a command: without a Prefect server to talk to (no PREFECT_API_URL), Prefect
    starts a temporary one, which must die with this process. Importing Prefect's server module costs seconds, so
    only commands about to run a flow pay it."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        tie_prefect_server_to_this_process()
