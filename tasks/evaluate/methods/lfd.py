"""LFD (layer fused decoding, Sun et al. 2025): the full-context prompt, each greedy token chosen from the final
layer's next-token distribution fused with that of the layer of lowest internal knowledge score (chosen on dev)."""

from __future__ import annotations

from tasks.core.prompts import qa_messages
from tasks.evaluate.methods.base import Method

METHOD = Method(
    "lfd", "LFD", "the context and the question; next token from the final layer fused with the latter-half"
    " layer of lowest internal knowledge score on dev (lfd_layers.parquet)", qa_messages,
    context="plain", model="base", decoding="lfd", default=False,
)
