"""Benchmark of how long the CLI takes when there is little to do (issue 13); run by hand, never in CI.

On an existing finished run it times, each in a fresh process, median of --repeats runs, the commands in turns:
  floor:   `clearflow sql "select 1"`: start-up and one query, no flow (the baseline of the ratios);
  run:     the same `clearflow run` again (every stage current);
  stage:   `clearflow stage report` (the report written again),
first without a Prefect server (no PREFECT_API_URL), then with one started here on 127.0.0.1 (the server's own
start-up is not counted). Issue 13's targets: with a server, run <= 10 s and stage <= 5 s; without one, both at
least 2x faster than the 23 s and 17 s measured before.

    .venv/bin/python benchmarks/cli_latency.py --run NAME --runs-dir data/runs [--repeats 3] [-- run options]

The run options after `--` must be those the run was made with (otherwise it is not unchanged and will run).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "flows.cli"]
TARGETS = {("run", True): 10.0, ("stage", True): 5.0, ("run", False): 23.0 / 2, ("stage", False): 17.0 / 2}


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    where = ["--runs-dir", str(args.runs_dir)]
    return {
        "floor": [*CLI, "sql", "select 1", *where],
        "run": [*CLI, "run", "--run", args.run, *where, *args.options],
        "stage": [*CLI, "stage", "report", "--run", args.run, *where],
    }


def seconds(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{done.stderr[-2000:]}")
    if "run" in cmd[3:4] and "up to date" not in done.stderr + done.stdout:
        raise SystemExit("the run was not unchanged (a stage ran): give the options it was made with after --")
    return took


def timings(cmds: dict[str, list[str]], env: dict[str, str], repeats: int) -> dict[str, float]:
    """Median seconds per command, the commands taking turns round by round."""
    taken: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            taken[name].append(seconds(cmd, env))
    return {name: statistics.median(values) for name, values in taken.items()}


def with_server(home: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home)}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    for _ in range(180):
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return server, api
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the Prefect server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--runs-dir", type=Path, default=Path("data/runs"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("options", nargs="*", help="the run's options, after --")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from timing import machine_note  # benchmarks/timing.py

    print(f"repeats={args.repeats}; {machine_note()}")
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"HF_HUB_OFFLINE": "1"}
    results = {False: timings(commands(args), base, args.repeats)}
    with tempfile.TemporaryDirectory() as home:
        server, api = with_server(Path(home))
        try:
            results[True] = timings(commands(args), base | {"PREFECT_API_URL": api}, args.repeats)
        finally:
            server.terminate()
            server.wait(30)
    print("\n| server | command | seconds (median) | / floor | target | |")
    print("| --- | --- | --- | --- | --- | --- |")
    for server_up, got in results.items():
        for name in ("floor", "run", "stage"):
            target = TARGETS.get((name, server_up))
            verdict = "" if target is None else ("PASS" if got[name] <= target else "FAIL")
            print(f"| {'yes' if server_up else 'no'} | {name} | {got[name]:.1f} | {got[name] / got['floor']:.1f}x |"
                  f" {'' if target is None else f'<= {target:.1f} s'} | {verdict} |")
    print(f"at end: {machine_note()}")


if __name__ == "__main__":
    main()
