"""Named sets of run options (`--preset NAME`): a preset fills in options before the ones given explicitly, so any
option given still wins.

A preset's options are dotted option names mapped to values, or to `Every(registry)`: every name registered there
when the preset is applied (a method or arm added later is in it with no edit here). Presets live in flows/ because
they name the stages' registries, which tasks.core may not import.
"""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass
from typing import Any

from tasks.core.config import RunConfig


@dataclass(frozen=True)
class Every:
    """Every name of a registry, looked up when the preset is applied."""

    registry: str  # "module:attribute" of a name -> entry mapping
    what: str  # what an entry is, for the help: "evaluation method"
    flag: str | None = None  # an attribute of the entries: only those where it is true

    def names(self) -> list[str]:
        entries = pkgutil.resolve_name(self.registry)
        return [name for name, entry in entries.items() if self.flag is None or getattr(entry, self.flag)]

    def __str__(self) -> str:
        return f"every registered {self.what}" + (f" with `{self.flag}`" if self.flag else "")


@dataclass(frozen=True)
class Preset:
    """A named set of option overrides."""

    name: str
    summary: str
    options: dict[str, Any]  # "section.field" -> value or Every(...)

    def describe(self) -> str:
        """One line: what the preset is for and what it sets."""
        return f"{self.summary} ({'; '.join(f'{k}: {v}' for k, v in self.options.items())})"

    def overrides(self) -> dict[str, Any]:
        """The options as a nested config dict, registries resolved."""
        nested: dict[str, Any] = {}
        for dotted, value in self.options.items():
            *sections, field = dotted.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
            node[field] = value.names() if isinstance(value, Every) else value
        return nested


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("full", "the whole comparison: every baseline, ablation and CLEAR", {
            "evaluate.methods": Every("tasks.evaluate.methods:REGISTRY", "evaluation method", flag="comparison"),
            "finetune.arms": Every("tasks.finetune.arms:REGISTRY", "fine-tuning arm"),
            "ingest.all_train_conditions": True,  # kaft trains on aligned and irrelevant train items too
        }),
    )
}


def preset_help() -> str:
    """The presets as one line each, for `--help` and `clearflow presets`."""
    return "; ".join(f"{p.name}: {p.describe()}" for p in PRESETS.values())


def get_preset(name: str) -> Preset:
    """The preset of a name, or one error line listing the presets there are."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {preset_help()} (clearflow presets lists them)")
    return PRESETS[name]


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`base` with the values of `new` replacing its own (nested sections merged, not replaced)."""
    out = dict(base)
    for k, v in new.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_config(name: str | None, given: dict[str, Any]) -> RunConfig:
    """The run config of the options given (a nested dict), the preset's options filling in those not given."""
    return RunConfig.model_validate(deep_update(get_preset(name).overrides() if name else {}, given))


def with_preset(name: str | None, cfg: RunConfig) -> RunConfig:
    """`cfg` with the preset's options under the options it sets explicitly (a RunConfig knows which it was given)."""
    return cfg if name is None else preset_config(name, cfg.model_dump(mode="json", exclude_unset=True))


def without_remote_code(saved: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with trust_remote_code off: running a model's own code is asked for on each command, never
    inherited from a run directory (which anyone who can write there could have edited)."""
    return {**saved, "model": {**saved.get("model", {}), "trust_remote_code": False}}
