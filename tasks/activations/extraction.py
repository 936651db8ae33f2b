"""Hidden states of any HF causal LM at requested layers and token positions, for the activation store.

Layer numbering: layer L (0-based) is the output of decoder block L, i.e. Hugging Face's
`output_hidden_states` index L + 1. The last layer is the inner decoder's `last_hidden_state`
(the output after the final norm), which is exactly what HF returns as `hidden_states[-1]`, so no
per-model norm name is needed.

Only the inner decoder runs (`model.get_decoder()`, never the LM head). Forward hooks sit on the
requested blocks alone; when the last layer is not requested, the hook of the deepest requested
block raises a private exception that ends the forward there, so no later block runs.

Two position kinds (docs/METHOD.md, section 2 "Features"):
- ``last``: each text fed alone (no chat template), the hidden state of its last token (the reference's);
- ``ctx_last`` / ``ctx_mean``: one forward over a whole context, then per sentence the state of the last
  token of its character span and the mean over the span's tokens.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tasks.core.progress import tqdm

from tasks.core.models import decoder_layers

LayerVectors = dict[int, np.ndarray]


class _StopForward(Exception):
    """Raised from the deepest requested block's hook so later blocks never run."""


def inner_decoder(model: nn.Module) -> nn.Module:
    """The base transformer under a causal-LM head (no lm_head, no logits), found via HF's own lookup."""
    get = getattr(model, "get_decoder", None)
    inner = get() if callable(get) else getattr(model, "base_model", model)
    return inner if inner is not None else model


def resolve_layers(requested: Sequence[int] | None, n_layers: int) -> list[int]:
    """Sorted unique 0-based layers to keep; None means all, out-of-range ones fail loudly."""
    layers = sorted(set(range(n_layers) if requested is None else requested))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or 'none'} invalid: the model has decoder layers 0..{n_layers - 1}")
    return layers


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar token length, so padding wastes little compute."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(ids: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token ids left or right; returns (input_ids, attention_mask)."""
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        sl = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        out[row, sl] = torch.tensor(x, dtype=torch.long)
        mask[row, sl] = 1
    return out, mask


def _block_output(output) -> torch.Tensor:
    """A decoder block returns a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def layer_capture(model: nn.Module, layers: Sequence[int]) -> Iterator[Callable[..., dict[int, torch.Tensor]]]:
    """A forward function returning {layer: reduce(hidden (batch, tokens, d))} that stops after the deepest layer.

    `reduce` runs inside each block's hook, so only the reduced rows (e.g. one token per text) outlive the
    block: memory does not grow with the number of layers requested.
    """
    blocks = decoder_layers(model)
    last = len(blocks) - 1
    inner = inner_decoder(model)
    takes_positions = "position_ids" in inspect.signature(inner.forward).parameters
    captured: dict[int, torch.Tensor] = {}
    state: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    deepest_hooked = max((layer for layer in layers if layer != last), default=None)

    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = state["reduce"](_block_output(output))
            if layer == deepest_hooked and last not in layers:
                raise _StopForward

        return hook

    def forward(input_ids: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]):
        kwargs = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
        if takes_positions:  # positions as if each row were fed alone, whatever its padding
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        captured.clear()
        state["reduce"] = reduce
        try:
            out = inner(**kwargs)
            captured[last] = reduce(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])
        except _StopForward:
            pass
        return {layer: captured.pop(layer) for layer in layers}

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers if layer != last]
    try:
        with torch.inference_mode():
            yield forward
    finally:
        for handle in handles:
            handle.remove()


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def iter_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    padding_side: str = "right",
    progress: bool = True,
) -> Iterator[tuple[list[int], LayerVectors]]:
    """Yield (text indices, {layer: float32 array (batch, d)}) of each text's last real token, batch by batch.

    Each text is tokenised alone (`add_special_tokens=True`, no chat template); batches are
    length-bucketed and padded on `padding_side`; the attention mask picks the last real token
    and gives position ids that match feeding the text alone.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    layers = resolve_layers(layers, len(decoder_layers(model)))
    device = next(model.parameters()).device
    token_ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    if any(len(x) == 0 for x in token_ids):
        raise ValueError("a text tokenised to zero tokens: nothing to take the last token of")
    bar = tqdm(total=len(token_ids), unit="sent", desc="activations", disable=not progress, dynamic_ncols=True)
    with layer_capture(model, layers) as forward, contextlib.closing(bar):
        for batch in length_buckets([len(x) for x in token_ids], batch_size):
            input_ids, mask = _pad([token_ids[i] for i in batch], _pad_id(tokenizer), padding_side)
            last_idx = (mask * torch.arange(mask.shape[1])).argmax(dim=-1).to(device)  # last real token
            rows = torch.arange(len(batch), device=device)
            hidden = forward(input_ids.to(device), mask.to(device), lambda h: h[rows, last_idx].float())
            yield batch, {layer: h.cpu().numpy() for layer, h in hidden.items()}
            bar.update(len(batch))


def extract(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    padding_side: str = "right",
    progress: bool = False,
) -> LayerVectors:
    """All texts' last-token vectors per layer, in input order (for small inputs and tests)."""
    out: LayerVectors = {}
    for batch, vectors in iter_activations(model, tokenizer, texts, layers, batch_size, padding_side, progress):
        for layer, array in vectors.items():
            if layer not in out:
                out[layer] = np.empty((len(texts), array.shape[1]), dtype=np.float32)
            out[layer][batch] = array
    return out


def span_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Token indices whose characters overlap [start, end) (special tokens, with empty offsets, never do)."""
    return [j for j, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def iter_context_activations(
    model: nn.Module,
    tokenizer,
    contexts: Sequence[str],
    spans: Sequence[Sequence[tuple[int, int]]],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Iterator[tuple[list[int], LayerVectors, LayerVectors]]:
    """Yield (context indices, {layer: last}, {layer: mean}) per batch: one forward per context, then per
    sentence span (char offsets) the last span token's state and the mean over its tokens, rows in the order of
    the batch's contexts and, within one, of its spans."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("sentence-in-context positions need a fast tokenizer (offset mappings)")
    layers = resolve_layers(layers, len(decoder_layers(model)))
    device = next(model.parameters()).device
    enc = tokenizer(list(contexts), add_special_tokens=True, return_offsets_mapping=True)
    token_spans = [[span_tokens(offs, s, e) for s, e in sp] for offs, sp in zip(enc["offset_mapping"], spans)]
    for i, per in enumerate(token_spans):
        if any(not t for t in per):
            raise ValueError(f"context {i}: a sentence span covers no token (char offsets out of the context?)")
    bar = tqdm(total=sum(len(s) for s in spans), unit="sent", desc="activations in context", disable=not progress,
               dynamic_ncols=True)
    with layer_capture(model, layers) as forward, contextlib.closing(bar):
        for batch in length_buckets([len(x) for x in enc["input_ids"]], batch_size):
            input_ids, mask = _pad([enc["input_ids"][i] for i in batch], _pad_id(tokenizer), "right")
            spans_of = [(r, t) for r, i in enumerate(batch) for t in token_spans[i]]

            def last_and_mean(h: torch.Tensor) -> torch.Tensor:
                """(2, n_spans, d): each span's last token, then its mean."""
                h = h.float()
                return torch.stack([torch.stack([h[r, t[-1]] for r, t in spans_of]),
                                    torch.stack([h[r, t].mean(0) for r, t in spans_of])])

            hidden = forward(input_ids.to(device), mask.to(device), last_and_mean)
            yield batch, {k: v[0].cpu().numpy() for k, v in hidden.items()}, {k: v[1].cpu().numpy() for k, v in hidden.items()}
            bar.update(sum(len(spans[i]) for i in batch))
