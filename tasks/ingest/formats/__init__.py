"""Benchmark readers: each --dataset name maps to the Reader of its published file format."""

from __future__ import annotations

from tasks.ingest.formats import confiqa, faitheval, known_facts, mquake, nq, squad
from tasks.ingest.formats.common import FormatError, Ingested, Reader, ReadOptions

READERS: dict[str, Reader] = {
    r.name: r
    for r in (
        known_facts.READER,
        *confiqa.READERS,
        *faitheval.READERS,
        *nq.READERS,
        squad.READER,
        mquake.READER,
    )
}

__all__ = ["READERS", "FormatError", "Ingested", "Reader", "ReadOptions"]
