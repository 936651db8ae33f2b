"""A DuckDB catalog of views over the runs' Parquet tables, and a read-only SQL entry point to it.

`<table>` views show one run (default: the latest finished), `all_<table>` views every run with a `run`
column; activations come with typed hive partitions (model VARCHAR, layer INTEGER), read where the activation
store says its files are. Sweeps over fine-tuning seeds (`clearflow sweep`) add `sweep_metrics` and
`sweep_comparisons` (the latest sweep) and `all_sweep_metrics`, `all_sweep_comparisons` (every sweep, with a
`sweep` column); a sweep directory is itself a runs directory of its seed runs. Views hold absolute paths, so the catalog file can be opened from anywhere with any
DuckDB >= 2.0.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from schemas.layout import ANALYSES
from schemas.tables import TABLES
from tasks.catalog import remote
from tasks.core.activation_store import DUCKDB_HIVE, ActivationStore, tree_glob
from tasks.core.sandbox import confine_writes
from tasks.core.storage import RunPaths, atomic_path, cache_root
from tasks.evaluate.seeds import SweepPaths

log = logging.getLogger(__name__)

ACTIVATION_GLOB = tree_glob(RunPaths(Path()).activations)  # every model's shards, relative to a run directory
_READ_TYPES = {"SELECT", "EXPLAIN"}  # DESCRIBE / SHOW / SUMMARIZE parse as SELECT
_GLOB_CHARS = re.compile(r"[*?\[\]{}]")
_LEADING_NOISE = re.compile(r"^(\s+|--[^\n]*\n?|/\*.*?\*/|\()*", re.S)
_EXPLAIN = re.compile(r"^\s*explain\s+(analy[sz]e\s+)?(\([^)]*\)\s*)?", re.I)
_MAX_CELL = 60


class ReadOnlyQueryError(ValueError):
    """A statement that could write, attach, load or reconfigure something was refused."""


@dataclass(frozen=True)
class RunInfo:
    """A run directory and when it finished (for picking the latest)."""

    name: str
    root: Path
    finished_at: dt.datetime | None  # from manifest.json, when the pipeline stamped it
    mtime: float

    @property
    def order_key(self) -> float:
        """Finish time if known, else the directory's last change."""
        return self.finished_at.timestamp() if self.finished_at else self.mtime


def table_relpaths() -> dict[str, str]:
    """Each table's file inside a run directory, as RunPaths lays it out."""
    return {name: RunPaths(Path()).table(name).as_posix() for name in TABLES}


def _finished_at(root: Path, record: str = "manifest.json") -> dt.datetime | None:
    """The finished_at of a run's manifest.json (or a sweep's record), parsed; None when absent or unreadable."""
    try:
        value = json.loads((root / record).read_text()).get("finished_at")
        stamp = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except (OSError, ValueError, AttributeError):
        return None
    if stamp is not None and stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp


def _is_run(root: Path) -> bool:
    """A run directory has a manifest, a table or an activation store."""
    if (root / "manifest.json").exists() or (root / "activations").is_dir():
        return True
    return any((root / rel).exists() for rel in table_relpaths().values())


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """Every run under runs_dir, oldest first."""
    runs_dir = Path(runs_dir).resolve()
    if not runs_dir.is_dir():
        return []
    runs = [
        RunInfo(p.name, p, _finished_at(p), p.stat().st_mtime)
        for p in runs_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and _is_run(p)
    ]
    return sorted(runs, key=lambda r: (r.order_key, r.name))


def list_sweeps(runs_dir: Path) -> list[RunInfo]:
    """Every sweep with an aggregate: runs_dir itself when it is one, and those directly under it; oldest first."""
    runs_dir = Path(runs_dir).resolve()
    if not runs_dir.is_dir():
        return []
    roots = [runs_dir] + [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    record = SweepPaths(Path()).record.name
    sweeps = [RunInfo(p.name, p, _finished_at(p, record), p.stat().st_mtime)
              for p in roots if SweepPaths(p).metrics.exists()]
    return sorted(sweeps, key=lambda r: (r.order_key, r.name))


def _create_sweep_views(con: duckdb.DuckDBPyConnection, sweeps: list[RunInfo]) -> None:
    """`sweep_metrics` and `sweep_comparisons` over the latest sweep, `all_sweep_*` over every sweep, each with a
    `sweep` column (a sweep aggregated before sweep_comparisons existed has none until it is aggregated again)."""
    for name in ("metrics", "comparisons"):
        paths = [(s.name, getattr(SweepPaths(s.root), name)) for s in sweeps]
        bodies = [f"SELECT {_lit(sweep)}::VARCHAR AS sweep, * FROM read_parquet({_lit(_check_path(path))})"
                  for sweep, path in paths if path.exists()]
        if bodies:
            con.execute(f"CREATE VIEW sweep_{name} AS {bodies[-1]}")
            con.execute(f"CREATE VIEW all_sweep_{name} AS {' UNION ALL BY NAME '.join(bodies)}")


def _has_activations(root: Path) -> bool:
    """Whether a run holds at least one activation shard."""
    return any(store.files() for store in ActivationStore.tree(RunPaths(root).activations))


def _lit(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _check_path(path: Path) -> str:
    """A directory as POSIX text, refused if DuckDB would read part of it as a glob pattern."""
    text = path.as_posix()
    if _GLOB_CHARS.search(text):
        raise ValueError(f"path {text!r} contains glob characters ({_GLOB_CHARS.pattern}); rename it for the catalog")
    return text


def _run_column(prefix: str) -> str:
    """SQL taking the run name from the `filename` column: the path segment right after runs_dir."""
    return f"split_part(substr(filename, {len(prefix) + 1}), '/', 1) AS run"


def _all_view_sql(runs_dir: Path, rel: str, hive: bool) -> str:
    """View body over one table in every run (union by name: runs may differ in columns)."""
    prefix = _check_path(runs_dir) + "/"
    opts = "filename = true, union_by_name = true" + (f", {DUCKDB_HIVE}" if hive else "")
    return f"SELECT {_run_column(prefix)}, * EXCLUDE (filename) FROM read_parquet({_lit(prefix + '*/' + rel)}, {opts})"


def _run_view_sql(run: RunInfo, rel: str, hive: bool) -> str:
    """View body over one table of one run."""
    path = _check_path(run.root) + "/" + rel
    opts = f", {DUCKDB_HIVE}" if hive else ""
    return f"SELECT {_lit(run.name)}::VARCHAR AS run, * FROM read_parquet({_lit(path)}{opts})"


def _sources(run: RunInfo) -> dict[str, tuple[str, bool]]:
    """table -> (relative path or glob, is hive-partitioned), for the tables this run has."""
    out = {name: (rel, False) for name, rel in table_relpaths().items() if (run.root / rel).exists()}
    out |= {name: (a.path, False) for name, a in ANALYSES.items() if a.kind == "table" and (run.root / a.path).exists()}
    if _has_activations(run.root):
        out["activations"] = (ACTIVATION_GLOB, True)
    return out


def _remote_activations_sql(run: RunInfo, store: str) -> str:
    """View body over the run's activations as the remote store holds them (columns as the local view's)."""
    hive = "hive_partitioning = true, hive_types = {'layer': INTEGER}"
    bodies = [f"SELECT {_lit(run.name)}::VARCHAR AS run, *, {_lit(slug)}::VARCHAR AS model"
              f" FROM read_parquet({_lit(glob)}, {hive})" for slug, glob in remote.run_store_globs(run.root, store)]
    return " UNION ALL BY NAME ".join(bodies)


def _view_sql(run: RunInfo, name: str, rel: str, hive: bool, store: str | None) -> str:
    """One run's view body: its local table, or with a remote `store` its activations read from there."""
    return _remote_activations_sql(run, store) if store and name == "activations" else _run_view_sql(run, rel, hive)


def _create_views(con: duckdb.DuckDBPyConnection, runs: list[RunInfo], selected: RunInfo | None,
                  runs_dir: Path | None, store: str | None = None) -> None:
    """`<table>` views over the selected run; `all_<table>` over every run (glob under runs_dir if given)."""
    for name, (rel, hive) in (_sources(selected) if selected else {}).items():
        con.execute(f"CREATE VIEW {name} AS {_view_sql(selected, name, rel, hive, store)}")
    present: dict[str, tuple[str, bool]] = {}
    for run in runs:
        present.update(_sources(run))
    for name, (rel, hive) in present.items():
        if runs_dir is not None and not (store and name == "activations"):
            body = _all_view_sql(runs_dir, rel, hive)
        else:  # one view per run, unioned: a single run's own catalog, or activations read from a remote store
            body = " UNION ALL BY NAME ".join(_view_sql(r, name, rel, hive, store) for r in runs
                                              if name in _sources(r))
        con.execute(f"CREATE VIEW all_{name} AS {body}")
    con.execute("CREATE TABLE runs (run VARCHAR, path VARCHAR, finished_at TIMESTAMPTZ, selected BOOLEAN)")
    rows = [(r.name, r.root.as_posix(), r.finished_at, selected is not None and r.name == selected.name) for r in runs]
    if rows:  # a runs directory may hold sweeps only
        con.executemany("INSERT INTO runs VALUES (?, ?, ?, ?)", rows)


def _write_catalog(db_path: Path, runs: list[RunInfo], selected: RunInfo | None, runs_dir: Path | None,
                   sweeps: list[RunInfo] | None = None, store: str | None = None) -> Path:
    """Build the catalog in a temp file beside db_path, then rename it over db_path."""
    db_path = Path(db_path)
    with atomic_path(db_path) as tmp:
        tmp.unlink()  # DuckDB refuses to open an empty file
        try:
            with duckdb.connect(str(tmp)) as con:
                if store:
                    remote.register(con, store)  # a view's files are read when it is created
                _create_views(con, runs, selected, runs_dir, store)
                _create_sweep_views(con, sweeps or [])
                con.execute("CHECKPOINT")
        finally:
            Path(f"{tmp}.wal").unlink(missing_ok=True)
    return db_path


def _select_run(runs: list[RunInfo], run: str | None) -> RunInfo:
    """The named run, or the latest finished one."""
    if run is None:
        return runs[-1]
    for info in runs:
        if info.name == run:
            return info
    raise ValueError(f"no run named {run!r}; known runs: {[r.name for r in runs]}")


def build_catalog(runs_dir: Path, db_path: Path | None = None, run: str | None = None,
                  store: str | None = None) -> Path:
    """(Re)create the runs catalog: views over the chosen run and over every run; returns its path. With a remote
    `store` URL the activations views read that store's shards (tasks/catalog/remote.py)."""
    runs_dir = Path(runs_dir).resolve()
    runs, sweeps = list_runs(runs_dir), list_sweeps(runs_dir)
    if not runs and not sweeps:
        raise FileNotFoundError(
            f"no runs under {runs_dir}: run `clearflow run` or `clearflow sweep` first (or pass --runs-dir)"
        )
    selected = _select_run(runs, run) if runs or run else None
    return _write_catalog(Path(db_path) if db_path else runs_dir / "catalog.duckdb", runs, selected, runs_dir, sweeps,
                          store)


def write_run_catalog(paths: RunPaths) -> Path:
    """The same views for one run, in the run's own catalog.duckdb."""
    root = Path(paths.root).resolve()
    info = RunInfo(root.name, root, _finished_at(root), root.stat().st_mtime)
    return _write_catalog(paths.catalog, [info], info, None)


def _keyword(text: str) -> str:
    """The statement's leading keyword (for a message the user recognises: INSTALL, not LOAD)."""
    match = re.match(r"[A-Za-z_]+", _LEADING_NOISE.sub("", text))
    return match.group(0).upper() if match else ""


def _refusal(stmt: Any) -> str | None:
    """Why a parsed statement is refused, or None if it only reads."""
    kind = stmt.type.name
    if kind not in _READ_TYPES:
        return _keyword(stmt.query) or kind
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: it must itself be a read
        inner = _EXPLAIN.sub("", stmt.query, count=1)
        try:
            inner_stmts = duckdb.extract_statements(inner)
        except (duckdb.Error, ValueError):
            return "EXPLAIN"
        if len(inner_stmts) != 1 or inner_stmts[0].type.name != "SELECT":
            return f"EXPLAIN {_keyword(inner) or 'non-SELECT'}"
    return None


def check_read_only(sql: str) -> list[Any]:
    """Parse sql and return its one statement (as a list), or raise ReadOnlyQueryError naming the first refused
    statement, or saying there is more than one."""
    try:
        statements = duckdb.extract_statements(sql)
    except ValueError as err:  # a statement type the Python API cannot even name
        raise ReadOnlyQueryError(f"clearflow sql is read-only: statement refused ({err})") from None
    if not statements:
        raise ReadOnlyQueryError("clearflow sql needs a query: the SQL given holds no statement")
    for stmt in statements:
        reason = _refusal(stmt)
        if reason:
            raise ReadOnlyQueryError(
                f"clearflow sql is read-only: {reason} statements are refused (only SELECT, EXPLAIN, DESCRIBE, "
                "SHOW and SUMMARIZE run)"
            )
    if len(statements) > 1:
        raise ReadOnlyQueryError(f"clearflow sql runs one statement; the SQL given holds {len(statements)} (split it"
                                 " into separate calls)")
    return statements


def _readable_dirs(runs_dir: Path) -> list[str]:
    """Directories a query may read: runs_dir, and the model stores (`model=*` directories holding a finished
    store's meta.json) of an activations/ directory a run links to elsewhere: never the link's target as a whole,
    which could be any directory (a link to / would open the whole file system)."""
    dirs = {runs_dir.as_posix() + "/"}
    for run in list_runs(runs_dir):
        target = (run.root / "activations").resolve()
        if target.is_dir() and not target.is_relative_to(runs_dir):
            dirs.update(s.dir.resolve().as_posix() + "/" for s in ActivationStore.tree(target) if s.complete())
    return sorted(dirs)


def _connect_read_only(db_path: Path, runs_dir: Path, store: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open the catalog read-only, able to read nothing but the runs and the remote store's prefix (defence beyond
    the statement check)."""
    con = duckdb.connect(
        str(db_path), read_only=True, config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )
    readable = _readable_dirs(runs_dir)
    if store:
        remote.register(con, store)
        readable += remote.readable_prefixes(store)
    con.execute("SET allowed_directories = ?", [readable])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def query(sql: str, runs_dir: Path, run: str | None = None, confine: bool = False,
          store: str | None = None) -> tuple[list[str], list[tuple]]:
    """Answer one read-only SQL statement over the runs; returns (column names, rows). The catalog is built in a
    private temporary directory, so a query writes nothing under runs_dir (a read-only share can be queried, and
    two queries never race on one catalog file). With `confine` (the CLI's process, which ends after the query) the
    kernel then refuses this process every file write outside that scratch space (tasks/core/sandbox.py). With a
    remote `store` URL, the activations views read its shards there."""
    (stmt,) = check_read_only(sql)
    runs_dir = Path(runs_dir).resolve()
    store = remote.check_store_url(store) if store else None
    scratch = _scratch_root() if confine else None
    with tempfile.TemporaryDirectory(prefix="clearflow-sql-", dir=scratch) as tmp:
        db_path = build_catalog(runs_dir, db_path=Path(tmp) / "catalog.duckdb", run=run, store=store)
        if scratch is not None:  # before DuckDB starts the threads that will run the query: they inherit it
            confine_writes(scratch)
        with _connect_read_only(db_path, runs_dir, store) as con:
            cur = con.execute(stmt)
            columns = [d[0] for d in cur.description] if cur.description else []
            rows = cur.fetchall() if cur.description else []
    return columns, rows


def _scratch_root() -> Path | None:
    """The user's own directory for query scratch space (the parent must be writable too, to remove a query's
    directory after it), or None when it cannot be made, and then the query runs unconfined."""
    root = cache_root() / "sql"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.debug("sql: no scratch directory %s (%s); the query runs without write confinement", root, exc)
        return None
    return root


def _cell(value: Any) -> str:
    """One value as short text (vectors and long strings are cut)."""
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.6g}"
        text = text if any(c in text for c in ".ein") else text + ".0"  # keep 0.0 distinguishable from 0
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def _is_numeric(values: list[Any]) -> bool:
    """A column of numbers (nulls aside) is right-aligned."""
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, int | float) for v in present)


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """Aligned text columns (numbers right-aligned) and a row count, for the CLI."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [_is_numeric([r[i] for r in rows]) for i in range(len(columns))]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
