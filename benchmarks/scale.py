"""Benchmark of extraction on a Dask cluster, and of the store on S3, against one local process (issue 14); run by
hand, never in CI.

On a run of the default benchmark (ingest and decompose done once, on --limit items) it extracts the activation
store again and again, each time into a fresh store, the variants taking turns for --rounds rounds:
  local:    `clearflow stage activations --threads 1` (one process, one torch thread: the baseline);
  dask-1:   `--executor dask --dask-workers 1` (one worker process, one thread);
  dask-2:   `--executor dask --dask-workers 2` (two worker processes, one thread each);
  dask-2-running: `--executor dask --dask-address ...` on a cluster of two one-thread workers started before the
            clock, as the README says to start one (`dask scheduler` and `dask worker --nthreads 1`, both with
            `--preload flows.dask_preload`, the README's Dask config): a fresh cluster each round, so each worker
            still loads the model inside the timed extraction, but no worker process starts or imports torch in it;
  s3:       as local, into `--activations.store s3://bench/...` on an S3-compatible server (moto, a subprocess on
            127.0.0.1 started here): every shard uploaded as written, the store published at the end.
Three figures per variant, medians over the rounds:
  seconds: the stage's own extraction time (meta.json's `seconds`: from the first missing shard to the last, so
           model loading and the cluster's start are in it; the Prefect server's start is not);
  steady rows/s: rows written per second once every worker has written its first shard (from the shard files'
           modification times), i.e. throughput without the one-off start: what a long extraction converges to;
  command seconds: the whole `clearflow stage activations` command (for s3: uploads and publishing included).
Issue 14's targets: dask-2 and dask-2-running >= 1.6x local (seconds) on 2 cores; s3 within 1.3x of local (command
seconds).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scale.py [--limit 804] [--rounds 2] [--positions last,ctx_last]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "flows.cli"]
WORKERS = {"dask-2": 2, "dask-2-running": 2}  # worker processes of a variant (default 1)
RUNNING = {"dask-2-running"}  # variants given a cluster started before the clock
VARIANTS = {
    "local": ["--threads", "1"],
    "dask-1": ["--executor", "dask", "--dask-workers", "1", "--threads", "1"],
    "dask-2": ["--executor", "dask", "--dask-workers", "2", "--threads", "1"],
    "dask-2-running": ["--executor", "dask", "--threads", "1"],
    "s3": ["--threads", "1"],
}
TARGET, S3_TARGET = 1.6, 1.3
BUCKET = "bench"
# the README's config for the workers of a cluster the user starts (Dask's nannies would set MALLOC_TRIM_THRESHOLD_)
WORKER_CONFIG = "distributed: {nanny: {pre-spawn-environ: {MALLOC_TRIM_THRESHOLD_: null}}," \
                " worker: {profile: {enabled: false}}}\n"


def clearflow(*args: str, env: dict[str, str]) -> float:
    """Run one clearflow command; its wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args], cwd=HERE.parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"clearflow {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with the benchmark's bucket; yields the environment that reaches it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                     aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_cluster(workers: int, env: dict[str, str], tmp: str) -> Iterator[str]:
    """A scheduler and `workers` one-thread workers on 127.0.0.1, started the README's way; yields its address
    once every worker has joined."""
    from distributed import Client

    config = Path(tmp) / "dask-config"
    config.mkdir(exist_ok=True)
    (config / "clearflow.yaml").write_text(WORKER_CONFIG)
    env = env | {"DASK_CONFIG": str(config), "PYTHONPATH": str(HERE.parent)}
    address = f"tcp://127.0.0.1:{free_port()}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "cwd": HERE.parent}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", address.rsplit(":", 1)[1], "--no-dashboard", "--preload",
                               "flows.dask_preload"], **quiet)]
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers",
                                   str(workers), "--nthreads", "1", "--no-dashboard",
                                   "--preload", "flows.dask_preload"], **quiet))
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=60)


def extraction_seconds(store: Path) -> tuple[float, int]:
    (meta,) = store.glob("*/meta.json")
    data = json.loads(meta.read_text())
    return float(data["seconds"]), int(data["n_rows"])


def steady_rate(store: Path, workers: int) -> float:
    """Rows per second after each of `workers` workers wrote its first shard (one layer's files, by mtime)."""
    layer = sorted(p for p in next(store.glob("*/meta.json")).parent.iterdir() if p.is_dir())[0]
    files = sorted(layer.glob("part-*.parquet"), key=lambda f: f.stat().st_mtime)
    if len(files) <= workers:
        return float("nan")
    start = files[workers - 1].stat().st_mtime
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files[workers:])
    return rows / max(files[-1].stat().st_mtime - start, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=804, help="items of the default benchmark (804: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded SmolLM2)")
    parser.add_argument("--shard-rows", type=int, default=64, help="rows per shard (one job per shard)")
    parser.add_argument("--positions", default="last", help="activations.positions, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which variants, comma-separated (local always)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from timing import machine_note  # benchmarks/timing.py

    from tasks.core.remote_store import mirror_root

    print(f"limit={args.limit} rounds={args.rounds} shard_rows={args.shard_rows} positions={args.positions};"
          f" {machine_note()}")
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3_env:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"HF_HUB_OFFLINE": "1"} | s3_env
        run = ["--run", "bench", "--runs-dir", f"{tmp}/runs", "--limit", str(args.limit),
               "--activations.shard-rows", str(args.shard_rows), "--activations.positions", args.positions]
        if args.model:
            run += ["--model.name", args.model]
        clearflow("stage", "ingest", *run, env=env)
        clearflow("stage", "decompose", *run, env=env)
        chosen = {"local": VARIANTS["local"]} | {n: VARIANTS[n] for n in args.variants.split(",") if n != "local"}
        figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in chosen}
        rows = 0
        for r in range(args.rounds):
            for name, options in chosen.items():
                store = Path(tmp) / f"store-{name}-{r}"
                where = f"s3://{BUCKET}/{Path(tmp).name}/{r}" if name == "s3" else str(store)
                with running_cluster(WORKERS[name], env, tmp) if name in RUNNING else contextlib.nullcontext() as at:
                    address = ["--dask-address", at] if at else []
                    command = clearflow("stage", "activations", *run, "--activations.store", where, *options,
                                        *address, env=env)
                if name == "s3":
                    store = mirror_root(where)
                seconds, rows = extraction_seconds(store)
                figures[name].append((seconds, steady_rate(store, WORKERS.get(name, 1)), command))
                print(f"round {r + 1} {name}: {seconds:.1f} s, steady {figures[name][-1][1]:.1f} rows/s,"
                      f" command {command:.1f} s")
            shutil.rmtree(mirror_root(f"s3://{BUCKET}/{Path(tmp).name}"), ignore_errors=True)  # the s3 mirrors
    med = {name: [statistics.median(column) for column in zip(*values)] for name, values in figures.items()}
    print(f"\n{rows} rows per layer; median of {args.rounds} rounds")
    print("| variant | seconds | speed-up | steady rows/s | steady speed-up | command s | command ratio | target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (seconds, rate, command) in med.items():
        ratio, steady, slower = med["local"][0] / seconds, rate / med["local"][1], command / med["local"][2]
        verdict = {"dask-2": "PASS" if ratio >= TARGET else "FAIL",
                   "dask-2-running": "PASS" if ratio >= TARGET else "FAIL",
                   "s3": "PASS" if slower <= S3_TARGET else "FAIL"}.get(name, "")
        shown = "n/a" if math.isnan(steady) else f"{steady:.2f}x"
        print(f"| {name} | {seconds:.1f} | {ratio:.2f}x | {rate:.1f} | {shown} | {command:.1f} | {slower:.2f}x |"
              f" {verdict} |")
    print(f"at end: {machine_note()}")


if __name__ == "__main__":
    main()
