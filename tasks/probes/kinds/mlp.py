"""MLP probe: the CLEAR reference's classifier and training schedule, seeded, with optional early stopping on dev.

Reference (LinfengGao/ProbeRAG): `src/classifier.py` (Classifier: d -> 512 -> 256 -> 1 with ReLU and a sigmoid;
train_model: BCE, Adam, shuffled batches) and `scripts/classifier_training.py` (lr 1e-3, batch 32, 100 epochs).
Here, as for the other kinds, the inputs are standardised on the fitted rows; the loss is taken on the logit
(BCEWithLogits: the same loss without the sigmoid's float saturation); initialisation and batch order come from
the run's seed. The strength the probes stage records (`l2`) is the number of epochs: `--probe.mlp-epochs`, or
the best dev epoch with `--probe.mlp-early-stop`, which the train+dev refit and the fold probes reuse.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file, save_file

from tasks.core.config import ProbeConfig
from tasks.core.storage import atomic_path, write_json
from tasks.probes.kinds.base import ProbeKind, check_labels, dev_auroc
from tasks.probes.kinds.linear import sigmoid

if TYPE_CHECKING:
    import torch

HIDDEN = (512, 256)  # the reference's hidden sizes
LR = 1e-3  # Adam, the reference's
BATCH = 32  # the reference's, last batch smaller (DataLoader, shuffle=True, drop_last=False)
TENSORS = ("mean", "scale", "w1", "b1", "w2", "b2", "w3", "b3")


def expected_shapes(d: int, h1: int, h2: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a d -> h1 -> h2 -> 1 probe's tensors (weights as torch stores them: (out, in))."""
    return {"mean": (d,), "scale": (d,), "w1": (h1, d), "b1": (h1,), "w2": (h2, h1), "b2": (h2,),
            "w3": (1, h2), "b3": (1,)}


@dataclass
class MLPProbe:
    """p_conflict = sigmoid(w3 relu(w2 relu(w1 z + b1) + b2) + b3) with z = (x - mean) / scale."""

    tensors: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [k for k in TENSORS if k not in self.tensors]
        if missing:
            raise ValueError(f"MLP probe tensors {missing} are missing (has {sorted(self.tensors)})")
        t = self.tensors = {k: np.ascontiguousarray(self.tensors[k], dtype=np.float32) for k in TENSORS}
        want = expected_shapes(*(t[k].shape[0] if t[k].ndim else 0 for k in ("mean", "w1", "w2")))
        bad = {k: t[k].shape for k in TENSORS if t[k].shape != want[k]}
        if bad:
            raise ValueError(f"MLP probe tensors of inconsistent shapes {bad} (expected {want})")

    @property
    def dim(self) -> int:
        """Width of the feature rows the first layer reads."""
        return int(self.tensors["mean"].shape[0])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of label 1 (conflicting) per row, shape (n,); float32 layers as trained, float64 sigmoid."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (n, {self.dim}), got {X.shape}")
        t = self.tensors
        h = np.maximum(standardise(X, t["mean"], t["scale"]) @ t["w1"].T + t["b1"], 0)
        h = np.maximum(h @ t["w2"].T + t["b2"], 0)
        return sigmoid((h @ t["w3"].T + t["b3"])[:, 0].astype(np.float64))

    def save(self, path: Path) -> Path:
        """Write `<path>` (.safetensors: the scaler and the three layers) and its `.json` metadata, atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(self.tensors, str(tmp), metadata={"kind": str(self.meta.get("kind", "mlp"))})
        write_json(self.meta, path.with_suffix(".json"))
        return path

    @classmethod
    def load(cls, path: Path) -> MLPProbe:
        """Read a probe saved by `save` (metadata from the .json beside it when present)."""
        path = Path(path)
        meta_path = path.with_suffix(".json")
        return cls(load_file(str(path)), json.loads(meta_path.read_text()) if meta_path.exists() else {})


def standardise(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 (x - mean) / scale: one route for training and scoring, so a probe scores what it was trained on."""
    return (np.asarray(X, dtype=np.float32) - mean) / scale


def _net(d: int, seed: int) -> torch.nn.Sequential:
    """The reference's layers without the final sigmoid (the loss takes logits), initialised from `seed` alone
    (torch's default init, drawn inside a forked RNG so the process's global RNG is left as it was)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(d, HIDDEN[0]), torch.nn.ReLU(), torch.nn.Linear(*HIDDEN),
                                   torch.nn.ReLU(), torch.nn.Linear(HIDDEN[1], 1))


def _snapshot(net: torch.nn.Sequential, mean: np.ndarray, scale: np.ndarray) -> MLPProbe:
    """The network's current weights as a probe (copies, so training on does not change it)."""
    layers = [m for m in net if hasattr(m, "weight")]
    tensors = {"mean": mean, "scale": scale}
    for i, layer in enumerate(layers, start=1):
        tensors[f"w{i}"] = layer.weight.detach().numpy().copy()
        tensors[f"b{i}"] = layer.bias.detach().numpy().copy()
    return MLPProbe(tensors)


def train_mlp(
    X: np.ndarray, y: np.ndarray, epochs: int, seed: int,
    dev: tuple[np.ndarray, np.ndarray] | None = None, patience: int = 0,
) -> tuple[MLPProbe, int, list[float]]:
    """The reference schedule (Adam lr 1e-3, shuffled batches of 32, BCE) for `epochs` epochs on standardised X.

    With `patience` > 0 and a dev set holding both labels, dev AUROC is measured after every epoch and training
    stops once it has not risen for `patience` epochs. Returns the probe of the best epoch (ties: the earlier),
    that epoch's number, and the dev AUROC of every epoch run ([] when not watching). The whole train set is one
    tensor and batches are index slices of a seeded permutation: no DataLoader, no copies per epoch.
    """
    import torch
    from sklearn.preprocessing import StandardScaler  # at fitting time only (see base.py)

    check_labels(y)
    scaler = StandardScaler().fit(X)
    mean, scale = scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32)
    Z = torch.from_numpy(standardise(X, mean, scale))
    target = torch.from_numpy(np.asarray(y, dtype=np.float32)).unsqueeze(1)
    net = _net(X.shape[1], seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=LR, fused=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = torch.Generator().manual_seed(seed)
    watch = patience > 0 and dev is not None and len(np.unique(dev[1])) == 2
    best, best_epoch, curve = None, 0, []
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(target), generator=order).split(BATCH):
            optimiser.zero_grad(set_to_none=True)
            loss_fn(net(Z[idx]), target[idx]).backward()
            optimiser.step()
        if not watch:
            continue
        probe = _snapshot(net, mean, scale)
        curve.append(dev_auroc(probe, *dev))
        if curve[-1] > max(curve[:-1], default=-math.inf):
            best, best_epoch = probe, epoch
        elif epoch - best_epoch >= patience:
            break
    return (best, best_epoch, curve) if watch else (_snapshot(net, mean, scale), epochs, curve)


def fit_mlp(X: np.ndarray, y: np.ndarray, epochs: float, seed: int = 0) -> MLPProbe:
    """The reference schedule for a fixed number of epochs (the refit and the fold probes reuse dev's choice)."""
    if epochs != int(epochs) or epochs < 1:
        raise ValueError(f"an mlp probe's strength is its number of epochs, a whole number >= 1; got {epochs}")
    return train_mlp(X, y, int(epochs), seed)[0]


def select_mlp(
    X: np.ndarray, y: np.ndarray, X_dev: np.ndarray, y_dev: np.ndarray, cfg: ProbeConfig, seed: int
) -> tuple[MLPProbe, float]:
    """Dev's part: the epoch count, by early stopping on dev AUROC when probe.mlp_early_stop is on (else the
    fixed probe.mlp_epochs, the reference's schedule, which never looks at dev)."""
    probe, epochs, _ = train_mlp(X, y, cfg.mlp_epochs, seed, (X_dev, y_dev), cfg.mlp_early_stop)
    return probe, float(epochs)


KIND = ProbeKind(
    "mlp", "the reference's MLP (d-512-256-1, ReLU), BCE, Adam 1e-3, batch 32, probe.mlp_epochs epochs; seeded",
    fit_mlp, MLPProbe.load, select=select_mlp, strength_name="epochs",
)
