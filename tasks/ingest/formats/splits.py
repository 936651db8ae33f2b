"""Seeded train/dev/test assignment of groups (subjects or questions), so no group's facts straddle two splits."""

from __future__ import annotations

import random

SPLIT_FRACTIONS = (("train", 0.6), ("dev", 0.2), ("test", 0.2))


def split_groups(groups: list[str], rng: random.Random) -> dict[str, str]:
    """Seeded 60/20/20 group split: dev and test get round(n / 5) groups each, so each has one as soon as there
    are three groups (round(0.6) = 1), and train the rest."""
    order = sorted(groups)
    rng.shuffle(order)
    n = len(order)
    n_dev, n_test = (round(n * fraction) for _, fraction in SPLIT_FRACTIONS[1:])
    names = ["train"] * (n - n_dev - n_test) + ["dev"] * n_dev + ["test"] * n_test
    return dict(zip(order, names))
