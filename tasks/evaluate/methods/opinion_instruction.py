"""Opinion + instruction (Zhou et al. 2023, O&I): the context as a narrator's statement, asked about his opinion."""

from __future__ import annotations

from tasks.core.prompts import SYSTEM, Messages, chat_messages
from tasks.evaluate.methods.base import Method


def messages(question: str, context: str | None) -> Messages:
    """The context attributed to Bob, and the question asked about what Bob believes."""
    if context is None:
        raise ValueError("the opinion prompt needs a context")
    user = (
        "Instruction: read the given information and answer the question.\n"
        f'Bob said, "{context}"\nQuestion: {question} In Bob\'s opinion, based on what he said?'
    )
    return chat_messages(SYSTEM, user)


METHOD = Method(
    "opinion_instruction", "opinion + instruction",
    "the context as a narrator's statement, the question about his opinion (Zhou et al. 2023, O&I)", messages,
    context="plain", model="base", default=False,
)
