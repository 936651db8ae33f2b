"""Evaluate stage: every method answers the same items (greedy decoding, or a model-free answer function); one
predictions table (with whether the model knows each item closed-book), one metrics table (overall and per subset)
and one comparisons table (each method paired with each reference method on the same items).

The methods themselves (prompt or answer function, context, weights) are the entries of tasks/evaluate/methods/.
"""

from __future__ import annotations

import gc
import logging

import polars as pl
import torch

from schemas.tables import COMPARISONS, LFD_LAYERS, METRICS, PREDICTIONS
from tasks.core.config import RunConfig
from tasks.core.fanout import fanned_out
from tasks.core.models import load_model, load_tokenizer
from tasks.core.chat import render
from tasks.core.prompts import item_question
from tasks.evaluate.answer_cache import AnswerCache, kept
from tasks.evaluate.decoding_loop import generate
from tasks.evaluate.generation_jobs import fanned_answers
from tasks.evaluate.methods import Method, resolve_methods
from tasks.evaluate.knowledge import CLOSED_BOOK, known_by_item, with_item_columns
from tasks.evaluate.paired import comparisons, missing_references
from tasks.evaluate.scoring import method_metrics, score_prediction
from tasks.core.storage import RunPaths, read_table, to_arrow, write_parquet

log = logging.getLogger(__name__)


def item_context(method: Method, item: dict, marked: dict[str, str] | None) -> str | None:
    """The context a method reads for an item: none, the item's own, or it with the probe's flags marked."""
    if method.context == "none":
        return None
    return item["context"] if method.context == "plain" else marked[item["item_id"]]


def build_prompts(method: Method, items: pl.DataFrame, tokenizer, marked: dict[str, str] | None) -> list[str]:
    """Rendered prompt text of every item for one method."""
    return [render(tokenizer, method.messages(item_question(item), item_context(method, item, marked)))
            for item in items.iter_rows(named=True)]


def answer_without_model(method: Method, items: pl.DataFrame, marked: dict[str, str] | None) -> tuple[list[str], list[str]]:
    """(prompts, answers) of a model-free method: the prompt recorded is the context it read (its only input
    besides the item's own question)."""
    contexts = [item_context(method, item, marked) for item in items.iter_rows(named=True)]
    answers = [method.answer(q, c) for q, c in zip(items["question"].to_list(), contexts)]
    return [c or "" for c in contexts], answers


def _marked_for(items: pl.DataFrame, paths: RunPaths) -> dict[str, str]:
    """Marked contexts of the evaluated items, refusing items the probe stage never scored."""
    from tasks.core.marking import marked_contexts

    marked = marked_contexts(paths)
    missing = [i for i in items["item_id"].to_list() if i not in marked]
    if missing:
        raise ValueError(
            f"{len(missing)} evaluated items have no sentences to mark (e.g. {missing[:3]}): run decompose and probes first"
        )
    return marked


def load_items(cfg: RunConfig, paths: RunPaths) -> pl.DataFrame:
    """Items of the evaluated split, refusing an empty split with the splits that do exist."""
    items = read_table(paths.table("items"))
    chosen = items.filter(pl.col("split") == cfg.evaluate.split).sort("item_id")
    if chosen.height == 0:
        raise ValueError(
            f"no items in split {cfg.evaluate.split!r}; splits present: {sorted(items['split'].unique().to_list())}"
        )
    return chosen


def _release_memory() -> None:
    """Return freed model memory before the next model loads (two copies of a large model may not fit)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_adapter(cfg: RunConfig, paths: RunPaths, arm: str):
    """The base model with a fine-tuning arm's adapter merged in (imported here: only runs with adapters need peft)."""
    from tasks.finetune.stage import load_finetuned

    return load_finetuned(cfg, paths, arm)  # refuses an arm the run has no adapter for, naming the command


def _require_adapters(paths: RunPaths, methods: list[Method]) -> None:
    """Refuse up front (before any generation) a method whose arm the run has no adapter for."""
    arms = [m.arm for m in methods if m.model == "finetuned"]
    if arms:
        from tasks.finetune.stage import require_adapters

        require_adapters(paths, arms)


def _answer(m: Method, model, tok, prompts: list[str], items: pl.DataFrame, cfg: RunConfig, paths: RunPaths
            ) -> list[str]:
    """Greedy answers, or those of the method's own decoding (CAD, LFD: tasks/evaluate/decoding.py)."""
    ev = cfg.evaluate
    if m.decoding == "greedy":
        return generate(model, tok, prompts, ev.max_new_tokens, ev.batch_size, desc=m.name,
                        draft_tokens=ev.prompt_lookup)
    from tasks.evaluate.decoding import decode_method  # imported here: it builds on this module's helpers

    return decode_method(m, model, tok, prompts, items, cfg, paths)


def _kept_answers(cache: AnswerCache | None, cfg: RunConfig, m: Method, prompts: list[str], tok,
                  paths: RunPaths) -> list[str] | None:
    """The cached answers of a method (None on a miss), its decoding's tables written back as on a fresh answer."""
    if cache is None or not kept(m):
        return None
    from tasks.evaluate.decoding import decoding_inputs, restore_tables

    found = cache.entry(cfg, m, prompts, decoding_inputs(m, tok, paths))
    if found is None:
        return None
    restore_tables(m, found.get("tables", {}), paths)
    return found["answers"]


def _keep_answers(cache: AnswerCache, cfg: RunConfig, m: Method, prompts: list[str], answers: list[str], tok,
                  paths: RunPaths) -> None:
    """Cache a base-model method's answers with what its decoding read and wrote."""
    if kept(m):
        from tasks.evaluate.decoding import decoding_inputs, written_tables

        cache.put(cfg, m, prompts, answers, decoding_inputs(m, tok, paths), written_tables(m, paths))


def _answer_with_models(cfg: RunConfig, paths: RunPaths, methods: list[Method], items: pl.DataFrame,
                        marked: dict[str, str] | None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(prompts, answers) per model-based method: kept answers first; then, when jobs fan out, the greedy methods'
    generation as jobs; the rest here, grouped by the weights that answer (one model in memory at a time)."""
    prompts: dict[str, list[str]] = {}
    answers: dict[str, list[str]] = {}
    if not methods:
        return prompts, answers
    tok, cache = load_tokenizer(cfg.model), AnswerCache.of(cfg)
    for m in methods:
        prompts[m.name] = build_prompts(m, items, tok, marked)
        if (found := _kept_answers(cache, cfg, m, prompts[m.name], tok, paths)) is not None:
            answers[m.name] = found
    todo = [m for m in methods if m.name not in answers]

    def answered(m: Method, found: list[str]) -> None:  # kept at once: a run stopped later resumes from it
        answers[m.name] = found
        if cache:
            _keep_answers(cache, cfg, m, prompts[m.name], found, tok, paths)

    if fanned_out():
        greedy = [m for m in todo if m.decoding == "greedy"]
        for m, found in zip(greedy, fanned_answers(cfg, paths, greedy, prompts).values()):
            answered(m, found)
        todo = [m for m in todo if m.decoding != "greedy"]
    for weights in dict.fromkeys(m.weights for m in todo):  # in method order, each weights loaded once
        group = [m for m in todo if m.weights == weights]
        model = load_model(cfg.model) if weights == "base" else _load_adapter(cfg, paths, group[0].arm)
        for m in group:
            answered(m, _answer(m, model, tok, prompts[m.name], items, cfg, paths))
        model = None
        _release_memory()
    return prompts, answers


def run_evaluate(cfg: RunConfig, paths: RunPaths) -> None:
    """Answer the split's items with every configured method; write per-sample predictions and per-method metrics
    (overall and per condition x known/unknown subset)."""
    methods = resolve_methods(cfg.evaluate.methods)
    items = load_items(cfg, paths)
    _require_adapters(paths, methods)
    marked = _marked_for(items, paths) if any(m.context == "marked" for m in methods) else None
    prompts, answers = _answer_with_models(cfg, paths, [m for m in methods if m.model != "none"], items, marked)
    for m in methods:
        if m.model == "none":
            prompts[m.name], answers[m.name] = answer_without_model(m, items, marked)

    ids = items["item_id"].to_list()
    known = known_by_item(items, dict(zip(ids, answers[CLOSED_BOOK])) if CLOSED_BOOK in answers else None)
    rows = []
    for m in methods:  # report order
        for item, prompt, pred in zip(items.iter_rows(named=True), prompts[m.name], answers[m.name]):
            scores = score_prediction(pred, item["answers"], item["orig_answers"], item["counterfactual"])
            rows.append({"method": m.name, "item_id": item["item_id"], "prompt": prompt, "prediction": pred, **scores,
                         "known": known[item["item_id"]]})
    predictions = pl.from_arrow(to_arrow(rows, PREDICTIONS))
    metrics = method_metrics(with_item_columns(predictions, items), cfg.evaluate.bootstrap, cfg.seed)
    skipped = missing_references([m.name for m in methods], cfg.evaluate.references)
    if skipped:
        log.warning("references %s not evaluated in this run: not compared (add them to --evaluate.methods)", skipped)
    paired = comparisons(predictions, items, cfg.evaluate.references, cfg.evaluate.bootstrap, cfg.seed)
    write_parquet(predictions, paths.table("predictions"), PREDICTIONS)
    write_parquet(metrics, paths.table("metrics"), METRICS)
    write_parquet(paired, paths.table("comparisons"), COMPARISONS)
    if not any(m.decoding == "lfd" for m in methods):  # LFD wrote its layer choice; otherwise the table is empty
        write_parquet([], paths.table("lfd_layers"), LFD_LAYERS)
    for row in metrics.filter((pl.col("condition") == "all") & (pl.col("knowledge") == "all")).iter_rows(named=True):
        log.info("%s: %s", row["method"], ", ".join(f"{k} {row[k]:.3f}" for k in ("em", "f1", "ps", "po")
                                                    if row[k] is not None))
