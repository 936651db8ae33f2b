"""The seeded group split: sizes from a hand-worked table, seeded, and independent of the order groups arrive in."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tasks.ingest.formats.splits import split_groups

# n groups -> (train, dev, test), worked by hand: dev and test are round(0.2 n) each (Python rounds half to even),
# at least one each from three groups on, and train the rest.
SIZES = {
    0: (0, 0, 0),
    1: (1, 0, 0),
    2: (2, 0, 0),
    3: (1, 1, 1),  # round(0.6) = 1
    4: (2, 1, 1),  # round(0.8) = 1
    5: (3, 1, 1),
    7: (5, 1, 1),  # round(1.4) = 1
    8: (4, 2, 2),  # round(1.6) = 2
    10: (6, 2, 2),
    13: (7, 3, 3),  # round(2.6) = 3
    100: (60, 20, 20),
}


@pytest.mark.parametrize("n", sorted(SIZES))
def test_split_sizes_follow_the_hand_worked_table(n):
    groups = [f"g{i}" for i in range(n)]
    split = split_groups(groups, random.Random(0))
    assert sorted(split) == sorted(groups)
    counts = Counter(split.values())
    assert (counts["train"], counts["dev"], counts["test"]) == SIZES[n]


def test_split_is_seeded_and_ignores_the_input_order():
    groups = [f"subject {i}" for i in range(30)]
    first = split_groups(groups, random.Random("kf:0"))
    assert split_groups(list(reversed(groups)), random.Random("kf:0")) == first
    assert split_groups(groups, random.Random("kf:1")) != first


def test_split_is_the_seeded_shuffle_of_the_sorted_groups():
    """The order a seed gives is the one random.shuffle gives the sorted groups: train first, then dev, then test."""
    groups = ["delta", "alpha", "echo", "charlie", "bravo"]
    order = sorted(groups)
    random.Random(7).shuffle(order)
    assert split_groups(groups, random.Random(7)) == dict(zip(order, ["train"] * 3 + ["dev", "test"]))
