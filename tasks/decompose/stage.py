"""Stage 2, decompose: every item's context as the units that are probed and marked.

Units are the context's sentences (offline splitter, exact character offsets) or, with
`decompose.method = "llm"`, the atomic facts an LLM rewrites each sentence into (docs/METHOD.md stage 1); a fact
carries the span of the sentence it came from. With `decompose.relevance`, each unit also gets its cosine
relevance to the question's steps and whether the top-k filter keeps it.
"""

from __future__ import annotations

import logging
from collections import Counter

import polars as pl
from tqdm.auto import tqdm

from schemas.tables import SENTENCES
from tasks.core.config import RunConfig
from tasks.core.splitter import split_sentences
from tasks.core.storage import RunPaths, read_table, text_key, write_parquet

log = logging.getLogger(__name__)

Span = tuple[str, int, int]  # (sentence, char_start, char_end) in the context
Unit = tuple[int, str, str]  # (source sentence index, text, "sentence" | "fact")


def _truth_by_key(statements: pl.DataFrame | None) -> dict[str, bool]:
    """Map a statement key to whether it is true; keys stated with both labels are left unknown."""
    if statements is None or statements.height == 0:
        return {}
    labels = statements.group_by("key").agg(pl.col("label").unique().alias("labels"))
    return {k: (ls[0] == 0) for k, ls in zip(labels["key"], labels["labels"]) if len(ls) == 1}


def _label(text: str, target: str | None, counterfactual: bool) -> str | None:
    """Benchmark label of one sentence; unknown (None) when the item names no target sentence."""
    if target is None:
        return None
    if text == target.strip():
        return "conflict" if counterfactual else "aligned"
    return "irrelevant"


def split_contexts(items: pl.DataFrame, progress: bool = True) -> list[list[Span]]:
    """Sentence spans of every item's context, in items order."""
    contexts = items["context"].to_list()
    return [split_sentences(c) for c in tqdm(contexts, desc="split", disable=not progress)]


def sentence_units(spans: list[Span]) -> list[Unit]:
    """The default units: each sentence is its own unit."""
    return [(i, text, "sentence") for i, (text, _, _) in enumerate(spans)]


def llm_units(chat, spans: list[list[Span]]) -> list[list[Unit]]:
    """Atomic facts of every context from the LLM; a sentence it gives no fact for stays as itself."""
    from tasks.decompose.atomic_facts import atomic_units

    return atomic_units(chat, [[text for text, _, _ in item] for item in spans])


def question_steps_of(chat, questions: list[str]) -> list[list[str]]:
    """Question steps: the LLM's (as the reference) when there is one, else the offline heuristic."""
    if chat is not None:
        from tasks.decompose.atomic_facts import question_steps

        steps = question_steps(chat, questions)
    else:
        from tasks.decompose.relevance import heuristic_steps

        steps = [heuristic_steps(q) for q in questions]
    return [s or [q] for s, q in zip(steps, questions)]  # a question always counts as its own step


def relevance_of(
    cfg: RunConfig, items: pl.DataFrame, units: list[list[Unit]], chat=None
) -> list[tuple[list[float], list[bool]]]:
    """Per item: each unit's relevance to the question steps and whether the top-k filter keeps it."""
    from tasks.decompose.relevance import score_items

    ids = items["item_id"].to_list()
    steps = question_steps_of(chat, items["question"].to_list())
    scored = score_items(
        {i: [text for _, text, _ in u] for i, u in zip(ids, units)},
        dict(zip(ids, steps)),
        cfg.decompose.top_k,
        cfg.decompose.encoder,
    )
    return [scored[i] for i in ids]


def unit_rows(
    items: pl.DataFrame,
    spans: list[list[Span]],
    units: list[list[Unit]],
    truth: dict[str, bool],
    relevance: list[tuple[list[float], list[bool]]] | None = None,
) -> list[dict]:
    """One `sentences` row per unit; a fact inherits the span and benchmark label of its source sentence."""
    rows: list[dict] = []
    cols = items.select("item_id", "target_sentence", "counterfactual").iter_rows()
    for n, (item_id, target, cf) in enumerate(cols):
        scores, keep = relevance[n] if relevance else (None, None)
        for idx, (src, text, kind) in enumerate(units[n]):
            source_text, start, end = spans[n][src]
            key = text_key(text)
            rows.append(
                {
                    "item_id": item_id,
                    "sent_idx": idx,
                    "key": key,
                    "text": text,
                    "char_start": start,
                    "char_end": end,
                    "relevance": scores[idx] if scores else None,
                    "label": _label(source_text, target, bool(cf)),
                    "truthful": truth.get(key),
                    "unit": kind,
                    "source_idx": src,
                    "is_relevant": keep[idx] if keep else None,
                }
            )
    return rows


def _targets_found(rows: list[dict]) -> int:
    """Items whose target sentence the units recovered (a fact inherits its source sentence's label)."""
    return len({r["item_id"] for r in rows if r["label"] in ("conflict", "aligned")})


def _summary(items: pl.DataFrame, rows: list[dict], n_target: int, extra: list[str]) -> str:
    """The stage's one line: units by kind, targets found, relevant units, cache use."""
    kinds = Counter(r["unit"] for r in rows)
    parts = [f"decompose: {items.height} items -> {len(rows)} units"
             f" ({', '.join(f'{v} {k}s' for k, v in sorted(kinds.items()))}), {n_target} target sentences found"]
    if rows and rows[0]["is_relevant"] is not None:
        parts.append(f"{sum(bool(r['is_relevant']) for r in rows)} relevant")
    return "; ".join(parts + extra)


def run_decompose(cfg: RunConfig, paths: RunPaths) -> None:
    """Decompose every item's context into the `sentences` table, labelled from the benchmark and statements."""
    items = read_table(paths.table("items"))
    stmt_path = paths.table("statements")
    statements = read_table(stmt_path) if stmt_path.exists() else None
    spans = split_contexts(items)
    chat = None
    if cfg.decompose.method == "llm":
        from tasks.decompose.llm import make_chat

        chat = make_chat(cfg.decompose.llm, cfg.model, cfg.seed)
        units = llm_units(chat, spans)
    else:
        units = [sentence_units(s) for s in spans]
    relevance = relevance_of(cfg, items, units, chat) if cfg.decompose.relevance else None
    rows = unit_rows(items, spans, units, _truth_by_key(statements), relevance)
    write_parquet(rows, paths.table("sentences"), SENTENCES)
    n_target = _targets_found(rows)
    log.info(_summary(items, rows, n_target, [chat.summary()] if chat else []))
    missing = int(items["target_sentence"].is_not_null().sum()) - n_target
    if missing > 0:
        log.warning("decompose: %d items' target sentence was not recovered by the splitter", missing)
