"""Stopping a `clearflow run` from outside (issue 12): SIGTERM ends it with one line and exit code 143, neither
SIGTERM nor `kill -9` leaves its temporary Prefect server (or any other child) running or holding its port, and a
run killed mid-stage then run again ends with the tables a run never killed writes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest
from polars.testing import assert_frame_equal

from tasks.core.activation_store import ActivationStore
from tasks.core.storage import RunPaths

REPO = Path(__file__).resolve().parents[1]


def _start_run(tiny_model: str, runs: Path) -> subprocess.Popen:
    """`clearflow run` on the tiny model, as a user starts it (its own process, output captured)."""
    cmd = [sys.executable, "-m", "flows.cli", "run", "--run", "r", "--runs-dir", str(runs), "--limit", "60",
           "--model.name", tiny_model]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children_mid_run(proc: subprocess.Popen, runs: Path) -> list[psutil.Process]:
    """Wait until the run is past ingest (its Prefect server up, a stage under way); its descendants then."""
    items = RunPaths(runs / "r").table("items")
    deadline = time.monotonic() + 240
    while not items.exists():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run never finished ingest"
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children), "no temporary Prefect server was running"
    return children


def _server_port(children: list[psutil.Process]) -> int:
    cmdline = next(c.cmdline() for c in children if "uvicorn" in " ".join(c.cmdline()))
    return int(cmdline[cmdline.index("--port") + 1])


def _all_gone(children: list[psutil.Process], within: float) -> list[str]:
    """The children still alive after `within` seconds (zombies count as gone: they hold no port and run nothing)."""
    deadline = time.monotonic() + within
    while True:
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return [" ".join(c.cmdline()[:4]) for c in alive]
        time.sleep(0.2)


def _port_free(port: int) -> bool:
    """Whether a server could listen on the port again (SO_REUSEADDR, as servers bind: connections the old server
    closed may linger in TIME_WAIT, a listening socket may not)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _main_with(run, monkeypatch, capsys) -> tuple[int, str]:
    """`clearflow stages` with the CLI's work replaced by `run`: its exit code and what it printed to stderr."""
    from flows import cli

    monkeypatch.setattr(cli.CliApp, "run", run)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["stages"])
    return exit_.value.code, capsys.readouterr().err


def test_a_sigterm_wrapped_in_another_error_is_still_a_stop(monkeypatch, capsys):
    """SIGTERM landing while a class is built (an import mid-run) reaches the CLI as RuntimeError("Error calling
    __set_name__ ...") on Python 3.11: it must still stop as SIGTERM (143), not report an error (2)."""
    from flows import cli

    def run(*args, **kwargs):
        try:
            raise cli.Terminated()
        except cli.Terminated as stop:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance 'keys'") from stop

    code, err = _main_with(run, monkeypatch, capsys)
    assert code == 143
    assert err.strip().endswith("stopped by SIGTERM; the same command resumes (finished stages are kept)")
    assert cli.wrapped_interrupt(ValueError("plain")) is None


def test_an_error_raised_while_unwinding_from_a_sigterm_is_the_stop(monkeypatch, capsys):
    """SIGTERM landing in a Prefect task run's setup: Prefect catches the stop, reports "Crash detected!", and raises
    ValueError("Task run is not set") (or fails its assert of the same words) while unwinding, chained to nothing.
    The run was stopped (143), not failed (2); and the next command in the same process, with no SIGTERM, reports
    its error as an error again."""
    from flows import cli

    def stopped_then_unwound(*args, **kwargs):
        try:
            cli._terminate(signal.SIGTERM, None)
        except cli.Terminated:
            pass  # Prefect's engine swallows the stop here
        raise AssertionError("Task run is not set")

    code, err = _main_with(stopped_then_unwound, monkeypatch, capsys)
    assert code == 143 and "stopped by SIGTERM" in err

    def failed(*args, **kwargs):
        raise ValueError("Task run is not set")

    code, err = _main_with(failed, monkeypatch, capsys)
    assert code == 2 and err.strip() == "clearflow: error: Task run is not set"


def test_a_sigterm_taken_by_prefects_handler_and_lost_in_its_unwinding_is_the_stop(monkeypatch, capsys):
    """The CI failure of 2026-12-04: SIGTERM lands while Prefect's flow engine holds the signal (its own handler,
    installed by its real `capture_sigterm`), a task engine catches Prefect's TerminationSignal and raises
    ValueError("Task run is not set") in its place, chained to nothing, so Prefect never hands the signal back to
    ours. The run was stopped (143), not failed (2)."""
    from prefect.exceptions import TerminationSignal
    from prefect.utilities.engine import capture_sigterm

    from flows import cli

    def stopped_inside_prefect(*args, **kwargs):
        with capture_sigterm():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
            except TerminationSignal:
                pass
            raise ValueError("Task run is not set")

    code, err = _main_with(stopped_inside_prefect, monkeypatch, capsys)
    assert code == 143 and "stopped by SIGTERM" in err
    assert signal.getsignal(signal.SIGTERM) is not cli._terminate  # main's handler is gone once it returns
    assert signal.set_wakeup_fd(-1) == -1  # and so is its witness


@pytest.mark.parametrize("how", ["SIGTERM"])  # SIGKILL: the kill -9 test below
def test_stopping_a_run_leaves_no_child_alive(tiny_model, tmp_path, how):
    runs = tmp_path / "runs"
    proc = _start_run(tiny_model, runs)
    try:
        children = _children_mid_run(proc, runs)
        port = _server_port(children)
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "SIGTERM":
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1] == ("clearflow: stopped by SIGTERM; the same command resumes (finished"
                                                " stages are kept)"), err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert _all_gone(children, within=10) == []
    assert _port_free(port)
    assert not list(runs.rglob("*.tmp")) and not list(runs.rglob(".*.partial-*"))  # no half-written table left


# every stage small, one thread (results do not depend on timing), shards of 10 texts (a kill lands between them)
_OPTS = ["--limit", "60", "--threads", "1", "--activations.batch-size", "1", "--activations.shard-rows", "10",
         "--no-finetune.compile"]


class _Watched:
    """A `clearflow run` whose merged output is read as it comes (progress bars' carriage returns end a line too),
    so the test can act on what the run says it is doing and shows all of it when something goes wrong."""

    def __init__(self, tiny_model: str, runs: Path, caches: Path, log: Path | None = None, api: str | None = None):
        env = {**os.environ, "PYTHONPATH": str(REPO), "CLEARFLOW_STORE": str(caches / "store"),
               "CLEARFLOW_CACHE": str(caches / "cache")}
        if api:  # a running Prefect API (the session's) instead of a temporary server: ~30 s less to start
            env["PREFECT_API_URL"] = api
        cmd = [sys.executable, "-m", "flows.cli", "run", "--run", "r", "--runs-dir", str(runs),
               "--model.name", tiny_model, *_OPTS]
        self.log = log  # output to a file instead of a pipe: a run nobody reads as it goes never blocks on it
        out = subprocess.PIPE if log is None else log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.servers: list[int] = []  # pids of the temporary Prefect servers it had when `kill_at` struck

    def kill_at(self, pattern: str) -> list[psutil.Process]:
        """Read until a line matches, then kill -9 the run at once; its descendants at that moment (`servers`: the
        temporary Prefect servers among them)."""
        buffer = b""
        while chunk := self.proc.stdout.read1(4096):
            buffer += chunk
            *done, buffer = re.split(rb"[\r\n]", buffer)
            self.lines += [d.decode(errors="replace") for d in done]
            if done and any(re.search(pattern, line) for line in self.lines[-len(done):]):
                children = psutil.Process(self.proc.pid).children(recursive=True)
                self.servers = [c.pid for c in children if "uvicorn" in " ".join(c.cmdline())]
                self.proc.kill()
                self.proc.wait(60)
                return children
        raise AssertionError(f"the run ended before {pattern!r}:\n" + self.said())

    def finish(self) -> None:
        out, _ = self.proc.communicate(timeout=600)
        out = self.log.read_bytes() if self.log is not None else out
        self.lines += out.decode(errors="replace").splitlines()
        assert self.proc.returncode == 0, self.said()

    def said(self) -> str:
        return "\n".join(self.lines[-60:])


def _tables(run: Path) -> dict[str, pl.DataFrame]:
    return {str(p.relative_to(run)): pl.read_parquet(p) for p in sorted(run.rglob("*.parquet"))}


def _store_rows(store_root: Path) -> dict[int, pl.DataFrame]:
    (key,) = [d.name for d in store_root.iterdir() if d.is_dir()]
    store = ActivationStore(store_root, key)
    assert store.complete()
    return {int(d.name.split("=")[1]): pl.read_parquet(d).sort("key", "position")
            for d in sorted(store.dir.glob("layer=*"))}


def test_kill_9_mid_stage_then_the_same_command_equals_a_clean_run(tiny_model, tmp_path, prefect_harness):
    """kill -9 during activations (no child outlives it, its temporary Prefect server included, the port is freed),
    again during fine-tuning, then the same command: every table (and the shared store, and the adapter's bytes)
    equals a run that was never killed (its own store and caches, so nothing is shared with the killed one), with no
    duplicate row and no temp file. Only the first run starts a temporary server (the one whose end is checked);
    the others report to the session's."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    # the never-killed run goes alongside (one thread each: the two share 2 cores without changing any result)
    clean_run = _Watched(tiny_model, tmp_path / "clean", tmp_path / "b", log=tmp_path / "clean.log", api=api)
    killed = _Watched(tiny_model, tmp_path / "runs", tmp_path / "a")
    children = killed.kill_at(r"activations:\s+\d+%.*\b[1-9]\d*/\d+")  # a shard or more written, not all
    assert killed.servers, "the first run had no temporary Prefect server:\n" + killed.said()
    assert _all_gone(children, within=10) == [], killed.said()
    stores = [d for d in (tmp_path / "a" / "store").iterdir() if d.is_dir()]
    assert len(stores) == 1 and not (stores[0] / "meta.json").exists(), "the kill must land mid-extraction:\n" + \
        killed.said()
    again = _Watched(tiny_model, tmp_path / "runs", tmp_path / "a", api=api)
    again.kill_at(r"finetune clear:\s+\d+%.*\b[1-9]\d*/\d+")  # a training step or more done, not all
    assert not (tmp_path / "runs" / "r" / "adapters" / "clear").exists(), "the kill must land mid-training:\n" + \
        again.said()
    _Watched(tiny_model, tmp_path / "runs", tmp_path / "a", api=api).finish()
    clean_run.finish()

    resumed, clean = tmp_path / "runs" / "r", tmp_path / "clean" / "r"
    got, want = _tables(resumed), _tables(clean)
    assert got.keys() == want.keys() and "predictions.parquet" in got
    for name, table in got.items():
        assert_frame_equal(table, want[name], check_exact=False, rtol=1e-5, atol=1e-6)
        assert not table.is_duplicated().any(), name
    adapter = Path("adapters", "clear", "adapter_model.safetensors")
    assert (resumed / adapter).read_bytes() == (clean / adapter).read_bytes()
    resumed_store, clean_store = _store_rows(tmp_path / "a" / "store"), _store_rows(tmp_path / "b" / "store")
    assert resumed_store.keys() == clean_store.keys()
    for layer, rows in resumed_store.items():
        assert rows.select("key", "position").is_duplicated().sum() == 0
        assert rows["key"].to_list() == clean_store[layer]["key"].to_list()
        np.testing.assert_allclose(np.stack(rows["vector"].to_numpy()), np.stack(clean_store[layer]["vector"]
                                                                                 .to_numpy()), rtol=1e-5, atol=1e-6)
    leftovers = [p for where in (tmp_path / "runs", tmp_path / "a" / "store")
                 for p in where.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]
    assert leftovers == []


# A process that rewrites a table and is killed inside the write: the new rows are in its temp file, not yet
# renamed over the table (the write's last step) when the marker appears.
_REWRITE = """
import sys, time
from pathlib import Path
import pyarrow.parquet as pq
import tasks.core.storage as storage
from schemas.tables import ITEMS

real = pq.write_table
def slow_write(table, where, **kw):
    real(table, where, **kw)
    Path(sys.argv[2]).write_text(str(where))  # the temp file is whole; the rename has not happened
    time.sleep(120)
storage.pq.write_table = slow_write
rows = [{"item_id": f"new{i}", "dataset": "x", "split": "test", "group": f"g{i}", "question": "Q?", "context": "C.",
         "answers": ["a"], "counterfactual": True} for i in range(5000)]
storage.write_parquet(rows, Path(sys.argv[1]), ITEMS)
"""


def test_kill_9_inside_a_table_write_leaves_the_previous_table_whole(tmp_path):
    from schemas.tables import ITEMS
    from tasks.core.storage import write_parquet

    table = tmp_path / "items.parquet"
    old = [{"item_id": "old", "dataset": "x", "split": "test", "group": "g", "question": "Q?", "context": "C.",
            "answers": ["a"], "counterfactual": True}]
    write_parquet(old, table, ITEMS)
    before = pl.read_parquet(table)
    marker = tmp_path / "inside"
    proc = subprocess.Popen([sys.executable, "-c", _REWRITE, str(table), str(marker)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, f"the writer ended before the kill:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, "the writer never reached its write"
        time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    temp = Path(marker.read_text())
    assert pl.read_parquet(temp).height == 5000  # the kill landed with the new table written but not renamed
    assert_frame_equal(pl.read_parquet(table), before)  # the previous table, whole
    assert temp.name.startswith(".items.parquet.") and temp.suffix == ".tmp"  # hidden from `*.parquet` readers
    assert [p.name for p in tmp_path.glob("*.parquet")] == ["items.parquet"]
