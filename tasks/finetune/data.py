"""What each fine-tuning arm trains on: the same selected items (KAFT: the same facts), with the arm's contexts.

Markers come from the arm's source (tasks/core/marking.py): the probe's flags, as many units placed at random
(seeded per item), or the gold `conflicting` labels. KAFT (Li et al. 2022) trains on the selected facts a third
each in the counterfactual, aligned and irrelevant condition, in plain contexts (the benchmark's answer: the
context's in the first two, the true one in the irrelevant).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import polars as pl

from schemas.tables import CONDITIONS
from tasks.core.marking import ContextUnits, unit_flags
from tasks.core.prompts import item_question, mark_context
from tasks.finetune.arms import Arm

log = logging.getLogger(__name__)

COUNTERFACTUAL, ALIGNED, IRRELEVANT = CONDITIONS


@dataclass(frozen=True)
class TrainItem:
    """One training item of an arm: the question, the context as the arm sees it, the target answers."""

    item_id: str
    question: str
    context: str
    answers: list[str]
    condition: str | None
    sentenced: bool  # the item has units in the sentences table (a marked arm marks nothing without them)


def kaft_rows(selected: pl.DataFrame, items: pl.DataFrame, seed: int) -> pl.DataFrame:
    """The selected facts, each in one condition rotated over a seeded order (a third each): the counterfactual
    item itself, or the aligned / irrelevant train item of the same fact (same `source_id`)."""
    others = items.filter((pl.col("split") == "train") & pl.col("condition").is_in([ALIGNED, IRRELEVANT]))
    if others.height == 0:
        dataset = items["dataset"][0] if items.height else "?"
        raise ValueError(f"fine-tuning arm 'kaft' trains on aligned and irrelevant train contexts too, and the train"
                         f" split of dataset {dataset!r} has none: with known-facts add --ingest.all-train-conditions;"
                         " other datasets cannot give them, so leave 'kaft' out of --finetune.arms")
    sibling = {(r["source_id"], r["condition"]): r["item_id"]
               for r in others.select("source_id", "condition", "item_id").iter_rows(named=True)}
    order = list(range(selected.height))
    random.Random(f"kaft:{seed}").shuffle(order)
    wanted = {pos: CONDITIONS[rank % len(CONDITIONS)] for rank, pos in enumerate(order)}
    picked, missing = [], []
    for pos, (item_id, source_id) in enumerate(selected.select("item_id", "source_id").iter_rows()):
        condition = wanted[pos]
        if condition == COUNTERFACTUAL:
            picked.append(item_id)
        elif (source_id, condition) in sibling:
            picked.append(sibling[source_id, condition])
        else:
            missing.append(item_id)
    if missing:
        raise ValueError(f"fine-tuning arm 'kaft': {len(missing)} selected train items have no aligned or irrelevant"
                         f" train item of the same fact (e.g. {missing[:3]}); rebuild the items with"
                         " --ingest.all-train-conditions")
    return items.filter(pl.col("item_id").is_in(picked)).sort("item_id")


def _check_oracle(arm: Arm, rows: pl.DataFrame, units: dict[str, ContextUnits]) -> None:
    """Oracle markers need the gold label of every unit of every training context: one line naming what lacks it."""
    unlabelled = [i for i in rows["item_id"].to_list() if i not in units or not units[i].labelled]
    if unlabelled:
        raise ValueError(f"fine-tuning arm {arm.name!r} marks the gold `conflicting` units, and {len(unlabelled)} of"
                         f" {rows.height} selected train contexts have units without that label (e.g."
                         f" {unlabelled[:3]}): the benchmark does not label them (known-facts does), so leave"
                         f" {arm.name!r} out of --finetune.arms")


def arm_context(arm: Arm, row: dict, units: ContextUnits | None, seed: int) -> str:
    """The context an arm trains on: the item's own, or its units rebuilt with the arm's markers (an item
    without units keeps its own context, unmarked)."""
    if not arm.marked or units is None:
        return row["context"]
    return mark_context(units.texts, unit_flags(units, arm.markers, f"{seed}:{row['item_id']}"))


def arm_items(arm: Arm, selected: pl.DataFrame, items: pl.DataFrame, units: dict[str, ContextUnits],
              seed: int) -> list[TrainItem]:
    """The training items of one arm, in item_id order (the training loop shuffles them with the seed)."""
    rows = kaft_rows(selected, items, seed) if arm.data == "kaft" else selected
    if arm.markers == "oracle":
        _check_oracle(arm, rows, units)
    return [
        TrainItem(row["item_id"], item_question(row), arm_context(arm, row, units.get(row["item_id"]), seed),
                  row["answers"], row.get("condition"), row["item_id"] in units)
        for row in rows.iter_rows(named=True)
    ]
