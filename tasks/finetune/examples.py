"""Training examples: the arm's prompt rendered as evaluation renders it, the target, CE labels, marked tokens.

* CE is the token cross-entropy on the answer tokens only (every prompt token is labelled -100).
* Marked tokens are the tokens of the text between ``<conflict>`` and ``</conflict>`` AND the
  tokens of the two markers themselves. They are found from character spans of the rendered prompt
  (each ``<conflict>`` ... ``</conflict>`` occurrence inside the context, from the first character of
  the opening marker to the last character of the closing one) through the fast tokenizer's offset
  mapping: a token is marked when its character range overlaps a span. A token that straddles a span
  boundary (e.g. ``" <"``, whose leading space lies outside the span) therefore counts as marked.
  The system prompt also names the markers literally; only spans inside the context are used.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import polars as pl

from schemas.tables import CONDITIONS
from tasks.core import chat, prompts
from tasks.core.prompts import Messages

IGNORE = -100
_SPAN = re.compile(re.escape(prompts.OPEN) + r".*?" + re.escape(prompts.CLOSE), re.DOTALL)
COUNTERFACTUAL = CONDITIONS[0]


def marked_char_spans(prompt_text: str, context: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each marked unit, markers included, inside the prompt's context."""
    start = prompt_text.rfind(context)  # the system prompt precedes the context and names the markers too
    if start < 0:
        raise ValueError("the context does not occur verbatim in the rendered prompt")
    return [(start + m.start(), start + m.end()) for m in _SPAN.finditer(context)]


def token_mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """A token is marked when its character range overlaps any span (so span edges are never lost)."""
    return [any(s < span_end and e > span_start for span_start, span_end in spans) for s, e in offsets]


@dataclass(frozen=True)
class Example:
    """One tokenized training example: prompt + target ids, CE labels, marked-key mask."""

    input_ids: list[int]
    labels: list[int]
    marked: list[bool]
    truncated: bool


def build_example(tok, question: str, context: str, answers: Sequence[str], max_length: int,
                  messages: Callable[[str, str | None], Messages] = prompts.marked_qa_messages) -> Example:
    """Prompt as evaluation renders it (`messages`: the arm's method's builder), target = first answer + EOS,
    left-truncated so the target always survives."""
    prompt_text = chat.render(tok, messages(question, context))
    if not getattr(tok, "is_fast", False):
        raise TypeError("marking tokens needs a fast tokenizer (offset mappings)")
    enc = chat.encode(tok, prompt_text, return_offsets_mapping=True)
    prompt_ids = list(enc["input_ids"])
    marked = token_mask_from_spans(enc["offset_mapping"], marked_char_spans(prompt_text, context))
    target_ids = list(tok(prompts.target_text(answers, tok), add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise ValueError(f"empty target for question {question!r}")
    target_ids = target_ids[:max_length]  # only a pathological answer is this long
    keep = max_length - len(target_ids)
    truncated = len(prompt_ids) > keep
    if truncated:
        cut = len(prompt_ids) - keep
        prompt_ids, marked = prompt_ids[cut:], marked[cut:]
    return Example(
        input_ids=prompt_ids + target_ids,
        labels=[IGNORE] * len(prompt_ids) + target_ids,
        marked=marked + [False] * len(target_ids),
        truncated=truncated,
    )


def select_train_items(items: pl.DataFrame, max_items: int, seed: int) -> pl.DataFrame:
    """Counterfactual train-split items (condition counterfactual or unknown), at most max_items of them by a
    seeded choice (stable under input order): every arm's items, or (KAFT) facts."""
    train = items.filter(pl.col("split") == "train")
    if "condition" in train.columns:  # aligned / irrelevant train items are KAFT's alone (ingest.all_train_conditions)
        train = train.filter(pl.col("condition").is_null() | (pl.col("condition") == COUNTERFACTUAL))
    train = train.sort("item_id")
    if train.height == 0:
        raise ValueError("no train-split items to fine-tune on")
    if train.height > max_items:
        idx = sorted(random.Random(seed).sample(range(train.height), max_items))
        train = train[idx]
    return train
