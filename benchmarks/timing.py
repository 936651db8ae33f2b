"""Timing helpers shared by the benchmarks: interleaved best-of-N rates, and what else the machine was doing."""

from __future__ import annotations

import gc
import os
import subprocess
import time
from collections.abc import Callable


def interleaved_rates(methods: dict[str, tuple[Callable[[], object], Callable[[], object]]], n: int,
                      repeats: int = 2) -> tuple[dict[str, float], dict[str, object]]:
    """Items/s of each method's fastest run (n items per run), and its last result.

    Each method gets one warm-up batch; then the runs go in rounds (b, c, a, a', b, c, ...), so a burst of
    load from other work on the machine hits every method rather than the one that happened to run then.
    """
    for _, warmup in methods.values():
        warmup()
    best = {name: float("inf") for name in methods}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, (run, _) in methods.items():
            gc.collect()
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: n / seconds for name, seconds in best.items()}, results


def machine_note(top: int = 3) -> str:
    """Load average and the busiest other processes, so a figure can be read against the noise it ran in."""
    load = os.getloadavg()
    line = f"cpus {os.cpu_count()}, load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    try:
        ps = subprocess.run(["ps", "-eo", "pid=,pcpu=,comm=", "--sort=-pcpu"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return line + "; other processes: unknown (no ps)"
    others = [r.split(None, 2) for r in ps if r.split(None, 1)[0] != str(os.getpid())]
    busy = [f"{comm} {cpu}%" for _, cpu, comm in others[:top] if float(cpu) >= 5.0]
    return line + "; other busy processes: " + (", ".join(busy) if busy else "none above 5% CPU")
