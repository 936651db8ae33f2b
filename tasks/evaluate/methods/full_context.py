"""Full context: plain retrieval-augmented prompting, the baseline every other method is compared with."""

from __future__ import annotations

from tasks.core.prompts import qa_messages
from tasks.evaluate.methods.base import Method

METHOD = Method(
    "full_context", "full context", "the context and the question (plain RAG)", qa_messages,
    context="plain", model="base",
)
