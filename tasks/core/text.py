"""Answer text normal form (docs/METHOD.md "Evaluation"), shared by the readers (duplicate and same-answer checks)
and the scorer, so both compare answers the same way."""

from __future__ import annotations

import re
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _strip_punctuation(text: str) -> str:
    """Drop every Unicode punctuation character (SQuAD deletes them rather than spacing them)."""
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed: the SQuAD answer normal form."""
    text = _strip_punctuation(text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())
