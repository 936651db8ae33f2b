"""Answer text normal form (docs/METHOD.md "Evaluation"), shared by the readers (duplicate and same-answer checks)
and the scorer, so both compare answers the same way."""

from __future__ import annotations

import re
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _strip_punctuation(text: str) -> str:
    """Drop every Unicode punctuation and format character (SQuAD deletes punctuation rather than spacing it; format
    characters such as a zero-width space are invisible and must not make two answers or questions differ)."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] != "P" and unicodedata.category(ch) != "Cf")


def visible(text: str) -> str:
    """The text without its invisible format characters (zero-width spaces and joiners, BOMs, soft hyphens)."""
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed: the SQuAD answer normal form."""
    text = _strip_punctuation(text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())
