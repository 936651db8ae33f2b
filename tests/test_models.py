"""Loading models: the embedded model's one-time conversion (two processes that need it at once convert it once), and
a fanned-out worker's kept weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

import tasks.core.models as models
from tasks.core.config import ModelConfig
from tasks.core.models import resolve_model_path

REPO = Path(__file__).resolve().parents[1]

# A process that needs the embedded model, its conversion replaced by a fake that records each call and converts
# only once the other process has asked for the model too (so the two overlap).
_CHILD = textwrap.dedent(
    r"""
    import logging, sys, time
    from pathlib import Path
    import tasks.core.models as models

    logging.basicConfig(level=logging.INFO)
    calls = Path(sys.argv[1])

    def fake_convert(src_dir, gguf_file, out_dir):
        with calls.open("a") as f:
            f.write("converted\n")
        deadline = time.monotonic() + 60
        while calls.read_text().count("arrived") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    models.convert_gguf = fake_convert
    with calls.open("a") as f:
        f.write("arrived\n")
    print(models.resolve_model_path("smollm2-135m"))
    """
)


def test_two_processes_convert_the_embedded_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARFLOW_CACHE", str(tmp_path / "cache"))
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(calls)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert calls.read_text().splitlines().count("converted") == 1, outs
    want = str(tmp_path / "cache" / "models" / "smollm2-135m")
    assert [out.strip() for out, _ in outs] == [want, want]
    assert any("another process is writing it; waiting" in err for _, err in outs), outs  # the second one waited
    assert resolve_model_path("smollm2-135m") == want


def test_a_worker_loads_each_weights_once_for_consecutive_jobs(tiny_model, monkeypatch):
    """Fanned-out jobs of the same weights reuse the worker's model (one load, one merge); other weights reload."""
    cfg = ModelConfig(name=tiny_model)
    loads, merges = [], []
    monkeypatch.setattr(models, "load_model", lambda c: loads.append(c.name) or nn.Linear(1, 1))

    def merge(c, adapter):
        merges.append(adapter.name)
        return nn.Linear(1, 1)

    models._kept_weights.cache_clear()
    try:
        base = models.worker_weights(cfg)[0]
        assert models.worker_weights(cfg)[0] is base
        a = models.worker_weights(cfg, "/x/arm_a", merge)[0]
        assert models.worker_weights(cfg, "/x/arm_a", merge)[0] is a is not base
        models.worker_weights(cfg, "/x/arm_b", merge)
        assert models.worker_weights(cfg)[0] is not base  # evicted by the adapters: loaded again
        assert loads == [tiny_model, tiny_model] and merges == ["arm_a", "arm_b"]
        with pytest.raises(ValueError, match="merges it"):
            models.worker_weights(cfg, "/x/arm_a")
    finally:
        models._kept_weights.cache_clear()
