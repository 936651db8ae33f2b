"""The known-facts generator's options (``--ingest.*``), as the reader sees them and as provenance keys them.

A leaf module (it imports only the config), so that ReadOptions can carry these options without importing the
generator itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.core.config import IngestConfig

# Reader version per generator version: provenance records it and the ingest cache keys on it.
VERSIONS = {"1": "1", "2": "2"}
# The IngestConfig fields that shape the known-facts tables (besides n_distractors, seed, limit and the budget).
CONFIG_FIELDS = (
    "known_facts_version", "same_relation_distractors", "same_subject_distractors", "unrelated_distractors",
    "test_conditions_per_fact", "holdout_relations", "all_train_conditions",
)


@dataclass(frozen=True)
class KnownFactsOptions:
    """Which generator builds known-facts and how its v2 contexts and splits are drawn."""

    version: str = "2"
    same_relation: int = 2
    same_subject: int = 1
    unrelated: int = 2
    conditions_per_test_fact: int = 1
    holdout_relations: tuple[str, ...] = ()
    all_train_conditions: bool = False  # train facts in the aligned and irrelevant conditions too (KAFT)

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"ingest.known_facts_version={self.version!r}: use one of {sorted(VERSIONS)}")
        for name, value in (("same_relation_distractors", self.same_relation),
                            ("same_subject_distractors", self.same_subject),
                            ("unrelated_distractors", self.unrelated)):
            if value < 0:
                raise ValueError(f"ingest.{name}={value}: a count of sentences cannot be negative")
        if not 1 <= self.conditions_per_test_fact <= 3:
            raise ValueError(f"ingest.test_conditions_per_fact={self.conditions_per_test_fact}: use 1, 2 or 3")
        if self.all_train_conditions and self.version != "2":
            raise ValueError("ingest.all_train_conditions needs ingest.known_facts_version 2 (v1 builds counterfactual"
                             " contexts only)")


def from_config(ingest: IngestConfig) -> KnownFactsOptions:
    """The generator options of a run's ingest config."""
    return KnownFactsOptions(
        version=ingest.known_facts_version,
        same_relation=ingest.same_relation_distractors,
        same_subject=ingest.same_subject_distractors,
        unrelated=ingest.unrelated_distractors,
        conditions_per_test_fact=ingest.test_conditions_per_fact,
        holdout_relations=tuple(ingest.holdout_relations),
        all_train_conditions=ingest.all_train_conditions,
    )


def provenance_options(ingest: IngestConfig) -> dict[str, Any]:
    """The generator options as the ingest cache key and provenance record them."""
    return ingest.model_dump(mode="json", include=set(CONFIG_FIELDS))


def loader_version(ingest: IngestConfig) -> str:
    """The known-facts reader version a run's config selects."""
    return VERSIONS[ingest.known_facts_version]
