"""CLEAR: the marked context read by the model fine-tuned with the conflict-attention loss.

Its prompt is `marked_qa_messages`, the same function fine-tuning builds its examples with
(tasks/finetune/stage.py), so training and evaluation see the same text byte for byte.
"""

from __future__ import annotations

from tasks.core.prompts import marked_qa_messages
from tasks.evaluate.methods.base import Method

METHOD = Method(
    "clear", "CLEAR", "the marked context, model fine-tuned with the conflict-attention loss (CLEAR)",
    marked_qa_messages, context="marked", model="finetuned",
)
