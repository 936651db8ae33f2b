"""The structure rules of docs/ARCHITECTURE.md, checked: import directions, module sizes, docs that exist."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 400


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_import_contracts_hold():
    """schemas imports nothing of tasks, tasks nothing of flows, core no stage, readers nothing of evaluation."""
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _contracts() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return text[text.index("[tool.importlinter]"):]


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("schemas/suites.py", "import tasks.core.storage", "schemas import neither"),
        ("tasks/core/storage.py", "import tasks.probes.stage", "core imports no stage"),
        ("tasks/ingest/formats/x.py", "import tasks.evaluate.scoring", "readers import nothing from evaluation"),
    ],
)
def test_contracts_catch_a_backward_import(tmp_path: Path, module: str, line: str, contract: str):
    """The same contracts on a skeleton with one backward import: the checker must refuse it."""
    for pkg in ("flows", "schemas", "tasks", *(f"tasks/{s}" for s in
                ("core", "catalog", "ingest", "ingest/formats", "decompose", "activations", "probes", "finetune",
                 "evaluate"))):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    for name in ("tasks/report.py", "tasks/trace.py", "tasks/core/storage.py", "tasks/probes/stage.py", "tasks/evaluate/scoring.py",
                 "schemas/suites.py"):
        (tmp_path / name).write_text("")
    (tmp_path / module).write_text(line + "\n")
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(_contracts()))
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert contract in out.stdout.split("Broken contracts")[1]


def test_no_task_module_is_over_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "tasks").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}


def test_docs_cited_by_the_code_exist():
    """Docstrings cite the project's own docs/ (METHOD.md and ARCHITECTURE.md outside it are not shipped)."""
    cited, stray = set(), []
    for p in [*ROOT.glob("flows/**/*.py"), *ROOT.glob("tasks/**/*.py"), *ROOT.glob("schemas/**/*.py")]:
        text = p.read_text()
        cited |= set(re.findall(r"docs/[A-Z_]+\.md", text))
        stray += [f"{p.relative_to(ROOT)}: {m}" for m in re.findall(r"(?<!docs/)\b(?:METHOD|ARCHITECTURE)\.md", text)]
    assert stray == []
    assert cited, "the code should point at docs/"
    assert [c for c in cited if not (ROOT / c).exists()] == []


def test_architecture_doc_shows_the_declared_stages():
    from flows.stages import stage_table

    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    shown = doc.split("<!-- stage-table -->\n")[1].split("\n<!-- /stage-table -->")[0]
    assert shown == stage_table()


def test_the_worked_examples_name_real_registries():
    """The doc's examples use names that exist: the helpers they import and the MODULES they extend."""
    import importlib

    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for module, names in re.findall(r"^from (tasks\.[\w.]+|schemas\.\w+) import (.+)$", doc, re.M):
        mod = importlib.import_module(module)
        assert all(hasattr(mod, n.strip()) for n in names.split(",")), (module, names)
    for package in ("tasks.evaluate.methods", "tasks.probes.kinds", "tasks.ingest.formats"):
        assert hasattr(importlib.import_module(package), "MODULES") and f"`{package.replace('.', '/')}/__init__.py`" in doc


def test_readme_method_table_is_the_registry():
    """The README lists the registered methods, in registry order, with their descriptions."""
    from tasks.evaluate.methods import REGISTRY

    readme = (ROOT / "README.md").read_text()
    rows = "\n".join(f"| `{m.name}` | {m.description} |" for m in REGISTRY.values())
    assert "| method | what the model sees |\n| --- | --- |\n" + rows + "\n" in readme
    defaults = ", ".join(f"`{m.name}`" for m in REGISTRY.values() if m.default)
    assert f"`make run` evaluates the default methods ({defaults});" in readme
