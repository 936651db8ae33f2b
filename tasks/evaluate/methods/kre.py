"""KRE (knowledge-aware re-answering), phrased as the CLEAR reference code (LinfengGao/ProbeRAG) prompts it.

The reference asks the model to answer, explain, and re-answer from the context when unsure or in conflict;
here that request sits in the user turn, after the shared short-answer system line (so the answer is scored in
the same format as every other method), and the reference's options line comes from the question when the item
has options.
"""

from __future__ import annotations

from tasks.core.prompts import SYSTEM, Messages, chat_messages
from tasks.evaluate.methods.base import Method

PREAMBLE = (
    "You are a professional assistant and can answer most of the questions. I'll give you the question and the"
    " context and so on. Your goal is to answer my questions, provide explanations for your answers, and re-answer"
    " based on context if you are unsure or if your answers conflict with other information I have provided."
    " If you can't provide an answer, please respond with 'None'."
)


def messages(question: str, context: str | None) -> Messages:
    """The re-answering preamble, the context, the question, then `Answer:`."""
    if context is None:
        raise ValueError("the KRE prompt needs a context")
    return chat_messages(SYSTEM, f"{PREAMBLE}\n{context}\nQuestion: {question}\nAnswer:")


METHOD = Method(
    "kre", "KRE (re-answering prompt)",
    "the reference code's knowledge-aware re-answering instruction, the context and the question", messages,
    context="plain", model="base", default=False,
)
