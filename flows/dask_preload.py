"""Dask preload for a cluster you run: `dask scheduler --preload flows.dask_preload` and `dask worker
tcp://host:8786 --nthreads 1 --preload flows.dask_preload`.

Each process then imports at its start what clearflow's first jobs would otherwise import on their critical path.
A worker: torch, the stages' job functions, Prefect's task engine (each job is a Prefect task run) and the model code
transformers imports on a model's first load (measured: 3.4 s of SmolLM2's 4.0 s load in a fresh process; Llama's
module, the default model's, and the infrastructure every architecture shares). The scheduler: the same modules,
which it imports to unpickle the first graph of jobs before any job starts (measured: 3 s of a fresh scheduler's
CPU in one extraction). Nothing is loaded: the weights come with the first job, which says which.
"""

from __future__ import annotations

import flows  # noqa: F401  (clearflow's Prefect defaults, and torch's thread policy before torch loads)
import prefect.task_engine  # noqa: F401
import tasks.activations.stage  # noqa: F401  (torch, the extraction's jobs)
import tasks.evaluate.generation_jobs  # noqa: F401  (the evaluation's generation jobs)
import transformers.models.llama.modeling_llama  # noqa: F401  (with it: modeling_utils, activations, masking)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
