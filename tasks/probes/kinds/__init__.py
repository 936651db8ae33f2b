"""Probe kinds: one module per kind declaring `KIND` (a `ProbeKind`), registered below.

Adding a kind is one new module here plus one line in MODULES (see docs/ARCHITECTURE.md); the
probes stage fits every configured kind per layer and checks `probe.kinds` / `probe.select_kind` here.
Saved probes of every kind are read back through `load_probe`, which checks them against the features they
will score.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError

from tasks.core.config import ProbeConfig
from tasks.core.registry import collect, resolve
from tasks.probes.kinds.base import Probe, ProbeKind

MODULES = (  # one line per kind
    "logistic",
    "diffmean",
    "mlp",
)
KINDS: dict[str, ProbeKind] = collect(__name__, MODULES, "KIND")


def probe_kinds(cfg: ProbeConfig) -> list[str]:
    """Kinds fitted per layer (the configured ones, then the select kind), unknown names refused up front."""
    names = list(dict.fromkeys([*cfg.kinds, cfg.select_kind]))
    return [kind.name for kind in resolve(KINDS, names, "probe kind")]


def strength_text(kind: str, value: object) -> str:
    """'L2 strength C=0.01', 'epochs=100': a recorded strength as its kind names it."""
    return f"{KINDS[kind].strength_name if kind in KINDS else 'strength'}={value}"


def refit_command(path: Path) -> str:
    """The command that writes a probe file where `path` is: the probes stage of the run that holds it."""
    path = Path(path)
    if path.parent.name == "probes":  # <runs_dir>/<run>/probes/<file>
        run = path.parent.parent
        return f"clearflow stage probes --run {run.name} --runs-dir {run.parent}"
    return "clearflow stage probes --run <run> (the run whose model and layers you score)"


def load_probe(path: Path, dim: int, features: str = "the features") -> Probe:
    """A probe of any kind saved by the probes stage, refused in one line unless its tensors read `dim`-wide rows
    (a probe of another model, or a damaged file, would otherwise fail deep inside a matrix product)."""
    path = Path(path)
    fix = f"write a matching one with `{refit_command(path)}`"
    try:
        kind = json.loads(path.with_suffix(".json").read_text())["kind"]
        if kind not in KINDS:
            raise ValueError(f"unknown probe kind {kind!r}; known: {sorted(KINDS)}")
        probe = KINDS[kind].load(path)
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable probe ({type(e).__name__}: {e}); {fix}") from None
    if probe.dim != dim:
        raise ValueError(f"{path}: the {kind} probe's tensors read {probe.dim}-dim hidden states but {features}"
                         f" are {dim}-dim (a probe of another model or layer); {fix}")
    return probe


__all__ = ["KINDS", "MODULES", "Probe", "ProbeKind", "load_probe", "probe_kinds", "strength_text"]
