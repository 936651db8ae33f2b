"""Dask preload for the workers of a cluster you run: `dask worker tcp://host:8786 --nthreads 1 --preload
flows.worker_preload`.

A worker then imports at its start what its first clearflow job would otherwise import inside the job's time: torch,
the stages' job functions, Prefect's task engine (each job is a Prefect task run) and the model code transformers
imports on a model's first load (measured: 3.4 s of SmolLM2's 4.0 s load in a fresh process; Llama's module, the
default model's, and the infrastructure every architecture shares). Nothing is loaded: the weights come with the first
job, which says which.
"""

from __future__ import annotations

import flows  # noqa: F401  (clearflow's Prefect defaults, and torch's thread policy before torch loads)
import prefect.task_engine  # noqa: F401
import tasks.activations.stage  # noqa: F401  (torch, the extraction's jobs)
import tasks.evaluate.generation_jobs  # noqa: F401  (the evaluation's generation jobs)
import transformers.models.llama.modeling_llama  # noqa: F401  (with it: modeling_utils, activations, masking)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
