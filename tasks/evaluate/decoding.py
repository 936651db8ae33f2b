"""Decoding methods other than plain greedy (docs/METHOD.md, "Decoding baselines"): CAD here, LFD in
decoding_lfd.py, both on the step-by-step greedy loop of decoding_loop.py; the evaluate stage dispatches here on a
method's `decoding`."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch

from tasks.core.chat import render
from tasks.core.prompts import item_question
from tasks.core.storage import RunPaths
from tasks.evaluate.decoding_lfd import answer_lfd
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
