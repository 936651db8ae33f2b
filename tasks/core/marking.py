"""Contexts with units marked, as both fine-tuning and evaluation see them: by the probe's flags, or (for the
fine-tuning arms that isolate what the probe adds) as many units at random places, or the gold `conflicting` ones.

Localisation prunes before it probes (docs/METHOD.md, "Relevance pruning"): when the relevance filter ran
(`--decompose.relevance`), a unit it did not keep is never flagged, whatever its p_conflict, so the attention
loss never pulls attention onto a false but irrelevant sentence. The probes stage prunes its flags, and marking
prunes again, so no table written elsewhere can mark an irrelevant unit.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from tasks.core.prompts import mark_context
from tasks.core.storage import RunPaths, read_table


@dataclass(frozen=True)
class ContextUnits:
    """The units of one context in order, with the probe's flags and the benchmark's `conflicting` labels."""

    texts: list[str]
    flagged: list[bool]
    conflicting: list[bool | None]  # None where the benchmark does not label the unit

    @property
    def labelled(self) -> bool:
        """Every unit carries a `conflicting` label (what oracle markers need)."""
        return all(c is not None for c in self.conflicting)


def relevance_filtered(sentences: pl.DataFrame) -> bool:
    """Whether the relevance filter ran on these units (decompose.relevance): they carry is_relevant values."""
    return "is_relevant" in sentences.columns and sentences["is_relevant"].null_count() < sentences.height


def pruned(flagged: pl.Expr, sentences: pl.DataFrame) -> pl.Expr:
    """The flags a unit may keep: all of them without the filter; with it, only on units it kept (unknown: not)."""
    return flagged & pl.col("is_relevant").fill_null(False) if relevance_filtered(sentences) else flagged


def context_units(paths: RunPaths) -> dict[str, ContextUnits]:
    """item_id -> its units in order, each with its probe flag (False where unscored or pruned) and its gold label."""
    sentences = read_table(paths.table("sentences"))
    sentences = sentences.select("item_id", "sent_idx", "text", "conflicting",
                                 *(["is_relevant"] if "is_relevant" in sentences.columns else []))
    scores = read_table(paths.table("sentence_scores")).select("item_id", "sent_idx", "flagged")
    joined = sentences.join(scores, on=["item_id", "sent_idx"], how="left").with_columns(
        pruned(pl.col("flagged").fill_null(False), sentences).alias("flagged")
    )
    return {
        item_id: ContextUnits(group["text"].to_list(), group["flagged"].to_list(), group["conflicting"].to_list())
        for (item_id,), group in joined.sort("item_id", "sent_idx").group_by("item_id", maintain_order=True)
    }


def marked_contexts(paths: RunPaths) -> dict[str, str]:
    """item_id -> its context rebuilt from its sentences, flagged ones wrapped in <conflict> markers."""
    return {item_id: mark_context(u.texts, u.flagged) for item_id, u in context_units(paths).items()}


def random_flags(flagged: Sequence[bool], rng: random.Random) -> list[bool]:
    """As many flags as `flagged` holds, on units drawn uniformly without replacement: the count without the place."""
    chosen = set(rng.sample(range(len(flagged)), sum(map(bool, flagged))))
    return [i in chosen for i in range(len(flagged))]


def unit_flags(units: ContextUnits, source: str, key: str) -> list[bool]:
    """The units a marker source marks: 'probe' flags, 'random' (seeded by `key`, e.g. seed and item) or 'oracle'."""
    if source == "probe":
        return list(units.flagged)
    if source == "random":
        return random_flags(units.flagged, random.Random(f"random-markers:{key}"))
    if source == "oracle":
        if not units.labelled:
            raise ValueError(f"oracle markers need a `conflicting` label on every unit; {key} has unlabelled units")
        return [bool(c) for c in units.conflicting]
    raise ValueError(f"unknown marker source {source!r}; known: ['oracle', 'probe', 'random']")
