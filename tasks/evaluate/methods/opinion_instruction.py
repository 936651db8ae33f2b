"""O&I (Zhou et al. 2023): the opinion prompt after their reading instruction (`instr+opin`, zero-shot)."""

from __future__ import annotations

from tasks.core.prompts import SYSTEM, Messages, chat_messages
from tasks.evaluate.methods.base import Method
from tasks.evaluate.methods.opin import opinion_prompt

INSTRUCTION = "Instruction: read the given information and answer the corresponding question.\n\n"


def messages(question: str, context: str | None) -> Messages:
    """Zhou et al.'s instruction line, a blank line, then the opinion template."""
    return chat_messages(SYSTEM, INSTRUCTION + opinion_prompt(question, context))


METHOD = Method(
    "opinion_instruction", "O&I (opinion + instruction)",
    "Zhou et al.'s reading instruction, then the context as Bob's statement and the question about his opinion"
    " (Zhou et al. 2023, O&I)", messages,
    context="plain", model="base", default=False,
)
