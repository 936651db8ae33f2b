"""LFD (layer fused decoding, Sun et al. 2025; docs/METHOD.md, "Decoding baselines"): the final layer's next-token
distribution fused with that of one intermediate layer, read through the model's own final norm and LM head.

The layer is chosen once per run on the dev split by the internal knowledge score (IKS): how far a layer's FFN moves
the next-token distribution (the Jensen-Shannon divergence of the logit lens before and after the FFN, as
ReDeEP's parametric knowledge score), averaged over the positions that predict each dev item's gold answer. LFD
takes the layer of lowest IKS among the latter half of the layers (the final one excepted): the layer where the FFN
adds least of the model's memory to what attention read from the context.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import polars as pl
import torch
from scipy.spatial.distance import jensenshannon
from torch import nn

from schemas.tables import LFD_LAYERS
from tasks.activations.extraction import _block_output, inner_decoder
from tasks.core.chat import encode
from tasks.core.models import decoder_layers
from tasks.core.storage import RunPaths, read_table, write_parquet
from tasks.evaluate.decoding_loop import Decoder, Trace, decode_batched, streams
from tasks.evaluate.methods import Method
from tasks.evaluate.stage import build_prompts

log = logging.getLogger(__name__)

LFD_SPLIT = "dev"  # the split whose items choose the fused layer (never the evaluated one)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder block and the LM head (Llama/Qwen/Mistral `norm`, GPT-2 `ln_f`)."""
    inner = inner_decoder(model)
    for name in ("norm", "ln_f", "final_layernorm"):
        if isinstance(getattr(inner, name, None), nn.Module):
            return getattr(inner, name)
    raise ValueError(f"LFD: no final norm (norm, ln_f or final_layernorm) on {type(inner).__name__}")


def logit_lens(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits read off a hidden state the way the final layer's are: final norm, then the LM head."""
    return model.get_output_embeddings()(final_norm(model)(hidden)).float()


def lfd_scores(final_logits: torch.Tensor, layer_logits: torch.Tensor) -> torch.Tensor:
    """LFD's next-token log-probabilities: the final layer's and the fused layer's distributions multiplied and
    renormalised (softmax of the summed logits)."""
    return torch.log_softmax(final_logits.float() + layer_logits.float(), dim=-1)


def candidate_layers(n_layers: int) -> range:
    """The latter half of the decoder layers, the final one excepted (fusing it with itself is plain decoding)."""
    return range(n_layers // 2, n_layers - 1)


def choose_layer(iks: Sequence[float]) -> int:
    """The candidate layer of lowest IKS (the shallower one on a tie)."""
    candidates = candidate_layers(len(iks))
    if not candidates:
        raise ValueError(f"LFD fuses a latter-half layer with the final one: it needs at least 3 decoder layers, the"
                         f" model has {len(iks)}")
    return min(candidates, key=lambda layer: (iks[layer], layer))


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> np.ndarray:
    """Jensen-Shannon divergence (nats) between the rows' softmax distributions."""
    p, q = (torch.softmax(x.double(), dim=-1).cpu().numpy() for x in (logits_p, logits_q))
    return jensenshannon(p, q, axis=-1) ** 2


@contextlib.contextmanager
def ffn_divergence(model: nn.Module) -> Iterator[dict]:
    """While open, every forward fills {layer: JSD of the logit lens before vs after the block's FFN} at the
    positions of `captured["select"]` (a (rows, tokens) bool mask set by the caller before the forward)."""
    blocks, captured, ffn_out = decoder_layers(model), {}, {}
    missing = [type(b).__name__ for b in blocks if not isinstance(getattr(b, "mlp", None), nn.Module)]
    if missing:
        raise ValueError(f"LFD's internal knowledge score reads each block's `mlp`; {missing[0]} has none")

    def on_ffn(layer: int):
        def hook(_module, _inputs, output):
            ffn_out[layer] = output[captured["select"]]
        return hook

    def on_block(layer: int):
        def hook(_module, _inputs, output):
            after = _block_output(output)[captured["select"]]
            before = after - ffn_out.pop(layer)  # pre-norm residual block: x_out = x_mid + mlp(norm(x_mid))
            captured[layer] = js_divergence(logit_lens(model, before), logit_lens(model, after))
        return hook

    handles = [h for i, b in enumerate(blocks) for h in (b.mlp.register_forward_hook(on_ffn(i)),
                                                         b.register_forward_hook(on_block(i)))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def teacher_forced(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each prompt followed by its gold answer's tokens, left-padded, and `select`: the positions whose next token is
    an answer token."""
    prompt_ids = [encode(tokenizer, p)["input_ids"] for p in prompts]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": [p + a for p, a in zip(prompt_ids, answer_ids)]}, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    select = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, a in enumerate(answer_ids):
        start = width - len(a) - 1  # the prompt's last token predicts the answer's first
        select[row, start : width - 1] = True
    return {**batch, "select": select}


@torch.inference_mode()
def layer_iks(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
              batch_size: int) -> list[float]:
    """IKS of every decoder layer: per item, the mean JSD over its answer-predicting positions; then the mean over
    items (so a long answer does not weigh more)."""
    per_item = []
    with ffn_divergence(model) as captured:
        for begin in range(0, len(prompts), batch_size):
            batch = teacher_forced(tokenizer, prompts[begin : begin + batch_size], answers[begin : begin + batch_size])
            mask = batch["attention_mask"].to(model.device)
            captured["select"] = batch["select"].to(model.device)
            model(input_ids=batch["input_ids"].to(model.device), attention_mask=mask,
                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False, logits_to_keep=1)
            owner = batch["select"].nonzero()[:, 0].numpy()
            counts = np.bincount(owner, minlength=mask.shape[0])
            layers = sorted(k for k in captured if isinstance(k, int))
            per_item.append(np.stack([np.bincount(owner, captured[k], mask.shape[0]) / counts for k in layers], 1))
    return np.concatenate(per_item).mean(axis=0).tolist()


@torch.inference_mode()
def decode_lfd(model: nn.Module, tokenizer, prompts: Sequence[str], layer: int, max_new_tokens: int, batch_size: int,
               trace: Trace | None = None) -> list[str]:
    """LFD answers: greedy on `lfd_scores` of the final logits and the logit lens of `layer`'s last position."""
    seen: dict[str, torch.Tensor] = {}

    def keep_last(_module, _inputs, output):
        seen["hidden"] = _block_output(output)[:, -1]

    open_stream = streams(model, tokenizer, prompts, capture=lambda: seen["hidden"])

    def start(idx: list[int]) -> Decoder:
        return Decoder([open_stream(idx)], lambda s: lfd_scores(s[0].logits, logit_lens(model, s[0].extra)))

    handle = decoder_layers(model)[layer].register_forward_hook(keep_last)
    try:
        return decode_batched(model, tokenizer, prompts, batch_size, max_new_tokens, start, trace, desc="lfd")
    finally:
        handle.remove()


def dev_items(paths: RunPaths) -> pl.DataFrame:
    """The items LFD chooses its layer on, refusing an empty split with the splits that do exist."""
    items = read_table(paths.table("items"))
    dev = items.filter(pl.col("split") == LFD_SPLIT).sort("item_id")
    if dev.height == 0:
        raise ValueError(f"LFD chooses its layer on the {LFD_SPLIT!r} split, which has no items (splits present:"
                         f" {sorted(items['split'].unique().to_list())}): ingest a dataset with a dev split, or leave"
                         " 'lfd' out of --evaluate.methods")
    return dev


def layer_table(iks: Sequence[float], chosen: int, n_items: int) -> pl.DataFrame:
    """One row per layer: its IKS, whether LFD could fuse it and whether it does."""
    candidates = set(candidate_layers(len(iks)))
    return pl.DataFrame([{"layer": layer, "iks": value, "n_items": n_items, "candidate": layer in candidates,
                          "chosen": layer == chosen} for layer, value in enumerate(iks)])


def lfd_inputs(method: Method, tokenizer, paths: RunPaths) -> dict[str, list[str]]:
    """What chooses LFD's layer besides the model: the dev items' prompts (built as the method builds them) and
    gold answers; the answer cache keys LFD's answers on them too."""
    dev = dev_items(paths)
    return {"dev_prompts": build_prompts(method, dev, tokenizer, None),
            "dev_answers": [answers[0] for answers in dev["answers"].to_list()]}


def answer_lfd(method: Method, model: nn.Module, tokenizer, prompts: list[str], cfg, paths: RunPaths) -> list[str]:
    """Choose the layer on dev, record the choice (table `lfd_layers`), then decode."""
    dev, ev = lfd_inputs(method, tokenizer, paths), cfg.evaluate
    iks = layer_iks(model, tokenizer, dev["dev_prompts"], dev["dev_answers"], ev.batch_size)
    layer = choose_layer(iks)
    write_parquet(layer_table(iks, layer, len(dev["dev_prompts"])), paths.table("lfd_layers"), LFD_LAYERS)
    log.info("LFD fuses layer %d (IKS %.4f, lowest of layers %d-%d on %d dev items)", layer, iks[layer],
             candidate_layers(len(iks))[0], candidate_layers(len(iks))[-1], len(dev["dev_prompts"]))
    return decode_lfd(model, tokenizer, prompts, layer, ev.max_new_tokens, ev.batch_size)
