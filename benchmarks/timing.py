"""Timing helpers shared by the benchmarks: interleaved best-of-N rates, paired rounds with per-round ratios, and
what else the machine was doing."""

from __future__ import annotations

import gc
import os
import subprocess
import time
from collections.abc import Callable, Collection, Sequence


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


def paired_rounds(methods: dict[str, tuple[Callable[[], object], Callable[[], object]]], rounds: int,
                  once: Collection[str] = ()) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds of each method's runs, round by round, and its last result: a warm-up each, then `rounds` rounds in
    which every method runs once (those in `once` in the first round only), the order reversed every other round.

    Two methods' runs in one round sit minutes apart at most, so their ratio in that round compares them under
    the same load; on a shared machine the load moves between rounds by more than the methods differ.
    """
    for _, warmup in methods.values():
        warmup()
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, object] = {}
    for r in range(rounds):
        for name in list(methods) if r % 2 == 0 else list(methods)[::-1]:
            if name in once and times[name]:
                continue
            gc.collect()
            start = time.perf_counter()
            results[name] = methods[name][0]()
            times[name].append(time.perf_counter() - start)
    return times, results


def round_ratios(fast: Sequence[float], slow: Sequence[float]) -> list[float]:
    """How many times faster `fast` ran than `slow` in each round both ran in (seconds per round, in order)."""
    return [s / f for f, s in zip(fast, slow)]


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
