"""Instruction-only control: the marker methods' "trust the marked context" system line, with no markers.

Probe marking differs from full context in two ways (the system line and the markers); this control changes
only the first, so probe marking minus this isolates what the markers themselves do.
"""

from __future__ import annotations

from tasks.core.prompts import marked_qa_messages
from tasks.evaluate.methods.base import Method

METHOD = Method(
    "instruction_only", "instruction only (no markers)",
    "control: the marker methods' system line on the plain context, base model", marked_qa_messages,
    context="plain", model="base", default=False,
)
