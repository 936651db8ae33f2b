"""What a probe kind declares: how to fit one, which strengths dev chooses among, and how to reload a saved one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tasks.core.config import ProbeConfig


class Probe(Protocol):
    """A fitted probe: p_conflict per row of features, saved as <path>.safetensors plus its .json metadata."""

    meta: dict  # kind, layer, strength ("l2"), splits fitted on, metrics: filled in by the probes stage

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of label 1 (conflicting) per row, shape (n,)."""
        ...

    def save(self, path: Path) -> Path:
        """Write the weights to `path` (.safetensors) and `meta` to the .json beside it."""
        ...


def fixed_strength(cfg: ProbeConfig) -> tuple[float, ...]:
    """A kind with nothing to tune on dev: one fit, at strength 1.0."""
    return (1.0,)


@dataclass(frozen=True)
class ProbeKind:
    """One probe family, fitted per layer on train (strength chosen on dev) and refitted on train+dev."""

    name: str  # the `probe` value in probe_metrics and sentence_scores
    description: str  # one line: what the probe computes
    fit: Callable[[np.ndarray, np.ndarray, float], Probe]  # (features (n, d), labels in {0, 1}, strength) -> probe
    load: Callable[[Path], Probe]  # a probe `save` wrote
    strengths: Callable[[ProbeConfig], Sequence[float]] = fixed_strength  # candidates tried, best dev AUROC kept


def check_labels(y: np.ndarray) -> None:
    """A probe needs both labels in its training data."""
    if len(np.unique(y)) < 2:
        raise ValueError(f"the train split has only label(s) {np.unique(y).tolist()}: a probe needs both 0 and 1")
