"""Sentence splitting with exact character offsets: shared by ingest (contexts) and decompose (units)."""

from __future__ import annotations

import functools
import logging
import re

log = logging.getLogger(__name__)

# Fallback boundary for text pysbd could not place: end punctuation (plus closing quotes/brackets), then
# whitespace, then something that can open a sentence.
_FALLBACK_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@functools.lru_cache(maxsize=1)
def _segmenter():
    """One pysbd segmenter per process: building its rule set costs more than segmenting a context."""
    import pysbd

    return pysbd.Segmenter(language="en", clean=False, char_span=True)


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink [start, end) so it neither starts nor ends with whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _regex_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Split text[start:end] at punctuation + whitespace + capital: the fallback where pysbd failed."""
    spans: list[tuple[int, int]] = []
    cursor = start
    for m in _FALLBACK_BOUNDARY.finditer(text, start, end):
        spans.append(_strip_span(text, cursor, m.start()))
        cursor = m.end()
    spans.append(_strip_span(text, cursor, end))
    return [(s, e) for s, e in spans if e > s]


def _pysbd_spans(text: str) -> list[tuple[int, int]]:
    """pysbd's spans, stripped, kept only where they match the text and move strictly forward."""
    spans: list[tuple[int, int]] = []
    last_end = 0
    for seg in _segmenter().segment(text):
        start, end = int(seg.start), int(seg.end)
        if start < last_end or end > len(text) or text[start:end] != seg.sent:
            continue  # a span pysbd mislocated: its text is covered by the gap filling below
        start, end = _strip_span(text, start, end)
        if end > start:
            spans.append((start, end))
            last_end = end
    return spans


def split_sentences(text: str) -> list[tuple[str, int, int]]:
    """Sentences of `text` as (sentence, start, end) with text[start:end] == sentence, covering all of it.

    pysbd decides the boundaries (it knows abbreviations such as "St. Louis" or "U.S."); any non-blank
    stretch its spans miss (pysbd silently drops sentences it cannot locate) is split by a simple
    punctuation rule instead, so no character of the context is ever lost.
    """
    if not text or text.isspace():
        return []
    try:
        spans = _pysbd_spans(text)
    except Exception as exc:  # pysbd raises on rare inputs (regex edge cases); never lose the context
        log.warning("pysbd failed (%s); splitting by punctuation instead", exc)
        spans = []
    out: list[tuple[int, int]] = []
    cursor = 0
    for start, end in spans + [(len(text), len(text))]:
        if start > cursor and not text[cursor:start].isspace():
            out.extend(_regex_spans(text, cursor, start))
        if end > start:
            out.append((start, end))
        cursor = max(cursor, end)
    return [(text[s:e], s, e) for s, e in out]
