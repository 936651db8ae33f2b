"""Prompt-lookup drafts for greedy decoding (the n-gram form of speculative decoding): answers to a question about a
context mostly copy spans of the prompt, so the tokens that followed the answer's latest n-gram in the prompt are a
good guess at what comes next. A step feeds each row's chosen token together with its draft; the row keeps draft
tokens while each equals the greedy choice after the ones before it, so the answer is the greedy answer, and a
well-guessed row advances several tokens for the price of one step (a decoding step costs about as much for one
token per row as for five: it is bound by reading the weights, not by arithmetic)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the loop imports this module
    from tasks.evaluate.decoding_loop import Decoder, Rows


def draft(seq: Sequence[int], k: int, n_min: int = 2, n_max: int = 3) -> list[int]:
    """The (up to) k tokens that followed the latest earlier occurrence of `seq`'s last n tokens, trying the
    longest n first; [] when no n-gram of at least `n_min` tokens recurs."""
    length = len(seq)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        tail = list(seq[length - n:])
        for start in range(length - n - 1, -1, -1):
            if seq[start] == tail[0] and list(seq[start:start + n]) == tail:
                return list(seq[start + n:start + n + k])
    return []


class PromptLookup:
    """Drafts from each prompt's own tokens and what its row generated so far; `advance` replaces the decoder's
    one-token step for single-stream greedy decoding."""

    def __init__(self, prompt_ids: Sequence[Sequence[int]], k: int, pad_id: int):
        if k < 1:
            raise ValueError(f"prompt lookup needs at least one draft token, got {k}")
        self.prompt_ids, self.k, self.pad_id = prompt_ids, k, pad_id

    def advance(self, decoder: Decoder, live: list[int], tokens: list[int], rows: Rows) -> list[int]:
        """Feed each live row its chosen token and its draft, keep the draft's verified tokens (recorded in `rows`
        with the scores each was chosen from), and return the prompts still answering."""
        drafts = [draft([*self.prompt_ids[i], *rows.tokens[i]], self.k) for i in live]
        width = max(map(len, drafts))
        if width == 0:
            decoder.advance(torch.tensor(tokens))
            return live
        block = torch.tensor([[t, *d, *[self.pad_id] * (width - len(d))] for t, d in zip(tokens, drafts)])
        valid = torch.tensor([[1] * (1 + len(d)) + [0] * (width - len(d)) for d in drafts])
        logits = decoder.feed_block(block, valid)  # [rows, 1 + width, vocab]: what follows each fed token
        greedy = logits.argmax(-1).tolist()
        accepted, going = [], []
        for j, (i, guess) in enumerate(zip(live, drafts)):
            kept, on = 0, True
            while on and kept < len(guess) and greedy[j][kept] == guess[kept]:
                on = rows.add(i, guess[kept], logits[j, kept])
                kept += 1
            accepted.append(kept)
            if on:
                going.append(j)
        decoder.settle(torch.tensor(accepted))
        return [live[j] for j in decoder.drop(going, len(live))]  # none going: the loop ends or opens a fresh decoder
