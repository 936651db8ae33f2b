"""The fine-tuned methods, generated from the fine-tuning arms (tasks/finetune/arms/): an arm is one entry there.

An arm trained with markers answers on the probe-marked context (`<arm>`, the test prompts of `clear`, so two
arms differ by their adapter only) and on the plain context under the same system line (`<arm>_unmarked`: what
the markers add at inference). An arm trained without markers answers on the plain context under its own training
prompt. The prompt builder is the arm's, the one its training examples are built with, so training and evaluation
see the same text byte for byte. Only `clear` and `clear_unmarked` are in the default list. The full comparison
(`--preset full`) leaves out the other arms' `_unmarked` rows: what markers add at inference is asked of CLEAR's
adapter, and each of those rows costs an evaluation pass per seed (name them in --evaluate.methods to get them).
"""

from __future__ import annotations

from tasks.evaluate.methods.base import Method
from tasks.finetune.arms import ARMS, Arm

DEFAULT_ARM = "clear"


def arm_methods(arm: Arm) -> list[Method]:
    """The methods that evaluate one arm's adapter: marked and unmarked for a marked arm, plain otherwise."""
    common = {"messages": arm.messages, "model": "finetuned", "arm": arm.name, "default": arm.name == DEFAULT_ARM}
    if not arm.marked:
        return [Method(arm.name, arm.label, f"the context, adapter trained on {arm.description}", context="plain",
                       **common)]
    return [
        Method(arm.name, arm.label, f"the marked context, adapter trained on {arm.description}", context="marked",
               **common),
        Method(f"{arm.name}_unmarked", f"{arm.label} weights, no markers", f"ablation: the {arm.name} adapter on the"
               " unmarked context (what the markers add at inference)", context="plain",
               comparison=arm.name == DEFAULT_ARM, **common),
    ]


METHOD = [m for arm in ARMS for m in arm_methods(arm)]
