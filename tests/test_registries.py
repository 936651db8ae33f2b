"""Registries own their entries: a throwaway method, probe kind and dataset reader, each one module-sized entry plus
one registry line, run through the tiny pipeline and show up in its tables and report."""

from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from safetensors.numpy import load_file, save_file

import tests.format_fixtures as fixtures
from tasks.core.config import RunConfig
from tasks.core.prompts import SYSTEM, chat_messages
from tasks.core.registry import collect, resolve
from tasks.core.storage import RunPaths, write_json
from tasks.evaluate.comparison import overall
from tasks.evaluate.methods import MODULES, REGISTRY, Method
from tasks.evaluate.methods.arms import METHOD as ARM_METHODS
from tasks.ingest.formats import READERS
from tasks.probes.kinds import KINDS, ProbeKind
from tasks.probes.kinds.base import check_labels

# ---------------------------------------------------------------- a throwaway method: the question before the context


def question_first(question: str, context: str | None) -> list[dict[str, str]]:
    """The shared QA prompt with its two parts swapped."""
    return chat_messages(SYSTEM, f"Question: {question}\nContext: {context}")


QUESTION_FIRST = Method("question_first", "question first", "the question, then the context", question_first,
                        context="plain", model="base")

# ---------------------------------------------------------------- a throwaway probe kind: nearest centroid


@dataclass
class CentroidProbe:
    """p_conflict = d0 / (d0 + d1), d_k the squared distance to the mean vector of label k (not a linear probe)."""

    centroids: np.ndarray  # (2, d): label 0, label 1
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.centroids = np.asarray(self.centroids, dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        d = ((np.asarray(X, np.float64)[:, None, :] - self.centroids.astype(np.float64)) ** 2).sum(-1)
        return d[:, 0] / (d[:, 0] + d[:, 1])

    def save(self, path: Path) -> Path:
        save_file({"centroids": self.centroids}, str(path))
        write_json(self.meta, Path(path).with_suffix(".json"))
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> CentroidProbe:
        return cls(load_file(str(path))["centroids"], json.loads(Path(path).with_suffix(".json").read_text()))


def fit_centroid(X: np.ndarray, y: np.ndarray, strength: float, seed: int) -> CentroidProbe:
    check_labels(y)
    return CentroidProbe(np.stack([X[y == 0].mean(axis=0), X[y == 1].mean(axis=0)]))


CENTROID = ProbeKind("centroid", "nearest label centroid", fit_centroid, CentroidProbe.load)

# ------------------------------------------------ a throwaway dataset reader: a JSON list of {q, ctx, cf, mem}

TINY = fixtures.TOY  # a throwaway reader: tests/format_fixtures.py declares it as its own module would
TINY_READER = fixtures.toy_reader()


def expected_subset_counts(predictions: pl.DataFrame, items: pl.DataFrame) -> dict[tuple[str, str, str], int]:
    """(method, condition, knowledge) -> n, counted row by row: a condition-less or known-less item counts in "all"."""
    condition = dict(zip(items["item_id"], items["condition"]))
    counts: dict[tuple[str, str, str], int] = {}
    for p in predictions.iter_rows(named=True):
        conds = ["all"] + ([condition[p["item_id"]]] if condition[p["item_id"]] else [])
        knows = ["all"] + ([] if p["known"] is None else ["known" if p["known"] else "unknown"])
        for key in ((p["method"], c, k) for c in conds for k in knows):
            counts[key] = counts.get(key, 0) + 1
    return counts


def subset_counts(metrics: pl.DataFrame) -> dict[tuple[str, str, str], int]:
    """(method, condition, knowledge) -> n of the metrics table, refusing a subset listed twice."""
    keys = list(metrics.select("method", "condition", "knowledge").iter_rows())
    assert len(keys) == len(set(keys))
    return dict(zip(keys, metrics["n"]))


# ---------------------------------------------------------------- tests


def test_every_declared_entry_is_registered_under_its_module_name():
    """A method or kind module left out of MODULES would silently never run: each one is listed, by its own name
    (a module declaring a list, as the fine-tuned methods generated from the arms, by the names it declares)."""
    registries = (("tasks.evaluate.methods", "METHOD", REGISTRY), ("tasks.probes.kinds", "KIND", KINDS))
    for package, attr, registry in registries:
        declared = {}
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            entry = getattr(importlib.import_module(f"{package}.{info.name}"), attr, None)
            if entry is not None:
                declared[info.name] = entry
        singles = {module: entry.name for module, entry in declared.items() if not isinstance(entry, list)}
        assert singles and all(module == name for module, name in singles.items()), singles
        names = {e.name for entry in declared.values() for e in (entry if isinstance(entry, list) else [entry])}
        assert names == set(registry), package
    in_order = [n for module in MODULES for n in ([m.name for m in ARM_METHODS] if module == "arms" else [module])]
    assert list(REGISTRY) == in_order  # report order


def test_registry_helpers_refuse_bad_names():
    with pytest.raises(ValueError, match="two modules declare the entry 'logistic'"):
        collect("tasks.probes.kinds", ["logistic", "logistic"], "KIND")
    with pytest.raises(ValueError, match=r"unknown probe kind\(s\) \['x'\]; known: \['diffmean', 'logistic', 'mlp'\]"):
        resolve(KINDS, ["logistic", "x"], "probe kind")
    with pytest.raises(ValueError, match="no probe kinds configured"):
        resolve(KINDS, [], "probe kind")
    with pytest.raises(ValueError, match="listed twice"):
        resolve(KINDS, ["logistic", "logistic"], "probe kind")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture()
def throwaway_entries(monkeypatch, tmp_path):
    """The three throwaway entries, each registered with one line, removed again after the test."""
    monkeypatch.setitem(REGISTRY, QUESTION_FIRST.name, QUESTION_FIRST)
    monkeypatch.setitem(KINDS, CENTROID.name, CENTROID)
    monkeypatch.setitem(READERS, TINY, TINY_READER)
    monkeypatch.setenv("CLEARFLOW_CACHE", str(tmp_path / "cache"))  # no ingest cache entry of another run


def test_throwaway_entries_run_through_the_pipeline(throwaway_entries, tiny_model, tmp_path, prefect_harness):
    from flows.pipeline import pipeline_flow

    cfg = RunConfig.model_validate({
        "run": "throwaway", "runs_dir": str(tmp_path / "runs"), "dataset": TINY,
        "data_path": str(fixtures.write_toy(_mkdir(tmp_path / "data"))), "limit": 40, "model": {"name": tiny_model},
        "probe": {"kinds": ["logistic", "centroid"], "select_kind": "centroid"},
        "finetune": {"max_items": 2, "max_length": 192, "compile": False}, "evaluate": {"max_new_tokens": 3, "bootstrap": 20},
    })  # evaluate.methods unset: every registered method, the throwaway one included
    pipeline_flow(cfg=cfg)
    paths = RunPaths(cfg.runs_dir / "throwaway")

    items = pl.read_parquet(paths.table("items"))  # the reader: every record became an item
    assert items.height == len(fixtures.FACTS) and set(items["dataset"]) == {TINY}
    assert set(items["question"]) == {f[0] for f in fixtures.FACTS}

    probe_metrics = pl.read_parquet(paths.table("probe_metrics"))  # the kind: fitted on every layer, chosen
    layers = set(probe_metrics["layer"])
    assert set(probe_metrics.filter(pl.col("probe") == "centroid")["layer"]) == layers
    assert set(probe_metrics["probe"]) == {"logistic", "centroid"}
    assert set(pl.read_parquet(paths.table("sentence_scores"))["probe"]) == {"centroid"}
    final = CENTROID.load(paths.probes / "final.safetensors")
    assert final.meta["kind"] == "centroid" and final.meta["fitted_on"] == ["train", "dev"]

    predictions = pl.read_parquet(paths.table("predictions"))  # the method: answered, scored, reported
    n_test = items.filter(pl.col("split") == "test").height
    ours = predictions.filter(pl.col("method") == "question_first")
    assert n_test > 0 and ours.height == n_test
    assert all(p.index("Question:") < p.index("Context:") for p in ours["prompt"])
    metrics = pl.read_parquet(paths.table("metrics"))
    defaults = [n for n, m in REGISTRY.items() if m.default and n != QUESTION_FIRST.name]
    assert overall(metrics)["method"].to_list() == [*defaults, "question_first"]  # registry order, the new one last
    assert subset_counts(metrics) == expected_subset_counts(predictions, items)  # every subset with n > 0, once
    report = paths.report.read_text()
    assert "| question first | " in report and "- **question first** (`question_first`): the question, then" in report
