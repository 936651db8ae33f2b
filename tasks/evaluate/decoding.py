"""Decoding methods other than plain greedy (docs/METHOD.md, "Decoding baselines"): CAD here, LFD in
decoding_lfd.py, both on the step-by-step greedy loop of decoding_loop.py; the evaluate stage dispatches here on a
method's `decoding`."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import pyarrow as pa
import torch

from schemas.tables import LFD_LAYERS
from tasks.core.chat import render
from tasks.core.prompts import item_question
from tasks.core.storage import RunPaths, read_table, write_parquet
from tasks.evaluate.decoding_lfd import answer_lfd, lfd_inputs
from tasks.evaluate.decoding_loop import Decoder, Trace, decode_batched, streams
from tasks.evaluate.methods import Method
from tasks.evaluate.methods.closed_book import messages as question_only


def cad_scores(with_context: torch.Tensor, without_context: torch.Tensor, alpha: float) -> torch.Tensor:
    """Context-aware decoding's next-token logits: the context's effect on the logits amplified by alpha."""
    return (1 + alpha) * with_context - alpha * without_context


@torch.inference_mode()
def decode_cad(model, tokenizer, with_context: Sequence[str], without_context: Sequence[str], alpha: float,
               max_new_tokens: int, batch_size: int, trace: Trace | None = None) -> list[str]:
    """CAD answers: an item's two prompts decoded in lock-step, each step's token fed to both."""
    if len(with_context) != len(without_context):
        raise ValueError(f"CAD needs one context-free prompt per prompt: {len(with_context)} vs {len(without_context)}")

    open_ctx, open_bare = streams(model, tokenizer, with_context), streams(model, tokenizer, without_context)

    def start(idx: list[int]) -> Decoder:
        return Decoder([open_ctx(idx), open_bare(idx)], lambda s: cad_scores(s[0].logits, s[1].logits, alpha))

    return decode_batched(model, tokenizer, with_context, batch_size, max_new_tokens, start, trace, desc="cad")


def question_only_prompts(items: pl.DataFrame, tokenizer) -> list[str]:
    """CAD's context-free prompts: each item's question as the closed-book method renders it."""
    return [render(tokenizer, question_only(item_question(item))) for item in items.iter_rows(named=True)]


def decode_method(method: Method, model, tokenizer, prompts: list[str], items: pl.DataFrame, cfg,
                  paths: RunPaths) -> list[str]:
    """Answers of a method whose decoding is not plain greedy (LFD also writes its layer table)."""
    ev = cfg.evaluate
    if method.decoding == "cad":
        return decode_cad(model, tokenizer, prompts, question_only_prompts(items, tokenizer), ev.cad_alpha,
                          ev.max_new_tokens, ev.batch_size)
    if method.decoding == "lfd":
        return answer_lfd(method, model, tokenizer, prompts, cfg, paths)
    raise ValueError(f"method {method.name!r}: unknown decoding {method.decoding!r}; known: greedy, cad, lfd")


# The tables a decoding writes as it answers, beside the predictions: kept with its cached answers, restored on a hit.
DECODING_TABLES: dict[str, dict[str, pa.Schema]] = {"lfd": {"lfd_layers": LFD_LAYERS}}


def decoding_inputs(method: Method, tokenizer, paths: RunPaths) -> dict | None:
    """What a method's answers depend on besides its prompts, model and options (part of the answer cache's key):
    LFD's dev prompts and answers, which choose its layer; None for the others."""
    return lfd_inputs(method, tokenizer, paths) if method.decoding == "lfd" else None


def written_tables(method: Method, paths: RunPaths) -> dict[str, list[dict]]:
    """The rows of the tables the method's decoding wrote in this run (to keep with its answers)."""
    return {name: read_table(paths.table(name)).to_dicts() for name in DECODING_TABLES.get(method.decoding, {})}


def restore_tables(method: Method, tables: dict[str, list[dict]], paths: RunPaths) -> None:
    """Write back the tables kept with a method's cached answers, as its decoding would have written them."""
    for name, schema in DECODING_TABLES.get(method.decoding, {}).items():
        if name not in tables:
            raise ValueError(f"the answer cache's entry of {method.name!r} lacks its {name!r} table; delete the entry")
        write_parquet(tables[name], paths.table(name), schema)
