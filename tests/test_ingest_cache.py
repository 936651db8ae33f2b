"""Ingest provenance and cache: sha256 of every input, a second read of the same file parses nothing."""

from __future__ import annotations

import json

import polars as pl
import pytest

import tests.format_fixtures as fixtures
from flows.runner import fingerprint
from flows.stages import STAGES
from tasks.core.config import RunConfig
import tasks.ingest.stage
from tasks.ingest.provenance import input_files
from tasks.ingest.sources import run_sources
from tasks.ingest.stage import run_ingest
from tasks.core.storage import RunPaths, file_sha256


def _cfg(tmp_path, run: str, data_path, **kw) -> RunConfig:
    return RunConfig.model_validate(
        {"run": run, "runs_dir": str(tmp_path / "runs"), "dataset": "confiqa-qa", "data_path": str(data_path),
         "limit": 30, "ingest": {"max_context_tokens": 400}, **kw}
    )


def _provenance(cfg: RunConfig) -> dict:
    """Ingest a run and return its ingest_provenance.json."""
    paths = RunPaths(cfg.runs_dir / cfg.run)
    run_ingest(cfg, paths)
    return json.loads(paths.ingest_provenance.read_text())


def _lines(caplog) -> list[str]:
    """The stage's summary lines (one per source), as the CLI shows them."""
    out = [r.getMessage() for r in caplog.records if r.name == "tasks.ingest.stage" and " read, " in r.getMessage()]
    caplog.clear()
    return out


def test_same_file_and_options_are_not_parsed_again(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="tasks")
    data = fixtures.write_confiqa_qa(tmp_path / "data", broken=True)
    first = RunPaths(tmp_path / "runs" / "a")
    run_ingest(_cfg(tmp_path, "a", data), first)
    lines = _lines(caplog)
    prov = json.loads(first.ingest_provenance.read_text())
    assert prov["files"][0] == {"role": "data", "path": str(data.resolve()), "bytes": data.stat().st_size,
                                "sha256": file_sha256(data)}
    assert prov["files"][1]["role"] == "probe" and prov["loaders"]["probe"]["dataset"] == "known-facts"
    # the counts add up per source, and both sources' lines are printed
    for counts in prov["counts"].values():
        assert counts["read"] == counts["kept"] + counts["rejected"]
    assert lines[0].startswith("confiqa-qa: ") and lines[1].startswith("known-facts: ")

    def refuse(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(tasks.ingest.stage, "read_sources", refuse)
    second = RunPaths(tmp_path / "runs" / "b")
    run_ingest(_cfg(tmp_path, "b", data), second)
    assert _lines(caplog) == lines
    for table in ("items", "statements", "rejects"):
        assert pl.read_parquet(second.table(table)).equals(pl.read_parquet(first.table(table)))
    assert json.loads(second.ingest_provenance.read_text()) == prov


def test_edited_file_or_other_options_miss_the_cache(tmp_path, monkeypatch):
    data = fixtures.write_confiqa_qa(tmp_path / "data")
    first = _provenance(_cfg(tmp_path, "a", data))
    other = _provenance(_cfg(tmp_path, "b", data, seed=3))
    assert other["cache_key"] != first["cache_key"]
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[:-1]))
    edited = _provenance(_cfg(tmp_path, "c", data))
    assert edited["cache_key"] != first["cache_key"] and edited["files"][0]["sha256"] != first["files"][0]["sha256"]


def test_an_edited_input_file_makes_the_ingest_stage_stale(tmp_path):
    data = fixtures.write_confiqa_qa(tmp_path / "data")
    cfg = _cfg(tmp_path, "a", data)
    before = fingerprint(STAGES["ingest"], cfg, {})
    assert fingerprint(STAGES["ingest"], cfg, {}) == before
    data.write_text(data.read_text().replace("[", "[ ", 1))
    assert fingerprint(STAGES["ingest"], cfg, {}) != before


def test_missing_path_and_bad_probe_source_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs --data-path"):
        run_ingest(RunConfig(run="x", dataset="nq-swap"), RunPaths(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="nope.json: no such file or directory \\(dataset nq-swap; get it from"):
        run_ingest(RunConfig(run="x", dataset="nq-swap", data_path=tmp_path / "nope.json"), RunPaths(tmp_path / "x"))
    with pytest.raises(ValueError, match="has no probe statements"):
        run_ingest(RunConfig(run="x", ingest={"probe_dataset": "squad"}), RunPaths(tmp_path / "x"))


@pytest.mark.parametrize(
    ("dataset", "ingest", "expected"),
    [
        ("known-facts", {}, [("known-facts", "data")]),
        ("mquake", {}, [("mquake", "data")]),
        ("mquake", {"probe_dataset": "mquake"}, [("mquake", "data")]),
        ("mquake", {"probe_dataset": "known-facts"}, [("mquake", "data"), ("known-facts", "probe")]),
        ("known-facts", {"probe_dataset": "mquake", "probe_data_path": "m.json"},
         [("known-facts", "data"), ("mquake", "probe")]),
        ("confiqa-qa", {}, [("confiqa-qa", "data"), ("known-facts", "probe")]),
        ("squad", {"probe_dataset": "mquake", "probe_data_path": "m.json"}, [("squad", "data"), ("mquake", "probe")]),
    ],
)
def test_the_probe_statement_source_is_decided_once(dataset, ingest, expected):
    cfg = RunConfig.model_validate({"run": "x", "dataset": dataset, "data_path": "d.json", "ingest": ingest})
    sources = run_sources(cfg)
    assert [(s.dataset, s.role) for s in sources] == expected
    assert sources[0].path == cfg.data_path
    assert all(s.path == cfg.ingest.probe_data_path for s in sources[1:])


def test_reading_and_provenance_take_the_same_sources(tmp_path, monkeypatch, caplog):
    """What the stage reads is what provenance hashes: both come from the one run_sources list."""
    caplog.set_level("INFO", logger="tasks")
    probe = fixtures.write_mquake(tmp_path / "probe")
    cfg = _cfg(tmp_path, "a", fixtures.write_squad(tmp_path / "data"), dataset="squad",
               ingest={"max_context_tokens": 400, "probe_dataset": "mquake", "probe_data_path": str(probe)})
    calls = []
    monkeypatch.setattr(tasks.ingest.stage, "run_sources", lambda c: calls.append(c) or run_sources(c))
    paths = RunPaths(tmp_path / "runs" / "a")
    run_ingest(cfg, paths)
    prov = json.loads(paths.ingest_provenance.read_text())
    assert len(calls) == 1
    assert [(f["role"], f["sha256"]) for f in prov["files"]] == [("data", file_sha256(cfg.data_path)),
                                                               ("probe", file_sha256(probe))]
    assert {r: v["dataset"] for r, v in prov["loaders"].items()} == {"data": "squad", "probe": "mquake"}
    assert [line.split(":")[0] for line in _lines(caplog)] == ["squad", "mquake"]
    assert set(pl.read_parquet(paths.table("statements"))["stmt_id"].str.slice(0, 7)) == {"mquake-"}


def test_an_unknown_dataset_or_missing_probe_path_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'; supported datasets: .*squad"):
        run_sources(RunConfig(run="x", dataset="nope"))
    data = fixtures.write_squad(tmp_path)
    cfg = RunConfig(run="x", dataset="squad", data_path=data, ingest={"probe_dataset": "mquake"})
    with pytest.raises(ValueError, match="ingest.probe_dataset 'mquake' needs --ingest.probe-data-path"):
        input_files(run_sources(cfg))
