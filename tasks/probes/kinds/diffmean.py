"""Difference-of-means probe: the direction between the two labels' mean vectors, calibrated by a 1-D logistic fit."""

from __future__ import annotations

import numpy as np

from tasks.probes.kinds.base import ProbeKind, check_labels
from tasks.probes.kinds.linear import LinearProbe, standardised_logistic


def fit_diffmean(X: np.ndarray, y: np.ndarray, l2: float, seed: int = 0) -> LinearProbe:
    """Difference-of-means direction; a 1-D logistic fit on the train projections calibrates it (no randomness:
    the seed is not used). Identical label means (e.g. at a subject's last token, which a causal model reads
    before the true or false object: the paired statements' vectors are equal) give no direction: the probe then
    says the train base rate for every row, i.e. chance, rather than failing the layer."""
    check_labels(y)
    X = X.astype(np.float64)
    direction = X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0)
    norm = np.linalg.norm(direction)
    if norm <= 1e-12 * max(1.0, float(np.abs(X).max())):
        rate = float(np.mean(y))
        return LinearProbe(np.zeros(X.shape[1]), float(np.log(rate / (1 - rate))))
    direction /= norm
    a, b = standardised_logistic((X @ direction)[:, None], y, l2)
    return LinearProbe(a[0] * direction, b)


# the 1-D calibration needs no tuning: one fit at strength 1.0
KIND = ProbeKind("diffmean", "difference-of-means direction, calibrated by a 1-D logistic fit", fit_diffmean,
                 LinearProbe.load)
