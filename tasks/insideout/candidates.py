"""Answer candidates per item: the memorised answer and its aliases (correct), the fact's counterfactual object and
other objects of the same relation (incorrect), a fixed number per item drawn with a per-item seed."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import polars as pl

from tasks.core.text import normalize
from tasks.evaluate.knowledge import true_answers
from tasks.evaluate.scoring import contains_answer

TRUE, ALIAS, COUNTERFACTUAL, RELATION = "true", "alias", "counterfactual", "relation"


def distinct(answers: Iterable[str]) -> list[str]:
    """Answers with one spelling per normal form, in order (an answer that normalises to nothing is dropped)."""
    seen: dict[str, str] = {}
    for a in answers:
        seen.setdefault(normalize(a), a)
    return [a for key, a in seen.items() if key]


def relation_pools(items: pl.DataFrame) -> dict[str, list[str]]:
    """relation_id -> the distinct true answers of that relation's items (every split), sorted: the objects an
    incorrect candidate is drawn from."""
    pools: dict[str, list[str]] = {}
    for item in items.filter(pl.col("relation_id").is_not_null()).iter_rows(named=True):
        truth = true_answers(item)
        if truth:
            pools.setdefault(item["relation_id"], []).append(truth[0])
    return {rel: sorted(distinct(objs)) for rel, objs in pools.items()}


def _statement_texts(statements: pl.DataFrame | None) -> dict[tuple[str, str, int], str]:
    """(group, relation_id, label) -> the statement's text, for the facts stated once each way."""
    if statements is None or "relation_id" not in statements.columns:
        return {}
    once = statements.filter(pl.len().over("group", "relation_id", "label") == 1)
    return {(g, r, lab): t for g, r, lab, t in once.select("group", "relation_id", "label", "text").iter_rows()
            if r is not None}


def counterfactual_object(item: Mapping[str, Any], pool: Sequence[str],
                          texts: Mapping[tuple[str, str, int], str]) -> str | None:
    """The fact's counterfactual object: a counterfactual item's context answer; otherwise the object of the pool
    that the fact's false statement names and its true statement does not (the longest such; None without one)."""
    if item.get("counterfactual") and item.get("answers"):
        return item["answers"][0]
    false = texts.get((item["group"], item.get("relation_id"), 1))
    true = texts.get((item["group"], item.get("relation_id"), 0))
    if false is None or true is None:
        return None
    named = [o for o in pool if contains_answer(false, [o]) and not contains_answer(true, [o])]
    return max(named, key=lambda o: (len(normalize(o)), o), default=None)


def item_candidates(item: Mapping[str, Any], pool: Sequence[str], counterfactual: str | None, n_incorrect: int,
                    seed: int) -> list[dict]:
    """Candidate rows of one item: its correct answers, then up to n_incorrect incorrect ones (the counterfactual
    object first, the rest drawn from the pool with a seed of the run's seed and the item id)."""
    correct = distinct(true_answers(item) or [])
    taken = {normalize(a) for a in correct}  # an incorrect candidate never spells a correct one or another one
    rows = [(a, True, TRUE if i == 0 else ALIAS) for i, a in enumerate(correct)]
    if counterfactual is not None and normalize(counterfactual) and normalize(counterfactual) not in taken:
        rows.append((counterfactual, False, COUNTERFACTUAL))
        taken.add(normalize(counterfactual))
    rest = [o for o in pool if normalize(o) not in taken]
    k = min(n_incorrect - (len(rows) - len(correct)), len(rest))
    rows += [(o, False, RELATION) for o in random.Random(f"insideout:{seed}:{item['item_id']}").sample(rest, k)]
    return [{"item_id": item["item_id"], "split": item["split"], "cand_idx": i, "answer": a, "correct": c,
             "source": s} for i, (a, c, s) in enumerate(rows)]


def build_candidates(items: pl.DataFrame, statements: pl.DataFrame | None, n_incorrect: int,
                     seed: int) -> pl.DataFrame:
    """Every item's candidates; an item without a true answer or without any incorrect candidate has no pair to
    rank (K undefined, as the paper leaves out questions without one) and gets no rows."""
    pools, texts = relation_pools(items), _statement_texts(statements)
    rows: list[dict] = []
    for item in items.iter_rows(named=True):
        pool = pools.get(item.get("relation_id"), [])
        cands = item_candidates(item, pool, counterfactual_object(item, pool, texts), n_incorrect, seed)
        if any(c["correct"] for c in cands) and not all(c["correct"] for c in cands):
            rows += cands
    schema = {"item_id": pl.String, "split": pl.String, "cand_idx": pl.Int32, "answer": pl.String,
              "correct": pl.Boolean, "source": pl.String}
    return pl.DataFrame(rows, schema=schema)
