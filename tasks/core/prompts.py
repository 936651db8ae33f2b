"""The prompt text fine-tuning and evaluation share: system lines, conflict markers, the QA prompt.

Method-specific prompts live with their method in tasks/evaluate/methods/.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

OPEN, CLOSE = "<conflict>", "</conflict>"

SYSTEM = "Answer the question with the exact answer only: a few words, no sentence, no explanation."
SYSTEM_MARKED = (
    SYSTEM + " Facts between <conflict> and </conflict> may contradict what you remember;"
    " the context is right, so answer according to it."
)


def mark_context(sentences: Sequence[str], flagged: Sequence[bool]) -> str:
    """The context as its sentences, each flagged one wrapped in plain-text conflict markers."""
    if len(sentences) != len(flagged):
        raise ValueError(f"{len(sentences)} sentences but {len(flagged)} flags")
    return " ".join(f"{OPEN} {s} {CLOSE}" if f else s for s, f in zip(sentences, flagged))


def full_question(question: str, choices: Sequence[str] | None = None, instruction: str | None = None) -> str:
    """The question as the model sees it: multiple-choice options and an answer-format instruction appended."""
    parts = [question.strip()]
    if choices:
        parts.append("Options: " + "; ".join(c.strip() for c in choices))
    if instruction:
        parts.append(instruction.strip())
    return "\n".join(parts)


def item_question(item: Mapping[str, Any]) -> str:
    """full_question of an items-table row (columns choices/instruction may be absent or null)."""
    return full_question(item["question"], item.get("choices"), item.get("instruction"))


Messages = list[dict[str, str]]


def chat_messages(system: str, user: str) -> Messages:
    """A system line and one user turn: the shape of every method's prompt."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def qa_messages(question: str, context: str | None, system: str = SYSTEM) -> Messages:
    """The shared question-answering prompt: the context, then the question."""
    if context is None:
        raise ValueError("the QA prompt needs a context")
    return chat_messages(system, f"Context: {context}\nQuestion: {question}")


def marked_qa_messages(question: str, context: str | None) -> Messages:
    """The QA prompt under the marker-aware system line: what CLEAR fine-tunes on and is evaluated with."""
    return qa_messages(question, context, SYSTEM_MARKED)


def target_text(answers: Sequence[str], tokenizer) -> str:
    """Fine-tuning target: the first gold answer, then end of sequence."""
    return f"{answers[0]}{tokenizer.eos_token or ''}"
