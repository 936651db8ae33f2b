"""Ablation of CLEAR: the same fine-tuned model and system line on the unmarked context (what markers add)."""

from __future__ import annotations

from tasks.core.prompts import marked_qa_messages
from tasks.evaluate.methods.base import Method

METHOD = Method(
    "clear_unmarked", "CLEAR weights, no markers",
    "ablation: the fine-tuned model on the unmarked context (what the markers add at inference)",
    marked_qa_messages, context="plain", model="finetuned",
)
