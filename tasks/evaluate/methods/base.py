"""What an evaluation method declares: its names, its prompt (or answer function), the context it sees and the
weights that answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tasks.core.prompts import Messages

PromptBuilder = Callable[[str, str | None], Messages]
AnswerFunction = Callable[[str, str | None], str]  # (the item's question, its context or None) -> the answer


@dataclass(frozen=True)
class Method:
    """One evaluated method: everything the evaluate stage and the report need to know about it.

    A model-free method (`model="none"`) gives `answer` instead of `messages`: the stage calls it on the item's
    own question (no options or instruction: those are written for a model) and records the context it read
    as the prompt.
    """

    name: str  # the `method` value in predictions and metrics
    label: str  # how the report names it
    description: str  # one line: what the model sees
    messages: PromptBuilder | None  # chat messages from (full question, context or None); None for model-free
    context: Literal["none", "plain", "marked"]  # none, the item's context, or it with probe-flagged sentences marked
    model: Literal["base", "finetuned", "none"]  # the base model, it with a fine-tuning arm's adapter, or no model
    answer: AnswerFunction | None = None  # model="none": the answer from (question, context), deterministic
    arm: str = "clear"  # model="finetuned": the fine-tuning arm whose adapter answers
    decoding: Literal["greedy", "cad", "lfd"] = "greedy"  # how the next token is chosen
    default: bool = True  # in the default method list (`make run`); otherwise evaluated when named or in a preset
    comparison: bool = True  # in the full comparison (`--preset full`, `make compare`); every method can be named

    @property
    def weights(self) -> str:
        """Which weights answer: "base", "none", or "adapter:<arm>" (methods sharing weights share one loaded model)."""
        return f"adapter:{self.arm}" if self.model == "finetuned" else self.model

    @property
    def needs(self) -> tuple[str, ...]:
        """The upstream stages whose outputs this method reads, beyond the evaluated items."""
        return (("probes",) if self.context == "marked" else ()) + (("finetune",) if self.model == "finetuned" else ())

    def __post_init__(self) -> None:
        """A method answers one way: a prompt for a model, or a function without one (never both, never neither)."""
        model_free = self.model == "none"
        if model_free != (self.answer is not None) or model_free == (self.messages is not None):
            raise ValueError(
                f"method {self.name!r}: give `messages` with model 'base'/'finetuned', or `answer` with model 'none'"
            )
