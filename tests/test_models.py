"""The embedded model's one-time conversion: two processes that need it at once convert it once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import tasks.core.models as models


def _resolve(log: str) -> None:
    """In a forked child: the conversion replaced by a slow fake that records each call."""

    def fake_convert(src_dir, gguf_file, out_dir: Path) -> Path:
        with open(log, "a") as f:
            f.write("converted\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one converts
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    models.convert_gguf = fake_convert
    models.resolve_model_path("smollm2-135m")


def test_two_processes_convert_the_embedded_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARFLOW_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "calls.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_resolve, args=(str(log),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["converted"]
    assert models.resolve_model_path("smollm2-135m") == str(tmp_path / "cache" / "models" / "smollm2-135m")
