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


def _dask_workers(parent: psutil.Process) -> list[psutil.Process]:
    """The LocalCluster's worker processes: children the command's in-process nannies spawned (a multiprocessing
    spawn, or "dask worker [...]" where the setproctitle package is installed and distributed renames them)."""
    found = []
    for child in parent.children():
        try:
            cmdline = " ".join(child.cmdline())
            if "spawn_main" in cmdline or cmdline.startswith("dask worker"):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_dask_writes_the_local_tables_even_with_a_worker_killed_mid_extraction(decomposed, local_tables):
    """A LocalCluster of 2 worker processes writes the tables the local executor writes; kill -9 of one worker once
    the shards are handed out changes nothing: the run finishes (Dask reschedules, Prefect retries), with every
    shard once and the local executor's vectors. (One test for both: a run is ~40 s of CI.)"""
    root, env = decomposed
    proc = _activations(root, env, root / "store-killed", "--executor", "dask", "--dask-workers", "2", wait=False)
    out: list[str] = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "jobs on a local cluster of 2 workers" in line:
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


def test_local_cluster_workers_start_without_dasks_malloc_trim_and_profiler(tmp_path, monkeypatch):
    """The nannies' MALLOC_TRIM_THRESHOLD_=65536 (it made the extraction's forward pass 1.4x slower) and the
    statistical profiler are off in the local cluster's workers, and in them only: what the user exports wins, and
    this process's Dask config is as it was."""
    import dask
    import distributed  # noqa: F401  (its config defaults)

    from flows.scale import dask_mapper
    from tasks.core.config import RunConfig

    trim, profile = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_", "distributed.worker.profile.enabled"
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", raising=False)
    before = (dask.config.get(trim), dask.config.get(profile))
    cfg = RunConfig.model_validate({"run": "r", "runs_dir": str(tmp_path), "executor": "dask", "dask_workers": 1,
                                    "threads": 1})
    mapped = dask_mapper(cfg)
    assert mapped(os.getenv, ["MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS"], "environ") == [None, "1"]
    assert mapped(dask.config.get, [profile], "config") == [False]
    assert (dask.config.get(trim), dask.config.get(profile)) == before == (65536, True)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert mapped(os.getenv, ["MALLOC_TRIM_THRESHOLD_"], "environ") == ["131072"]


def _settings_api(_: object) -> tuple[str | None, bool]:
    """On a worker, inside a task run: the Prefect API the run's settings name (None: none, so it starts its own),
    and whether the model code a first model load imports (seconds) is already there."""
    import sys

    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return None if url is None else str(url), "transformers.models.llama.modeling_llama" in sys.modules


def test_a_cluster_you_run_reports_to_the_commands_prefect_api(tmp_path, monkeypatch, prefect_harness):
    """Workers started as the README says (`dask worker ... --preload flows.dask_preload`, no PREFECT_API_URL) get
    the API of the process that sends the jobs, as the CLI has it (its temporary server, named in no setting):
    otherwise each worker started a temporary server of its own (~10 s per worker, measured) and its task runs never
    reached the command's UI. The preload has imported the model code before the first job."""
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    import flows.scale
    from tasks.core.config import RunConfig

    api = str(get_current_settings().api.url)  # the session's server stands in for the command's temporary one
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with flows.scale._environ_kept(), LocalCluster(  # its nannies write OMP/MKL_NUM_THREADS=1 into os.environ
            n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
            preload=["flows.dask_preload"]) as cluster, temporary_settings(restore_defaults={PREFECT_API_URL}):
        monkeypatch.setattr(flows.scale, "prefect_api_url", lambda: api)
        cfg = RunConfig.model_validate({"run": "r", "runs_dir": str(tmp_path), "executor": "dask", "threads": 1,
                                        "dask_address": cluster.scheduler_address})
        assert flows.scale.dask_mapper(cfg)(_settings_api, [0, 1], "api") == [(api, True)] * 2
        assert get_current_settings().api.url is None  # named for the jobs only


# ---------------------------------------------------------------- the store on S3 (moto's server, on 127.0.0.1)

BUCKET = "clearflow-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(decomposed):
    """An S3-compatible server (moto, a subprocess on 127.0.0.1) with one bucket; yields the env that reaches it."""
    root, env = decomposed
    port = _free_port()
    log = open(root / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    s3_env = env | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None, (root / "moto.log").read_text()
                time.sleep(0.1)
        import boto3

        client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                              aws_secret_access_key="test", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield s3_env, client
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _remote_tables(client, prefix: str) -> dict[str, object]:
    """Every shard file of the one store under s3://BUCKET/prefix, read back from the server, by relative path."""
    import io

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])]
    (meta,) = [k for k in keys if k.endswith("/meta.json")]
    store = meta.rsplit("/", 1)[0]
    assert not [k for k in keys if "/.tmp/" in k], keys  # every upload published, none left half-done
    return {k[len(store) + 1:]: pq.read_table(io.BytesIO(client.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
            for k in sorted(keys) if k.endswith(".parquet")}


def test_a_store_on_s3_holds_the_local_tables_and_serves_another_machine_without_a_model(decomposed, local_tables,
                                                                                       s3):
    root, _ = decomposed
    env, client = s3
    url = f"s3://{BUCKET}/stores"
    _activations(root, env | {"CLEARFLOW_CACHE": str(root / "cache-a")}, url)
    _assert_same_tables(_remote_tables(client, "stores"), local_tables)
    # another machine (an empty cache): the finished remote store arrives whole, with no model loaded
    done = _activations(root, env | {"CLEARFLOW_CACHE": str(root / "cache-b")}, url)
    assert "no model loaded" in done.stdout + done.stderr
    (mirror,) = (root / "cache-b" / "remote" / "s3" / BUCKET / "stores").glob("*/meta.json")
    _assert_same_tables(_store_tables(mirror.parent.parent), local_tables)


def test_an_s3_store_resumes_from_the_shards_a_killed_run_published(decomposed, local_tables, s3):
    """A remote copy with some shards and no meta.json (a run killed mid-way, elsewhere): only the rest is extracted."""
    root, _ = decomposed
    env, client = s3
    (key,) = [d for d in (root / "store-local").iterdir() if d.is_dir()]
    published = sorted(key.glob(f"layer=*/{SHARD_GLOB}"))[::2]
    for path in published:
        client.upload_file(str(path), BUCKET, f"resume/{key.name}/{path.relative_to(key)}")
    done = _activations(root, env | {"CLEARFLOW_CACHE": str(root / "cache-c")}, f"s3://{BUCKET}/resume")
    said = done.stdout + done.stderr
    assert f"{len(published)} shard files pulled" in said, said[-3000:]
    _assert_same_tables(_remote_tables(client, "resume"), local_tables)


@pytest.mark.parametrize("fault, said", [
    ("no-endpoint", "cannot reach the endpoint"),
    ("no-credentials", "no credentials: set AWS_ACCESS_KEY_ID"),
    ("no-bucket", "bucket 'no-such-bucket' does not exist"),
])
def test_a_bad_s3_store_is_one_clear_line(decomposed, s3, fault, said):
    root, _ = decomposed
    env, _ = s3
    bucket = "no-such-bucket" if fault == "no-bucket" else BUCKET
    if fault == "no-endpoint":
        env = env | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}
    if fault == "no-credentials":
        env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    cmd = [sys.executable, "-m", "flows.cli", "stage", "activations", "--run", "r", "--runs-dir", str(root / "runs"),
           *OPTIONS, "--activations.store", f"s3://{bucket}/stores"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)  # the bound
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"activation store s3://{bucket}/stores: {said}" in last, done.stderr[-3000:]


def test_sql_reads_a_runs_activations_from_the_s3_store_and_nothing_outside_it(decomposed, local_tables, s3,
                                                                                 monkeypatch):
    """`clearflow sql --store`: DuckDB reads the run's vectors from the remote store itself (only one layer is
    uploaded, so the answers show where they came from); the example queries run unchanged; reads stay confined."""
    import duckdb

    from tasks.catalog.queries import example_sql
    from tasks.catalog.views import query

    root, _ = decomposed
    env, client = s3
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    (key,) = [d for d in (root / "store-local").iterdir() if d.is_dir()]
    layer = sorted(key.glob("layer=*"))[0]
    for path in sorted(layer.glob(SHARD_GLOB)):
        client.upload_file(str(path), BUCKET, f"sql/{key.name}/{layer.name}/{path.name}")
    client.upload_file(str(path), BUCKET, "outside/part-0.parquet")
    runs, url, rows = root / "runs", f"s3://{BUCKET}/sql", "SELECT * FROM activations ORDER BY ALL"
    local_cols, local = query(rows, runs, run="r")
    cols, got = query(rows, runs, run="r", store=url)
    n = int(layer.name.split("=")[1])
    assert cols == local_cols and got == [r for r in local if r[cols.index("layer")] == n] and got
    _, local_sep = query(example_sql("layer_separation"), runs, run="r")
    _, remote_sep = query(example_sql("layer_separation"), runs, run="r", store=url)
    assert remote_sep == [r for r in local_sep if r[1] == n]
    _, every = query("SELECT count(*) FROM all_activations", runs, store=url)
    assert every == [(len(got),)]
    with pytest.raises(duckdb.PermissionException):
        query(f"SELECT count(*) FROM read_parquet('s3://{BUCKET}/outside/*.parquet')", runs, store=url)
    with pytest.raises(ValueError, match="give a remote store URL"):
        query(rows, runs, store=str(root / "store-local"))
    cli = [sys.executable, "-m", "flows.cli", "sql", "--runs-dir", str(runs), "--run", "r"]
    done = subprocess.run([*cli, "--example", "layer_separation", "--store", url], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # the CLI confines its writes too
    assert done.returncode == 0 and f"{remote_sep[0][2]:.6g}" in done.stdout, done.stdout + done.stderr[-3000:]
    done = subprocess.run([*cli, rows, "--store", "s3://no-such-bucket/sql"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "bucket 'no-such-bucket' does not exist" in done.stderr.strip().splitlines()[-1], done.stderr[-3000:]
