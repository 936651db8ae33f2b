"""Prefect flows of clearflow: one per stage plus the end-to-end pipeline.

Prefect reads its settings at import, so the offline-friendly defaults are set here, before any
flow module imports it; anything the user exported wins.
"""

import os
from pathlib import Path

import tasks  # noqa: F401  (sets the OpenMP thread policy before anything loads torch: tasks/core/threads.py)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# flow and task runs log their states at INFO to the API (the UI's run logs); the CLI keeps them off the terminal
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "INFO")
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "INFO")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # stage code run outside a flow
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
    from tasks.core.storage import cache_root

    os.environ["PREFECT_HOME"] = str(cache_root() / "prefect")
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
