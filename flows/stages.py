"""The DAG, declared once: what each stage reads, writes and is configured by.

Everything else is derived from these declarations: the order of stages (a stage runs after the stages that write
what it reads), the config view a stage gets, its staleness fingerprint (flows/runner.py), its quality suites and
the outputs the manifest records. Artifact names are those of schemas/layout.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from schemas.layout import artifact
from tasks.core.config import ConfigView, RunConfig
from tasks.core.storage import RunPaths


@dataclass(frozen=True)
class Stage:
    """One node of the pipeline: the plain function `run(cfg, paths)` of tasks/, and its contract.

    The function gets a view of the config holding only `config` (reading any other section raises), writes
    every artifact of `writes` under `paths` and returns nothing: the runner takes the paths from the layout.
    """

    name: str
    run: str  # "module:function", imported lazily so `clearflow sql` never imports torch
    reads: tuple[str, ...]  # run artifacts it reads; their writers are its upstream stages
    writes: tuple[str, ...]  # run artifacts it must produce; recorded (with content hashes) in the manifest
    config: tuple[str, ...]  # the RunConfig sections it receives; a change to one makes it stale
    summary: str
    inputs: str | None = None  # "module:function" (config view -> JSON-able): outside inputs, e.g. file hashes

    def __post_init__(self) -> None:
        for name in (*self.reads, *self.writes):
            artifact(name)  # an unknown name fails at import, not mid-run
        unknown = [s for s in self.config if s not in RunConfig.model_fields]
        if unknown:
            raise ValueError(f"stage {self.name!r} declares unknown config sections {unknown}")

    def function(self) -> Callable[[RunConfig | ConfigView, RunPaths], None]:
        return _resolve(self.run)

    def view(self, cfg: RunConfig) -> ConfigView:
        """The config as this stage may see it: its declared sections only."""
        return cfg.view(*self.config, stage=self.name)

    def input_fingerprint(self, cfg: RunConfig) -> object:
        """What the stage reads from outside the run (file contents), so an edited input file makes it stale."""
        return _resolve(self.inputs)(self.view(cfg)) if self.inputs else None

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stages that write what this one reads, in pipeline order."""
        return tuple(dict.fromkeys(WRITER[a] for a in self.reads))

    @property
    def suites(self) -> tuple[str, ...]:
        """The written tables that have a quality suite: what the runner checks after the stage."""
        from schemas.suites import SUITES

        return tuple(a for a in self.writes if a in SUITES)


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("ingest", "tasks.ingest.stage:run_ingest",
              reads=(), writes=("items", "statements", "rejects", "ingest_provenance"),
              config=("dataset", "data_path", "limit", "seed", "ingest", "model"),
              summary="build items, probe statements and rejects from the dataset",
              inputs="tasks.ingest.provenance:input_fingerprint"),
        Stage("decompose", "tasks.decompose.stage:run_decompose",
              reads=("items", "statements"), writes=("sentences",), config=("decompose", "model", "seed"),
              summary="split every context into units (sentences or LLM atomic facts), score their relevance"),
        Stage("activations", "tasks.activations.stage:run_activations",
              reads=("items", "statements", "sentences"), writes=("activations",), config=("model", "activations"),
              summary="hidden states of statements and sentences per layer and position, from the shared store"),
        Stage("probes", "tasks.probes.stage:run_probes",
              reads=("items", "statements", "sentences", "activations"),
              writes=("probes", "probe_metrics", "probe_localisation", "best_probe", "sentence_scores"),
              config=("probe", "activations", "model", "seed"),
              summary="train a probe per layer, pick the best on dev, score every context sentence"
                      " (train items' by cross-fitted fold probes)"),
        Stage("finetune", "tasks.finetune.stage:run_finetune",
              reads=("items", "sentences", "sentence_scores"), writes=("adapters", "train_log"),
              config=("model", "finetune", "seed"),
              summary="one LoRA adapter per fine-tuning arm (CLEAR: <conflict> markers and the attention loss)"),
        Stage("evaluate", "tasks.evaluate.stage:run_evaluate",
              reads=("items", "sentences", "sentence_scores", "adapters"),
              writes=("predictions", "metrics", "comparisons", "lfd_layers"),
              config=("model", "evaluate", "seed"),
              summary="generate answers per method, score them, pair each method with each reference",
              inputs="tasks.evaluate.methods:evaluated_methods"),
        Stage("insideout", "tasks.insideout.stage:run_insideout",
              reads=("items", "statements"), writes=("insideout_scores", "insideout_k", "insideout_layers"),
              config=("insideout", "model", "seed"),
              summary="Inside-Out knowledge K per dev and test item: the model's answer log-probabilities vs a"
                      " probe per layer (off unless insideout.enabled)"),
        Stage("report", "tasks.report:run_report",
              reads=("items", "sentences", "probe_metrics", "probe_localisation", "best_probe", "sentence_scores",
                     "train_log", "predictions", "metrics", "comparisons", "lfd_layers", "insideout_layers"),
              writes=("report", "figures", "trace"), config=("dataset", "limit", "seed", "model", "evaluate"),
              summary="write report.md, its figures and the per-item trace page"),
    )
}
ORDER = list(STAGES)
RUNNER_ARTIFACTS = ("quality", "manifest", "catalog")  # written by the runner and the pipeline, not by a stage


def writers(stages: Iterable[Stage]) -> dict[str, str]:
    """artifact -> the one stage that writes it; refuses two writers and a read of what no earlier stage wrote."""
    writer: dict[str, str] = {}
    for stage in stages:
        unwritten = [a for a in stage.reads if a not in writer]
        if unwritten:
            raise ValueError(f"stage {stage.name!r} reads {unwritten}, which no earlier stage writes")
        for a in stage.writes:
            if a in writer or a in RUNNER_ARTIFACTS:
                raise ValueError(f"{a!r} is written by both {writer.get(a, 'the runner')!r} and {stage.name!r}")
            writer[a] = stage.name
    return writer


WRITER: dict[str, str] = writers(STAGES.values())


def stage_table() -> str:
    """The declarations as a Markdown table: `clearflow stages` prints it, docs/ARCHITECTURE.md shows it (tested)."""
    rows = ["| stage | reads | writes | config sections | flow | task |", "| --- | --- | --- | --- | --- | --- |"]
    for s in STAGES.values():
        module, func = s.run.split(":")
        rows.append(f"| `{s.name}` | {', '.join(s.reads) or '(dataset files)'} | {', '.join(s.writes)} |"
                    f" {', '.join(s.config)} | `flows/{s.name}.py` | `{module.replace('.', '/')}.py:{func}` |")
    return "\n".join(rows)
