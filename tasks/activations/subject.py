"""The `subject_last` position: a statement fed alone, the hidden state at the last token of its subject.

Physics of Language Models 3.1 (Allen-Zhu and Li) probes at the entity's tokens as well as at the end of the text;
this is that second reading point for the probe statements. A statement's subject is its `group` (the known-facts
and MQuAKE readers group statements by subject, tasks/ingest/formats/), found in the text as fed (case-insensitive:
a sentence may capitalise a subject's first letter); a statement whose text does not contain it gets no row.
The state is read in the same forward pass as `last` (tasks/activations/stage.py), so asking for it costs no
extra forward: only the extra rows in the store.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

import polars as pl
import torch
from torch import nn

from tasks.activations.extraction import (
    LayerVectors,
    _pad,
    _pad_id,
    layer_capture,
    length_buckets,
    resolve_layers,
    span_tokens,
)
from tasks.core.models import decoder_layers

log = logging.getLogger(__name__)


def subject_span(text: str, subject: str) -> tuple[int, int] | None:
    """Characters [start, end) of the first case-insensitive occurrence of `subject` in `text` (None if absent).

    The first one: every statement template states the subject before the object, and an object may repeat it.
    """
    subject = subject.strip()
    if not subject:
        return None
    match = re.search(re.escape(subject), text, flags=re.IGNORECASE)
    return (match.start(), match.end()) if match else None


def subject_spans(statements: pl.DataFrame, keys: Sequence[str], fed: Sequence[str]) -> list[tuple[int, int, int]]:
    """(input row, start, end) of each statement's subject in its text as fed; rows are those of `keys` / `fed`."""
    subject_of: dict[str, str] = {}
    for key, group in statements.select("key", "group").iter_rows():
        subject_of.setdefault(key, group)
    out, missing = [], 0
    for row, (key, text) in enumerate(zip(keys, fed)):
        if key not in subject_of:
            continue  # a context sentence, not a statement
        span = subject_span(text, subject_of[key])
        if span is None:
            missing += 1
            continue
        out.append((row, *span))
    if missing:
        log.info("activations: %d statements do not contain their subject (group): no subject_last row", missing)
    if not out:
        raise ValueError("activations.positions asks for 'subject_last' but no statement contains its subject"
                         " (statements.group): this dataset's statements have no known subject; drop the position")
    return out


def subject_token(offsets: Sequence[tuple[int, int]], start: int, end: int) -> int:
    """Index of the last token whose characters overlap the subject's [start, end)."""
    tokens = span_tokens(offsets, start, end)
    if not tokens:
        raise ValueError(f"the subject's characters [{start}, {end}) cover no token")
    return tokens[-1]


def iter_last_and_subject(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    subjects: dict[int, tuple[int, int]],
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
) -> Iterator[tuple[list[int], LayerVectors, LayerVectors]]:
    """Yield (text indices, {layer: last-token states}, {layer: subject-last states}) batch by batch.

    Tokenised, bucketed and right-padded as iter_activations does, so the `last` rows are the ones it gives; a text
    without a subject (not in `subjects`: text index -> character span) gets its last token in the second array too.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("the subject_last position needs a fast tokenizer (offset mappings)")
    layers = resolve_layers(layers, len(decoder_layers(model)))
    device = next(model.parameters()).device
    enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True)
    token_ids = enc["input_ids"]
    if any(len(x) == 0 for x in token_ids):
        raise ValueError("a text tokenised to zero tokens: nothing to take the last token of")
    at = [subject_token(enc["offset_mapping"][i], *subjects[i]) if i in subjects else len(ids) - 1
          for i, ids in enumerate(token_ids)]
    with layer_capture(model, layers) as forward:
        for batch in length_buckets([len(x) for x in token_ids], batch_size):
            input_ids, mask = _pad([token_ids[i] for i in batch], _pad_id(tokenizer), "right")
            last = torch.tensor([len(token_ids[i]) - 1 for i in batch], device=device)
            subject = torch.tensor([at[i] for i in batch], device=device)
            rows = torch.arange(len(batch), device=device)
            hidden = forward(input_ids.to(device), mask.to(device),
                             lambda h: torch.stack([h[rows, last], h[rows, subject]]).float())
            yield (batch, {layer: h[0].cpu().numpy() for layer, h in hidden.items()},
                   {layer: h[1].cpu().numpy() for layer, h in hidden.items()})
