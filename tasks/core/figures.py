"""Figures written as PNG, drawn only when what they show changed.

A forced report on unchanged tables (`clearflow stage report`) is the common way to re-run one task; drawing its
figures again (and importing matplotlib to do it) would be most of its time. Each PNG carries, in a text chunk, a
key over the figure's inputs, the source of the project's packages (tasks/, schemas/) and matplotlib's version: a
figure whose key matches is kept, any change to the data or to the code draws it again.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from tasks.core.storage import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KEY_FIELD = "clearflow-key"
DPI = 120


PACKAGES = ("tasks", "schemas")


@cache
def code_digest() -> bytes:
    """The source of every module of the project's packages: a change anywhere may change a figure, so it redraws
    (~100 small files, a few ms)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256(version("matplotlib").encode())
    for path in sorted(p for package in PACKAGES for p in (root / package).rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.digest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, pl.DataFrame):
        buf = io.BytesIO()
        value.write_ipc(buf)
        h.update(buf.getvalue())
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())


def figure_key(draw: Callable[..., Any], inputs: tuple[Any, ...]) -> str:
    """What the PNG of draw(*inputs) depends on."""
    h = hashlib.sha256(f"{draw.__module__}.{draw.__qualname__}".encode())
    for value in inputs:
        _feed(h, value)
    h.update(code_digest())
    return h.hexdigest()


def stored_key(path: Path) -> str | None:
    """The key a PNG was written with; None when there is none or the file is not a readable PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(KEY_FIELD)
    except (OSError, UnidentifiedImageError):
        return None


def write_png(fig: Figure, path: Path, key: str | None = None) -> Path:
    """Render with the Agg canvas, atomically (a crash never leaves half a PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata={KEY_FIELD: key} if key else None)
    return Path(path)


def save_figure(draw: Callable[..., Figure], path: Path, *inputs: Any) -> Path:
    """draw(*inputs) written to path, unless the PNG there was drawn from the same inputs by the same code."""
    key = figure_key(draw, inputs)
    if Path(path).exists() and stored_key(path) == key:
        return Path(path)
    return write_png(draw(*inputs), path, key)
