"""Evaluation's greedy generation as fanned-out jobs (`--executor dask`): one job per (method, chunk of prompts).

A job carries only its prompts, the decoding options and which weights answer (the base model, or an adapter
directory merged into it); a worker loads those weights once and keeps them for its next jobs of the same
weights. Answers do not depend on how prompts are batched (tests/test_evaluate.py: the batched loop equals
`generate` on each prompt alone), so the fanned-out answers are the local ones. Methods with their own decoding
(CAD, LFD: they read dev items and write tables into the run) stay in the stage's process.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.core.config import ModelConfig, RunConfig
from tasks.core.fanout import fan_out
from tasks.core.models import worker_weights
from tasks.core.storage import RunPaths
from tasks.evaluate.decoding_loop import generate
from tasks.evaluate.methods import Method


@dataclass(frozen=True)
class GenerationJob:
    """One method's chunk of rendered prompts, answered wherever the job runs."""

    model: ModelConfig
    adapter: str | None  # the arm's adapter directory, or None for the base model
    prompts: tuple[str, ...]
    max_new_tokens: int
    batch_size: int
    draft_tokens: int
    desc: str


def run_generation_job(job: GenerationJob) -> list[str]:
    """Greedy answers to the job's prompts, in their order (a fanned-out job)."""
    from tasks.finetune.stage import merged_adapter

    model, tok = worker_weights(job.model, job.adapter, merged_adapter)
    return generate(model, tok, list(job.prompts), job.max_new_tokens, job.batch_size, desc=job.desc,
                    draft_tokens=job.draft_tokens)


def generation_jobs(cfg: RunConfig, paths: RunPaths, methods: list[Method], prompts: dict[str, list[str]]
                    ) -> list[tuple[str, GenerationJob]]:
    """(method name, job) for every chunk of `evaluate.batch_size` prompts of every method, in method order."""
    ev = cfg.evaluate
    jobs = []
    for m in methods:
        adapter = None if m.weights == "base" else str(paths.arm_adapter(m.arm).resolve())
        todo = prompts[m.name]
        for start in range(0, len(todo), ev.batch_size):
            chunk = tuple(todo[start:start + ev.batch_size])
            jobs.append((m.name, GenerationJob(cfg.model, adapter, chunk, ev.max_new_tokens, ev.batch_size,
                                               ev.prompt_lookup, m.name)))
    return jobs


def fanned_answers(cfg: RunConfig, paths: RunPaths, methods: list[Method], prompts: dict[str, list[str]]
                   ) -> dict[str, list[str]]:
    """Each greedy method's answers, generated as fanned-out jobs and put back in prompt order."""
    named = generation_jobs(cfg, paths, methods, prompts)
    results = fan_out(run_generation_job, [job for _, job in named], "generation")
    answers: dict[str, list[str]] = {m.name: [] for m in methods}
    for (name, _), chunk in zip(named, results):
        answers[name].extend(chunk)
    return answers
