"""Conflict-aware LoRA fine-tuning (docs/METHOD.md stage 3): answer CE plus attention drawn to <conflict> spans.

Loss per training example (batch 1):

    L = (1 - lambda) * CE + lambda * L_attn

* CE is the token cross-entropy on the answer tokens only (every prompt token is labelled -100).
* L_attn is the mean, over every (head, query position) of the LAST decoder layer whose query can
  attend to a marked span (causal attention: query positions at or after the first marked token),
  of ``1 - (attention probability mass that query puts on marked tokens)``.
* Marked tokens are the tokens of the text between ``<conflict>`` and ``</conflict>`` AND the
  tokens of the two markers themselves. They are found from character spans of the rendered prompt
  (each ``<conflict>`` ... ``</conflict>`` occurrence inside the context, from the first character of
  the opening marker to the last character of the closing one) through the fast tokenizer's offset
  mapping: a token is marked when its character range overlaps a span. A token that straddles a span
  boundary (e.g. ``" <"``, whose leading space lies outside the span) therefore counts as marked.
  The system prompt also names the markers literally; only spans inside the context are used.
* An item with no flagged sentence has no marked token: its L_attn is defined as 0, so it trains on
  ``(1 - lambda) * CE`` alone (the same formula, with no attention term).

The last layer's attention probabilities come from a forward hook on that layer's attention module:
with ``attn_implementation="eager"`` transformers 5.x attention modules return ``(output, weights)``,
and ``output_attentions=True`` is itself implemented with such hooks on *every* layer, so hooking only
the last one is the cheaper route. Eager attention is used in every layer (measured on 2 CPU cores at
~130 tokens: eager and sdpa forward+backward steps cost the same within noise).
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from tasks.core import chat, prompts
from tasks.core.config import RunConfig, finetune_seed
from tasks.core.marking import marked_contexts
from tasks.core.models import decoder_layers, load_model, load_tokenizer
from tasks.core.storage import RunPaths, read_table, write_json

log = logging.getLogger(__name__)

IGNORE = -100
TRAIN_LOG = RunPaths(Path()).train_log.relative_to(RunPaths(Path()).adapter)  # the log inside the adapter dir
_SPAN = re.compile(re.escape(prompts.OPEN) + r".*?" + re.escape(prompts.CLOSE), re.DOTALL)


# ---------------------------------------------------------------------------- attention loss


def attention_loss(attn_probs: torch.Tensor, marked_mask: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - (attention mass on marked keys) over heads x queries that can see a marked key.

    `attn_probs` is [heads, q, k] (rows sum to 1, causal), `marked_mask` a bool [k]. Queries are the
    last q key positions (q == k without a cache). Returns 0 (keeping the graph) when nothing is marked.
    """
    if attn_probs.dim() != 3:
        raise ValueError(f"attn_probs must be [heads, q, k], got {tuple(attn_probs.shape)}")
    n_q, n_k = attn_probs.shape[-2:]
    if marked_mask.shape != (n_k,):
        raise ValueError(f"marked_mask must be [{n_k}], got {tuple(marked_mask.shape)}")
    marked = marked_mask.to(device=attn_probs.device, dtype=torch.bool)
    if not bool(marked.any()):
        return attn_probs.sum() * 0.0
    first_marked = int(marked.nonzero()[0])
    first_query = max(first_marked - (n_k - n_q), 0)  # query i sits at key position n_k - n_q + i
    if first_query >= n_q:
        return attn_probs.sum() * 0.0
    mass = (attn_probs[:, first_query:, :] * marked.to(attn_probs.dtype)).sum(dim=-1)  # [heads, queries]
    return (1.0 - mass).float().mean()


# ---------------------------------------------------------------------------- examples


def marked_char_spans(prompt_text: str, context: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each marked unit, markers included, inside the prompt's context."""
    start = prompt_text.rfind(context)  # the system prompt precedes the context and names the markers too
    if start < 0:
        raise ValueError("the context does not occur verbatim in the rendered prompt")
    return [(start + m.start(), start + m.end()) for m in _SPAN.finditer(context)]


def token_mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """A token is marked when its character range overlaps any span (so span edges are never lost)."""
    return [any(s < span_end and e > span_start for span_start, span_end in spans) for s, e in offsets]


@dataclass(frozen=True)
class Example:
    """One tokenized training example: prompt + target ids, CE labels, marked-key mask."""

    input_ids: list[int]
    labels: list[int]
    marked: list[bool]
    truncated: bool


def build_example(tok, question: str, context: str, answers: Sequence[str], max_length: int) -> Example:
    """Prompt as evaluation renders it (method 'clear': the same builder), target = first answer + EOS, left-truncated."""
    prompt_text = chat.render(tok, prompts.marked_qa_messages(question, context))
    if not getattr(tok, "is_fast", False):
        raise TypeError("marking tokens needs a fast tokenizer (offset mappings)")
    enc = chat.encode(tok, prompt_text, return_offsets_mapping=True)
    prompt_ids = list(enc["input_ids"])
    marked = token_mask_from_spans(enc["offset_mapping"], marked_char_spans(prompt_text, context))
    target_ids = list(tok(prompts.target_text(answers, tok), add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise ValueError(f"empty target for question {question!r}")
    target_ids = target_ids[:max_length]  # only a pathological answer is this long
    keep = max_length - len(target_ids)
    truncated = len(prompt_ids) > keep
    if truncated:
        cut = len(prompt_ids) - keep
        prompt_ids, marked = prompt_ids[cut:], marked[cut:]
    return Example(
        input_ids=prompt_ids + target_ids,
        labels=[IGNORE] * len(prompt_ids) + target_ids,
        marked=marked + [False] * len(target_ids),
        truncated=truncated,
    )


def select_train_items(items: pl.DataFrame, max_items: int, seed: int) -> pl.DataFrame:
    """Train-split items, at most max_items of them by a seeded choice (stable under input order)."""
    train = items.filter(pl.col("split") == "train").sort("item_id")
    if train.height == 0:
        raise ValueError("no train-split items to fine-tune on")
    if train.height > max_items:
        idx = sorted(random.Random(seed).sample(range(train.height), max_items))
        train = train[idx]
    return train


# ---------------------------------------------------------------------------- model plumbing


def present_target_modules(model: nn.Module, wanted: Sequence[str]) -> list[str]:
    """The configured LoRA target names that exist as Linear leaves of this model (others skipped)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    present = [w for w in wanted if w in names]
    if not present:
        raise ValueError(f"none of the LoRA target modules {list(wanted)} exist in the model")
    return present


def last_attention_module(model: nn.Module) -> nn.Module:
    """The self-attention module of the last decoder layer (the one whose weights L_attn reads)."""
    layer = decoder_layers(model)[-1]
    for attr in ("self_attn", "attn", "attention", "self_attention"):
        mod = getattr(layer, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    for name, mod in layer.named_modules():
        if name and type(mod).__name__.endswith("Attention"):
            return mod
    raise ValueError(f"no attention module found in {type(layer).__name__}")


class AttentionGrabber:
    """Forward hook keeping the attention probabilities the hooked (eager) attention module returns."""

    def __init__(self, module: nn.Module):
        self.weights: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("attention weights unavailable: load the model with attn_implementation='eager'")
        self.weights = weights

    def pop(self) -> torch.Tensor:
        """The last captured weights, cleared so a stale tensor is never reused."""
        if self.weights is None:
            raise RuntimeError("no attention weights captured in this forward pass")
        weights, self.weights = self.weights, None
        return weights

    def remove(self) -> None:
        self._handle.remove()


def _window_mean(values: Sequence[float | None], first: bool) -> float | None:
    """Mean over the first or last 20% of steps (at least one), ignoring steps without a value."""
    k = max(1, math.ceil(0.2 * len(values)))
    window = values[:k] if first else values[-k:]
    kept = [v for v in window if v is not None]
    return float(sum(kept) / len(kept)) if kept else None


def save_adapter_atomically(model: nn.Module, target: Path, log_obj: dict) -> Path:
    """Write the adapter and its log into a temp dir beside `target`, then swap it in whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        write_json(log_obj, tmp / TRAIN_LOG)
        if target.exists():
            os.replace(target, old)  # os.replace cannot overwrite a non-empty directory
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------- stage


def run_finetune(cfg: RunConfig, paths: RunPaths) -> None:
    """Train the LoRA adapter on marked train items with CE + attention loss; save adapter and log."""
    from peft import LoraConfig, get_peft_model

    fcfg, seed = cfg.finetune, finetune_seed(cfg)
    items = select_train_items(read_table(paths.table("items")), fcfg.max_items, seed)
    contexts = marked_contexts(paths)
    missing = [i for i in items["item_id"].to_list() if i not in contexts]
    if missing:
        log.warning("%d train items have no sentences; their unmarked context is used", len(missing))

    tok = load_tokenizer(cfg.model)
    examples = [
        build_example(
            tok, prompts.item_question(row), contexts.get(row["item_id"], row["context"]), row["answers"], fcfg.max_length
        )
        for row in items.iter_rows(named=True)
    ]
    n_truncated = sum(e.truncated for e in examples)
    n_marked = sum(any(e.marked) for e in examples)
    log.info(
        "finetune: %d items (%d with a marked span), %d truncated from the left to %d tokens",
        len(examples), n_marked, n_truncated, fcfg.max_length,
    )

    torch.manual_seed(seed)
    model = load_model(cfg.model, attn_implementation="eager")
    targets = present_target_modules(model, fcfg.target_modules)
    lora = LoraConfig(
        r=fcfg.lora_r, lora_alpha=fcfg.lora_alpha, lora_dropout=fcfg.lora_dropout,
        target_modules=targets, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=fcfg.lr)
    grabber = AttentionGrabber(last_attention_module(model))
    lam = fcfg.attn_lambda

    rng = random.Random(seed)
    ce_hist: list[float] = []
    attn_hist: list[float | None] = []
    start = time.perf_counter()
    bar = tqdm(total=len(examples) * fcfg.epochs, desc="finetune", unit="step")
    try:
        for _ in range(fcfg.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for i in order:
                ex = examples[i]
                ids = torch.tensor([ex.input_ids], device=device)
                labels = torch.tensor([ex.labels], device=device)
                marked = torch.tensor(ex.marked, device=device)
                out = model(input_ids=ids, labels=labels, use_cache=False)
                attn = attention_loss(grabber.pop()[0], marked)
                loss = (1.0 - lam) * out.loss + lam * attn
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ce_hist.append(float(out.loss.detach()))
                attn_hist.append(float(attn.detach()) if any(ex.marked) else None)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", ce=f"{ce_hist[-1]:.3f}")
    finally:
        bar.close()
        grabber.remove()
    seconds = time.perf_counter() - start
    if not all(math.isfinite(v) for v in ce_hist):
        raise FloatingPointError("non-finite cross-entropy during fine-tuning")

    train_log = {
        "n_items": len(examples),
        "n_marked": n_marked,
        "n_truncated": n_truncated,
        "n_unsentenced": len(missing),
        "steps": len(ce_hist),
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(len(ce_hist), 1), 4),
        "ce_first": _window_mean(ce_hist, first=True),
        "ce_last": _window_mean(ce_hist, first=False),
        "attn_first": _window_mean(attn_hist, first=True),
        "attn_last": _window_mean(attn_hist, first=False),
        "lr": fcfg.lr,
        "target_modules": targets,
        "model": cfg.model.name,
        "seed": seed,
        "config": fcfg.model_dump(mode="json"),
    }
    model.eval()
    save_adapter_atomically(model, paths.adapter, train_log)
    log.info("finetune: %d steps in %.1f s; CE %.3f -> %.3f", len(ce_hist), seconds,
             train_log["ce_first"], train_log["ce_last"])


def load_finetuned(cfg: RunConfig, paths: RunPaths) -> nn.Module:
    """The base model with the trained adapter merged in, in eval mode, for evaluation."""
    from peft import PeftModel

    if not (paths.adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{paths.adapter} holds no adapter: run the finetune stage first")
    base = load_model(cfg.model)
    model = PeftModel.from_pretrained(base, str(paths.adapter)).merge_and_unload()
    return model.eval()
