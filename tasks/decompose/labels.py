"""Labels of a context unit: benchmark label, truthful, relevant and conflicting (docs/METHOD.md stage 1).

Two sources, in order. An item's `sentence_labels` (what its generator or reader knows of each sentence it put
in the context) label a unit whose source sentence has exactly that text; an atomic fact inherits its source
sentence's labels. Without them, only what the target sentence and the statements tell: the target sentence
carries the answer, so it is relevant; the truth of a unit is that of a statement with the same key. Anything
else is null: a label the data cannot give is never guessed. `conflicting` is derived, never read:
relevant AND NOT truthful, null when either is null.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import polars as pl

Truth = dict[str, bool]  # statement key -> whether it is true


@dataclass(frozen=True)
class SentenceLabel:
    """What an item's sentence_labels say of one sentence text (None: not known)."""

    truthful: bool | None
    relevant: bool | None


def truth_by_key(statements: pl.DataFrame | None) -> Truth:
    """Map a statement key to whether it is true; keys stated with both labels are left unknown."""
    if statements is None or statements.height == 0:
        return {}
    labels = statements.group_by("key").agg(pl.col("label").unique().alias("labels"))
    return {k: (ls[0] == 0) for k, ls in zip(labels["key"], labels["labels"]) if len(ls) == 1}


def benchmark_label(text: str, target: str | None, counterfactual: bool) -> str | None:
    """The legacy `label` of one sentence; unknown (None) when the item names no target sentence."""
    if target is None:
        return None
    if text == target.strip():
        return "conflict" if counterfactual else "aligned"
    return "irrelevant"


def labels_by_text(sentence_labels: Iterable[Mapping] | None) -> dict[str, SentenceLabel] | None:
    """An item's sentence_labels keyed by stripped text; a text labelled two different ways gets all-null labels."""
    if sentence_labels is None:
        return None
    out: dict[str, SentenceLabel] = {}
    for entry in sentence_labels:
        text = (entry.get("text") or "").strip()
        if not text:
            continue
        label = SentenceLabel(entry.get("truthful"), entry.get("relevant"))
        out[text] = label if out.get(text, label) == label else SentenceLabel(None, None)
    return out


def conflicting(relevant: bool | None, truthful: bool | None) -> bool | None:
    """The unit CLEAR should mark: relevant to the question and false; null when either label is unknown."""
    if relevant is None or truthful is None:
        return None
    return relevant and not truthful


def unit_labels(
    source_text: str, key: str, target: str | None, counterfactual: bool,
    labels: dict[str, SentenceLabel] | None, truth: Truth,
) -> dict[str, object]:
    """label / truthful / relevant / conflicting of one unit from its source sentence's text and its own key.

    With `labels`, a matched source sentence gives truthful and relevant (truthful falls back to the statements
    where the label leaves it unknown); an unmatched one gets relevant null. Without, the target sentence is
    relevant and nothing else is known to be. `truthful` from the statements is today's value, unchanged.
    """
    stated = truth.get(key)
    if labels is not None:
        found = labels.get(source_text.strip())
        relevant = found.relevant if found else None
        truthful = found.truthful if found and found.truthful is not None else stated
    else:
        relevant = True if target is not None and source_text.strip() == target.strip() else None
        truthful = stated
    return {
        "label": benchmark_label(source_text, target, counterfactual),
        "truthful": truthful,
        "relevant": relevant,
        "conflicting": conflicting(relevant, truthful),
    }
