"""Greedy decoding written out step by step: the evaluate stage's plain greedy answers (`generate`), and the methods
that choose each token from more than one forward pass (CAD: two prompts; LFD: two layers of one pass).

Three things make it faster than a `model.generate` loop at the same batch size (benchmarks/generation.py) without
changing what a row computes:
- prompts are sorted by length, batched with left padding, and a batch's prompts are fed in groups of similar
  length (their caches then joined), so little padding is fed;
- the token prefix that every prompt of a call shares (the system prompt, the instruction) is fed once; its KV
  cache seeds each batch's;
- a row leaves the batch once it has ended (EOS or a complete first non-empty line: nothing after it is read), and
  once a quarter of the batch has left, the next prompts join the rows still answering (their caches left-padded to
  one length), so steps run near-full batches: on SmolLM2 on 2 cores a step costs 103 ms for 16 rows, 113 ms for 32;
- the KV cache is written in place (`SlabLayer`): a step writes into spare room, a row that leaves is replaced by
  the last row rather than closing the gap, and positions that only departed rows used are dropped, so the cache
  stays as wide as its longest live row (without that, joins widened it by a third over a 159-prompt call).
Positions are counted from each row's first real token, so a row's answer does not depend on its batch. Answers are
normalised the same way everywhere: the text before EOS, its first non-empty line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tasks.core.progress import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tasks.core.chat import encode
from tasks.evaluate.kv_cache import SlabLayer, growing, joined, keep_rows, plain_cache
from tasks.evaluate.prompt_lookup import PromptLookup

Trace = dict[int, list[torch.Tensor]]  # prompt index -> the scores each of its tokens was chosen from, step by step


def first_line(text: str) -> str:
    """The answer is the first non-empty line: models often add an explanation after it."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def line_complete(tokenizer, tokens: Sequence[int]) -> bool:
    """Whether generated tokens already hold a complete non-empty line (the answer cannot change after it)."""
    return "\n" in tokenizer.decode(list(tokens), skip_special_tokens=True).lstrip()


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends an answer (the tokenizer's EOS and the generation config's, which may be a list)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}


def cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """Tokens before the first EOS: whatever a row generates after it is not the answer."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each rendered prompt's token ids, as the model is fed them."""
    return [list(encode(tokenizer, p)["input_ids"]) for p in prompts]


class Prefix:
    """Token ids every prompt of a call starts with, fed through the model once; `cache(rows)` is a KV cache holding
    them for a batch, so a batch feeds only what differs. Empty when nothing is shared or the model's cache is not a
    `DynamicCache` (then every batch feeds its whole prompts)."""

    def __init__(self, model, ids: Sequence[int]):
        self.ids, self._kv = list(ids), []
        if self.ids:
            out = model(input_ids=torch.tensor([self.ids], device=model.device), use_cache=True, logits_to_keep=1)
            if isinstance(out.cache, DynamicCache):
                self._kv = [(layer.keys, layer.values) for layer in out.cache.layers]
            else:
                self.ids = []
        self._config = getattr(model, "config", None)

    @classmethod
    def shared(cls, model, prompt_ids: Sequence[Sequence[int]]) -> Prefix:
        """The longest prefix all prompts share, leaving each at least one token of its own to predict from."""
        if not prompt_ids:
            return cls(model, [])
        first, limit = prompt_ids[0], min(len(p) for p in prompt_ids) - 1
        n = 0
        while n < limit and all(p[n] == first[n] for p in prompt_ids):
            n += 1
        return cls(model, first[:n])

    def cache(self, rows: int) -> DynamicCache | None:
        """A fresh cache holding the prefix for `rows` rows (feeding a batch appends to it, never to the prefix)."""
        if not self.ids:
            return None
        data = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self._kv]
        return DynamicCache(ddp_cache_data=data, config=self._config)


class Stream:
    """A batch of prompts fed through the model together, with its KV cache: `logits` predict every row's next token.
    Rows are the prompts' suffixes after a shared `Prefix`, left-padded. `capture`, when given, is read after every
    forward pass and kept per row as `extra` (LFD: an intermediate layer's last hidden state)."""

    def __init__(self, model, prompt_ids: Sequence[Sequence[int]], prefix: Prefix, pad_id: int,
                 capture: Callable[[], torch.Tensor] | None = None):
        n = len(prefix.ids)
        if any(list(p[:n]) != prefix.ids for p in prompt_ids):
            raise ValueError("every prompt of a stream must start with its shared prefix")
        suffixes = [list(p[n:]) for p in prompt_ids]
        width = max(map(len, suffixes))
        ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in suffixes], device=model.device)
        own = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=model.device)
        self.model, self.capture = model, capture
        self.mask = torch.cat([own.new_ones((len(suffixes), n)), own], dim=1)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, n:]  # as if each row were fed alone
        self._forward(input_ids=ids, position_ids=positions, cache=prefix.cache(len(suffixes)))

    def _forward(self, logits_to_keep: int = 1, **inputs) -> None:
        out = self.model(attention_mask=self.mask, use_cache=True, logits_to_keep=logits_to_keep, **inputs)
        self.cache, self.block = out.cache, out.logits.float()
        self.logits = self.block[:, -1]
        self.extra = self.capture() if self.capture else None
        if type(self.cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in self.cache.layers):
            self.cache.layers = [SlabLayer(layer.keys, layer.values) for layer in self.cache.layers]

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed each row's chosen token; `logits` then predict the token after it."""
        self._feed(tokens[:, None], torch.ones_like(tokens[:, None]))

    def feed_block(self, block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Feed each row several tokens at once (`valid` marks the real ones; the others are masked out) and return
        the scores after each [rows, tokens, vocab]; `settle` then says how many of them each row keeps."""
        if self.capture is not None:
            raise ValueError("a stream that captures a hidden state per step cannot take several tokens at once")
        self._feed(block, valid)
        return self.block

    def _feed(self, block: torch.Tensor, valid: torch.Tensor) -> None:
        """Append columns to every row (`valid` 0 = masked out), each at the position after its row's last real
        token, with the scores after each column kept."""
        start = self.mask.shape[1]
        self.mask = torch.cat([self.mask, valid.to(self.mask)], dim=1)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, start:]  # masked-out columns never count
        self._forward(input_ids=block.to(self.mask.device), position_ids=positions, cache=self.cache,
                      logits_to_keep=block.shape[1])

    def settle(self, kept: torch.Tensor) -> None:
        """After `feed_block`: row r keeps its first `kept[r] + 1` tokens; the rest stay in the cache masked out
        (holes no later token attends to), and `logits` predict the token after the last one kept."""
        width = self.block.shape[1]
        kept = kept.to(self.mask.device)
        self.mask[:, -width:] *= (torch.arange(width, device=self.mask.device)[None, :] <= kept[:, None]).to(self.mask)
        self.logits = self.block[torch.arange(self.block.shape[0], device=kept.device), kept]

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only (indices into the current rows); positions that no row kept still uses (the
        padding of rows that left) are dropped with them."""
        rows = rows.to(self.mask.device)
        self.mask, self.logits = self.mask[rows], self.logits[rows]
        self.extra = None if self.extra is None else self.extra[rows]
        if self.mergeable:
            start = self.unused()
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                keep_rows(layer, rows, start)
        else:
            self.cache.batch_select_indices(rows)

    def unused(self) -> int:
        """Leading positions masked out in every row (padding only: dropping them changes no position or score)."""
        return int(self.mask.any(0).int().argmax())

    @property
    def mergeable(self) -> bool:
        """Plain growing caches only: a sliding-window or other cache keeps state that left padding would break."""
        return growing(self.cache.layers)

    def merge(self, *others: Stream) -> None:
        """Append other streams' rows after this one's, in order: leading positions no row uses dropped, masks and
        caches left-padded to one length and concatenated once (padding is masked out, positions come from each
        row's own mask, so no row's next scores change)."""
        group = [self, *others]
        starts = [s.unused() for s in group]
        width = max(s.mask.shape[1] - start for s, start in zip(group, starts))
        self.mask = torch.cat([_left_pad(s.mask[:, start:], width) for s, start in zip(group, starts)])
        for layers in zip(*(s.cache.layers for s in group), strict=True):
            room = SlabLayer.ROOM if type(layers[0]) is SlabLayer else 0
            keys = joined([layer.keys[..., start:, :] for layer, start in zip(layers, starts)], width, room)
            values = joined([layer.values[..., start:, :] for layer, start in zip(layers, starts)], width, room)
            if room:
                layers[0].adopt(keys, values, width)
            else:
                layers[0].keys, layers[0].values = keys, values
        self.logits = torch.cat([s.logits for s in group])
        self.extra = None if self.extra is None else torch.cat([s.extra for s in group])


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros (masked-out positions) before a mask's columns up to `width`."""
    return F.pad(mask, (width - mask.shape[1], 0))


@dataclass
class Decoder:
    """A group of rows being decoded: streams fed the same tokens in lock-step (CAD: with and without context) and
    the rule that turns their state into next-token scores."""

    streams: list[Stream]
    score: Callable[[list[Stream]], torch.Tensor]  # -> (live rows, vocab)

    def scores(self) -> torch.Tensor:
        return self.score(self.streams)

    def advance(self, tokens: torch.Tensor) -> None:
        for s in self.streams:
            s.advance(tokens)

    def keep(self, rows: torch.Tensor) -> None:
        for s in self.streams:
            s.keep(rows)

    def drop(self, going: list[int], rows: int) -> list[int]:
        """Go on with the rows in `going` (increasing indices of the current `rows`); returns their old indices in
        their new order: rows stay in place and the last ones fill the places of those that left, so the cache moves
        as many rows as left, not every row after the first to leave."""
        tail = iter(j for j in going if j >= len(going))
        staying = set(going)
        order = [j if j in staying else next(tail) for j in range(len(going))]
        if order and len(order) < rows:
            self.keep(torch.tensor(order))
        return order

    def feed_block(self, block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Several tokens per row at once (prompt-lookup drafts): single-stream greedy decoders only."""
        if len(self.streams) != 1 or self.score is not plain_scores:
            raise ValueError("drafted tokens are verified against greedy choices on one stream's logits")
        return self.streams[0].feed_block(block, valid)

    def settle(self, kept: torch.Tensor) -> None:
        self.streams[0].settle(kept)

    @property
    def mergeable(self) -> bool:
        return all(s.mergeable for s in self.streams)

    def merge(self, other: Decoder) -> None:
        for mine, theirs in zip(self.streams, other.streams, strict=True):
            mine.merge(theirs)


def plain_scores(streams: list[Stream]) -> torch.Tensor:
    """Greedy on the one stream's logits."""
    return streams[0].logits


class Rows:
    """Every prompt's generated tokens (and, when traced, the scores each was chosen from), and when a row ends."""

    def __init__(self, n: int, tokenizer, eos: set[int], max_new_tokens: int, keep_scores: bool):
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.scores: list[list[torch.Tensor]] | None = [[] for _ in range(n)] if keep_scores else None
        self._tokenizer, self._eos, self._budget = tokenizer, eos, max_new_tokens

    def add(self, i: int, token: int, scores: torch.Tensor) -> bool:
        """Record prompt i's next token; whether it goes on (no EOS, no complete first line, budget left)."""
        self.tokens[i].append(token)
        if self.scores is not None:
            self.scores[i].append(scores)
        return (token not in self._eos and len(self.tokens[i]) < self._budget
                and not line_complete(self._tokenizer, self.tokens[i]))


def decode_batched(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
                   start: Callable[[list[int]], Decoder], trace: Trace | None = None, desc: str = "decode",
                   draft_tokens: int = 0) -> list[str]:
    """Answers in input order: greedy on the decoder's scores, at most `batch_size` rows at a time, shortest prompts
    first; `start(indices)` opens a decoder on those prompts. `trace`, when given, receives each prompt's per-step
    scores (what the tests check). `draft_tokens` > 0 (plain greedy decoders only) feeds each step that many tokens
    guessed from the prompt as well, kept where greedy decoding agrees (tasks/evaluate/prompt_lookup.py)."""
    tokenizer.padding_side = "left"
    all_ids = token_ids(tokenizer, prompts)
    lengths = [len(ids) for ids in all_ids]
    lookup = PromptLookup(all_ids, draft_tokens, pad_id(model, tokenizer)) if draft_tokens else None
    queue = deque(sorted(range(len(prompts)), key=lambda i: lengths[i]))
    eos = eos_ids(model, tokenizer)
    rows = Rows(len(prompts), tokenizer, eos, max_new_tokens, trace is not None)
    live: list[int] = []
    decoder: Decoder | None = None
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        while queue or live:
            if queue and batch_size - len(live) >= max(1, batch_size // 4) and (not live or decoder.mergeable):
                joining = [queue.popleft() for _ in range(min(batch_size - len(live), len(queue)))]
                new = start(joining)
                if live:
                    decoder.merge(new)
                else:
                    decoder = new
                live += joining
            scores = decoder.scores()
            chosen = scores.argmax(-1).tolist()
            going = [j for j, (i, token) in enumerate(zip(live, chosen)) if rows.add(i, token, scores[j])]
            before = len(live)
            order = decoder.drop(going, len(live))
            live = [live[j] for j in order]
            if live and lookup is not None:
                live = lookup.advance(decoder, live, [chosen[j] for j in order], rows)
            elif live:
                decoder.advance(torch.tensor([chosen[j] for j in order], device=scores.device))
            bar.update(before - len(live))
    if trace is not None:
        trace.update(enumerate(rows.scores))
    return [first_line(tokenizer.decode(cut_at_eos(t, eos), skip_special_tokens=True)) for t in rows.tokens]


def pad_id(model, tokenizer) -> int:
    """The id fed at padded positions (masked out; any id would do, the tokenizer's own when it has one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids(model, tokenizer)))


def streams(model, tokenizer, prompts: Sequence[str], capture: Callable[[], torch.Tensor] | None = None
            ) -> Callable[[list[int]], Stream]:
    """`open(indices)`: a Stream of those prompts in that order, all seeded from the one prefix the prompts share;
    fed in groups of similar length (then joined) where the model's cache allows, so little padding is fed."""
    ids = token_ids(tokenizer, prompts)
    prefix, pad = Prefix.shared(model, ids), pad_id(model, tokenizer)
    grouped = plain_cache(model)

    def open_stream(idx: list[int]) -> Stream:
        groups = length_groups([len(ids[i]) for i in idx]) if grouped else [list(range(len(idx)))]
        parts = [Stream(model, [ids[idx[j]] for j in g], prefix, pad, capture) for g in groups]
        if len(parts) > 1:
            parts[0].merge(*parts[1:])
        return parts[0]
    return open_stream


def length_groups(lengths: Sequence[int], slack: float = 0.05, least: int = 4) -> list[list[int]]:
    """Consecutive positions, grouped so that left-padding a group to its longest feeds at most `slack` padding
    (a group of fewer than `least` rows may feed more): a padded position costs a forward pass as much as a real one,
    and rows of one length-sorted batch still differ by ~10%."""
    groups: list[list[int]] = []
    for i, n in enumerate(lengths):
        group = groups[-1] if groups else []
        fed = max(n, *(lengths[j] for j in group)) * (len(group) + 1) if group else n
        if not group or (len(group) >= least and fed - n - sum(lengths[j] for j in group) > slack * fed):
            groups.append([i])
        else:
            group.append(i)
    return groups


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, desc: str = "generate",
             trace: Trace | None = None, draft_tokens: int = 0) -> list[str]:
    """Greedy answers (first non-empty line) to rendered prompts, in input order (`draft_tokens`: prompt-lookup
    drafts per step, the same answers in fewer steps)."""
    open_stream = streams(model, tokenizer, prompts)
    return decode_batched(model, tokenizer, prompts, batch_size, max_new_tokens,
                          lambda idx: Decoder([open_stream(idx)], plain_scores), trace, desc=desc,
                          draft_tokens=draft_tokens)
