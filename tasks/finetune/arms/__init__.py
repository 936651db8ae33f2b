"""Fine-tuning arms: one entry per arm, in report order. Adding an arm is one line here; the finetune stage trains
it (`--finetune.arms`) and tasks/evaluate/methods/arms.py turns it into evaluation methods.

Every arm trains on the same selected train items (KAFT: the same facts) with the same budget, learning rate,
schedule and seed, so two arms differ only in what their entries here say (docs/METHOD.md, section 3).
"""

from __future__ import annotations

from tasks.core.registry import resolve
from tasks.finetune.arms.base import MARKER_SOURCES, TRAIN_DATA, Arm

ARMS = (
    Arm("clear", "CLEAR", "probe-marked contexts, CE + attention loss (CLEAR)", markers="probe", attention=True),
    Arm("sft", "SFT", "the same items' plain contexts, CE only (supervised fine-tuning)", markers="none",
        attention=False),
    Arm("kaft", "KAFT", "the same facts' plain counterfactual, aligned and irrelevant contexts, a third each, CE"
        " only (Li et al. 2022)", markers="none", attention=False, data="kaft"),
    Arm("clear_markers_only", "CLEAR markers only", "probe-marked contexts, CE only (what the attention loss adds)",
        markers="probe", attention=False),
    Arm("clear_random_markers", "CLEAR random markers", "contexts with as many units marked as the probe"
        " flagged, at seeded random places, CE + attention loss (what the probe's placement adds)", markers="random",
        attention=True),
    Arm("clear_oracle_markers", "CLEAR oracle markers", "contexts with the gold conflicting units marked, CE +"
        " attention loss (a perfect probe)", markers="oracle", attention=True),
)
REGISTRY: dict[str, Arm] = {a.name: a for a in ARMS}
assert len(REGISTRY) == len(ARMS), "two arms share a name"


def resolve_arms(names: list[str]) -> list[Arm]:
    """The configured arms in the given order; unknown or repeated names refused with the known ones."""
    return resolve(REGISTRY, names, "fine-tuning arm")


__all__ = ["ARMS", "MARKER_SOURCES", "REGISTRY", "TRAIN_DATA", "Arm", "resolve_arms"]
