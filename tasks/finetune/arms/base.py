"""What a fine-tuning arm declares: which markers its training contexts carry, whether the attention loss is on,
and which items it trains on. Everything else (items, budget, learning rate, schedule, seed) is shared by all arms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tasks.core.prompts import Messages, marked_qa_messages, qa_messages

MarkerSource = Literal["probe", "none", "random", "oracle"]
TrainData = Literal["counterfactual", "kaft"]
MARKER_SOURCES: tuple[str, ...] = MarkerSource.__args__
TRAIN_DATA: tuple[str, ...] = TrainData.__args__


@dataclass(frozen=True)
class Arm:
    """One fine-tuning arm: one adapter at `adapters/<name>/`, evaluated by the methods generated from it."""

    name: str  # the adapter's directory and the evaluation method's name
    label: str  # how the report names it
    description: str  # one line: what it trains on and with which loss
    markers: MarkerSource  # probe flags, none, as many as the probe flagged at random places, or the gold labels
    attention: bool  # the attention loss is on (lambda = finetune.attn_lambda) or off (lambda = 0)
    data: TrainData = "counterfactual"  # the selected counterfactual train items, or KAFT's three conditions of them

    def __post_init__(self) -> None:
        """Refuse a declaration that cannot train: unknown values, or an attention loss with nothing marked."""
        if self.markers not in MARKER_SOURCES or self.data not in TRAIN_DATA:
            raise ValueError(f"arm {self.name!r}: markers must be one of {MARKER_SOURCES}, data one of {TRAIN_DATA}")
        if self.attention and self.markers == "none":
            raise ValueError(f"arm {self.name!r}: the attention loss needs marked units (markers='none')")

    @property
    def marked(self) -> bool:
        """Its training contexts carry <conflict> markers (and its prompt the marker-aware system line)."""
        return self.markers != "none"

    @property
    def messages(self) -> Callable[[str, str | None], Messages]:
        """Its prompt builder, in training and evaluation: the marker-aware QA prompt with markers, else the plain one."""
        return marked_qa_messages if self.marked else qa_messages
