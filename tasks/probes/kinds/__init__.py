"""Probe kinds: one module per kind declaring `KIND` (a `ProbeKind`), registered below.

Adding a kind is one new module here plus one line in MODULES (see docs/ARCHITECTURE.md); the
probes stage fits every configured kind per layer and checks `probe.kinds` / `probe.select_kind` here.
"""

from __future__ import annotations

from tasks.core.config import ProbeConfig
from tasks.core.registry import collect, resolve
from tasks.probes.kinds.base import Probe, ProbeKind

MODULES = (  # one line per kind
    "logistic",
    "diffmean",
)
KINDS: dict[str, ProbeKind] = collect(__name__, MODULES, "KIND")


def probe_kinds(cfg: ProbeConfig) -> list[str]:
    """Kinds fitted per layer (the configured ones, then the select kind), unknown names refused up front."""
    names = list(dict.fromkeys([*cfg.kinds, cfg.select_kind]))
    return [kind.name for kind in resolve(KINDS, names, "probe kind")]


__all__ = ["KINDS", "MODULES", "Probe", "ProbeKind", "probe_kinds"]
