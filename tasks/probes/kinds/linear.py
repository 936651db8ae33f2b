"""The linear probe both built-in kinds reduce to: p_conflict = sigmoid(x @ weight + bias) in the raw feature space.

Standardisation is folded into the weights, so a saved probe carries no scaler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from tasks.core.storage import atomic_path, write_json

MAX_ITER = 2000


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass
class LinearProbe:
    """p_conflict = sigmoid(x @ weight + bias): every probe kind reduces to this."""

    weight: np.ndarray  # (d,) float32
    bias: float
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float32).reshape(-1)
        self.bias = float(np.float32(self.bias))  # what the safetensors file can hold, so reloads are identical

    @property
    def dim(self) -> int:
        """Width of the feature rows the weight reads."""
        return int(self.weight.shape[0])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of label 1 (conflicting) per row, shape (n,) (not sklearn's (n, 2))."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.weight.shape[0]:
            raise ValueError(f"expected features of shape (n, {self.weight.shape[0]}), got {X.shape}")
        return sigmoid(X.astype(np.float64) @ self.weight.astype(np.float64) + self.bias)

    def save(self, path: Path) -> Path:
        """Write `<path>` (.safetensors: weight, bias) and its `.json` metadata beside it, atomically."""
        path = Path(path)
        tensors = {"weight": self.weight, "bias": np.array(self.bias, dtype=np.float32)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"kind": str(self.meta.get("kind", "linear"))})
        write_json(self.meta, path.with_suffix(".json"))
        return path

    @classmethod
    def load(cls, path: Path) -> LinearProbe:
        """Read a probe saved by `save` (metadata from the .json beside it when present)."""
        path = Path(path)
        tensors = load_file(str(path))
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return cls(tensors["weight"], float(tensors["bias"]), meta)


def _fold(coef: np.ndarray, intercept: float, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, float]:
    """Fold standardisation into a linear map: coef @ ((x - mean) / scale) + c == x @ w + b."""
    w = coef / scale
    return w, float(intercept - w @ mean)


def standardised_logistic(X: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """(weight, bias) of an L2 logistic regression fitted on standardised X, folded back to raw X."""
    from sklearn.linear_model import LogisticRegression  # at fitting time only (see base.py)
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(C=l2, max_iter=MAX_ITER).fit(scaler.transform(X), y)
    return _fold(clf.coef_[0], clf.intercept_[0], scaler.mean_, scaler.scale_)
