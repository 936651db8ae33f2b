"""End to end on the real embedded default (SmolLM2-135M-Instruct) with a handful of items."""

from __future__ import annotations

import json

import polars as pl
import pytest


@pytest.mark.slow
def test_pipeline_on_default_model(tmp_path, prefect_harness):
    from flows.pipeline import pipeline_flow
    from tasks.core.config import RunConfig
    from tasks.core.storage import RunPaths

    cfg = RunConfig.model_validate(
        {
            "run": "smol",
            "runs_dir": str(tmp_path),
            "limit": 60,
            "finetune": {"max_items": 6},
            "evaluate": {"max_new_tokens": 12, "bootstrap": 100},
        }
    )
    pipeline_flow(cfg=cfg)
    paths = RunPaths(tmp_path / "smol")
    best = json.loads((paths.probes / "best.json").read_text())
    layers = pl.read_parquet(paths.table("probe_metrics"))["layer"].unique().sort().to_list()
    assert layers == list(range(30))  # SmolLM2 has 30 decoder layers, all probed by default
    assert 0.0 <= best["test_auroc"] <= 1.0
    table = pl.read_parquet(paths.table("metrics")).filter((pl.col("condition") == "all") & (pl.col("knowledge") == "all"))
    metrics = {r["method"]: r for r in table.iter_rows(named=True)}  # the overall rows
    # The model follows a counterfactual context far more often than it invents the same answer closed-book.
    assert metrics["full_context"]["ps"] > metrics["closed_book"]["ps"]
    assert metrics["closed_book"]["ps"] <= 0.2
    assert "CLEAR" in paths.report.read_text() or "clear" in paths.report.read_text()
