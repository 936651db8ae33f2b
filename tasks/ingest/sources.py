"""Which datasets one ingest reads, decided once per run: the main dataset (its items), and the source of the
probe statements when that is a separate one (the bundled known facts, or an MQuAKE file).

The stage reads exactly these sources and provenance hashes exactly their files, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.core.config import RunConfig
from tasks.ingest.formats import READERS, Ingested, Reader, ReadOptions

DATA, PROBE = "data", "probe"  # a source's role: it gives the items / the probe statements
# Datasets whose reader yields probe statements; any other dataset borrows them from one of these.
PROBE_SOURCES = ("known-facts", "mquake")


def reader_for(name: str) -> Reader:
    """The registered reader of a dataset name, or one clear error listing the names there are."""
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; supported datasets: {', '.join(sorted(READERS))}")
    return READERS[name]


@dataclass(frozen=True)
class Source:
    """One dataset the ingest reads, from which path, in which role (DATA or PROBE)."""

    dataset: str
    path: Path | None
    role: str

    def __post_init__(self) -> None:
        reader_for(self.dataset)  # an unknown name fails here, before anything is read or hashed

    @property
    def reader(self) -> Reader:
        return reader_for(self.dataset)

    def files(self) -> list[Path]:
        """The input files this source stands for; a missing path is one error naming the option to set."""
        if self.reader.needs_path and self.path is None:
            if self.role == PROBE:
                raise ValueError(f"ingest.probe_dataset {self.dataset!r} needs --ingest.probe-data-path")
            raise ValueError(f"dataset {self.dataset!r} needs --data-path (get it from {self.reader.source})")
        return self.reader.files(self.path)

    def read(self, opts: ReadOptions) -> Ingested:
        """This source's rows."""
        return self.reader.read(self.path, opts)


def _probe_source(cfg: RunConfig) -> Source | None:
    """The source whose statements train the probes, or None when the main dataset supplies its own."""
    name = cfg.ingest.probe_dataset
    if name is None:
        return None if cfg.dataset in PROBE_SOURCES else Source("known-facts", None, PROBE)
    if name not in PROBE_SOURCES:
        raise ValueError(f"ingest.probe_dataset {name!r} has no probe statements; use one of {list(PROBE_SOURCES)}")
    if name == cfg.dataset and cfg.ingest.probe_data_path in (None, cfg.data_path):
        return None
    return Source(name, cfg.ingest.probe_data_path, PROBE)


def run_sources(cfg: RunConfig) -> list[Source]:
    """The sources of this run: the main dataset first, then the probe-statement source when it is separate."""
    main = Source(cfg.dataset, cfg.data_path, DATA)
    probe = _probe_source(cfg)
    return [main] if probe is None else [main, probe]
