"""Evaluation methods: one module per method declaring `METHOD` (a `Method`), registered below in report order.

Adding a method is one new module here plus one line in MODULES (see docs/ARCHITECTURE.md); the
evaluate stage, the report's labels and the default of `evaluate.methods` all follow this registry.
"""

from __future__ import annotations

from tasks.core.registry import collect, resolve
from tasks.evaluate.methods.base import AnswerFunction, Method, PromptBuilder

MODULES = (  # one line per method, in report order
    "closed_book",
    "lexical_copy",
    "full_context",
    "instruction_only",
    "opin",
    "opinion_instruction",
    "kre",
    "cad",
    "lfd",
    "probe_marking",
    "arms",  # clear, clear_unmarked and every other fine-tuning arm (tasks/finetune/arms/)
)
REGISTRY: dict[str, Method] = collect(__name__, MODULES, "METHOD")


def resolve_methods(names: list[str] | None) -> list[Method]:
    """The configured methods (None: the registry's default ones, in registry order), unknown names refused up front."""
    if names is None:
        return [m for m in REGISTRY.values() if m.default]
    return resolve(REGISTRY, names, "evaluation method")


def method_label(name: str) -> str:
    """Human name of a method: its registered label (a name no longer registered, from an old run, stays as it is)."""
    return REGISTRY[name].label if name in REGISTRY else name


def evaluated_methods(cfg) -> list[str]:
    """The evaluate stage's outside input: with the default list, registering a default method makes a run stale."""
    return [m.name for m in resolve_methods(cfg.evaluate.methods)]


__all__ = ["MODULES", "REGISTRY", "AnswerFunction", "Method", "PromptBuilder", "evaluated_methods", "method_label", "resolve_methods"]
