"""Greedy decoding written out step by step: the evaluate stage's plain greedy answers (`generate`), and the methods
that choose each token from more than one forward pass (CAD: two prompts; LFD: two layers of one pass).

Three things make it faster than a `model.generate` loop at the same batch size (benchmarks/generation.py) without
changing what a row computes:
- prompts are sorted by length and batched with left padding, so little padding is fed;
- the token prefix that every prompt of a call shares (the system prompt, the instruction) is fed once; its KV
  cache seeds each batch's;
- a row leaves the batch once it has ended (EOS or a complete first non-empty line: nothing after it is read), so
  later steps run on the rows still answering.
Positions are counted from each row's first real token, so a row's answer does not depend on its batch. Answers are
normalised the same way everywhere: the text before EOS, its first non-empty line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from tasks.core.chat import encode

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
    Rows are the prompts' suffixes after a shared `Prefix`, left-padded; `keep` drops rows that have ended."""

    def __init__(self, model, prompt_ids: Sequence[Sequence[int]], prefix: Prefix, pad_id: int):
        n = len(prefix.ids)
        if any(list(p[:n]) != prefix.ids for p in prompt_ids):
            raise ValueError("every prompt of a stream must start with its shared prefix")
        suffixes = [list(p[n:]) for p in prompt_ids]
        width = max(map(len, suffixes))
        ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in suffixes], device=model.device)
        own = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=model.device)
        self.model = model
        self.mask = torch.cat([own.new_ones((len(suffixes), n)), own], dim=1)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, n:]  # as if each row were fed alone
        self._forward(input_ids=ids, position_ids=positions, cache=prefix.cache(len(suffixes)), logits_to_keep=1)

    def _forward(self, **inputs) -> None:
        out = self.model(attention_mask=self.mask, use_cache=True, **inputs)
        self.cache, self.logits = out.cache, out.logits[:, -1].float()

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed each row's chosen token; `logits` then predict the token after it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        self._forward(input_ids=tokens[:, None], position_ids=positions, cache=self.cache)

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only (indices into the current rows)."""
        self.cache.batch_select_indices(rows.to(self.mask.device))
        self.mask, self.logits = self.mask[rows], self.logits[rows]

    def decoder(self) -> Decoder:
        """Plain greedy on this stream's logits."""
        return Decoder(lambda: self.logits, self.advance, self.keep)


@dataclass
class Decoder:
    """One batch being decoded: the next-token scores of its live rows, feeding their chosen tokens, dropping rows."""

    scores: Callable[[], torch.Tensor]  # -> (live rows, vocab)
    advance: Callable[[torch.Tensor], None]  # the live rows' chosen tokens
    keep: Callable[[torch.Tensor], None]  # indices of the live rows that go on


def greedy_rows(decoder: Decoder, tokenizer, eos: set[int], max_new_tokens: int, rows: int, keep_scores: bool = False
                ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """(each row's new tokens up to the one that ended it, and when asked the scores each was chosen from): the
    argmax of the decoder's scores until every row has ended (EOS or a complete first line) or the budget is spent."""
    tokens: list[list[int]] = [[] for _ in range(rows)]
    scores_of: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    live = list(range(rows))
    for step in range(max_new_tokens):
        scores = decoder.scores()
        chosen = scores.argmax(-1).tolist()
        going = []
        for j, (row, token) in enumerate(zip(live, chosen)):
            tokens[row].append(token)
            if keep_scores:
                scores_of[row].append(scores[j])
            if token not in eos and not line_complete(tokenizer, tokens[row]):
                going.append(j)
        if not going or step == max_new_tokens - 1:
            break
        if len(going) < len(live):
            decoder.keep(torch.tensor(going))
        live = [live[j] for j in going]
        decoder.advance(torch.tensor([chosen[j] for j in going], device=scores.device))
    return tokens, scores_of


def decode_batched(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
                   start: Callable[[list[int]], Decoder], trace: Trace | None = None, desc: str = "decode") -> list[str]:
    """Answers in input order; `start(indices)` opens the batch of those prompts. `trace`, when given, receives each
    prompt's per-step scores (what the tests check)."""
    tokenizer.padding_side = "left"
    lengths = [len(ids) for ids in token_ids(tokenizer, prompts)]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    eos = eos_ids(model, tokenizer)
    out = [""] * len(prompts)
    for begin in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[begin : begin + batch_size]
        rows, steps = greedy_rows(start(idx), tokenizer, eos, max_new_tokens, len(idx), trace is not None)
        for row, i in enumerate(idx):
            out[i] = first_line(tokenizer.decode(cut_at_eos(rows[row], eos), skip_special_tokens=True))
            if trace is not None:
                trace[i] = steps[row]
    return out


def pad_id(model, tokenizer) -> int:
    """The id fed at padded positions (masked out; any id would do, the tokenizer's own when it has one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids(model, tokenizer)))


def streams(model, tokenizer, prompts: Sequence[str]) -> Callable[[list[int]], Stream]:
    """`open(indices)`: a Stream of those prompts, all seeded from the one prefix the prompts share."""
    ids = token_ids(tokenizer, prompts)
    prefix, pad = Prefix.shared(model, ids), pad_id(model, tokenizer)
    return lambda idx: Stream(model, [ids[i] for i in idx], prefix, pad)


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, desc: str = "generate",
             trace: Trace | None = None) -> list[str]:
    """Greedy answers (first non-empty line) to rendered prompts, in input order."""
    open_stream = streams(model, tokenizer, prompts)
    return decode_batched(model, tokenizer, prompts, batch_size, max_new_tokens,
                          lambda idx: open_stream(idx).decoder(), trace, desc=desc)
