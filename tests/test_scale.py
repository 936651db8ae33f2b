"""Scale-out (issue 14): activation shards as Prefect tasks on a real Dask LocalCluster of 2 worker processes on
127.0.0.1, started by the command under test; the tables must equal those the local executor writes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from tasks.core.activation_store import SHARD_GLOB

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ["--limit", "16", "--activations.shard-rows", "4", "--activations.positions", "last,ctx_last"]


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory, tiny_model) -> tuple[Path, dict[str, str]]:
    """A run directory with ingest and decompose done (in-process, no orchestrator): what activations reads."""
    from flows.execute import run_stage_with
    from tasks.core.config import RunConfig

    root = tmp_path_factory.mktemp("scale")
    cfg = RunConfig.model_validate({"run": "r", "runs_dir": str(root / "runs"), "limit": 16,
                                    "model": {"name": tiny_model}})
    for stage in ("ingest", "decompose"):
        run_stage_with(stage, cfg, False)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return root, env | {"CLEARFLOW_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}


def _activations(root: Path, env: dict, store: Path, *extra: str, wait: bool = True):
    """`clearflow stage activations` on the decomposed run into its own store."""
    cmd = [sys.executable, "-m", "flows.cli", "stage", "activations", "--run", "r", "--runs-dir", str(root / "runs"),
           *OPTIONS, "--activations.store", str(store), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _store_tables(store: Path) -> dict[str, object]:
    """Every shard file of the one store under `store`, by its path below the store directory."""
    (key,) = [d for d in store.iterdir() if d.is_dir()]
    assert (key / "meta.json").exists()
    return {str(p.relative_to(key)): pq.read_table(p) for p in sorted(key.glob(f"layer=*/{SHARD_GLOB}"))}


def _assert_same_tables(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) and len(want) >= 4  # several shards and layers
    for name, table in want.items():
        other = got[name]
        for column in ("key", "source", "position", "context_key"):
            assert other[column].to_pylist() == table[column].to_pylist(), (name, column)
        a = np.stack(table["vector"].to_numpy(zero_copy_only=False))
        b = np.stack(other["vector"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def local_tables(decomposed) -> dict:
    root, env = decomposed
    _activations(root, env, root / "store-local")
    return _store_tables(root / "store-local")


def test_dask_executor_writes_the_tables_the_local_one_does(decomposed, local_tables):
    root, env = decomposed
    done = _activations(root, env, root / "store-dask", "--executor", "dask", "--dask-workers", "2")
    said = done.stdout + done.stderr
    assert "jobs on a local cluster of 2 workers" in said, said[-3000:]
    _assert_same_tables(_store_tables(root / "store-dask"), local_tables)


def _dask_workers(parent: psutil.Process) -> list[psutil.Process]:
    """The LocalCluster's worker processes: children the command's in-process nannies spawned."""
    found = []
    for child in parent.children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_dask_worker_killed_mid_extraction_is_replaced_and_the_tables_are_whole(decomposed, local_tables):
    """kill -9 of one worker once the shards are handed out: the run finishes (Dask reschedules, Prefect retries),
    with every shard once and the local executor's vectors."""
    root, env = decomposed
    proc = _activations(root, env, root / "store-killed", "--executor", "dask", "--dask-workers", "2", wait=False)
    out: list[str] = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "jobs on a local cluster" in line:
                break
        parent, store = psutil.Process(proc.pid), root / "store-killed"
        workers: list[psutil.Process] = []
        for _ in range(1200):  # until a worker has written a shard: extraction is under way
            workers = _dask_workers(parent)
            if len(workers) >= 2 and list(store.rglob(SHARD_GLOB)):
                break
            time.sleep(0.05)
        assert workers, "no Dask worker process found:\n" + "".join(out)[-3000:]
        assert not list(store.rglob("meta.json")), "the kill came after the store was complete:\n" + "".join(out)
        os.kill(workers[0].pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=400)
        out.append(rest)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = "".join(out)
    assert proc.returncode == 0, said[-5000:]
    _assert_same_tables(_store_tables(root / "store-killed"), local_tables)
    assert not list((root / "store-killed").rglob("*.tmp"))


def test_an_unreachable_dask_scheduler_is_one_clear_line(decomposed):
    root, env = decomposed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "flows.cli", "stage", "activations", "--run", "r", "--runs-dir", str(root / "runs"),
           *OPTIONS, "--activations.store", str(root / "store-nowhere"), "--executor", "dask", "--dask-address",
           f"tcp://127.0.0.1:{port}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within 10 s" in last, done.stderr[-3000:]
