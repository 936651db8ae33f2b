"""What both known-facts generators share: validating a record into a Fact, choosing the usable facts, the
probe statements of a fact, the rejects row, and fitting a fact's items to the token budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from schemas.rejects import (
    DUPLICATE,
    DUPLICATE_ID,
    EMPTY_FIELD,
    MISSING_FIELD,
    NO_COUNTERFACTUAL,
    NOT_AN_OBJECT,
    UNDECODABLE,
    UNFORMABLE_SENTENCE,
    UNKNOWN_RELATION,
    WRONG_TYPE,
)
from tasks.core.splitter import split_sentences
from tasks.core.storage import text_key
from tasks.ingest.formats.fields import RecordReject
from tasks.ingest.formats.items import ReadOptions, fit_context, reject_row
from tasks.ingest.formats.reader import Ingested
from tasks.ingest.formats.records import RawRecord, has_surrogates

REQUIRED_STR = ("subject", "attribute", "relation_id")
_FORBIDDEN_CHARS = set("{}\n\r\t\x00")

# The sentences a generator could state of (relation, subject, object); None for a relation it has no wording of.
Renderer = Callable[[str, str, str], "list[str] | None"]


@dataclass(frozen=True)
class Fact:
    """One validated known-facts record."""

    record: int
    known_id: str
    subject: str
    obj: str
    relation_id: str


def reject(source: str, index: int, raw: Any, reason: str, detail: str) -> dict:
    """A rejects row whose record_id is the fact's id ("kf-<known_id>")."""
    record_id = None
    if isinstance(raw, dict) and raw.get("known_id") is not None:
        record_id = f"kf-{raw['known_id']}"
    return reject_row(source, index, raw, reason, detail, record_id)


def _check_fields(raw: dict) -> tuple[str, str] | None:
    """(reason, detail) when a required field is missing, mistyped or empty, else None."""
    for name in (*REQUIRED_STR, "known_id"):
        if name not in raw or raw[name] is None:
            return MISSING_FIELD, f"field {name!r} is missing"
    for name in REQUIRED_STR:
        if not isinstance(raw[name], str):
            return WRONG_TYPE, f"field {name!r} is a {type(raw[name]).__name__}, not a string"
        if not raw[name].strip():
            return EMPTY_FIELD, f"field {name!r} is empty"
    kid = raw["known_id"]
    if isinstance(kid, bool) or not isinstance(kid, (int, str)):
        return WRONG_TYPE, f"field 'known_id' is a {type(kid).__name__}, not an integer or string"
    if isinstance(kid, str) and not kid.strip():
        return EMPTY_FIELD, "field 'known_id' is empty"
    return None


def check_record(rec: RawRecord, render: Renderer) -> tuple[str, str] | Fact:
    """Validate one raw record: a Fact, or (reason, detail) explaining why it cannot be used."""
    raw = rec.value
    if rec.reject:
        return rec.reject
    if not isinstance(raw, dict):
        return NOT_AN_OBJECT, f"record is a {type(raw).__name__}, not a JSON object"
    if has_surrogates(raw):
        return UNDECODABLE, "a string of the record holds bytes that are not valid UTF-8"
    problem = _check_fields(raw)
    if problem:
        return problem
    relation = raw["relation_id"].strip()
    if render(relation, "s", "o") is None:
        return UNKNOWN_RELATION, f"no question/sentence template for relation {relation!r}"
    subject, obj = raw["subject"].strip(), raw["attribute"].strip()
    for name, value in (("subject", subject), ("attribute", obj)):
        if _FORBIDDEN_CHARS & set(value):
            return UNFORMABLE_SENTENCE, f"{name} {value!r} contains a brace or control character"
    # Twice in a row: a subject or object that confuses the splitter at a sentence start or end
    # (e.g. a trailing "S.p.A.") would merge it with its neighbour in a context and lose its label.
    for sentence in render(relation, subject, obj) or []:
        if [s for s, _, _ in split_sentences(f"{sentence} {sentence}")] != [sentence, sentence]:
            return UNFORMABLE_SENTENCE, f"sentence {sentence!r} does not split back into itself between neighbours"
    return Fact(record=-1, known_id=str(raw["known_id"]).strip(), subject=subject, obj=obj, relation_id=relation)


def alternatives(pool: dict[str, set[str]], fact: Fact) -> list[str]:
    """Counterfactual objects of a fact: the relation's other objects, sorted for reproducibility."""
    return sorted(o for o in pool[fact.relation_id] if o.casefold() != fact.obj.casefold())


def object_pool(checked: list) -> dict[str, set[str]]:
    """Objects per relation of every valid record, sampled or not, so that a quick run (limit) still finds a
    counterfactual for every fact the full run would."""
    pool: dict[str, set[str]] = {}
    for fact in checked:
        if isinstance(fact, Fact):
            pool.setdefault(fact.relation_id, set()).add(fact.obj)
    return pool


def select_facts(
    data: list[RawRecord], checked: list, positions: list[int], pool: dict[str, set[str]], out: Ingested, source: str
) -> list[Fact]:
    """The usable facts among the given positions; every other record becomes a reject (when `out` is given)."""
    facts: list[Fact] = []
    seen_pair: dict[tuple[str, str], int] = {}
    seen_id: dict[str, int] = {}
    for i in positions:
        raw, fact = data[i].value, checked[i]
        problem = None
        pair = (fact.subject.casefold(), fact.relation_id) if isinstance(fact, Fact) else None
        if not isinstance(fact, Fact):
            problem = fact
        elif pair in seen_pair:
            problem = DUPLICATE, f"same (subject, relation_id) as record {seen_pair[pair]}"
        elif fact.known_id in seen_id:
            problem = DUPLICATE_ID, f"known_id already used by record {seen_id[fact.known_id]}"
        elif not alternatives(pool, fact):
            problem = NO_COUNTERFACTUAL, f"relation {fact.relation_id} has no object other than {fact.obj!r}"
        if problem:
            out.rejects.append(reject(source, i, raw, *problem))
            continue
        seen_pair[pair] = i
        seen_id[fact.known_id] = i
        facts.append(replace(fact, record=i))
    return facts


def statements(f: Fact, split: str, true_sent: str, cf_sent: str) -> list[dict]:
    """The two probe statements of one fact: true (label 0) and counterfactual (label 1)."""
    return [
        {
            "stmt_id": f"kf-{f.known_id}-{label}",
            "key": text_key(text),
            "text": text,
            "label": label,
            "group": f.subject,
            "relation_id": f.relation_id,
            "split": split,
        }
        for label, text in ((0, true_sent), (1, cf_sent))
    ]


def labels_of(sentences: list[str], truthful: list[bool], relevant: list[bool]) -> list[dict]:
    """items.sentence_labels: what the generator knows of each sentence it put in a context, in order."""
    return [{"text": t, "truthful": tr, "relevant": rel} for t, tr, rel in zip(sentences, truthful, relevant)]


def _kept_labels(labels: list[dict] | None, context: str) -> list[dict] | None:
    """The labels of the whole sentences a truncated context keeps (it keeps a prefix of them)."""
    if labels is None:
        return None
    n = 0
    while n < len(labels) and len(" ".join(lab["text"] for lab in labels[: n + 1])) <= len(context):
        n += 1
    return labels[:n]


def _fit_item(item: dict, opts: ReadOptions) -> dict:
    """The item within the token budget (RecordReject under the reject policy)."""
    context, truncated = fit_context(item["context"], opts)
    if not truncated:
        return item
    target = item["target_sentence"]
    return {**item, "context": context, "truncated": True, "target_sentence": target if target and target in context else None,
            "sentence_labels": _kept_labels(item["sentence_labels"], context)}


def apply_budget(out: Ingested, facts: list[Fact], data: list[RawRecord], opts: ReadOptions, source: str) -> None:
    """Reject the facts with an item over the token budget (their probe statements stay), or truncate them."""
    by_id = {f.known_id: f for f in facts}
    fitted: dict[str, list[dict]] = {}
    for item in out.items:
        fitted.setdefault(item["source_id"], []).append(item)
    kept: list[dict] = []
    n_rejected = 0
    for kid, items in fitted.items():
        try:
            kept += [_fit_item(item, opts) for item in items]
        except RecordReject as rej:
            fact = by_id[kid]
            out.rejects.append(reject(source, fact.record, data[fact.record].value, rej.reason, rej.detail))
            n_rejected += 1
    out.items = kept
    out.n_kept = len(facts) - n_rejected
