"""Both scores of an answer candidate from one forward pass over prompt + answer.

External: the mean log-probability of the answer's tokens after the rendered closed-book prompt (the paper's
length-normalised P(a | q), in logs). Internal features: every layer's hidden state at the answer's last token, with
the layer numbering of the activation store (layer L = output of block L; the last after the final norm). The forward
is the activation extraction's (tasks/activations/extraction.py: `layer_capture`), so no second hidden-state reader
exists; the LM head runs on the answer's positions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tasks.activations.extraction import _pad, _pad_id, layer_capture, length_buckets, resolve_layers
from tasks.core.chat import encode
from tasks.core.models import decoder_layers


@dataclass
class CandidateScores:
    """Per sequence: the answer's mean token log-probability and token count, and per layer its features."""

    logprob: np.ndarray  # (n,) float64
    n_tokens: np.ndarray  # (n,) int
    features: dict[int, np.ndarray]  # layer -> (n, d) float32, the answer's last token


def sequence_ids(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each rendered prompt followed by its answer, and the answer's token count.

    The answer is tokenised on its own (no special tokens), as the model would generate it right after the prompt;
    a prompt is tokenised once however many answers follow it.
    """
    prompt_ids = {p: encode(tokenizer, p)["input_ids"] for p in dict.fromkeys(prompts)}
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    empty = [a for a, ids in zip(answers, answer_ids) if not ids]
    if empty:
        raise ValueError(f"answer candidate(s) {empty[:3]} tokenise to no token: nothing to score")
    return [prompt_ids[p] + a for p, a in zip(prompts, answer_ids)], [len(a) for a in answer_ids]


def _check_head(model: nn.Module) -> nn.Module:
    """The LM head, refusing models whose logits are post-processed after it (the answer log-probs would be off)."""
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("insideout: models with final_logit_softcapping (e.g. Gemma 2) are not supported: the LM head"
                         " alone does not give their logits")
    return model.get_output_embeddings()


def _mean_logprobs(head: nn.Module, final: torch.Tensor, spans: list[tuple[int, int]],
                   ids: list[list[int]]) -> list[float]:
    """Mean log-probability of each answer: a span's rows but its last predict the answer's tokens (the last row is
    the answer's last token, which predicts what follows it)."""
    logp = torch.log_softmax(head(final.to(head.weight.dtype)).float(), dim=-1)
    out, start = [], 0
    for (s, e), seq in zip(spans, ids):
        target = torch.tensor(seq[s + 1 : e], device=logp.device)
        out.append(float(logp[start : start + e - s - 1].gather(1, target[:, None]).mean()))
        start += e - s
    return out


def score_candidates(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
) -> CandidateScores:
    """External score and internal features of every (prompt, answer) pair, in input order.

    Sequences are length-bucketed and right-padded with explicit position ids (so each row is computed as if fed
    alone); every block keeps only the rows from the last prompt token to the last answer token.
    """
    n_layers = len(decoder_layers(model))
    layers = resolve_layers(layers, n_layers)
    head, last, device = _check_head(model), n_layers - 1, next(model.parameters()).device
    ids, n_answer = sequence_ids(tokenizer, prompts, answers)
    logprob = np.empty(len(ids))
    features: dict[int, np.ndarray] = {}
    with layer_capture(model, sorted({*layers, last})) as forward:
        for batch in length_buckets([len(x) for x in ids], batch_size):
            spans = [(len(ids[i]) - n_answer[i] - 1, len(ids[i])) for i in batch]
            rows = torch.cat([torch.full((e - s,), r) for r, (s, e) in enumerate(spans)]).to(device)
            cols = torch.cat([torch.arange(s, e) for s, e in spans]).to(device)
            input_ids, mask = _pad([ids[i] for i in batch], _pad_id(tokenizer), "right")
            hidden = forward(input_ids.to(device), mask.to(device), lambda h: h[rows, cols].float())
            ends = torch.tensor(np.cumsum([e - s for s, e in spans]) - 1, device=device)
            for layer in layers:
                vectors = hidden[layer][ends].cpu().numpy()
                features.setdefault(layer, np.empty((len(ids), vectors.shape[1]), dtype=np.float32))[batch] = vectors
            logprob[batch] = _mean_logprobs(head, hidden[last], spans, [ids[i] for i in batch])
    return CandidateScores(logprob, np.asarray(n_answer), features)
