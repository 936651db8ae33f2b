"""Stage 2, decompose: every item's context as the units that are probed and marked.

Units are the context's sentences (offline splitter, exact character offsets) or, with
`decompose.method = "llm"`, the atomic facts an LLM rewrites each sentence into (docs/METHOD.md stage 1); a fact
carries the span of the sentence it came from. With `decompose.relevance`, each unit also gets its cosine
relevance to the question's steps and whether the top-k filter keeps it.

Labels per unit (tasks/decompose/labels.py): `truthful`, `relevant` and `conflicting` (= relevant AND NOT
truthful, the unit CLEAR should mark) come from the item's `sentence_labels` when its benchmark recorded them,
matched by the source sentence's exact text (a fact inherits its sentence's labels; an unmatched sentence gets
relevant null). Without them, the target sentence is relevant and truth comes from the statements by key, as
before; every other label is null. `label` and today's `truthful` values are unchanged.

What each published format supports: known-facts fills `sentence_labels` in its generator. The readers of
formats with an original context (ConFiQA, NQ-Swap; tasks/ingest/formats/items.py: substitution_labels)
label a sentence the substitution changed and that holds a context answer as relevant and false (so
conflicting), a sentence found verbatim in the original context as true with relevance unknown (it is the
dataset's original text, but the data does not say which of its sentences the question needs), and any
other changed sentence as unknown. Other formats give only the target sentence. Never a guess: a label the
data cannot give is null.
"""

from __future__ import annotations

import logging
from collections import Counter

import polars as pl
from tasks.core.progress import tqdm

from schemas.tables import SENTENCES
from tasks.core.config import RunConfig
from tasks.core.splitter import split_sentences
from tasks.core.storage import RunPaths, read_optional_table, read_table, text_key, write_parquet
from tasks.decompose.labels import Truth, labels_by_text, truth_by_key, unit_labels

log = logging.getLogger(__name__)

Span = tuple[str, int, int]  # (sentence, char_start, char_end) in the context
Unit = tuple[int, str, str]  # (source sentence index, text, "sentence" | "fact")


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
    truth: Truth,
    relevance: list[tuple[list[float], list[bool]]] | None = None,
) -> list[dict]:
    """One `sentences` row per unit; a fact inherits the span and the labels of its source sentence."""
    rows: list[dict] = []
    labels = items["sentence_labels"] if "sentence_labels" in items.columns else [None] * items.height
    cols = items.select("item_id", "target_sentence", "counterfactual").iter_rows()
    for n, ((item_id, target, cf), item_labels) in enumerate(zip(cols, labels)):
        scores, keep = relevance[n] if relevance else (None, None)
        by_text = labels_by_text(item_labels)
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
                    **unit_labels(source_text, key, target, bool(cf), by_text, truth),
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
    labelled = [r["conflicting"] for r in rows if r["conflicting"] is not None]
    parts.append(f"{sum(labelled)} of {len(labelled)} units with a conflict label conflicting"
                 if labelled else "no conflict labels (the benchmark gives none)")
    return "; ".join(parts + extra)


def run_decompose(cfg: RunConfig, paths: RunPaths) -> None:
    """Decompose every item's context into the `sentences` table, labelled from the benchmark and statements."""
    items = read_table(paths.table("items"))
    statements = read_optional_table(paths.table("statements"))
    spans = split_contexts(items)
    chat = None
    if cfg.decompose.method == "llm":
        from tasks.decompose.llm import make_chat

        chat = make_chat(cfg.decompose.llm, cfg.model, cfg.seed)
        units = llm_units(chat, spans)
    else:
        units = [sentence_units(s) for s in spans]
    relevance = relevance_of(cfg, items, units, chat) if cfg.decompose.relevance else None
    rows = unit_rows(items, spans, units, truth_by_key(statements), relevance)
    write_parquet(rows, paths.table("sentences"), SENTENCES)
    n_target = _targets_found(rows)
    log.info(_summary(items, rows, n_target, [chat.summary()] if chat else []))
    missing = int(items["target_sentence"].is_not_null().sum()) - n_target
    if missing > 0:
        log.warning("decompose: %d items' target sentence was not recovered by the splitter", missing)
