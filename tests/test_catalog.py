"""DuckDB catalog: views over the latest run and every run, typed activation partitions, read-only SQL."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import tables as T
from tasks.catalog.views import (
    ReadOnlyQueryError,
    build_catalog,
    check_read_only,
    format_table,
    list_runs,
    query,
    write_run_catalog,
)
from tasks.core.storage import RunPaths, write_json, write_parquet

DIM = 4
LAYERS = [0, 1, 2]


def _write_run(runs_dir: Path, name: str, auroc_shift: float, finished_at: str | None, keys: int) -> RunPaths:
    """A run with items, probe metrics and a small activation store (no predictions yet)."""
    paths = RunPaths(runs_dir / name)
    items = [
        {"item_id": f"{name}-{i}", "dataset": "toy", "split": "test", "group": str(i), "question": "q?",
         "context": "c.", "answers": ["a"], "counterfactual": True}  # fmt: skip
        for i in range(3)
    ]
    write_parquet(items, paths.table("items"), T.ITEMS)
    metrics = [
        {"layer": la, "probe": p, "position": "last", "split": "test", "n": 10, "accuracy": 0.5, "f1": 0.5,
         "auroc": 0.5 + auroc_shift * la + d}
        for la in LAYERS
        for p, d in (("logistic", 0.01), ("diffmean", 0.0))
    ]
    write_parquet(metrics, paths.table("probe_metrics"), T.PROBE_METRICS)
    rng = np.random.default_rng(len(name))
    for layer in LAYERS:
        vec = rng.normal(size=(keys, DIM)).astype(np.float32)
        table = pa.table(
            {"key": [f"k{i}" for i in range(keys)], "source": ["statements"] * keys, "position": ["last"] * keys,
             "context_key": [None] * keys,
             "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), DIM)},  # fmt: skip
            schema=T.activations_schema(DIM),
        )
        out = paths.activations / "model=tiny" / f"layer={layer}" / "part-00000.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    manifest = {"run": name} | ({"finished_at": finished_at} if finished_at else {})
    write_json(manifest, paths.manifest)
    return paths


@pytest.fixture()
def runs_dir(tmp_path) -> Path:
    """Two runs: 'new' finished after 'old' although its directory is older on disk."""
    runs = tmp_path / "runs"
    old = _write_run(runs, "old", 0.0, "2026-01-01T10:00:00+00:00", keys=2)
    new = _write_run(runs, "new", 0.1, "2026-01-02T10:00:00+00:00", keys=5)
    os.utime(new.root, (1_000_000, 1_000_000))  # mtime says 'old' is newer: finished_at must win
    (runs / "not-a-run").mkdir()
    write_parquet([{"method": "clear", "item_id": "old-0", "prompt": "p", "prediction": "a", "em": 1.0, "f1": 1.0,
                    "ps": True, "po": False}], old.table("predictions"), T.PREDICTIONS)  # fmt: skip
    return runs


def _snapshot(root: Path) -> dict[str, str]:
    """Hash of every file under root, to prove a refused statement changed nothing."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_latest_run_views_answer_probe_query(runs_dir):
    """Plain views show the most recently finished run; all_ views hold both, with a run column."""
    assert [r.name for r in list_runs(runs_dir)] == ["old", "new"]
    cols, rows = query("select layer, max(auroc) from probe_metrics group by layer order by layer", runs_dir)
    assert cols == ["layer", "max(auroc)"]
    assert rows == [(0, pytest.approx(0.51)), (1, pytest.approx(0.61)), (2, pytest.approx(0.71))]

    _, rows = query("select run, count(*) from all_probe_metrics group by run order by run", runs_dir)
    assert rows == [("new", 6), ("old", 6)]
    _, rows = query("select distinct run from items", runs_dir, run="old")
    assert rows == [("old",)]
    _, rows = query("select count(*) from all_predictions", runs_dir)  # only 'old' has predictions
    assert rows == [(1,)]
    assert not (runs_dir / "catalog.duckdb").exists()  # a query writes nothing under the runs directory
    with duckdb.connect(str(build_catalog(runs_dir)), read_only=True) as con:
        views = {r[0] for r in con.sql("select view_name from duckdb_views() where not internal").fetchall()}
    assert "predictions" not in views and {"items", "all_items", "activations", "all_predictions"} <= views


def test_activation_partitions_are_typed_and_prune(runs_dir):
    """layer is an INTEGER (not a string), model a VARCHAR; filtering one layer returns its rows only."""
    cols, rows = query("select column_name, column_type from (describe activations)", runs_dir)
    types = dict(rows)
    assert types["layer"] == "INTEGER" and types["model"] == "VARCHAR" and types["run"] == "VARCHAR"
    sql = "select model, layer, count(*), min(len(vector)) from activations where layer = 2 group by all"
    _, rows = query(sql, runs_dir)
    assert rows == [("tiny", 2, 5, DIM)]
    _, rows = query("select run, count(*) from all_activations where layer >= 1 group by run order by run", runs_dir)
    assert rows == [("new", 10), ("old", 4)]


@pytest.mark.parametrize(
    "sql, word",
    [
        ("insert into items select * from items", "INSERT"),
        ("update items set split = 'x'", "UPDATE"),
        ("delete from items", "DELETE"),
        ("drop view items", "DROP"),
        ("create table t as select 1", "CREATE"),
        ("copy (select * from items) to '{out}'", "COPY"),
        ("attach '{db}' as other", "ATTACH"),
        ("install httpfs", "INSTALL"),
        ("load parquet", "LOAD"),
        ("set enable_external_access = true", "SET"),
        ("pragma enable_profiling", "PRAGMA"),
        ("select 1; drop view items", "DROP"),
        ("explain analyze copy (select 1) to '{out}'", "EXPLAIN COPY"),
        ("/* sneaky */ delete from items", "DELETE"),
    ],
)
def test_write_and_escape_statements_are_refused(runs_dir, sql, word):
    """Every statement that could write, attach, load or reconfigure is refused and no file changes."""
    build_catalog(runs_dir)
    before = _snapshot(runs_dir)
    out = runs_dir / "new" / "leak.csv"
    with pytest.raises(ReadOnlyQueryError, match=f"read-only: {word} statements are refused"):
        query(sql.format(out=out, db=runs_dir / "x.duckdb"), runs_dir)
    assert _snapshot(runs_dir) == before
    assert not out.exists()


def test_read_statements_run(runs_dir):
    """DESCRIBE, SHOW, SUMMARIZE, EXPLAIN and CTEs are reads and are allowed."""
    reads = ["describe items", "show tables", "summarize probe_metrics", "explain select * from items",
             "with x as (select * from items) select count(*) from x", "from runs select run, selected"]
    for sql in reads:
        cols, rows = query(sql, runs_dir)
        assert cols and rows, sql
    _, rows = query("select run from runs where selected", runs_dir)
    assert rows == [("new",)]


def test_select_cannot_read_outside_the_runs(runs_dir, tmp_path):
    """Even a SELECT may not read files outside runs_dir (external access is limited to it)."""
    secret = tmp_path / "secret.parquet"
    pq.write_table(pa.table({"x": [1]}), secret)
    with pytest.raises(duckdb.PermissionException):
        query(f"select * from read_parquet('{secret}')", runs_dir)


def test_no_runs_and_unknown_run_are_clear(tmp_path, runs_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        query("select 1", tmp_path / "empty")
    with pytest.raises(ValueError, match="no run named 'nope'"):
        build_catalog(runs_dir, run="nope")


def test_rebuild_is_atomic_and_run_catalog_works(runs_dir):
    """The catalog is replaced whole (no temp or WAL left behind); a run's own catalog has its views."""
    db = build_catalog(runs_dir)
    build_catalog(runs_dir, run="old")
    assert sorted(p.name for p in runs_dir.iterdir() if p.is_file()) == [db.name]
    run_db = write_run_catalog(RunPaths(runs_dir / "old"))
    with duckdb.connect(str(run_db), read_only=True) as con:
        assert con.sql("select count(*) from predictions").fetchall() == [(1,)]
        assert con.sql("select distinct layer from activations order by layer").fetchall() == [(0,), (1,), (2,)]
    # the run's catalog is not mistaken for a table by the runs catalog
    _, rows = query("select count(*) from all_items", runs_dir)
    assert rows == [(6,)]


def test_check_read_only_returns_statements():
    assert len(check_read_only("select 1;")) == 1
    with pytest.raises(ReadOnlyQueryError, match="runs one statement; the SQL given holds 2"):
        check_read_only("select 1; select 2")
    with pytest.raises(ReadOnlyQueryError, match="holds no statement"):
        check_read_only("   ")


def test_format_table_aligns_columns():
    text = format_table(["layer", "probe", "auroc"], [(0, "logistic", 0.51234567), (12, None, None)])
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "probe", "auroc"]
    assert lines[2].split() == ["0", "logistic", "0.512346"] and "NULL" in lines[3]
    assert lines[2].index("0") == lines[3].index("2")  # right-aligned numbers
    assert lines[-1] == "(2 rows)"
