"""OPIN (Zhou et al. 2023): the context reframed as a narrator's opinion, asked about that opinion.

The user turn is Zhou et al.'s zero-shot `opin` template (wzhouad/context-faithful-llm): `Bob said "<context>"`
(double quotes removed from the context), then `Q: <question without its final "?"> in Bob's opinion?` and `A:`.
The system line is the shared short-answer one, so every prompt method asks for the answer in the same words.
"""

from __future__ import annotations

from tasks.core.prompts import SYSTEM, Messages, chat_messages
from tasks.evaluate.methods.base import Method


def opinion_prompt(question: str, context: str | None) -> str:
    """Zhou et al.'s opinion template; options or an instruction appended to the question follow its first line."""
    if context is None:
        raise ValueError("the opinion prompt needs a context")
    first, *rest = question.split("\n")
    asked = first.rstrip()
    asked = asked[:-1] if asked.endswith("?") else asked
    tail = "".join(f"\n{line}" for line in rest)
    return f'Bob said "{context.replace(chr(34), "")}"\nQ: {asked} in Bob\'s opinion?{tail}\nA:'


def messages(question: str, context: str | None) -> Messages:
    """The opinion template under the shared short-answer system line."""
    return chat_messages(SYSTEM, opinion_prompt(question, context))


METHOD = Method(
    "opin", "OPIN (opinion prompt)",
    "the context as Bob's statement, the question about Bob's opinion (Zhou et al. 2023, OPIN)", messages,
    context="plain", model="base", default=False,
)
