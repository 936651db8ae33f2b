"""Seeded train/dev/test assignment of groups (subjects or questions), so no group's facts straddle two splits."""

from __future__ import annotations

import random

SPLIT_FRACTIONS = (("train", 0.6), ("dev", 0.2), ("test", 0.2))


def split_groups(groups: list[str], rng: random.Random) -> dict[str, str]:
    """Seeded 60/20/20 group split; every split gets a group as soon as there are three."""
    order = sorted(groups)
    rng.shuffle(order)
    n = len(order)
    n_dev = round(n * SPLIT_FRACTIONS[1][1])
    n_test = round(n * SPLIT_FRACTIONS[2][1])
    if n >= 3:
        n_dev, n_test = max(n_dev, 1), max(n_test, 1)
    n_train = n - n_dev - n_test
    names = ["train"] * n_train + ["dev"] * n_dev + ["test"] * n_test
    return dict(zip(order, names))
