"""Stage insideout: external vs internal knowledge K of the base model per item and layer (docs/METHOD.md,
"Inside-Out knowledge"); off by default, when it writes its three tables empty.

Train items' candidates fit one logistic probe per layer (correct vs incorrect answer after the question), dev items
choose its C (AUROC) and the reported layer (mean K), test items are reported; no probe ever sees a dev or test item's
candidates while fitting.
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits
from tasks.core.progress import tqdm

from schemas.tables import INSIDEOUT_K, INSIDEOUT_LAYERS, INSIDEOUT_SCORES
from tasks.core.config import ProbeConfig, RunConfig
from tasks.core.models import load_model, load_tokenizer
from tasks.core.storage import RunPaths, read_table, write_parquet
from tasks.evaluate.methods import REGISTRY as METHODS
from tasks.evaluate.stage import build_prompts
from tasks.insideout.candidates import build_candidates
from tasks.insideout.forward import CandidateScores, score_candidates
from tasks.insideout.ranking import EXTERNAL, INTERNAL, chosen_layer, k_per_item, summarise
from tasks.probes.kinds.linear import LinearProbe
from tasks.probes.stage import fit_on_dev

log = logging.getLogger(__name__)

KIND = "logistic"  # the probe kind of the internal score (tasks/probes/kinds/)
REPORTED = ("dev", "test")  # splits whose items get K: what no probe was fitted on
TABLES = {"insideout_scores": INSIDEOUT_SCORES, "insideout_k": INSIDEOUT_K, "insideout_layers": INSIDEOUT_LAYERS}


def closed_book_prompts(items: pl.DataFrame, tokenizer) -> dict[str, str]:
    """item_id -> the closed_book method's prompt, rendered as the evaluate stage renders it."""
    return dict(zip(items["item_id"].to_list(), build_prompts(METHODS["closed_book"], items, tokenizer, None)))


def probe_logit(probe: LinearProbe, X: np.ndarray) -> np.ndarray:
    """The probe's logit x @ w + b: its ranking without the sigmoid, which rounds large logits to exactly 1.0 and
    would turn distinct scores into ties that K counts as wrongly ranked."""
    return X.astype(np.float64) @ probe.weight.astype(np.float64) + probe.bias


def internal_scores(scored: CandidateScores, correct: np.ndarray, split: np.ndarray, probe_cfg: ProbeConfig,
                    seed: int) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Per layer: the logit of a logistic probe fitted on the train candidates (C by dev AUROC) for every candidate,
    and the C chosen."""
    logits, l2 = {}, {}
    with threadpool_limits(limits=1):  # tiny fits: threaded BLAS only slows them (as in the probes stage)
        for layer, X in tqdm(sorted(scored.features.items()), desc="insideout probes", unit="layer"):
            probe, l2[layer] = fit_on_dev(KIND, X, correct.astype(int), split, probe_cfg, seed)
            logits[layer] = probe_logit(probe, X)
    return logits, l2


def score_table(cands: pl.DataFrame, scored: CandidateScores, logits: dict[int, np.ndarray]) -> pl.DataFrame:
    """INSIDEOUT_SCORES rows of the reported splits: the external score, then every layer's internal score."""
    base = cands.with_columns(n_tokens=pl.Series(scored.n_tokens).cast(pl.Int32))
    parts = [base.with_columns(scorer=pl.lit(EXTERNAL), layer=pl.lit(None, pl.Int32),
                               score=pl.Series(scored.logprob).cast(pl.Float64))]
    parts += [base.with_columns(scorer=pl.lit(INTERNAL), layer=pl.lit(layer, pl.Int32),
                                score=pl.Series(values).cast(pl.Float64)) for layer, values in sorted(logits.items())]
    return pl.concat(parts).filter(pl.col("split").is_in(REPORTED)).select(INSIDEOUT_SCORES.names)


def _write(paths: RunPaths, frames: dict[str, pl.DataFrame | list]) -> None:
    for name, schema in TABLES.items():
        write_parquet(frames[name], paths.table(name), schema)


def _candidates(cfg: RunConfig, paths: RunPaths, items: pl.DataFrame) -> pl.DataFrame:
    """The run's candidates, refusing a run whose train split has none (nothing to fit the probe on)."""
    cands = build_candidates(items, read_table(paths.table("statements")), cfg.insideout.n_incorrect, cfg.seed)
    if cands.filter(pl.col("split") == "train").height == 0:
        raise ValueError("insideout: no train item has both a true answer and an incorrect candidate (a relation"
                         " with another object), so there is nothing to fit the internal probe on")
    return cands


def run_insideout(cfg: RunConfig, paths: RunPaths) -> None:
    """Score every candidate externally and internally, K per item and layer, the per-layer summary."""
    if not cfg.insideout.enabled:
        _write(paths, dict.fromkeys(TABLES, []))
        log.info("insideout: off (--insideout.enabled or --preset full turns it on)")
        return
    items = read_table(paths.table("items"))
    cands = _candidates(cfg, paths, items)
    tokenizer, model = load_tokenizer(cfg.model), load_model(cfg.model)
    prompts = closed_book_prompts(items, tokenizer)
    scored = score_candidates(model, tokenizer, [prompts[i] for i in cands["item_id"]], cands["answer"].to_list(),
                              batch_size=cfg.insideout.batch_size)
    logits, l2 = internal_scores(scored, cands["correct"].to_numpy(), cands["split"].to_numpy().astype(str),
                                 ProbeConfig(l2_grid=cfg.insideout.l2_grid), cfg.seed)
    scores = score_table(cands, scored, logits)
    k_items = k_per_item(scores)
    summary = summarise(k_items, l2, cfg.insideout.bootstrap, cfg.seed)
    _write(paths, {"insideout_scores": scores, "insideout_k": k_items, "insideout_layers": summary})
    best = summary.filter(pl.col("chosen") & (pl.col("split") == "test"))
    ext = summary.filter((pl.col("scorer") == EXTERNAL) & (pl.col("split") == "test"))
    if best.height and ext.height:
        log.info("insideout: %d test items, external K %.3f, internal K %.3f (layer %s, chosen on dev), hidden"
                 " knowledge on %.1f%% of items", ext["n_items"][0], ext["mean_k"][0], best["mean_k"][0],
                 chosen_layer(summary), 100 * best["hidden_share"][0])
