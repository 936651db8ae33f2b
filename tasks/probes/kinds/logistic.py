"""Logistic probe: standardised L2 logistic regression on the hidden states, its L2 strength chosen on dev."""

from __future__ import annotations

import numpy as np

from tasks.core.config import ProbeConfig
from tasks.probes.kinds.base import ProbeKind, check_labels
from tasks.probes.kinds.linear import LinearProbe, standardised_logistic


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float, seed: int = 0) -> LinearProbe:
    """Standardised L2 logistic regression (sklearn C = l2), folded back to the raw feature space; lbfgs is
    deterministic, so the seed is not used."""
    check_labels(y)
    return LinearProbe(*standardised_logistic(X, y, l2))


def l2_grid(cfg: ProbeConfig) -> list[float]:
    """Every inverse L2 strength of probe.l2_grid is fitted on train; the best dev AUROC is kept."""
    return cfg.l2_grid


KIND = ProbeKind(
    "logistic", "standardised L2 logistic regression, C chosen on dev from probe.l2_grid", fit_logistic,
    LinearProbe.load, l2_grid,
)
