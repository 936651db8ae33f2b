"""The DAG: which stage runs what, after which, and which config sections it depends on."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths


@dataclass(frozen=True)
class Stage:
    """One node of the pipeline: the work is the plain function `target` in tasks/."""

    name: str
    target: str  # "module:function", imported lazily so `clearflow sql` never imports torch
    sections: tuple[str, ...]  # RunConfig fields whose change makes this stage stale
    after: tuple[str, ...]  # upstream stages whose outputs it reads
    summary: str
    inputs: str | None = None  # "module:function" (cfg -> JSON-able): outside inputs, e.g. input file hashes

    def function(self) -> Callable[[RunConfig, RunPaths], dict[str, str]]:
        return _resolve(self.target)

    def input_fingerprint(self, cfg: RunConfig) -> object:
        """What the stage reads from outside the run (file contents), so an edited input file makes it stale."""
        return _resolve(self.inputs)(cfg) if self.inputs else None


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("ingest", "tasks.ingest.stage:run_ingest", ("dataset", "data_path", "limit", "seed", "ingest"), (),
              "build items, probe statements and rejects from the dataset", inputs="tasks.ingest.provenance:input_fingerprint"),
        Stage("decompose", "tasks.decompose.stage:run_decompose", ("decompose", "model"), ("ingest",),
              "split every context into units (sentences or LLM atomic facts), score their relevance"),
        Stage("activations", "tasks.activations.stage:run_activations", ("model", "activations"), ("ingest", "decompose"),
              "hidden states of statements and sentences per layer and position, from the shared store"),
        Stage("probes", "tasks.probes.stage:run_probes", ("probe",), ("ingest", "decompose", "activations"),
              "train a probe per layer, pick the best on dev, score every context sentence"),
        Stage("finetune", "tasks.finetune.stage:run_finetune", ("model", "finetune", "seed"), ("ingest", "decompose", "probes"),
              "LoRA fine-tuning with <conflict> markers and the attention loss"),
        Stage("evaluate", "tasks.evaluate.stage:run_evaluate", ("model", "evaluate", "seed"),
              ("ingest", "decompose", "probes", "finetune"), "generate answers per method and score them"),
        Stage("report", "tasks.report:run_report", (), ("ingest", "decompose", "probes", "finetune", "evaluate"),
              "write report.md and its figures"),
    )
}
ORDER = list(STAGES)
