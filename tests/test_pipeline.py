"""The pipeline flow on the tiny model: every stage, quality checks, manifest, resume, CLI."""

from __future__ import annotations

import json

import polars as pl
import pytest

from flows.cli import main
from flows.stages import ORDER, STAGES
from tasks.core.storage import RunPaths


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory, prefect_harness):
    """One pipeline run of the tiny model on 60 facts, shared by the tests below; its store named in the config, so
    a test that runs it again finds the same store whatever the test's own CLEARFLOW_STORE."""
    from flows.pipeline import pipeline_flow
    from tasks.core.config import RunConfig

    cfg = RunConfig.model_validate(
        {
            "run": "tiny",
            "runs_dir": str(tmp_path_factory.mktemp("runs")),
            "limit": 60,
            "model": {"name": tiny_model},
            "finetune": {"max_items": 4, "max_length": 256, "compile": False},  # compiling: tests/test_finetune.py
            "evaluate": {"max_new_tokens": 4, "bootstrap": 50},
            "activations": {"store": str(tmp_path_factory.mktemp("store"))},
        }
    )
    report = pipeline_flow(cfg=cfg)
    return cfg, RunPaths(cfg.runs_dir / "tiny"), report


def test_pipeline_writes_every_artifact(tiny_run):
    cfg, paths, report = tiny_run
    assert report == str(paths.report) and paths.report.exists()
    for table in ("items", "statements", "rejects", "sentences", "probe_metrics", "sentence_scores",
                  "predictions", "metrics", "comparisons"):
        assert paths.table(table).exists(), table
        assert (paths.quality / f"{table}.json").exists(), table
    assert list(paths.activations.glob("model=*/layer=*/*.parquet"))
    assert (paths.arm_adapter("clear") / "adapter_model.safetensors").exists()
    assert list(paths.figures.glob("*.png"))
    assert paths.catalog.exists()
    manifest = json.loads(paths.manifest.read_text())
    assert set(manifest["stages"]) == set(ORDER)
    assert manifest["config"]["limit"] == 60 and manifest["finished_at"]
    assert all(len(o["sha256"]) == 64 for s in manifest["stages"].values() for o in s["outputs"].values())
    assert {n: set(s["outputs"]) for n, s in manifest["stages"].items()} == {n: set(STAGES[n].writes) for n in ORDER}
    assert manifest["inputs"] == json.loads(paths.ingest_provenance.read_text())
    methods = set(pl.read_parquet(paths.table("metrics"))["method"])
    from tasks.evaluate.methods import REGISTRY

    assert methods == set(cfg.evaluate.methods or [n for n, m in REGISTRY.items() if m.default])  # None: defaults


def test_second_run_resumes_without_redoing_stages(tiny_run):
    from flows.pipeline import pipeline_flow

    cfg, paths, _ = tiny_run
    pipeline_flow(cfg=cfg)  # current for cfg, whatever another test of the module changed (a probe option)
    before = json.loads(paths.manifest.read_text())["stages"]
    pipeline_flow(cfg=cfg)
    after = json.loads(paths.manifest.read_text())["stages"]
    assert {s: r["finished_at"] for s, r in after.items()} == {s: r["finished_at"] for s, r in before.items()}


def test_stage_flows_in_the_pipeline_send_no_heartbeats_and_a_stage_flow_alone_does(tiny_run, monkeypatch):
    """Inside the pipeline's flow (whose own heartbeat says the process lives) the stage flows send none: Prefect's
    heartbeat thread holds each flow run's end up to a second. A stage flow run on its own (a deployment, `clearflow
    stage` with a server) keeps Prefect's heartbeat, which its crash detection reads."""
    import flows.orchestrate as orchestrate
    from flows.pipeline import pipeline_flow, stage_flow
    from prefect.settings import Settings, get_current_settings

    cfg, _, _ = tiny_run
    seen = []
    real = orchestrate.run_stage

    def recording(*args, **kwargs):
        seen.append(get_current_settings().flows.heartbeat_frequency)
        return real(*args, **kwargs)

    monkeypatch.setattr(orchestrate, "run_stage", recording)
    pipeline_flow(cfg=cfg)
    assert seen == [None] * len(ORDER)
    seen.clear()
    stage_flow("report")(cfg=cfg)
    assert seen == [Settings().flows.heartbeat_frequency] and seen[0] is not None
    assert get_current_settings().flows.heartbeat_frequency is not None  # the pipeline gave the setting back


def test_an_unchanged_run_starts_no_orchestrator_and_force_does(tiny_run, monkeypatch, capsys):
    """`clearflow run` with the options of a finished run has nothing to do: it says so without starting Prefect (no
    flow, no temporary server); --force runs the pipeline flow."""
    import flows.children
    import flows.pipeline
    from flows.cli import Run

    cfg, paths, _ = tiny_run
    flows.pipeline.pipeline_flow(cfg=cfg)  # current again, whatever another test changed
    started = []
    monkeypatch.setattr(flows.pipeline, "pipeline_flow", lambda **kw: started.append(kw) or str(paths.report))
    monkeypatch.setattr(flows.children, "tie_prefect_server_to_this_process", lambda: started.append("server"))
    Run.model_validate(cfg.model_dump()).cli_cmd()
    assert started == [] and f"report: {paths.report}" in capsys.readouterr().out
    Run.model_validate(cfg.model_dump() | {"force": True}).cli_cmd()
    assert started == ["server", {"cfg": cfg, "force": True}]


def test_a_stage_without_a_server_runs_in_process_and_with_one_as_a_flow(tiny_run, monkeypatch, capsys):
    """`clearflow stage` with no PREFECT_API_URL runs the stage's work and checks as plain calls (no temporary
    server to start); with one, it runs the stage's flow, which the server records."""
    import flows.pipeline
    from flows.runner import load_manifest

    cfg, paths, _ = tiny_run
    flows_run = []
    real = flows.pipeline.stage_flow

    def recording(name):
        return lambda **kw: flows_run.append(name) or real(name)(**kw)

    monkeypatch.setattr(flows.pipeline, "stage_flow", recording)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    before = load_manifest(paths)["stages"]["report"]["finished_at"]
    main(["stage", "report", "--run", "tiny", "--runs-dir", str(cfg.runs_dir)])
    assert flows_run == [] and f"report: {paths.report}" in capsys.readouterr().out
    assert load_manifest(paths)["stages"]["report"]["finished_at"] >= before
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the session's test server
    main(["stage", "report", "--run", "tiny", "--runs-dir", str(cfg.runs_dir)])
    assert flows_run == ["report"]


def test_stage_rerun_with_new_option_makes_downstream_stale(tiny_run, capsys):
    from flows.runner import is_current, load_manifest
    from flows.stages import STAGES

    cfg, paths, _ = tiny_run
    main(["stage", "probes", "--run", "tiny", "--runs-dir", str(cfg.runs_dir), "--probe.threshold", "0.9"])
    manifest = load_manifest(paths)
    assert manifest["config"]["probe"]["threshold"] == 0.9
    assert manifest["config"]["limit"] == 60  # the rest of the run's config is kept
    scores = pl.read_parquet(paths.table("sentence_scores"))
    assert scores["flagged"].to_list() == (scores["p_conflict"] > 0.9).to_list()
    new_cfg = cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"threshold": 0.9})})
    assert is_current(STAGES["probes"], new_cfg, paths, manifest)
    # finetune read the old flags: it is no longer current for the new probes outputs
    assert not is_current(STAGES["finetune"], new_cfg, paths, manifest)


def test_runner_gives_a_stage_only_its_declared_sections(tiny_run, prefect_harness, monkeypatch):
    import tasks.report
    from flows.orchestrate import run_stage
    from tasks.core.config import ConfigView

    cfg, paths, _ = tiny_run
    seen = []
    real = tasks.report.run_report

    def spy(view, run_paths):
        seen.append(view)
        return real(view, run_paths)

    monkeypatch.setattr(tasks.report, "run_report", spy)
    outputs, skipped = run_stage("report", cfg, force=True)
    assert outputs == {"report": str(paths.report), "figures": str(paths.figures),
                       "trace": str(paths.artifact("trace"))} and not skipped
    assert isinstance(seen[0], ConfigView) and seen[0].sections == STAGES["report"].config


def test_stage_of_unknown_run_is_a_clear_error(tiny_cfg, capsys):
    with pytest.raises(SystemExit):
        main(["stage", "probes", "--run", "nothing-here", "--runs-dir", str(tiny_cfg.runs_dir)])
    assert "no run 'nothing-here'" in capsys.readouterr().err
    assert not (tiny_cfg.runs_dir / "nothing-here").exists()


def test_stage_needs_its_upstream(tiny_run, prefect_harness):
    from flows.orchestrate import run_stage

    cfg, _, _ = tiny_run
    fresh = cfg.model_copy(update={"run": "fresh"})
    (cfg.runs_dir / "fresh").mkdir()
    with pytest.raises(RuntimeError, match="needs"):
        run_stage("probes", fresh)


def test_sql_answers_from_latest_run_and_is_read_only(tiny_run, capsys):
    cfg, paths, _ = tiny_run
    main(["sql", "select layer, max(auroc) as auroc from probe_metrics group by layer order by layer",
          "--runs-dir", str(cfg.runs_dir)])
    out = capsys.readouterr().out
    n_layers = pl.read_parquet(paths.table("probe_metrics"))["layer"].n_unique()
    assert "auroc" in out and len([line for line in out.splitlines() if line.strip()]) >= n_layers
    with pytest.raises(SystemExit):
        main(["sql", "drop view items", "--runs-dir", str(cfg.runs_dir)])
    assert "read-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sql", "select * from no_such_table", "--runs-dir", str(cfg.runs_dir)])
    err = capsys.readouterr().err
    assert err.startswith("clearflow: error: query failed") and "Traceback" not in err
