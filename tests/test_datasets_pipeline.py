"""Every published format runs through the whole pipeline to a report, and ingest provenance is cached."""

from __future__ import annotations

import json

import polars as pl
import pytest

import tests.format_fixtures as fixtures
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths

PUBLISHED = [
    "confiqa-qa", "confiqa-mr", "confiqa-mc", "faitheval-counterfactual", "faitheval-unanswerable",
    "faitheval-inconsistent", "nq-swap", "zhou-nq", "squad", "mquake",
]  # fmt: skip


def _writer(dataset: str):
    return getattr(fixtures, "write_" + dataset.replace("-", "_"))


def _cfg(dataset: str, data_path, tiny_model: str, runs_dir, **extra) -> RunConfig:
    """A small run of the tiny model; probe statements from 40 bundled known facts unless the data has some."""
    return RunConfig.model_validate(
        {
            "run": dataset,
            "runs_dir": str(runs_dir),
            "dataset": dataset,
            "data_path": str(data_path),
            "limit": 40,
            "model": {"name": tiny_model},
            "finetune": {"max_items": 2, "max_length": 192, "compile": False},  # compiling: tests/test_finetune.py
            "evaluate": {"max_new_tokens": 3, "bootstrap": 20, "methods": ["full_context", "clear"]},
            **extra,
        }
    )


def pipeline(cfg: RunConfig) -> str:
    """Every stage in order, each checked by its suites and recorded in the manifest, through the runner that
    `clearflow stage` uses without a server (flows/execute.py): this module tests the formats, not the orchestration
    (tests/test_pipeline.py runs the Prefect flows), which costs seconds a run."""
    from flows.execute import run_stage_with
    from flows.stages import ORDER

    for stage in ORDER:
        run_stage_with(stage, cfg, False)
    return str(RunPaths(cfg.runs_dir / cfg.run).report)


@pytest.mark.parametrize("dataset", PUBLISHED)
def test_each_format_runs_to_a_report(dataset, tiny_model, tmp_path):
    data_path = _writer(dataset)(tmp_path / "data")
    cfg = _cfg(dataset, data_path, tiny_model, tmp_path / "runs")
    report = pipeline(cfg)
    paths = RunPaths(cfg.runs_dir / dataset)
    assert report == str(paths.report) and paths.report.exists()
    items = pl.read_parquet(paths.table("items"))
    assert items.height > 0 and set(items["dataset"]) == {dataset}
    statements = pl.read_parquet(paths.table("statements"))
    assert set(statements["label"]) == {0, 1}
    metrics = pl.read_parquet(paths.table("metrics"))
    assert set(metrics["method"]) == {"full_context", "clear"}
    manifest = json.loads(paths.manifest.read_text())
    roles = {f["role"] for f in manifest["inputs"]["files"]}
    assert "data" in roles and all(len(f["sha256"]) == 64 for f in manifest["inputs"]["files"])
    assert manifest["inputs"]["loaders"]["data"]["dataset"] == dataset


def test_a_dataset_registered_with_one_reader_runs_to_a_report(tiny_model, tmp_path, monkeypatch):
    """A new dataset is one reader (tests/format_fixtures.py:toy_reader) plus one registry entry."""
    from tasks.ingest.formats import READERS

    monkeypatch.setitem(READERS, fixtures.TOY, fixtures.toy_reader())
    cfg = _cfg(fixtures.TOY, fixtures.write_toy(tmp_path / "data", broken=True), tiny_model, tmp_path / "runs")
    assert pipeline(cfg) == str(RunPaths(cfg.runs_dir / fixtures.TOY).report)
    paths = RunPaths(cfg.runs_dir / fixtures.TOY)
    assert set(pl.read_parquet(paths.table("items"))["dataset"]) == {fixtures.TOY}
    rejects = pl.read_parquet(paths.table("rejects")).filter(pl.col("source") == "toy.jsonl")
    assert rejects["reason"].to_list() == ["same_answer", "not_an_object"]
    assert set(pl.read_parquet(paths.table("metrics"))["method"]) == {"full_context", "clear"}


def test_llm_facts_relevance_and_relevant_only_probing_through_the_pipeline(tiny_model, tmp_path):
    """The reference's decomposition options end to end: local-LLM facts, relevance filter, only relevant units probed."""
    data_path = fixtures.write_nq_swap(tmp_path / "data")
    cfg = _cfg(
        "nq-swap", data_path, tiny_model, tmp_path / "runs",
        decompose={"method": "llm", "llm": {"max_new_tokens": 24}, "relevance": True, "top_k": 1},
        activations={"sentences": "relevant"},
    )
    pipeline(cfg)
    paths = RunPaths(cfg.runs_dir / "nq-swap")
    sentences = pl.read_parquet(paths.table("sentences"))
    assert sentences["unit"].is_in(["sentence", "fact"]).all() and sentences["source_idx"].min() == 0
    assert sentences["relevance"].null_count() == 0 and sentences["is_relevant"].any()
    # every item keeps at least its top-1 unit per step; only relevant units were scored by the probe
    assert set(sentences.filter("is_relevant")["item_id"]) == set(sentences["item_id"])
    scores = pl.read_parquet(paths.table("sentence_scores"))
    relevant = sentences.filter("is_relevant").select("item_id", "sent_idx")
    assert scores.select("item_id", "sent_idx").sort(["item_id", "sent_idx"]).equals(relevant.sort(["item_id", "sent_idx"]))
    assert paths.report.exists()
