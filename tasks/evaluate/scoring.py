"""Answer scoring of the reference protocol (docs/METHOD.md, "Evaluation"): EM, F1, p_s, p_o, MR with bootstrap CIs."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from schemas.tables import METRICS
from tasks.core.text import normalize

NEGATIONS = frozenset(
    ["no", "not", "never", "none", "cannot", "nobody", "nothing", "nowhere", "neither", "nor", "without", "hardly"]
)
METRIC_COLUMNS = ("em", "f1", "ps", "po")


def has_negation(text: str) -> bool:
    """Whether the answer negates (e.g. "not Paris"): such answers never count as stating the context answer."""
    return any(tok in NEGATIONS for tok in normalize(text).split())


def _aliases(answers: Sequence[str] | None) -> list[str]:
    """Normalised, non-empty gold aliases (an alias that normalises to nothing can match nothing)."""
    return [a for a in (normalize(x) for x in (answers or [])) if a]


def exact_match(prediction: str, answers: Sequence[str], counterfactual: bool = False) -> float:
    """1.0 if the normalised prediction equals a normalised alias; negated answers score 0 on counterfactual items."""
    if counterfactual and has_negation(prediction):
        return 0.0
    pred = normalize(prediction)
    return float(any(pred == a for a in _aliases(answers)))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    """SQuAD token-overlap F1; two empty answers agree, one empty answer scores 0."""
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Max over gold aliases of token-overlap F1 between normalised answers."""
    pred = normalize(prediction).split()
    scores = [_token_f1(pred, a.split()) for a in _aliases(answers)]
    return max(scores, default=0.0)


def contains_answer(prediction: str, answers: Sequence[str] | None) -> bool:
    """Whether any normalised alias occurs in the normalised prediction on word boundaries."""
    padded = f" {normalize(prediction)} "
    return any(f" {a} " in padded for a in _aliases(answers))


def faithfulness(prediction: str, answers: Sequence[str], orig_answers: Sequence[str] | None) -> tuple[bool, bool]:
    """(p_s, p_o) of one prediction: states the context answer (un-negated, without the memorised one) / the memorised one."""
    po = contains_answer(prediction, orig_answers)
    ps = contains_answer(prediction, answers) and not has_negation(prediction) and not po
    return ps, po


def score_prediction(
    prediction: str, answers: Sequence[str], orig_answers: Sequence[str] | None, counterfactual: bool
) -> dict[str, float | bool]:
    """Every per-sample score of one prediction, as the PREDICTIONS table stores them."""
    ps, po = faithfulness(prediction, answers, orig_answers)
    return {
        "em": exact_match(prediction, answers, counterfactual),
        "f1": f1_score(prediction, answers),
        "ps": ps,
        "po": po,
    }


def memorisation_ratio(ps: float, po: float) -> float | None:
    """MR = p_o / (p_s + p_o); undefined (None) when the model states neither answer."""
    total = ps + po
    return None if total <= 0 else po / total


def _finite_or_none(value: float) -> float | None:
    """Arrow nulls rather than NaN for undefined values, so readers see 'missing', not a number."""
    return None if value is None or not np.isfinite(value) else float(value)


def bootstrap_cis(
    values: np.ndarray, n_boot: int, seed: int, level: float = 0.95
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile CIs of the mean of each column of `values` (n x 4: em, f1, ps, po) and of MR, from one set of resamples."""
    nulls = {m: (None, None) for m in (*METRIC_COLUMNS, "mr")}
    n = len(values)
    if n_boot <= 0 or n == 0:
        return nulls
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = values[idx].mean(axis=1)  # (n_boot, 4)
    alpha = (1 - level) / 2 * 100
    out = {}
    for j, name in enumerate(METRIC_COLUMNS):
        lo, hi = np.percentile(means[:, j], [alpha, 100 - alpha])
        out[name] = (float(lo), float(hi))
    ps, po = means[:, 2], means[:, 3]
    total = ps + po
    mr = np.divide(po, total, out=np.full_like(po, np.nan), where=total > 0)
    if np.isfinite(mr).any():
        lo, hi = np.nanpercentile(mr, [alpha, 100 - alpha])
        out["mr"] = (_finite_or_none(lo), _finite_or_none(hi))
    else:
        out["mr"] = (None, None)
    return out


def method_metrics(predictions: pl.DataFrame, n_boot: int, seed: int, level: float = 0.95) -> pl.DataFrame:
    """Per method (in order of first appearance): n, EM, F1, p_s, p_o, MR as fractions with bootstrap CIs (schema METRICS)."""
    rows = []
    for (method,), group in predictions.group_by("method", maintain_order=True):
        values = np.column_stack([group[c].cast(pl.Float64).to_numpy() for c in METRIC_COLUMNS])
        point = dict(zip(METRIC_COLUMNS, values.mean(axis=0).tolist())) if len(values) else {}
        point["mr"] = memorisation_ratio(point["ps"], point["po"]) if point else None
        cis = bootstrap_cis(values, n_boot, seed, level)
        row: dict[str, object] = {"method": method, "n": len(group)}
        for name in (*METRIC_COLUMNS, "mr"):
            row[name] = _finite_or_none(point.get(name))
            row[f"{name}_lo"], row[f"{name}_hi"] = cis[name]
        rows.append(row)
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=METRICS))
