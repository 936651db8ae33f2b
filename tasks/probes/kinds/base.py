"""What a probe kind declares: how to fit one, which strengths dev chooses among, and how to reload a saved one."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tasks.core.config import ProbeConfig


class Probe(Protocol):
    """A fitted probe: p_conflict per row of features, saved as <path>.safetensors plus its .json metadata."""

    meta: dict  # kind, layer, strength ("l2"), seed, splits fitted on, metrics: filled in by the probes stage

    @property
    def dim(self) -> int:
        """Width of the feature rows it reads (from its tensors), checked when a saved probe is loaded."""
        ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of label 1 (conflicting) per row, shape (n,)."""
        ...

    def save(self, path: Path) -> Path:
        """Write the weights to `path` (.safetensors) and `meta` to the .json beside it."""
        ...


# (train features, train labels, dev features, dev labels, probe config, seed) -> (probe, strength)
Select = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, ProbeConfig, int], tuple[Probe, float]]


def fixed_strength(cfg: ProbeConfig) -> tuple[float, ...]:
    """A kind with nothing to tune on dev: one fit, at strength 1.0."""
    return (1.0,)


def dev_auroc(probe: Probe, X: np.ndarray, y: np.ndarray) -> float:
    """Dev AUROC used for every choice (-inf where dev lacks a label, so it never wins)."""
    if len(np.unique(y)) < 2:
        return -math.inf
    from sklearn.metrics import roc_auc_score  # sklearn loads in ~1.5 s: the report, which reads kinds, never does

    return float(roc_auc_score(y, probe.predict_proba(X)))


@dataclass(frozen=True)
class ProbeKind:
    """One probe family, fitted per layer on train (strength chosen on dev) and refitted on train+dev."""

    name: str  # the `probe` value in probe_metrics and sentence_scores
    description: str  # one line: what the probe computes
    # (features (n, d), labels in {0, 1}, strength, seed) -> probe; a kind with no randomness ignores the seed
    fit: Callable[[np.ndarray, np.ndarray, float, int], Probe]
    load: Callable[[Path], Probe]  # a probe `save` wrote
    strengths: Callable[[ProbeConfig], Sequence[float]] = fixed_strength  # candidates tried, best dev AUROC kept
    select: Select | None = None  # a kind's own use of dev (e.g. early stopping); None = the strengths grid
    strength_name: str = "L2 strength C"  # what the strength (`l2` in best.json) means, for the report

    def fit_on_dev(
        self, X: np.ndarray, y: np.ndarray, X_dev: np.ndarray, y_dev: np.ndarray, cfg: ProbeConfig, seed: int
    ) -> tuple[Probe, float]:
        """Fit on train at every candidate strength and keep the best dev AUROC (ties: the smaller strength),
        or the kind's own `select`; returns the probe and the strength a refit reuses."""
        if self.select is not None:
            return self.select(X, y, X_dev, y_dev, cfg, seed)
        fits = [(self.fit(X, y, c, seed), c) for c in self.strengths(cfg)]
        return max(fits, key=lambda fc: (dev_auroc(fc[0], X_dev, y_dev), -fc[1]))


def check_labels(y: np.ndarray) -> None:
    """A probe needs both labels in its training data."""
    if len(np.unique(y)) < 2:
        raise ValueError(f"the train split has only label(s) {np.unique(y).tolist()}: a probe needs both 0 and 1")
