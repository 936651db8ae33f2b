"""Greedy decoding written out step by step, so a method can choose each token from more than one forward pass
(CAD: two prompts; LFD: two layers of one pass). Used by tasks/evaluate/decoding.py and decoding_lfd.py.

It behaves as `generate` in stage.py does: prompts sorted by length and batched with left padding, positions
counted from each row's first real token, a KV cache per stream, the same stops (EOS, a complete first non-empty
line, max_new_tokens) and the same answer normalisation (text before EOS, first non-empty line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from tasks.core.chat import encode
from tasks.evaluate.stage import FirstLineDone, _cut_at_eos, _eos_ids, first_line

Trace = dict[int, list[torch.Tensor]]  # prompt index -> the scores each of its tokens was chosen from, step by step
Scorer = Callable[[], torch.Tensor]  # -> (rows, vocab) scores of the next token
Advance = Callable[[torch.Tensor], None]  # feeds the (rows,) chosen tokens


class Stream:
    """A batch of prompts fed through the model together, with its KV cache: `logits` predict every row's next token."""

    def __init__(self, model, tokenizer, prompts: Sequence[str]):
        enc = encode(tokenizer, list(prompts), padding=True, return_tensors="pt").to(model.device)
        self.model, self.mask = model, enc["attention_mask"]
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # as if each row were fed alone, whatever its padding
        self._forward(input_ids=enc["input_ids"], position_ids=positions, logits_to_keep=1)

    def _forward(self, **inputs) -> None:
        out = self.model(attention_mask=self.mask, use_cache=True, **inputs)
        self.cache, self.logits = out.cache, out.logits[:, -1].float()

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed each row's chosen token; `logits` then predict the token after it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        self._forward(input_ids=tokens[:, None], position_ids=positions, cache=self.cache)


def greedy_rows(next_scores: Scorer, advance: Advance, tokenizer, eos: set[int], pad_id: int,
                max_new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """(each row's new tokens up to the one that ended it, the scores of every step): the argmax of `next_scores()`
    until every row has ended (EOS or a complete first line) or the budget is spent. An ended row is fed padding
    while the others go on, as in `generate`; it never reaches the row's tokens."""
    line_done = FirstLineDone(tokenizer, 0)
    eos_ids = torch.tensor(sorted(eos))
    generated, steps, done, own = None, [], None, None
    for step in range(max_new_tokens):
        scores = next_scores()
        steps.append(scores)
        tokens = scores.argmax(-1)
        done = torch.zeros_like(tokens, dtype=torch.bool) if done is None else done
        own = (~done).long() if own is None else own + (~done).long()  # tokens each row chose itself
        tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)
        generated = tokens[:, None] if generated is None else torch.cat([generated, tokens[:, None]], dim=1)
        done = done | torch.isin(tokens, eos_ids.to(tokens.device)) | line_done(generated, None)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        advance(tokens)
    return [row[:n].tolist() for row, n in zip(generated, own.tolist())], steps


def decode_batched(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
                   start: Callable[[list[int]], tuple[Scorer, Advance]], trace: Trace | None = None,
                   desc: str = "decode") -> list[str]:
    """Answers in input order; `start(indices)` opens the batch of those prompts and returns its (next_scores,
    advance) pair. `trace`, when given, receives each prompt's per-step scores (what the tests check)."""
    tokenizer.padding_side = "left"
    lengths = [len(encode(tokenizer, p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    out = [""] * len(prompts)
    for begin in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[begin : begin + batch_size]
        rows, steps = greedy_rows(*start(idx), tokenizer, eos, pad_id, max_new_tokens)
        for row, i in enumerate(idx):
            out[i] = first_line(tokenizer.decode(_cut_at_eos(rows[row], eos), skip_special_tokens=True))
            if trace is not None:
                trace[i] = [s[row] for s in steps[: len(rows[row])]]
    return out
