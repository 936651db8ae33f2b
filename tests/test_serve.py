"""`clearflow serve` against a real local Prefect server: deployments, schedule, and a triggered run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows.stages import ORDER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture()
def prefect_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 90, "the Prefect server")
        yield api, env
    finally:
        _stop(server)


def test_serve_registers_scheduled_pipeline_and_runs_a_stage_on_demand(prefect_server, tmp_path, tiny_model):
    api, env = prefect_server
    runs = tmp_path / "runs"
    env = {**env, "PREFECT_API_URL": api}
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--cron", "15 4 * * *", "--limit", "30",
         "--runs-dir", str(runs), "--model.name", tiny_model],
        env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        def deployments():
            found = httpx.post(f"{api}/deployments/filter", json={}, timeout=5).json()
            return found if len(found) == len(ORDER) + 1 else None

        found = _wait(deployments, 120, f"{len(ORDER) + 1} deployments (pipeline + {len(ORDER)} stages)")
        by_flow = {}
        for d in found:
            flow = httpx.get(f"{api}/flows/{d['flow_id']}", timeout=5).json()
            by_flow[flow["name"]] = d
        assert set(by_flow) == {"pipeline", *ORDER}
        crons = [s["schedule"]["cron"] for s in by_flow["pipeline"]["schedules"]]
        assert crons == ["15 4 * * *"]
        assert by_flow["ingest"]["parameters"]["cfg"]["limit"] == 30

        params = {"cfg": {**by_flow["ingest"]["parameters"]["cfg"], "run": "served"}}
        def created():  # a loaded machine's API can answer an error body (no id) once: ask again, as a client would
            reply = httpx.post(f"{api}/deployments/{by_flow['ingest']['id']}/create_flow_run",
                               json={"parameters": params}, timeout=5).json()
            return reply if "id" in reply else None

        run = _wait(created, 60, "the ingest flow run's creation")

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5).json()["state"]["type"]
            return state if state in ("COMPLETED", "FAILED", "CRASHED") else None

        state = _wait(finished, 120, "the triggered ingest run")
        if state != "COMPLETED":
            _stop(serve)
            pytest.fail(f"the served ingest run ended {state}:\n{serve.stderr.read().decode()[-3000:]}")
        manifest = json.loads((runs / "served" / "manifest.json").read_text())
        assert "ingest" in manifest["stages"] and (runs / "served" / "items.parquet").exists()
    finally:
        _stop(serve)
