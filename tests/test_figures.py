"""Figures drawn only when what they show changed (tasks/core/figures.py), and a report re-run on unchanged tables
that never imports matplotlib, scikit-learn or scipy (counts of draws and imports, no clock)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from tasks.core import figures
from tasks.core.figures import KEY_FIELD, save_figure, stored_key

ROOT = Path(__file__).resolve().parents[1]


def _draw(table: pl.DataFrame, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    fig.subplots().plot(table["x"], table["y"])
    fig.suptitle(title)
    return fig


@pytest.fixture()
def counted(monkeypatch):
    """_draw, counting its calls."""
    calls = []

    def draw(table, title):
        calls.append(title)
        return _draw(table, title)

    draw.__module__, draw.__qualname__ = __name__, "_draw"
    return draw, calls


def test_a_figure_is_drawn_once_per_content(tmp_path, counted, monkeypatch):
    draw, calls = counted
    path = tmp_path / "f.png"
    table = pl.DataFrame({"x": [0, 1, 2], "y": [0.1, 0.5, 0.2]})
    save_figure(draw, path, table, "a")
    first = path.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and len(calls) == 1
    with Image.open(path) as image:
        assert image.text[KEY_FIELD] == stored_key(path) and len(stored_key(path)) == 64
    save_figure(draw, path, table.clone(), "a")  # equal content: kept, not drawn
    assert len(calls) == 1 and path.read_bytes() == first
    save_figure(draw, path, table.with_columns(pl.col("y") * 2), "a")  # the data changed
    save_figure(draw, path, table.with_columns(pl.col("y") * 2), "b")  # a plain input changed
    assert calls == ["a", "a", "b"]
    monkeypatch.setattr(figures, "code_digest", lambda: b"other code")  # the project's code changed
    save_figure(draw, path, table.with_columns(pl.col("y") * 2), "b")
    assert len(calls) == 4


def test_a_png_without_our_key_or_damaged_is_drawn_again(tmp_path, counted):
    draw, calls = counted
    path = tmp_path / "f.png"
    table = pl.DataFrame({"x": [0, 1], "y": [1.0, 2.0]})
    path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert stored_key(path) is None
    save_figure(draw, path, table, "a")
    assert len(calls) == 1 and stored_key(path) is not None
    Image.new("RGB", (4, 4)).save(path)  # a PNG someone else wrote there
    assert stored_key(path) is None
    save_figure(draw, path, table, "a")
    assert len(calls) == 2


def test_the_code_digest_covers_every_module_of_the_packages():
    """A figure's key changes with any source file of tasks/ or schemas/: its digest equals one computed here."""
    import hashlib
    from importlib.metadata import version

    h = hashlib.sha256(version("matplotlib").encode())
    for path in sorted(p for pkg in ("tasks", "schemas") for p in (ROOT / pkg).rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    assert figures.code_digest() == h.digest()


REPORT = """
import json, sys
from pathlib import Path
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths
from tasks.report import run_report
run_report(RunConfig(run="t", runs_dir=sys.argv[1]), RunPaths(Path(sys.argv[1]) / "t"))
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"matplotlib", "sklearn", "scipy", "torch"})))
"""


def test_a_report_on_unchanged_tables_imports_no_plotting_or_learning_library(tmp_path):
    from tasks.core.storage import RunPaths
    from tests.test_report import METHODS, _write_comparisons, _write_metrics, build_synthetic_run

    paths = RunPaths(tmp_path / "t")
    paths.root.mkdir(parents=True)
    build_synthetic_run(paths)
    _write_metrics(paths, dict.fromkeys(METHODS, 0.5), half_width=0.1)
    _write_comparisons(paths)

    def report() -> list[str]:
        done = subprocess.run([sys.executable, "-c", REPORT, str(tmp_path)], cwd=ROOT, capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert report() == ["matplotlib"]  # the first report draws its figures, and needs nothing else heavy
    pngs = {p.name: p.read_bytes() for p in paths.figures.glob("*.png")}
    assert {"probe_layers.png", "methods.png"} <= set(pngs)
    assert report() == []  # the same tables: the figures are kept, so matplotlib is never imported
    assert {p.name: p.read_bytes() for p in paths.figures.glob("*.png")} == pngs
