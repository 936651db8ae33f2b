"""Stopping a `clearflow run` from outside (issue 12): SIGTERM ends it with one line and exit code 143, and neither
SIGTERM nor `kill -9` leaves its temporary Prefect server (or any other child) running or holding its port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tasks.core.storage import RunPaths

REPO = Path(__file__).resolve().parents[1]


def _start_run(tiny_model: str, runs: Path) -> subprocess.Popen:
    """`clearflow run` on the tiny model, as a user starts it (its own process, output captured)."""
    cmd = [sys.executable, "-m", "flows.cli", "run", "--run", "r", "--runs-dir", str(runs), "--limit", "60",
           "--model.name", tiny_model]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children_mid_run(proc: subprocess.Popen, runs: Path) -> list[psutil.Process]:
    """Wait until the run is past ingest (its Prefect server up, a stage under way); its descendants then."""
    items = RunPaths(runs / "r").table("items")
    deadline = time.monotonic() + 240
    while not items.exists():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run never finished ingest"
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children), "no temporary Prefect server was running"
    return children


def _server_port(children: list[psutil.Process]) -> int:
    cmdline = next(c.cmdline() for c in children if "uvicorn" in " ".join(c.cmdline()))
    return int(cmdline[cmdline.index("--port") + 1])


def _all_gone(children: list[psutil.Process], within: float) -> list[str]:
    """The children still alive after `within` seconds (zombies count as gone: they hold no port and run nothing)."""
    deadline = time.monotonic() + within
    while True:
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return [" ".join(c.cmdline()[:4]) for c in alive]
        time.sleep(0.2)


def _port_free(port: int) -> bool:
    """Whether a server could listen on the port again (SO_REUSEADDR, as servers bind: connections the old server
    closed may linger in TIME_WAIT, a listening socket may not)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopping_a_run_leaves_no_child_alive(tiny_model, tmp_path, how):
    runs = tmp_path / "runs"
    proc = _start_run(tiny_model, runs)
    try:
        children = _children_mid_run(proc, runs)
        port = _server_port(children)
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "SIGTERM":
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1] == ("clearflow: stopped by SIGTERM; the same command resumes (finished"
                                                " stages are kept)"), err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert _all_gone(children, within=10) == []
    assert _port_free(port)
    assert not list(runs.rglob("*.tmp")) and not list(runs.rglob(".*.partial-*"))  # no half-written table left
