"""The decoding loop's KV cache: a layer that grows, drops rows and trims positions in place (`SlabLayer`), and
the joins and checks the loop makes on caches of transformers' growing kind."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SlabLayer(DynamicLayer):
    """A KV cache layer that writes each step's keys and values into spare room of a preallocated slab instead of
    concatenating (a transformers `DynamicLayer` copies its whole cache on every step: a fifth of a decoding step's
    time at batch 32), and drops rows and leading positions in place. `keys`/`values` are views of the slab's rows
    `[:rows]` and positions `[lo, lo + length)`; anything that replaces them (merging streams) is copied into a fresh
    slab at the next step."""

    ROOM = 32  # spare positions per slab: one allocation covers a short answer

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self._slab: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lo, self._views = 0, None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n, new = self.get_seq_length(), key_states.shape[-2]
        if not self._ours() or self._lo + n + new > self._slab[0].shape[-2]:
            self.adopt(*(_with_room(t, key_states, n, n + new + self.ROOM) for t in (self.keys, self.values)), n)
        end = self._lo + n
        for slab, states in zip(self._slab, (key_states, value_states)):
            slab[: states.shape[0], :, end : end + new] = states
        self._show(key_states.shape[0], n + new)
        return self.keys, self.values

    def select(self, rows: torch.Tensor, start: int) -> None:
        """Keep these rows (distinct indices, in their new order), and the positions from `start` on, within the slab:
        only rows whose place changes are copied, and the next step still writes into the spare room."""
        n, order = self.get_seq_length(), rows.tolist()
        if not self._ours():
            self.keys, self.values = self.keys[rows, :, start:], self.values[rows, :, start:]
            return
        lo, end = self._lo + start, self._lo + n
        moved = [(dst, src) for dst, src in enumerate(order) if dst != src]
        if moved:
            dst, src = (torch.tensor(ix, device=rows.device) for ix in zip(*moved))
            for slab in self._slab:
                slab[dst, :, lo:end] = slab[src, :, lo:end]  # the right side is gathered first: no overlap
        self._lo = lo
        self._show(len(order), n - start)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take slabs whose first `length` positions hold every row's keys and values (the rest is spare room)."""
        self._slab, self._lo = (keys, values), 0
        self._show(keys.shape[0], length)

    def _show(self, rows: int, length: int) -> None:
        """Point `keys`/`values` at the slab's filled part."""
        keys, values = (t[:rows, :, self._lo : self._lo + length] for t in self._slab)
        self.keys, self.values, self._views = keys, values, (keys, values)

    def _ours(self) -> bool:
        """Whether `keys`/`values` are still the views of the slab this layer made (nothing replaced them)."""
        return self._views is not None and self.keys is self._views[0] and self.values is self._views[1]


def _with_room(filled: torch.Tensor, like: torch.Tensor, length: int, size: int) -> torch.Tensor:
    """A slab of `size` positions holding `filled`'s first `length` positions at its start (`like` gives shape and
    dtype when it is empty)."""
    slab = like.new_empty((like.shape[0], like.shape[1], size, like.shape[-1]))
    if length:
        slab[:, :, :length] = filled[:, :, :length]
    return slab


def keep_rows(layer, rows: torch.Tensor, start: int) -> None:
    """A growing cache layer keeps these rows, from position `start` on."""
    if isinstance(layer, SlabLayer):
        layer.select(rows, start)
    elif layer.get_seq_length():
        layer.keys, layer.values = layer.keys[rows, :, start:], layer.values[rows, :, start:]


def joined(parts: Sequence[torch.Tensor], width: int, room: int) -> torch.Tensor:
    """The parts' rows in order, each left-padded with zeros to `width` positions, in one tensor with `room` spare
    positions after them."""
    first = parts[0]
    out = first.new_empty((sum(p.shape[0] for p in parts), first.shape[1], width + room, first.shape[-1]))
    row = 0
    for p in parts:
        pad = width - p.shape[-2]
        out[row : row + p.shape[0], :, :pad] = 0
        out[row : row + p.shape[0], :, pad:width] = p
        row += p.shape[0]
    return out


def growing(layers) -> bool:
    """Whether cache layers only grow (no window, no other state), so rows of different forward passes can be
    left-padded and joined."""
    return all(type(layer) in (DynamicLayer, SlabLayer) for layer in layers)


def plain_cache(model) -> bool:
    """Whether the model's KV cache will be a growing one, known before any forward pass (from its config)."""
    config = getattr(model, "config", None)
    return config is not None and growing(DynamicCache(config=config).layers)
