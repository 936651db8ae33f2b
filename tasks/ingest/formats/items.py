"""Building the rows of one record: its item (group, target sentence, context within the token budget), the
seeded sample of records, and the rejects row that keeps a refused record whole.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.rejects import CONTEXT_TOO_LONG, QUESTION_TOO_LONG, RESERVED_MARKER
from schemas.tables import ITEMS
from tasks.core.prompts import CLOSE, OPEN
from tasks.core.splitter import split_sentences
from tasks.core.text import normalize
from tasks.ingest.formats.fields import RecordReject, check_same_answer
from tasks.ingest.formats.known_facts_options import KnownFactsOptions

@dataclass(frozen=True)
class ReadOptions:
    """How a reader samples and budgets: the part of the run config a reader needs."""

    seed: int = 0
    limit: int | None = None
    n_distractors: int = 3
    max_context_tokens: int | None = None
    truncation: str = "reject"
    count_tokens: Callable[[str], int] | None = None
    max_question_tokens: int | None = None  # with count_question: longer questions would crowd the prompt out
    count_question: Callable[[str], int] | None = None
    known_facts: KnownFactsOptions = KnownFactsOptions()  # the offline generator's options

    def __post_init__(self) -> None:
        if self.truncation not in ("reject", "truncate"):
            raise ValueError(f"truncation must be 'reject' or 'truncate', got {self.truncation!r}")


@dataclass
class Parsed:
    """What one valid record yields: an item (partial ITEMS row) and/or probe statements (without split)."""

    item: dict | None = None
    statements: list[dict] = field(default_factory=list)
    source_id: str | None = None
    locate_target: bool = True  # fill target_sentence from the (final) context and answers


def question_group(question: str) -> str:
    """The unit that must not straddle splits for QA formats: the normalised question."""
    return normalize(question) or " ".join(question.casefold().split())


def conflict_item(
    question: str, context: str, answers: list[str], orig: list[str], orig_context: str | None
) -> Parsed:
    """A counterfactual item: the context's answer must differ from the memorised one."""
    check_same_answer(answers, orig)
    item = {
        "group": question_group(question),
        "question": question,
        "context": context,
        "answers": answers,
        "orig_answers": orig,
        "orig_context": orig_context,
        "counterfactual": True,
    }
    return Parsed(item=item)


def content_hash(question: str, context: str, answers: list[str]) -> str:
    """Short id of an id-less record's content (question + context + answers)."""
    blob = json.dumps([question, context, answers], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def sample_positions(n: int, rng: random.Random, opts: ReadOptions) -> tuple[list[int], str]:
    """Record positions to read (all, or `limit` of them sampled with the seed) and the summary note."""
    positions = list(range(n))
    if opts.limit is not None and opts.limit < n:
        positions = sorted(rng.sample(positions, opts.limit))
        return positions, f"limit: {opts.limit} of {n} records sampled with seed {opts.seed}"
    return positions, ""


def _holds(sentence: str, answers: list[str]) -> bool:
    """Whether a sentence contains one of the answers (case-insensitive substring)."""
    return any(a.casefold() in sentence.casefold() for a in answers if a.strip())


def target_sentence(context: str, answers: list[str], orig_context: str | None = None) -> str | None:
    """The context sentence that carries a context answer (case-insensitive), else None.

    With the original context at hand, a sentence that the substitution changed is preferred: an unchanged
    sentence that merely mentions the answer (a distractor) is not the conflicting one.
    """
    holding = [s for s, _, _ in split_sentences(context) if _holds(s, answers)]
    if orig_context:
        unchanged = {s for s, _, _ in split_sentences(orig_context)}
        changed = [s for s in holding if s not in unchanged]
        if changed:
            return changed[0]
    return holding[0] if holding else None


def substitution_labels(context: str, answers: list[str], orig_context: str | None) -> list[dict] | None:
    """sentence_labels a substituted context supports (ConFiQA, NQ-Swap), None without the original context.

    A sentence found verbatim in the original context is the dataset's original text: true, relevance unknown.
    A changed sentence that holds a context answer is the substituted fact: relevant and false. Any other
    changed sentence is left unknown (the data does not say what the change made of it).
    """
    if not orig_context:
        return None
    unchanged = {s for s, _, _ in split_sentences(orig_context)}
    labels = []
    for sent, _, _ in split_sentences(context):
        if sent in unchanged:
            labels.append({"text": sent, "truthful": True, "relevant": None})
        elif _holds(sent, answers):
            labels.append({"text": sent, "truthful": False, "relevant": True})
        else:
            labels.append({"text": sent, "truthful": None, "relevant": None})
    return labels


def _window(context: str, budget: int, count: Callable[[str], int]) -> int:
    """Characters of the context that can hold a fitting prefix: doubled from 4 per budget token until their tokens
    exceed the budget (sentence splitting is superlinear: a 10 MB context must not be split whole)."""
    chars = 4 * budget
    while chars < len(context) and count(context[:chars]) <= budget:
        chars *= 2
    return min(chars, len(context))


def _fitting_prefix(context: str, budget: int, count: Callable[[str], int]) -> str | None:
    """The longest run of leading whole sentences within the budget (binary search), or None."""
    window = _window(context, budget, count)
    ends = [end for _, _, end in split_sentences(context[:window])]
    if window < len(context):
        ends = ends[:-1]  # the window may end inside its last sentence; beyond the window nothing fits
    lo, hi, best = 0, len(ends) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if count(context[: ends[mid]]) <= budget:
            best, lo = ends[mid], mid + 1
        else:
            hi = mid - 1
    return None if best is None else context[:best]


def fit_context(context: str, opts: ReadOptions) -> tuple[str, bool]:
    """(context, truncated) within the token budget, or context_too_long under the reject policy."""
    budget, count = opts.max_context_tokens, opts.count_tokens
    if budget is None or count is None:
        return context, False
    n = count(context)
    if n <= budget:
        return context, False
    if opts.truncation != "truncate":
        raise RecordReject(CONTEXT_TOO_LONG, f"context has {n} tokens, over the budget of {budget}")
    prefix = _fitting_prefix(context, budget, count)
    if prefix is None:
        raise RecordReject(CONTEXT_TOO_LONG, f"not even the first sentence of the context fits {budget} tokens")
    return prefix, True


def check_texts(question: str, context: str, opts: ReadOptions) -> None:
    """Refuse a question over its token budget, and text holding the tags the marking methods add (a context's own
    <conflict> would read as the probe's flag)."""
    for name, text in (("question", question), ("context", context)):
        lowered = text.lower()
        if OPEN in lowered or CLOSE in lowered:
            raise RecordReject(RESERVED_MARKER, f"the {name} holds {OPEN} or {CLOSE}, the tags of the marking methods")
    limit, count = opts.max_question_tokens, opts.count_question
    if limit is not None and count is not None and (n := count(question)) > limit:
        raise RecordReject(QUESTION_TOO_LONG, f"question has {n} tokens, over the {limit} the prompt leaves it")


def item_row(dataset: str, **fields: Any) -> dict:
    """An items row carrying every ITEMS column (absent ones null, truncated False)."""
    row = {name: None for name in ITEMS.names}
    row.update(dataset=dataset, truncated=False)
    unknown = set(fields) - set(row)
    if unknown:
        raise KeyError(f"not ITEMS columns: {sorted(unknown)}")
    row.update(fields)
    return row


def raw_json(value: Any) -> str:
    """A record as JSON text that json.loads gives back exactly (escaped where it holds lone surrogates)."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, default=str)
    return text


def reject_row(source: str, index: int, raw: Any, reason: str, detail: str, record_id: str | None = None) -> dict:
    """A rejects row that keeps the raw record so nothing is lost."""
    return {
        "source": source,
        "record": index,
        "record_id": record_id,
        "reason": reason,
        "detail": detail,
        "raw": raw_json(raw),
    }
