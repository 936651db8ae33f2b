"""Benchmark readers: each --dataset name maps to the Reader of its published file format.

A reader module of this package declares `READERS: list[Reader]` (most build theirs with
`reader.file_reader(...)`); adding a dataset is one new module here plus its name in MODULES below.
"""

from __future__ import annotations

from collections.abc import Iterable

from tasks.core.registry import collect
from tasks.ingest.formats.items import ReadOptions
from tasks.ingest.formats.reader import Ingested, Reader, file_reader
from tasks.ingest.formats.records import FormatError

# One line per reader module, in the order `clearflow datasets` lists them.
MODULES = (
    "known_facts",
    "confiqa",
    "faitheval",
    "nq",
    "squad",
    "mquake",
)


def registry(modules: Iterable[str]) -> dict[str, Reader]:
    """Every listed module's readers by name (two readers of one name are refused: one would shadow the other)."""
    return collect(__name__, list(modules), "READERS")


READERS: dict[str, Reader] = registry(MODULES)

__all__ = ["MODULES", "READERS", "FormatError", "Ingested", "Reader", "ReadOptions", "file_reader", "registry"]
