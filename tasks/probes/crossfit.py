"""Cross-fitting: the units of train-split items (what fine-tuning reads) are scored by probes that never saw them.

Why: a known-facts context is made of probe statements (every sentence is the true or counterfactual statement
of some fact of the same split), so the final probe, fitted on train+dev statements, would flag the fine-tuning
contexts in-sample: cleaner flags than any test context gets. Here the statement groups (the subject, which
holds both statements of a fact and never straddles splits) are dealt into K seeded folds; fold k's probe has
the chosen kind, layer and C, and is fitted on the final probe's splits without fold k's groups. A train-item
unit is scored by the probe of the fold holding every group it derives from: the groups of the statements
with its text, or with its source sentence's text (an LLM fact), else its item's group. Dev and test units keep
the final probe's scores (docs/METHOD.md, "Cross-fitted marking").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tasks.probes.kinds import KINDS, Probe

FINAL = "final"  # sentence_scores.scored_by of a unit the final probe scored
# Which probe scored the units of each split (clearflow sql), quoted verbatim in docs/METHOD.md.
SCORED_BY_SQL = """\
SELECT i.split, c.scored_by, count(*) AS units, count(*) FILTER (c.flagged) AS flagged
FROM sentence_scores c JOIN items i USING (item_id) GROUP BY ALL ORDER BY ALL"""
SHARED_META = ("kind", "layer", "model", "dim", "threshold", "l2", "seed", "position", "fitted_on")


def fold_label(k: int) -> str:
    """sentence_scores.scored_by of a unit that fold k's probe scored (also its file name in probes/)."""
    return f"fold-{k}"


def fold_probe_path(probes_dir: Path, k: int) -> Path:
    """Where fold k's probe lives (its .json beside it lists the statements it was fitted on)."""
    return Path(probes_dir) / f"{fold_label(k)}.safetensors"


def clear_fold_probes(probes_dir: Path) -> None:
    """Remove the fold probes of an earlier run, so probes/ holds only those that scored this run's units."""
    for path in Path(probes_dir).glob("fold-*.*"):
        path.unlink()


def unit_groups(
    units: pl.DataFrame, statements: pl.DataFrame, items: pl.DataFrame, norm: Callable[[str], str]
) -> list[list[str]]:
    """Per unit, the sorted statement groups it derives from (statements with its text or its source sentence's
    text, both passed through `norm`), else its item's group."""
    by_text: dict[str, set[str]] = {}
    for text, group in statements.select("text", "group").iter_rows():
        by_text.setdefault(norm(text), set()).add(group)
    item_of = {i: (context, group) for i, context, group in items.select("item_id", "context", "group").iter_rows()}
    out = []
    for item_id, text, start, end in units.select("item_id", "text", "char_start", "char_end").iter_rows():
        context, own = item_of[item_id]
        groups = by_text.get(norm(text), set()) | by_text.get(norm(context[start:end]), set())
        out.append(sorted(groups) or [own])
    return out


def fold_keys(groups: Iterable[str], links: Sequence[Sequence[str]]) -> dict[str, str]:
    """group -> its fold key: groups that one unit derives from are joined (connected components, named by their
    smallest group), so a single fold holds them all."""
    # scipy costs a second to import: the report imports this module (marker_line) and never calls this function
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    names = sorted(set(groups) | {g for linked in links for g in linked})
    index = {g: i for i, g in enumerate(names)}
    edges = [(index[linked[0]], index[g]) for linked in links for g in linked[1:]]
    rows, cols = (list(c) for c in zip(*edges)) if edges else ([], [])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, component = connected_components(graph, directed=False)
    first: dict[int, str] = {}
    for g, c in zip(names, component):
        first.setdefault(int(c), g)  # names are sorted: the first seen is the smallest
    return {g: first[int(c)] for g, c in zip(names, component)}


def assign_folds(keys: Iterable[str], k: int, seed: int) -> dict[str, int]:
    """Fold of each key: the sorted distinct keys in a seeded shuffle, dealt round-robin (so folds are balanced,
    and the same whatever the order of the rows the keys came from)."""
    order = sorted(set(keys))
    random.Random(f"crossfit:{seed}").shuffle(order)
    return {key: i % k for i, key in enumerate(order)}


@dataclass(frozen=True)
class FoldPlan:
    """Which fold each statement row belongs to, and which fold's probe scores each unit row (-1: the final)."""

    statement_fold: np.ndarray
    unit_fold: np.ndarray


def plan_folds(
    statements: pl.DataFrame, units: pl.DataFrame, items: pl.DataFrame, k: int, seed: int, norm: Callable[[str], str]
) -> FoldPlan:
    """Folds over the statement groups (joined where a train-item unit links several); train-item units only."""
    split_of = dict(items.select("item_id", "split").iter_rows())
    unknown = sorted(set(units["item_id"]) - set(split_of))
    if unknown:
        raise ValueError(f"sentences name {len(unknown)} items absent from items (e.g. {unknown[:3]}):"
                         " re-run decompose")
    train = np.array([split_of[i] == "train" for i in units["item_id"]], dtype=bool)
    links = unit_groups(units.filter(pl.Series(train)), statements, items, norm)
    key_of = fold_keys(statements["group"], links)
    fold_of = assign_folds(key_of.values(), k, seed)
    unit_fold = np.full(units.height, -1, dtype=np.int64)
    unit_fold[train] = [fold_of[key_of[linked[0]]] for linked in links]
    statement_fold = np.array([fold_of[key_of[g]] for g in statements["group"]], dtype=np.int64)
    return FoldPlan(statement_fold, unit_fold)


def fit_fold_probes(
    chosen: Probe, X: np.ndarray, y: np.ndarray, statements: pl.DataFrame, plan: FoldPlan
) -> dict[int, Probe]:
    """Per fold that scores a unit: the chosen kind, layer and C fitted on the chosen probe's splits without the
    fold; its meta lists the stmt_ids it was fitted on, so anyone can check what it saw."""
    pool = statements["split"].is_in(chosen.meta["fitted_on"]).to_numpy()
    ids = statements["stmt_id"].to_numpy()
    out: dict[int, Probe] = {}
    for k in sorted(set(plan.unit_fold[plan.unit_fold >= 0].tolist())):
        rows = pool & (plan.statement_fold != k)
        if len(np.unique(y[rows])) < 2:
            raise ValueError(f"probe.crossfit_folds: the statements outside fold {k} hold only label(s) "
                             f"{np.unique(y[rows]).tolist()}; use fewer folds, or 0 to turn cross-fitting off")
        probe = KINDS[chosen.meta["kind"]].fit(X[rows], y[rows], chosen.meta["l2"], chosen.meta["seed"])
        probe.meta = {**{key: chosen.meta[key] for key in SHARED_META if key in chosen.meta},
                      "fold": k, "scored_by": fold_label(k), "fitted_stmts": sorted(ids[rows].tolist())}
        out[k] = probe
    return out


def marker_line(best: dict) -> str:
    """The report's one line on how the fine-tuning contexts' markers were produced."""
    fitted = "+".join(best.get("fitted_on", ["train"]))
    folds = best.get("crossfit_folds")
    if folds is None:
        return (f"Fine-tuning markers: not recorded (a run from before cross-fitting: the final probe, fitted on"
                f" {fitted}, scored every context).")
    if folds < 2:
        return (f"Fine-tuning markers: from the final probe (fitted on {fitted} statements), so train-split contexts"
                f" are flagged in-sample (cross-fitting off: --probe.crossfit-folds {folds}).")
    return (f"Fine-tuning markers: the {best.get('crossfit_units', 0)} units of train-split contexts were scored by"
            f" {folds} cross-fitted probes (folds over statement groups; `scored_by` fold-k), each fitted without the"
            f" unit's statement or any other of its subject's; dev and test contexts by the final probe (fitted on"
            f" {fitted}).")
