"""CAD (context-aware decoding, Shi et al. 2023): the full-context prompt, each greedy token chosen from the
with-context logits amplified against the logits of the same question without the context."""

from __future__ import annotations

from tasks.core.prompts import qa_messages
from tasks.evaluate.methods.base import Method

METHOD = Method(
    "cad", "CAD", "the context and the question; next token from (1 + alpha) x logits with the context minus"
    " alpha x logits of the question alone (alpha: evaluate.cad_alpha)", qa_messages,
    context="plain", model="base", decoding="cad", default=False,
)
