"""The conflict-attention loss and the hook that reads the last layer's attention (docs/METHOD.md, section 3).

* L_attn is the mean, over every (head, query position) of the LAST decoder layer whose query can attend to a
  marked span (causal attention: query positions at or after the first marked token), of
  ``1 - (attention probability mass that query puts on marked tokens)``.
* An item with no marked token has L_attn = 0, so it trains on ``(1 - lambda) * CE`` alone.

The last layer's attention probabilities come from a forward hook on that layer's attention module:
with ``attn_implementation="eager"`` transformers 5.x attention modules return ``(output, weights)``,
and ``output_attentions=True`` is itself implemented with such hooks on *every* layer, so hooking only
the last one is the cheaper route. Eager attention is used in every layer (measured on 2 CPU cores at
~130 tokens: eager and sdpa forward+backward steps cost the same within noise).
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.core.models import decoder_layers


def attention_loss(attn_probs: torch.Tensor, marked_mask: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - (attention mass on marked keys) over heads x queries that can see a marked key.

    `attn_probs` is [heads, q, k] (rows sum to 1, causal), `marked_mask` a bool [k]. Queries are the
    last q key positions (q == k without a cache). Returns 0 (keeping the graph) when nothing is marked.
    """
    if attn_probs.dim() != 3:
        raise ValueError(f"attn_probs must be [heads, q, k], got {tuple(attn_probs.shape)}")
    n_q, n_k = attn_probs.shape[-2:]
    if not 0 < n_q <= n_k:
        raise ValueError(f"attn_probs needs 1 to k queries for its k keys, got {n_q} for {n_k}")
    if marked_mask.shape != (n_k,):
        raise ValueError(f"marked_mask must be [{n_k}], got {tuple(marked_mask.shape)}")
    marked = marked_mask.to(device=attn_probs.device, dtype=torch.bool)
    if not bool(marked.any()):
        return attn_probs.sum() * 0.0
    first_marked = int(marked.nonzero()[0])
    # Query i sits at key position n_k - n_q + i, so some query always sees the first marked key.
    first_query = max(first_marked - (n_k - n_q), 0)
    mass = (attn_probs[:, first_query:, :] * marked.to(attn_probs.dtype)).sum(dim=-1)  # [heads, queries]
    return (1.0 - mass).float().mean()


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
