"""What a Prefect user relies on (issue 13): transient faults retried, data-quality failures and bad input not,
flow runs named after the run directory and stage, artifact keys Prefect accepts."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from prefect import flow

import tasks.report
from flows.observe import _key, is_transient
from flows.orchestrate import STAGE_RETRIES, stage_work
from tasks.core.quality import DataQualityError


@pytest.mark.parametrize(("fault", "transient"), [
    (ConnectionResetError("peer went away"), True),
    (TimeoutError("read timed out"), True),
    (OSError(errno.EIO, "I/O error"), True),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (FileNotFoundError(errno.ENOENT, "no such file"), False),
    (DataQualityError("items: 2 expectations failed"), False),
    (ValueError("--limit must be at least 1"), False),
])
def test_which_faults_are_transient(fault, transient):
    assert is_transient(fault) is transient


@pytest.mark.parametrize(("fault", "calls"), [
    (ConnectionResetError("peer went away"), 2),  # retried once, then the stage succeeds
    (DataQualityError("items: 2 expectations failed"), 1),  # the same data fail the same way: not retried
    (ValueError("bad option"), 1),
])
def test_the_stage_task_retries_transient_faults_only(prefect_harness, tiny_cfg, monkeypatch, fault, calls):
    made = []

    def flaky(cfg, paths):
        made.append(paths)
        if len(made) == 1:
            raise fault

    monkeypatch.setattr(tasks.report, "run_report", flaky)
    work = stage_work.with_options(retry_delay_seconds=0)  # the stage task's own retries and condition, no wait

    @flow
    def one_stage():
        return work("report", tiny_cfg, return_state=True)

    state = one_stage(return_state=True)
    assert len(made) == calls and STAGE_RETRIES >= 1
    assert state.is_completed() is (calls == 2)


def test_artifact_keys_are_what_prefect_accepts():
    assert _key("Run_2026.12.03", "probes", "quality") == "run-2026-12-03-probes-quality"
    assert _key("--a__b--", "report") == "a-b-report"


KEY = "sk-clearflow-secret-4711"


def test_the_api_key_comes_from_a_secret_block_and_is_written_nowhere(prefect_harness, tiny_cfg, server, caplog):
    """decompose.llm.api_key_block names a Prefect Secret block: the endpoint gets its key as the bearer token, and
    the key is in no flow-run parameter, log line, manifest or other file of the run, nor in the reply cache."""
    import logging

    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from flows.decompose import decompose_flow
    from flows.ingest import ingest_flow

    Secret(value=KEY).save("clearflow-llm-key", overwrite=True)
    llm = {"backend": "openai", "base_url": server.base_url, "model": "test-model", "api_key_block": "clearflow-llm-key",
           "max_new_tokens": 64}
    cfg = tiny_cfg.model_copy(update={"limit": 12, "decompose": tiny_cfg.decompose.model_copy(
        update={"method": "llm", "llm": tiny_cfg.decompose.llm.model_validate(llm)})})
    caplog.set_level(logging.DEBUG)
    ingest_flow(cfg=cfg)
    decompose_flow(cfg=cfg)
    assert server.requests and {r["auth"] for r in server.requests} == {f"Bearer {KEY}"}

    from tasks.core.storage import cache_root

    places = [Path(tiny_cfg.runs_dir), cache_root() / "llm"]
    written = [p for where in places for p in where.rglob("*") if p.is_file()]
    assert written and not [p for p in written if KEY.encode() in p.read_bytes()]
    assert KEY not in caplog.text

    async def parameters() -> str:
        async with get_client() as client:
            runs = await client.read_flow_runs()
            return repr([r.parameters for r in runs])

    import asyncio

    said = asyncio.run(parameters())
    assert "clearflow-llm-key" in said and KEY not in said


def test_a_missing_secret_block_is_one_line(prefect_harness):
    from tasks.core.config import LLMConfig
    from tasks.decompose.llm import LLMError, api_key

    with pytest.raises(LLMError, match="decompose.llm.api_key_block 'no-such-block'") as err:
        api_key(LLMConfig(backend="openai", api_key_block="no-such-block"))
    assert "\n" not in str(err.value)


def test_a_stage_progress_bar_becomes_a_progress_artifact(prefect_harness, tiny_cfg, monkeypatch):
    """A bar inside the stage task shows in the UI as a progress artifact that ends at 100%."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    from tasks.core.progress import tqdm

    def counting(cfg, paths):
        for _ in tqdm(range(7), desc="counting", mininterval=0, disable=False):
            pass

    monkeypatch.setattr(tasks.report, "run_report", counting)

    @flow
    def one_stage():
        return stage_work("report", tiny_cfg)

    one_stage()

    async def progress() -> list:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
            return [(a.description, a.data) for a in found]

    found = asyncio.run(progress())
    assert ("report: counting", 100.0) in found, found
