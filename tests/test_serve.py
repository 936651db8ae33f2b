"""Scheduled runs against a real local Prefect server on 127.0.0.1: `prefect deploy --all` from prefect.yaml with a
process worker (as the README says), and `clearflow serve`."""

from __future__ import annotations

import json
import os
import re
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


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """One server for the module's tests (each registers its own deployments and runs into its own directory)."""
    port = _free_port()
    home = tmp_path_factory.mktemp("prefect")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
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
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        def deployments():
            only_served = {"deployments": {"name": {"any_": ["clearflow"]}}}  # not prefect.yaml's, on this server too
            found = httpx.post(f"{api}/deployments/filter", json=only_served, timeout=5).json()
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


def _prefect(env: dict, *args: str) -> str:
    """A `prefect` CLI command as the README gives it, run in the repository; its output (stdout, then stderr)."""
    done = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout + done.stderr


def _post(api: str, path: str, body: dict) -> list | dict:
    reply = httpx.post(f"{api}{path}", json=body, timeout=10)
    reply.raise_for_status()
    return reply.json()


def _final_state(api: str, run_id: str, worker: subprocess.Popen, timeout: float) -> dict:
    def finished():
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    try:
        return _wait(finished, timeout, f"flow run {run_id}")
    except AssertionError:
        _stop(worker)
        raise AssertionError(f"the worker's output:\n{worker.stdout.read().decode()[-4000:]}") from None


def _trigger(api: str, env: dict, deployment: str, params: dict) -> str:
    """`prefect deployment run NAME --params JSON`, as the README has it; the new flow run's id."""
    out = _prefect(env, "deployment", "run", deployment, "--params", json.dumps(params))
    found = re.search(r"UUID\W+([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", out)
    assert found, out
    return found.group(1)


def test_prefect_yaml_deployments_run_on_a_process_worker_with_logs_and_artifacts(prefect_server, tmp_path,
                                                                                 tiny_model):
    """The README's "Scheduled runs": create the pool, `prefect deploy --all`, start a worker, trigger runs. The
    pipeline completes on the worker; its stages' own log lines, its flow-run names and its artifacts are readable
    through the API; a current stage ends "Skipped"; a forced one runs again. Nothing is written into the repo."""
    api, env = prefect_server
    env = {**env, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    repo_before = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                                 text=True).stdout
    early = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=180)  # before the pool exists: refused, said why
    said = " ".join((early.stdout + early.stderr).split())
    assert early.returncode != 0 and "references work pool 'clearflow' which does not exist" in said, said[-2000:]
    assert not [d for d in _post(api, "/deployments/filter", {}) if d.get("work_pool_name") == "clearflow"]
    _prefect(env, "work-pool", "create", "clearflow", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all")
    deployments = {(httpx.get(f"{api}/flows/{d['flow_id']}", timeout=5).json()["name"], d["name"]): d
                   for d in _post(api, "/deployments/filter", {})}
    assert set(deployments) >= {("pipeline", "daily"), *((stage, "on-demand") for stage in ORDER)}
    daily = deployments[("pipeline", "daily")]
    assert [s["schedule"]["cron"] for s in daily["schedules"]] == ["0 3 * * *"]
    assert daily["global_concurrency_limit"]["limit"] == 1 and daily["parameters"] == {}  # no default frozen in
    for bad, said in (({"limit": 0}, "Validation failed for field 'cfg.limit'"), ({"limitt": 5}, "limitt")):
        refused = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "pipeline/daily", "--params",
                                  json.dumps({"cfg": bad})], env=env, cwd=REPO, capture_output=True, text=True,
                                 timeout=120)
        assert said in refused.stdout + refused.stderr and "UUID" not in refused.stdout, refused.stdout  # no run made

    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "clearflow"], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cfg = {"run": "w", "runs_dir": str(tmp_path / "runs"), "limit": 30, "model": {"name": tiny_model},
               "finetune": {"max_items": 4, "max_length": 256, "compile": False},
               "evaluate": {"max_new_tokens": 4, "bootstrap": 50}}
        pipeline = _trigger(api, env, "pipeline/daily", {"cfg": cfg})
        assert _final_state(api, pipeline, worker, 400)["type"] == "COMPLETED"
        skipped = _trigger(api, env, "ingest/on-demand", {"cfg": cfg})
        state = _final_state(api, skipped, worker, 200)
        assert (state["type"], state["name"]) == ("COMPLETED", "Skipped")
        forced = _trigger(api, env, "report/on-demand", {"cfg": cfg, "force": True})
        state = _final_state(api, forced, worker, 200)
        assert (state["type"], state["name"]) == ("COMPLETED", "Completed")
    finally:
        _stop(worker)

    runs = _post(api, "/flow_runs/filter", {"limit": 50})
    names = {r["name"] for r in runs}
    assert {"w: pipeline", "w: ingest", "w: activations", "w: report"} <= names, names
    logs = []
    while batch := _post(api, "/logs/filter", {"limit": 200, "offset": len(logs)}):
        logs += batch
    by_run = {r["id"]: r["name"] for r in runs}
    said = [(by_run.get(entry["flow_run_id"]), entry["name"], entry["message"]) for entry in logs]
    assert any(name == "w: activations" and logger.startswith("tasks.") and "rows in" in message
               for name, logger, message in said), said[:40]  # a stage module's own line, in its flow run
    assert any(name == "w: report" and message.startswith("report      done in") for name, _, message in said)
    keys = {a["key"] for a in _post(api, "/artifacts/filter", {"limit": 100}) if a.get("key")}
    assert {"w-metrics", "w-probe-layers", "w-report", "w-report-file", "w-ingest-quality"} <= keys, keys
    assert (tmp_path / "runs" / "w" / "report.md").exists()
    assert subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                          text=True).stdout == repo_before


def test_a_worker_started_before_the_server_says_so_and_exits(tmp_path):
    """The README's mistakes table: `prefect worker start` with no server at PREFECT_API_URL ends with one clear line
    (the timeout only guards against a hang)."""
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api", "PREFECT_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "clearflow"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and "Unable to reach the Prefect API" in said, said[-2000:]
