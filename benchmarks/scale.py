"""Benchmark of extraction on a Dask cluster against one local process (issue 14); run by hand, never in CI.

On a run of the default benchmark (ingest and decompose done once, on --limit items) it extracts the activation
store again and again, each time into a fresh store, the variants taking turns for --rounds rounds:
  local:    `clearflow stage activations --threads 1` (one process, one torch thread: the baseline);
  dask-1:   `--executor dask --dask-workers 1` (one worker process, one thread);
  dask-2:   `--executor dask --dask-workers 2` (two worker processes, one thread each).
The time is the stage's own extraction time (meta.json's `seconds`: from the first missing shard to the last, so
model loading and the cluster's start are in it; the Prefect server's start is not). It prints the median seconds of
each variant and its speed-up over local. Issue 14's target: dask-2 >= 1.6x local on 2 cores.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scale.py [--limit 150] [--rounds 2] [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "flows.cli"]
VARIANTS = {
    "local": ["--threads", "1"],
    "dask-1": ["--executor", "dask", "--dask-workers", "1"],
    "dask-2": ["--executor", "dask", "--dask-workers", "2"],
}
TARGET = 1.6


def clearflow(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run([*CLI, *args], cwd=HERE.parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"clearflow {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")


def extraction_seconds(store: Path) -> tuple[float, int]:
    (meta,) = store.glob("*/meta.json")
    data = json.loads(meta.read_text())
    return float(data["seconds"]), int(data["n_rows"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=150, help="items of the default benchmark")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded SmolLM2)")
    parser.add_argument("--shard-rows", type=int, default=64, help="rows per shard (one job per shard)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from timing import machine_note  # benchmarks/timing.py

    print(f"limit={args.limit} rounds={args.rounds} shard_rows={args.shard_rows}; {machine_note()}")
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"HF_HUB_OFFLINE": "1"}
        run = ["--run", "bench", "--runs-dir", f"{tmp}/runs", "--limit", str(args.limit),
               "--activations.shard-rows", str(args.shard_rows)]
        if args.model:
            run += ["--model.name", args.model]
        clearflow("stage", "ingest", *run, env=env)
        clearflow("stage", "decompose", *run, env=env)
        taken: dict[str, list[float]] = {name: [] for name in VARIANTS}
        rows = 0
        for r in range(args.rounds):
            for name, options in VARIANTS.items():
                store = Path(tmp) / f"store-{name}-{r}"
                clearflow("stage", "activations", *run, "--activations.store", str(store), *options, env=env)
                seconds, rows = extraction_seconds(store)
                taken[name].append(seconds)
                print(f"round {r + 1} {name}: {seconds:.1f} s")
    median = {name: statistics.median(values) for name, values in taken.items()}
    print(f"\n{rows} rows per layer; median of {args.rounds} rounds")
    print("| variant | seconds | speed-up over local | |")
    print("| --- | --- | --- | --- |")
    for name, seconds in median.items():
        ratio = median["local"] / seconds
        verdict = ("PASS" if ratio >= TARGET else "FAIL") if name == "dask-2" else ""
        print(f"| {name} | {seconds:.1f} | {ratio:.2f}x | {verdict} |")
    print(f"at end: {machine_note()}")


if __name__ == "__main__":
    main()
