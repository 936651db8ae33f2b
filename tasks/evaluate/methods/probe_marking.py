"""Probe marking: the probe's flagged sentences in conflict markers, read by the base model (no fine-tuning)."""

from __future__ import annotations

from tasks.core.prompts import marked_qa_messages
from tasks.evaluate.methods.base import Method

METHOD = Method(
    "probe_marking", "probe marking",
    "the context with probe-flagged sentences wrapped in conflict markers, base model", marked_qa_messages,
    context="marked", model="base", default=False,
)
