"""Markdown formatting of report numbers and tables, shared by the report and the method comparison it shows."""

from __future__ import annotations

import math
from typing import Any


def missing(x: Any) -> bool:
    """Whether a value is undefined (null or NaN): it prints as 'n/a'."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table, 'n/a' when undefined."""
    return "n/a" if missing(x) else f"{x:.{digits}f}"


def pct_ci(value: Any, lo: Any, hi: Any, unit: str = "") -> str:
    """A fraction and its CI as percentages: '45.0 [38.0, 52.0]'."""
    if missing(value):
        return "n/a"
    ci = "" if missing(lo) or missing(hi) else f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{100 * value:.1f}{unit}{ci}"


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
