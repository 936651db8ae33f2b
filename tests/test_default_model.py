"""End to end on the real embedded default (SmolLM2-135M-Instruct) with a handful of items: the numbers it gives
are recorded here, so a change that moves the science fails the suite and is recorded again on purpose."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest


# Recorded on 2026-12-04 (2 CPU cores, torch 2.13.0 CPU, the pins in .ci/constraints.txt) with the config below.
# Split sizes and the chosen layer must match exactly; AUROCs within 0.02, and p_s within one item's answer (1/n of
# the n counterfactual test items): room for floating-point differences between CPUs, not for a change of method.
RECORDED = {
    "items": {"dev": 13, "test": 14, "train": 33}, "statements": {"dev": 26, "test": 28, "train": 66},
    "layer": 10, "dev_auroc": 0.8935, "test_auroc": 0.6786,
    "ps": {"clear": 0.8, "clear_unmarked": 0.6, "closed_book": 0.0, "full_context": 0.6, "lexical_copy": 1.0},
}
AUROC_TOL = 0.02


def _observed(paths) -> dict:
    """The figures a change of the science would move: split sizes, the chosen probe and its AUROCs, p_s per
    method over every test item."""
    items = pl.read_parquet(paths.table("items"))
    statements = pl.read_parquet(paths.table("statements"))
    best = json.loads((paths.probes / "best.json").read_text())
    metrics = pl.read_parquet(paths.table("metrics")).filter((pl.col("condition") == "all")
                                                             & (pl.col("knowledge") == "all"))
    return {
        "items": dict(sorted(items.group_by("split").len().iter_rows())),
        "statements": dict(sorted(statements.group_by("split").len().iter_rows())),
        "layer": best["layer"], "dev_auroc": round(best["dev_auroc"], 4), "test_auroc": round(best["test_auroc"], 4),
        "ps": {m: round(p, 4) for m, p in sorted(metrics.select("method", "ps").iter_rows())},
        "n_counterfactual": metrics["n_counterfactual"].max(),
    }


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

    got = _observed(paths)
    said = f"the default model's figures moved; if on purpose, record them in RECORDED:\n{json.dumps(got)}"
    assert {k: got[k] for k in ("items", "statements", "layer")} == \
        {k: RECORDED.get(k) for k in ("items", "statements", "layer")}, said
    assert got["dev_auroc"] == pytest.approx(RECORDED["dev_auroc"], abs=AUROC_TOL), said
    assert got["test_auroc"] == pytest.approx(RECORDED["test_auroc"], abs=AUROC_TOL), said
    assert got["ps"].keys() == RECORDED["ps"].keys(), said
    one_item = 1 / got["n_counterfactual"]
    np.testing.assert_allclose([got["ps"][m] for m in RECORDED["ps"]], list(RECORDED["ps"].values()),
                               atol=one_item + 1e-9, err_msg=said)
