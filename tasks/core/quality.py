"""Run a table's Great Expectations suite so no stage starts on data that breaks its contract.

The suites (schemas/suites.py) only declare; this module loads what they check: the table, the frames its
preparation reads, and for the activations the store summarised per vector without loading a vector.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Any

import polars as pl

from schemas.suites import ACTIVATION_FACTS, ACTIVATION_METAS, ACTIVATION_POSITIONS, suite_for
from tasks.core.activation_store import DUCKDB_HIVE, ActivationStore
from tasks.core.storage import RunPaths, read_optional_table, read_table, write_json

_EXAMPLES = 5  # unexpected values quoted per failing expectation
_LOCK = threading.Lock()  # one GX context per process; its registry is not thread-safe
_STATE: dict[str, Any] = {}


class DataQualityError(RuntimeError):
    """Tables failed their suites; `tables` names them and `results` (table -> GX result dict) says how."""

    def __init__(self, message: str, results: dict[str, dict] | None = None):
        super().__init__(message)  # args = (message,): so the error pickles across Prefect workers
        self.results = results or {}
        self.tables = sorted(t for t, r in self.results.items() if not r.get("success"))


def _datasource() -> Any:
    """The process-wide ephemeral GX context's pandas data source (imports GX once: ~3 s)."""
    if "datasource" not in _STATE:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        _STATE["context"] = context
        _STATE["datasource"] = context.data_sources.add_pandas("clearflow")
    return _STATE["datasource"]


def _batch_definition(table: str) -> Any:
    """The whole-dataframe batch definition of a table's asset, created on first use."""
    key = f"batch:{table}"
    if key not in _STATE:
        asset = _datasource().add_dataframe_asset(name=table)
        _STATE[key] = asset.add_batch_definition_whole_dataframe("whole")
    return _STATE[key]


def _expectation_suite(table: str) -> Any:
    """The table's GX suite, built once per process."""
    key = f"suite:{table}"
    if key not in _STATE:
        _STATE[key] = suite_for(table).expectation_suite()
    return _STATE[key]


_VECTOR_FACTS_SQL = f"""
select model, layer, key, source, position, context_key,
       len(vector) as dim,
       -- fast path: a finite sum means every element is finite; else count them exactly
       case when isfinite(list_sum(vector)) then len(vector)
            else list_count(list_filter(vector, lambda x: isfinite(x))) end as n_finite
from read_parquet($files, {DUCKDB_HIVE}, union_by_name = true)
"""


def activation_frames(paths: RunPaths) -> dict[str, pl.DataFrame]:
    """The run's activation stores as their suite reads them: per vector its scalar facts (computed in DuckDB),
    per model and per (model, position) what meta.json declares."""
    import duckdb

    stores = ActivationStore.tree(paths.activations)
    files = [str(f) for store in stores for f in store.files()]
    if not files:
        raise FileNotFoundError(f"{paths.activations} holds no activation shards: run the activations stage first")
    metas, positions = [], []
    for store in stores:
        meta = store.meta() if store.complete() else None
        by_position = store.rows_by_position if meta else {}
        metas.append({"model": store.slug, "has_meta": meta is not None,
                      "meta_dim": meta.get("dim") if meta else None,
                      "meta_n_rows": sum(by_position.values()) if meta else None,
                      "meta_layers": [int(x) for x in meta.get("layers", [])] if meta else None})
        positions += [{"model": store.slug, "position": p, "meta_position_rows": n} for p, n in by_position.items()]
    with duckdb.connect() as con:
        facts = pl.from_arrow(con.sql(_VECTOR_FACTS_SQL, params={"files": files}).to_arrow_table())
    return {"activations": facts.cast(ACTIVATION_FACTS),
            "activation_metas": pl.DataFrame(metas, schema=ACTIVATION_METAS),
            "activation_positions": pl.DataFrame(positions, schema=ACTIVATION_POSITIONS)}


def suite_frame(table: str, paths: RunPaths) -> pl.DataFrame:
    """What a table's suite checks: the table (or the activation summary) prepared with the frames it reads."""
    suite = suite_for(table)
    loaded = activation_frames(paths) if table == "activations" else {}

    def load(name: str) -> pl.DataFrame:
        return loaded[name] if name in loaded else read_table(paths.table(name))

    present = [read_optional_table(paths.table(n)) for n in suite.reads_if_present]
    return suite.frame(load(table), *map(load, suite.reads), *present)


def run_suite(table: str, paths: RunPaths) -> dict:
    """Validate a table with its suite and return GX's result as a JSON dict (no file, no raise)."""
    frame = suite_frame(table, paths)
    pdf = frame.to_pandas()
    start = time.perf_counter()
    with _LOCK:
        batch = _batch_definition(table).get_batch(batch_parameters={"dataframe": pdf})
        result = batch.validate(_expectation_suite(table), result_format="BASIC")
    doc = result.to_json_dict()
    doc["table"] = table
    doc["n_rows"] = frame.height
    doc["evaluated"] = doc["statistics"]["evaluated_expectations"]
    doc["failed"] = doc["statistics"]["unsuccessful_expectations"]
    doc["validate_s"] = round(time.perf_counter() - start, 4)
    return doc


def validate(table: str, paths: RunPaths) -> dict:
    """Check one table, write quality/<table>.json, raise DataQualityError if any expectation failed."""
    doc = run_suite(table, paths)
    write_json(doc, paths.quality / f"{table}.json")
    if not doc["success"]:
        raise DataQualityError(failure_message(table, doc), {table: doc})
    return doc


def validate_tables(tables: Sequence[str], paths: RunPaths) -> dict[str, dict]:
    """Check each table (a stage's, flows/stages.py); all are checked and recorded before one error reports them all."""
    results: dict[str, dict] = {}
    messages = []
    for table in tables:
        try:
            results[table] = validate(table, paths)
        except DataQualityError as err:
            results.update(err.results)
            messages.append(str(err))
    if messages:
        raise DataQualityError("\n".join(messages), results)
    return results


def failure_message(table: str, doc: dict) -> str:
    """One header line naming the table and the failure count, then one line per failing expectation."""
    failed = [r for r in doc["results"] if not r.get("success")]
    total = len(doc["results"])
    lines = [f"data quality check failed for table {table!r}: {len(failed)} of {total} expectations failed"]
    lines += [f"  - {_describe(r)}" for r in failed]
    return "\n".join(lines)


def _describe(res: dict) -> str:
    """Type, columns, bounds and the observed numbers of one failing expectation."""
    cfg = res.get("expectation_config", {})
    kwargs = cfg.get("kwargs", {})
    cols = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs] + list(kwargs.get("column_list", []))
    text = cfg.get("type", "?") + (f" [{', '.join(map(str, cols))}]" if cols else "")
    bounds = {k: kwargs[k] for k in ("min_value", "max_value", "value_set", "regex", "or_equal") if k in kwargs}
    if bounds:
        text += " " + ", ".join(f"{k}={v!r}" for k, v in bounds.items())
    out = res.get("result", {})
    facts = []
    if "unexpected_count" in out:
        pct = out.get("unexpected_percent")
        facts.append(f"unexpected_count={out['unexpected_count']} of {out.get('element_count', '?')} rows"
                     + (f" ({pct:.1f}%)" if isinstance(pct, int | float) else ""))  # fmt: skip
    if "observed_value" in out:
        facts.append(f"observed_value={out['observed_value']!r}")
    examples = _distinct(out.get("partial_unexpected_list") or [])[:_EXAMPLES]
    if examples:
        facts.append(f"e.g. {examples!r}")
    exc = res.get("exception_info", {})
    if exc.get("raised_exception"):
        facts.append(f"raised: {str(exc.get('exception_message')).splitlines()[0]}")
    return text + (": " + "; ".join(facts) if facts else "")


def _distinct(values: list) -> list:
    """Unexpected values without repeats, in order (GX lists a duplicated id once per row)."""
    seen, out = set(), []
    for v in values:
        v = json.loads(json.dumps(v, default=lambda o: o.item() if hasattr(o, "item") else str(o)))  # numpy -> plain
        marker = repr(v)
        if marker not in seen:
            seen.add(marker)
            out.append(v)
    return out
