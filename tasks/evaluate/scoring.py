"""Answer scoring of the reference protocol (docs/METHOD.md, "Evaluation"): EM, F1, p_s, p_o, MR with bootstrap CIs,
overall and per subset (context condition x whether the model knows the fact), and the paired statistics of two
methods on the same items (paired bootstrap, McNemar's exact test)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from schemas.tables import CONDITIONS, KNOWLEDGE, METRICS
from tasks.core.text import normalize

NEGATIONS = frozenset(
    ["no", "not", "never", "none", "cannot", "nobody", "nothing", "nowhere", "neither", "nor", "without", "hardly"]
)
METRIC_COLUMNS = ("em", "f1", "ps", "po")
ALL = "all"  # the condition / knowledge value of a row over every item
CI_LEVEL = 0.95  # the confidence level of every interval the evaluation reports (metrics, paired differences)


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


def _percentiles(samples: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """Percentile interval of bootstrap samples, ignoring undefined (NaN) resamples; nulls when none is defined."""
    if not np.isfinite(samples).any():
        return None, None
    alpha = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(samples, [alpha, 100 - alpha])
    return _finite_or_none(lo), _finite_or_none(hi)


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """n_boot x n item indices drawn with replacement: the one resampling behind every interval of the evaluation."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _mr_of_means(ps: np.ndarray, po: np.ndarray) -> np.ndarray:
    """MR = p_o / (p_s + p_o) elementwise from the means; NaN where both are 0 (undefined)."""
    total = ps + po
    return np.divide(po, total, out=np.full_like(total, np.nan, dtype=float), where=total > 0)


def _cf_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row-wise weighted means (weights 0/1: the counterfactual items of each resample); NaN where none is."""
    count = weights.sum(axis=-1)
    total = (values * weights).sum(axis=-1)
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)


def bootstrap_cis(
    values: np.ndarray, n_boot: int, seed: int, level: float = CI_LEVEL, counterfactual: np.ndarray | None = None
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile CIs of EM, F1 (mean over every item), p_s, p_o (mean over the counterfactual items) and MR.

    `values` is n x 4 (em, f1, ps, po); one set of item resamples serves every metric, so with every item
    counterfactual (the default) p_s and p_o are plain means as before. A resample without a counterfactual
    item leaves p_s, p_o and MR undefined and is skipped for them.
    """
    n = len(values)
    if n_boot <= 0 or n == 0:
        return {m: (None, None) for m in (*METRIC_COLUMNS, "mr")}
    cf = np.ones(n) if counterfactual is None else np.asarray(counterfactual, dtype=float)
    idx = resample_indices(n, n_boot, seed)
    sample, weights = values[idx], cf[idx]  # (n_boot, n, 4), (n_boot, n)
    means = {"em": sample[:, :, 0].mean(axis=1), "f1": sample[:, :, 1].mean(axis=1),
             "ps": _cf_means(sample[:, :, 2], weights), "po": _cf_means(sample[:, :, 3], weights)}
    means["mr"] = _mr_of_means(means["ps"], means["po"])
    return {name: _percentiles(m, level) for name, m in means.items()}


def mean_statistic(scores: np.ndarray) -> np.ndarray:
    """The mean of the one score column over the items: EM, F1 or p_s of the scored items."""
    return scores[..., 0].mean(axis=-1)


def mr_statistic(scores: np.ndarray) -> np.ndarray:
    """MR from the (p_s, p_o) columns' means over the items, as the metrics table computes it; NaN where undefined."""
    return _mr_of_means(scores[..., 0].mean(axis=-1), scores[..., 1].mean(axis=-1))


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int, seed: int, level: float = CI_LEVEL,
    statistic: Callable[[np.ndarray], np.ndarray] = mean_statistic,
) -> tuple[float | None, float | None, float | None]:
    """statistic(a) - statistic(b) of two methods scored on the same items, and its paired percentile CI.

    `a`, `b`: per-item scores, n or n x k (row i is item i for both); `statistic` reduces the item axis of an
    (..., n, k) array (default: the mean, so the difference is the mean per-item difference). Resampling items
    for both methods at once (not each method's scores separately) keeps what the two share: an item both get
    right or both get wrong adds no noise to the difference. Resamples where the statistic is undefined (NaN) are
    skipped; an undefined point difference is None.
    """
    a, b = (x[:, None] if x.ndim == 1 else x for x in (np.asarray(a, dtype=float), np.asarray(b, dtype=float)))
    if a.shape != b.shape:
        raise ValueError(f"paired scores must cover the same items: shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        return None, None, None
    point = _finite_or_none(statistic(a) - statistic(b))
    if n_boot <= 0:
        return point, None, None
    idx = resample_indices(len(a), n_boot, seed)
    return (point, *_percentiles(statistic(a[idx]) - statistic(b[idx]), level))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    """McNemar's exact test of two methods' 0/1 outcomes on the same items: (two-sided p, items only a gets right,
    items only b gets right). Only discordant items tell the methods apart; with no difference each falls either
    way with probability 1/2, so the split is tested against Binomial(discordant, 1/2). No discordant item: p = 1."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or not np.isin(a, (0, 1)).all() or not np.isin(b, (0, 1)).all():
        raise ValueError("McNemar's test needs two 0/1 outcome vectors over the same items")
    from scipy.stats import binomtest  # scipy costs a second to import: readers of tables never pay it

    better, worse = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    if better + worse == 0:
        return 1.0, better, worse
    return float(binomtest(better, better + worse, 0.5, alternative="two-sided").pvalue), better, worse


def sign_flip_exact(a: np.ndarray, b: np.ndarray, seeds: int) -> tuple[float, int, int]:
    """The exact paired sign-flip (randomisation) test of two methods' per-item scores, each a mean of 0/1 outcomes
    over `seeds` seeds: (two-sided p, items where a is higher, items where b is). With no difference between the
    methods each item's difference is as likely negative as positive; p is the probability, over those 2^n sign
    patterns, of a total difference at least as far from 0 as the observed one. With one seed this is McNemar's
    exact test. The distribution is built exactly: per-item differences are multiples of 1/seeds, and the items
    sharing one size contribute a scaled Binomial(count, 1/2)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    units = np.rint(d * seeds).astype(np.int64)
    if d.ndim != 1 or not np.allclose(units, d * seeds, atol=1e-9):
        raise ValueError(f"the sign-flip test needs per-item means of 0/1 outcomes over {seeds} seeds")
    from scipy.signal import fftconvolve
    from scipy.stats import binom

    better, worse = int((units > 0).sum()), int((units < 0).sum())
    sizes = np.abs(units[units != 0])
    if sizes.size == 0:
        return 1.0, better, worse
    dist = np.ones(1)  # P(total = t), t from -span to +span
    for size in np.unique(sizes):
        count = int((sizes == size).sum())
        group = np.zeros(2 * count * size + 1)
        group[:: 2 * size] = binom.pmf(np.arange(count + 1), count, 0.5)  # total size * (2j - count), j flips up
        dist = fftconvolve(dist, group).clip(min=0) if dist.size * group.size > 10**7 else np.convolve(dist, group)
    span = (dist.size - 1) // 2
    extreme = np.abs(np.arange(-span, span + 1)) >= abs(int(units.sum()))
    return float(min(1.0, dist[extreme].sum())), better, worse

def iter_subsets(frame: pl.DataFrame) -> Iterator[tuple[str, str, pl.DataFrame]]:
    """(condition, knowledge, rows) of every non-empty subset: "all" and each condition present, by "all", "known",
    "unknown". An item without a condition (older benchmarks) or without a known flag is counted in "all" only."""
    if frame.height == 0:
        return
    present = set(frame["condition"].drop_nulls()) if "condition" in frame.columns else set()
    known = frame["known"] if "known" in frame.columns else pl.Series([None] * frame.height)
    known = known.cast(pl.Boolean)
    for condition in (ALL, *(c for c in CONDITIONS if c in present)):
        everything = pl.Series([True] * frame.height, dtype=pl.Boolean)
        in_condition = everything if condition == ALL else (frame["condition"] == condition)
        masks = (in_condition, in_condition & known, in_condition & ~known)
        for knowledge, mask in zip(KNOWLEDGE, masks):
            part = frame.filter(mask.fill_null(False))
            if part.height:
                yield condition, knowledge, part


def metrics_row(rows: pl.DataFrame, n_boot: int, seed: int, level: float) -> dict[str, object]:
    """n, EM, F1 over the rows, p_s, p_o, MR over their counterfactual ones (null when none), each with its CI."""
    values = np.column_stack([rows[c].cast(pl.Float64).to_numpy() for c in METRIC_COLUMNS])
    cf = rows["counterfactual"].to_numpy().astype(bool) if "counterfactual" in rows.columns else np.ones(len(rows), bool)
    point = {"em": values[:, 0].mean(), "f1": values[:, 1].mean()}
    point |= {"ps": values[cf, 2].mean(), "po": values[cf, 3].mean()} if cf.any() else {"ps": None, "po": None}
    point["mr"] = None if point["ps"] is None else memorisation_ratio(point["ps"], point["po"])
    cis = bootstrap_cis(values, n_boot, seed, level, counterfactual=cf)
    row: dict[str, object] = {"n": len(rows), "n_counterfactual": int(cf.sum())}
    for name in (*METRIC_COLUMNS, "mr"):
        row[name] = _finite_or_none(point[name])
        row[f"{name}_lo"], row[f"{name}_hi"] = cis[name]
    return row


def method_metrics(predictions: pl.DataFrame, n_boot: int, seed: int, level: float = CI_LEVEL) -> pl.DataFrame:
    """Per method (in order of first appearance), per subset of `iter_subsets`: the metrics with bootstrap CIs.

    `predictions` may carry the item columns `condition`, `counterfactual` and `known` (see
    tasks/evaluate/knowledge.py); without them every item is counterfactual and only ("all", "all") rows come out.
    """
    rows = []
    for (method,), group in predictions.group_by("method", maintain_order=True):
        for condition, knowledge, part in iter_subsets(group):
            rows.append({"method": method, "condition": condition, "knowledge": knowledge,
                         **metrics_row(part, n_boot, seed, level)})
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=METRICS))
