"""Registries that own their entries: one module per entry, one line per module, names checked once at stage start."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import import_module
from typing import Any, TypeVar

T = TypeVar("T")


def collect(package: str, modules: Sequence[str], attr: str) -> dict[str, Any]:
    """name -> entry of each listed module of `package` (its attribute `attr`: one entry, or a list of entries
    when one module declares several, as a reader of a family of files does), in the listed order."""
    entries: dict[str, Any] = {}
    declared_by: dict[str, str] = {}
    for module in modules:
        declared = getattr(import_module(f"{package}.{module}"), attr)
        for entry in declared if isinstance(declared, list | tuple) else [declared]:
            if entry.name in entries:  # a second entry of one name would shadow the first
                raise ValueError(f"{package}: two modules declare the entry {entry.name!r} ({declared_by[entry.name]}"
                                 f" and {module}); {entry.name!r} is registered twice")
            entries[entry.name], declared_by[entry.name] = entry, module
    return entries


def resolve(registry: Mapping[str, T], names: Sequence[str], what: str) -> list[T]:
    """The entries of `names`, refusing none, unknown or repeated names (listing the known ones) before any work."""
    if not names:
        raise ValueError(f"no {what}s configured; known: {sorted(registry)}")
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {sorted(registry)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}s listed twice: {list(names)}")
    return [registry[n] for n in names]
