"""Shared fixtures: a tiny random-weight Llama (fast, exercises every code path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.llm_server import server  # noqa: F401  (fixture: local OpenAI-compatible endpoint)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _session_store(tmp_path_factory):
    """Caches for what a module-scoped fixture builds (activation store, ingest and LLM caches, converted models)
    in a temp dir: nothing is read from an earlier test session or the user's runs, nor written into the user's
    cache. Each test then gets its own (`_own_store`)."""
    saved = {k: os.environ.get(k) for k in ("CLEARFLOW_STORE", "CLEARFLOW_CACHE")}
    os.environ["CLEARFLOW_STORE"] = str(tmp_path_factory.mktemp("store"))
    cache = tmp_path_factory.mktemp("cache")
    os.environ["CLEARFLOW_CACHE"] = str(cache)
    (cache / "models").symlink_to(_models_of_this_session(tmp_path_factory), target_is_directory=True)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _models_of_this_session(tmp_path_factory) -> Path:
    """Converted models, shared by the session's xdist workers (their temp roots' parent, this session's alone):
    converting the embedded model costs 25-45 s, and the conversion is safe across processes (a lock, then a
    rename: tests/test_models.py), so a second worker reuses the first's instead of converting again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    models = root / "converted-models"
    models.mkdir(exist_ok=True)
    return models


@pytest.fixture(autouse=True)
def _own_store(tmp_path_factory, monkeypatch):
    """Every test its own activation store and caches, so no test reads what another wrote or deletes what another
    needs, whatever the order. Converted models are the exception: read-only once written (under a lock), they
    are shared through a link to the session's cache, as a user's runs share them."""
    models = Path(os.environ["CLEARFLOW_CACHE"]) / "models"  # the session's link (`_session_store`)
    own = tmp_path_factory.mktemp("own")  # beside the test's tmp_path, which some tests list
    cache = own / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("CLEARFLOW_STORE", str(own / "store"))
    monkeypatch.setenv("CLEARFLOW_CACHE", str(cache))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Directory of a 4-layer, 64-wide random Llama with the SmolLM2 tokenizer (seeded: the same every time).

    `make mutation` runs the tests once per mutant, each time in a fresh process: it builds the model once and
    names it in CLEARFLOW_TEST_TINY_MODEL, which these tests then read (never write)."""
    from tasks.core.models import tiny_model_dir

    built = os.environ.get("CLEARFLOW_TEST_TINY_MODEL")
    if built and (Path(built) / "config.json").exists():
        return built
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture()
def tiny_cfg(tiny_model, tmp_path):
    """A RunConfig on the tiny model, writing under a temp runs dir, sized for seconds."""
    from tasks.core.config import RunConfig

    return RunConfig.model_validate(
        {
            "run": "t",
            "runs_dir": str(tmp_path / "runs"),
            "limit": 60,
            "model": {"name": tiny_model},
            "finetune": {"max_items": 4, "max_length": 256, "compile": False},
            "evaluate": {"max_new_tokens": 4, "bootstrap": 50},
        }
    )


@pytest.fixture()
def run_paths(tiny_cfg):
    from tasks.core.storage import RunPaths

    root = Path(tiny_cfg.runs_dir) / tiny_cfg.run
    root.mkdir(parents=True, exist_ok=True)
    return RunPaths(root)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs ~10 s)."""
    import flows  # noqa: F401  (Prefect defaults before import)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def one_thread():
    """Torch on one thread for a test: the tiny model gains nothing from threads, and on a busy machine two
    threads ran ~10x slower (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
