"""What an evaluation method declares: its names, its prompt, the context it sees and the weights that answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tasks.core.prompts import Messages

PromptBuilder = Callable[[str, str | None], Messages]


@dataclass(frozen=True)
class Method:
    """One evaluated method: everything the evaluate stage and the report need to know about it."""

    name: str  # the `method` value in predictions and metrics
    label: str  # how the report names it
    description: str  # one line: what the model sees
    messages: PromptBuilder  # chat messages from (full question, context or None)
    context: Literal["none", "plain", "marked"]  # none, the item's context, or it with probe-flagged sentences marked
    model: Literal["base", "finetuned"]  # the base model, or it with the fine-tuned CLEAR adapter
