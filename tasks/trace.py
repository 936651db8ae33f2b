"""The per-item trace page: one static HTML file (no server; it opens from the file system) where a person reads one
evaluated item at a time: its context units coloured by the probe's p_conflict with the marked ones boxed, the gold
answers, and what every method answered, right or wrong. A search box filters the items.

The data travel inside the page as JSON and the page's script writes them with textContent only: a context holding
markup or script shows as text and runs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from tasks.core.storage import RunPaths, atomic_path, read_optional_table, read_table
from tasks.evaluate.methods import method_label

_METRIC_COLUMNS = ("method", "n", "em", "f1", "ps", "po", "mr")


def _units(sentences: pl.DataFrame, scores: pl.DataFrame | None) -> dict[str, list[dict[str, Any]]]:
    """Each item's units in order, with p_conflict and whether the probe marked it (None when unscored)."""
    units = sentences.select("item_id", "sent_idx", "text", "label")
    if scores is not None:
        units = units.join(scores.select("item_id", "sent_idx", "p_conflict", "flagged"), on=["item_id", "sent_idx"],
                           how="left")
    else:
        units = units.with_columns(p_conflict=pl.lit(None, pl.Float64), flagged=pl.lit(None, pl.Boolean))
    out: dict[str, list[dict[str, Any]]] = {}
    for row in units.sort("item_id", "sent_idx").iter_rows(named=True):
        out.setdefault(row["item_id"], []).append(
            {"text": row["text"], "label": row["label"], "p": row["p_conflict"], "marked": row["flagged"]})
    return out


def _answers(predictions: pl.DataFrame | None) -> dict[str, list[dict[str, Any]]]:
    """Each item's answers, one per method, in the order the methods were evaluated."""
    if predictions is None:
        return {}
    order = {m: i for i, m in enumerate(dict.fromkeys(predictions["method"].to_list()))}
    out: dict[str, list[dict[str, Any]]] = {}
    for row in predictions.iter_rows(named=True):
        out.setdefault(row["item_id"], []).append(
            {"method": row["method"], "label": method_label(row["method"]), "answer": row["prediction"],
             "em": row["em"], "f1": row["f1"], "ps": row["ps"], "po": row["po"], "rank": order[row["method"]]})
    for answers in out.values():
        answers.sort(key=lambda a: a["rank"])
    return out


def trace_items(paths: RunPaths, split: str) -> list[dict[str, Any]]:
    """The evaluated split's items with everything the page shows of each."""
    items = read_table(paths.table("items")).filter(pl.col("split") == split)
    units = _units(read_table(paths.table("sentences")), read_optional_table(paths.table("sentence_scores")))
    answers = _answers(read_optional_table(paths.table("predictions")))
    return [
        {"id": r["item_id"], "question": r["question"], "condition": r["condition"],
         "counterfactual": bool(r["counterfactual"]), "answers": r["answers"],
         "orig_answers": r["orig_answers"] or [], "units": units.get(r["item_id"], []),
         "methods": answers.get(r["item_id"], [])}
        for r in items.sort("item_id").iter_rows(named=True)
    ]


def _header(run: str, facts: dict[str, Any], metrics: pl.DataFrame | None, best: dict | None) -> dict[str, Any]:
    """The run's identity, the options a reader asks about first, the chosen probe and the overall metrics."""
    rows = []
    if metrics is not None:
        overall = metrics.filter((pl.col("condition") == "all") & (pl.col("knowledge") == "all"))
        rows = overall.select(c for c in _METRIC_COLUMNS if c in overall.columns).to_dicts()
    probe = {k: best[k] for k in ("probe", "layer", "position", "dev_auroc", "test_auroc") if k in best} if best else {}
    return {"run": run, "facts": facts, "probe": probe, "metrics": rows}


def write_trace_page(paths: RunPaths, facts: dict[str, Any], split: str, out: Path) -> Path:
    """Write the page for the run's evaluated split (`facts`: the options its header shows); returns its path."""
    best = json.loads(paths.best_probe.read_text()) if paths.best_probe.exists() else None
    header = _header(paths.root.name, facts, read_optional_table(paths.table("metrics")), best)
    data = {"header": header, "split": split, "items": trace_items(paths, split)}
    blob = json.dumps(data, ensure_ascii=False, default=str)
    blob = blob.replace("</", "<\\/").replace("<!--", "<\\u0021--")  # nothing in it can end the script element
    page = _TEMPLATE.read_text(encoding="utf-8").replace("/*DATA*/null", blob)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


_TEMPLATE = Path(__file__).with_name("trace_template.html")
