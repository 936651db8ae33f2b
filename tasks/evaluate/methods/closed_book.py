"""Closed book: the question alone, so the answer is whatever the model memorised."""

from __future__ import annotations

from tasks.core.prompts import SYSTEM, Messages, chat_messages
from tasks.evaluate.methods.base import Method


def messages(question: str, context: str | None = None) -> Messages:
    """The question without any context (a context, if given, is ignored)."""
    return chat_messages(SYSTEM, f"Question: {question}")


METHOD = Method("closed_book", "closed book", "the question only", messages, context="none", model="base")
