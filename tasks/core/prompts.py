"""Prompts of every method, shared by fine-tuning and evaluation so both see the same text."""

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


def messages_for(method: str, question: str, context: str | None) -> list[dict[str, str]]:
    """Chat messages of one method; `context` is already marked for the marking methods."""
    if method == "closed_book":
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question: {question}"}]
    if context is None:
        raise ValueError(f"method {method!r} needs a context")
    if method == "full_context":
        user = f"Context: {context}\nQuestion: {question}"
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if method == "opinion_instruction":
        # Zhou et al. 2023 (O&I): the context as a narrator's statement, the question about his opinion.
        user = (
            "Instruction: read the given information and answer the question.\n"
            f'Bob said, "{context}"\nQuestion: {question} In Bob\'s opinion, based on what he said?'
        )
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if method in ("probe_marking", "clear", "clear_unmarked"):
        user = f"Context: {context}\nQuestion: {question}"
        return [{"role": "system", "content": SYSTEM_MARKED}, {"role": "user", "content": user}]
    raise KeyError(f"unknown method {method!r}")


def target_text(answers: Sequence[str], tokenizer) -> str:
    """Fine-tuning target: the first gold answer, then end of sequence."""
    return f"{answers[0]}{tokenizer.eos_token or ''}"
