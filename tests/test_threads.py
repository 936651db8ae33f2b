"""The thread policy (issue 12): set before torch loads, the user's settings win, and a stage starts with the
CPUs other processes leave free."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from tasks.core import threads

REPO = Path(__file__).resolve().parents[1]
SHOW = "import os, tasks, torch; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'), " \
       "torch.get_num_threads())"


def _policy_in_child(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "CLEARFLOW_THREAD"))}
    out = subprocess.run([sys.executable, "-c", SHOW], cwd=REPO, env={**base, **env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_importing_clearflow_sets_passive_waiting_and_the_usable_cpus_before_torch():
    n = str(threads.usable_cpus())
    assert _policy_in_child() == ["PASSIVE", n, n]
    assert _policy_in_child(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == ["ACTIVE", "1", "1"]  # the user's
    assert _policy_in_child(CLEARFLOW_THREAD_POLICY="default")[:2] == ["None", "None"]  # the libraries' own


def test_usable_cpus_follow_the_affinity_mask():
    assert 1 <= threads.usable_cpus() <= len(os.sched_getaffinity(0))


def test_a_busy_neighbour_takes_a_cpu_from_the_stage(monkeypatch):
    """With one CPU-bound process beside it, a stage starting now gets one CPU fewer (at least one)."""
    monkeypatch.setattr(threads, "_user_set_threads", False)
    monkeypatch.setattr(threads, "_last_reading", None)  # no reading an earlier stage of this process took
    monkeypatch.delenv("CLEARFLOW_THREAD_POLICY", raising=False)
    before = torch.get_num_threads()
    hog = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])
    try:
        watched = psutil.Process(hog.pid)
        watched.cpu_percent(None)
        while watched.cpu_percent(0.1) < 50:  # the hog is spinning before the sample starts
            pass
        got = threads.set_threads(None)
    finally:
        hog.kill()
        hog.wait()
        torch.set_num_threads(before)
    assert got <= max(1, threads.usable_cpus() - 1)


def test_stages_starting_in_quick_succession_share_one_load_reading(monkeypatch):
    """A reading under READING_REUSE_S old is reused (each sample sleeps 0.2 s); an older one is taken again."""
    readings = iter([2, 1])
    monkeypatch.setattr(threads, "free_cpus", lambda: next(readings))
    monkeypatch.setattr(threads, "_last_reading", None)
    clock = [100.0]
    monkeypatch.setattr(threads, "_clock", lambda: clock[0])
    assert threads.recent_free_cpus() == 2
    clock[0] += threads.READING_REUSE_S - 0.5
    assert threads.recent_free_cpus() == 2  # the same reading, not sampled again
    clock[0] += 1.0
    assert threads.recent_free_cpus() == 1  # stale: sampled anew


def test_an_explicit_count_or_the_default_policy_is_kept(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1
        monkeypatch.setenv("CLEARFLOW_THREAD_POLICY", "default")
        monkeypatch.setattr(threads, "free_cpus", lambda: 1 / 0)  # the default policy never samples
        assert threads.set_threads(None) == 1
    finally:
        torch.set_num_threads(before)
