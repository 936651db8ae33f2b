"""The offline default benchmark, ``known-facts``, built from real Wikidata facts (data/known_facts.json,
see data/NOTICE.md): each fact becomes a counterfactual QA item whose context states a different object
of the same relation among irrelevant sentences about other subjects of the same split, and two probe
training statements (the true sentence, label 0, and the counterfactual one, label 1).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
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
from tasks.ingest.formats.items import ReadOptions, fit_context, item_row, reject_row, sample_positions, split_groups
from tasks.ingest.formats.reader import Ingested, Reader
from tasks.ingest.formats.records import RawRecord, has_surrogates, load_format

log = logging.getLogger(__name__)

NAME = "known-facts"
VERSION = "1"
KNOWN_FACTS_PATH = Path(__file__).resolve().parents[3] / "data" / "known_facts.json"
SOURCE = "bundled data/known_facts.json (ROME's https://rome.baulab.info/data/dsets/known_1000.json, MIT)"

# Per Wikidata relation: (question about the subject, declarative sentence "{s} ... {o}.").
# "{a}" is the indefinite article of the object. Every sentence template differs from every other one
# so that two relations of one subject can never yield the same text with different truth labels.
RELATION_TEMPLATES: dict[str, tuple[str, str]] = {
    "P101": ("What field does {} work in?", "{s} works in the field of {o}."),
    "P103": ("What is the native language of {}?", "The native language of {s} is {o}."),
    "P106": ("What is the profession of {}?", "{s} works as {a} {o}."),
    "P108": ("Who is the employer of {}?", "{s} is employed by {o}."),
    "P127": ("Who owns {}?", "{s} is owned by {o}."),
    "P1303": ("What instrument does {} play?", "{s} plays the {o}."),
    "P131": ("In which administrative region is {} located?", "{s} is located within {o}."),
    "P136": ("What genre is {} associated with?", "The genre of {s} is {o}."),
    "P138": ("What is {} named after?", "{s} is named after {o}."),
    "P140": ("What religion is {} associated with?", "{s} is associated with the religion of {o}."),
    "P1412": ("What language does {} speak?", "{s} speaks {o}."),
    "P159": ("Where is {} headquartered?", "{s} is headquartered in {o}."),
    "P17": ("In which country is {} located?", "{s} is located in the country of {o}."),
    "P176": ("Which company produces {}?", "{s} is produced by {o}."),
    "P178": ("Who developed {}?", "{s} was developed by {o}."),
    "P19": ("Where was {} born?", "{s} was born in {o}."),
    "P20": ("Where did {} die?", "{s} died in {o}."),
    "P27": ("Which country is {} a citizen of?", "{s} is a citizen of {o}."),
    "P276": ("Where is {} located?", "{s} is located in {o}."),
    "P30": ("On which continent is {} located?", "{s} is part of the continent of {o}."),
    "P36": ("What is the capital of {}?", "The capital of {s} is {o}."),
    "P364": ("What is the original language of {}?", "The original language of {s} is {o}."),
    "P37": ("What is the official language of {}?", "The official language of {s} is {o}."),
    "P39": ("What position does {} hold?", "{s} holds the position of {o}."),
    "P407": ("What language is {} written in?", "{s} is written in {o}."),
    "P413": ("What position does {} play?", "{s} plays as {a} {o}."),
    "P449": ("Which network did {} originally air on?", "{s} originally aired on {o}."),
    "P463": ("What organization is {} a member of?", "{s} is a member of {o}."),
    "P495": ("Which country does {} come from?", "{s} comes from {o}."),
    "P641": ("What sport does {} play?", "{s} plays {o} professionally."),
    "P740": ("Where was {} founded?", "{s} was founded in {o}."),
    "P937": ("In which city did {} work?", "{s} worked in the city of {o}."),
}

_REQUIRED_STR = ("subject", "attribute", "relation_id")
_FORBIDDEN_CHARS = set("{}\n\r\t\x00")


@dataclass(frozen=True)
class Fact:
    """One validated known-facts record."""

    record: int
    known_id: str
    subject: str
    obj: str
    relation_id: str


def _article(word: str) -> str:
    """Indefinite article for a common noun ("an actor", "a pitcher")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _sentence_start(text: str) -> str:
    """Capitalise a sentence that opens with a lower-case common noun ("samurai cinema"), not "iPhone"."""
    first = text.split(" ", 1)[0]
    if first[:1].islower() and not any(c.isupper() for c in first):
        return text[0].upper() + text[1:]
    return text


def make_sentence(relation_id: str, subject: str, obj: str) -> str:
    """Declarative sentence stating `subject relation obj` (no doubled period after "S.p.A.")."""
    template = RELATION_TEMPLATES[relation_id][1]
    text = template.format(s=subject, o=obj, a=_article(obj))
    if text.endswith("..") and obj.endswith("."):
        text = text[:-1]
    return _sentence_start(text)


def make_question(relation_id: str, subject: str) -> str:
    """Question asking for the object of `subject relation ?`."""
    return _sentence_start(RELATION_TEMPLATES[relation_id][0].format(subject))


def _reject(source: str, index: int, raw: Any, reason: str, detail: str) -> dict:
    """A rejects row whose record_id is the item id the record would have had."""
    record_id = None
    if isinstance(raw, dict) and raw.get("known_id") is not None:
        record_id = f"kf-{raw['known_id']}"
    return reject_row(source, index, raw, reason, detail, record_id)


def _check_fields(raw: dict) -> tuple[str, str] | None:
    """(reason, detail) when a required field is missing, mistyped or empty, else None."""
    for name in (*_REQUIRED_STR, "known_id"):
        if name not in raw or raw[name] is None:
            return MISSING_FIELD, f"field {name!r} is missing"
    for name in _REQUIRED_STR:
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


def _check_record(rec: RawRecord) -> tuple[str, str] | Fact:
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
    if relation not in RELATION_TEMPLATES:
        return UNKNOWN_RELATION, f"no question/sentence template for relation {relation!r}"
    subject, obj = raw["subject"].strip(), raw["attribute"].strip()
    for name, value in (("subject", subject), ("attribute", obj)):
        if _FORBIDDEN_CHARS & set(value):
            return UNFORMABLE_SENTENCE, f"{name} {value!r} contains a brace or control character"
    sentence = make_sentence(relation, subject, obj)
    # Twice in a row: a subject or object that confuses the splitter at a sentence start or end
    # (e.g. a trailing "S.p.A.") would merge it with its neighbour in a context and lose its label.
    if [s for s, _, _ in split_sentences(f"{sentence} {sentence}")] != [sentence, sentence]:
        return UNFORMABLE_SENTENCE, f"sentence {sentence!r} does not split back into itself between neighbours"
    return Fact(record=-1, known_id=str(raw["known_id"]).strip(), subject=subject, obj=obj, relation_id=relation)


def _build_context(
    cf_sentence: str, others: list[Fact], sentences: dict[str, tuple[str, str]], k: int, rng: random.Random
) -> tuple[list[str], int]:
    """Sentences of one context (distractors about other subjects, true and false) and the target's slot."""
    chosen = rng.sample(others, min(k, len(others)))
    if len(chosen) >= 2:
        n_false = rng.randint(1, len(chosen) - 1)  # "some true and some false"
        flags = [True] * n_false + [False] * (len(chosen) - n_false)
        rng.shuffle(flags)
    else:
        flags = [rng.random() < 0.5 for _ in chosen]
    body = [sentences[f.known_id][1] if false else sentences[f.known_id][0] for f, false in zip(chosen, flags)]
    slot = rng.randint(0, len(body))
    return body[:slot] + [cf_sentence] + body[slot:], slot


def _alternatives(pool: dict[str, set[str]], fact: Fact) -> list[str]:
    """Counterfactual objects of a fact: the relation's other objects, sorted for reproducibility."""
    return sorted(o for o in pool[fact.relation_id] if o.casefold() != fact.obj.casefold())


def _select_facts(
    data: list[RawRecord], checked: list, positions: list[int], pool: dict[str, set[str]], out: Ingested, source: str
) -> list[Fact]:
    """The usable facts among the sampled positions; every other record becomes a reject."""
    facts: list[Fact] = []
    seen_pair: dict[tuple[str, str], int] = {}
    seen_id: dict[str, int] = {}
    for i in positions:
        raw, fact = data[i].value, checked[i]
        if not isinstance(fact, Fact):
            out.rejects.append(_reject(source, i, raw, *fact))
            continue
        pair = (fact.subject.casefold(), fact.relation_id)
        if pair in seen_pair:
            detail = f"same (subject, relation_id) as record {seen_pair[pair]}"
            out.rejects.append(_reject(source, i, raw, DUPLICATE, detail))
            continue
        if fact.known_id in seen_id:
            detail = f"known_id already used by record {seen_id[fact.known_id]}"
            out.rejects.append(_reject(source, i, raw, DUPLICATE_ID, detail))
            continue
        if not _alternatives(pool, fact):
            detail = f"relation {fact.relation_id} has no object other than {fact.obj!r}"
            out.rejects.append(_reject(source, i, raw, NO_COUNTERFACTUAL, detail))
            continue
        seen_pair[pair] = i
        seen_id[fact.known_id] = i
        facts.append(replace(fact, record=i))
    return facts


def _item(f: Fact, split: str, context: list[str], orig: list[str], cf_obj: str, cf_sent: str) -> dict:
    """The items row of one fact."""
    return item_row(
        NAME,
        item_id=f"kf-{f.known_id}",
        split=split,
        group=f.subject,
        relation_id=f.relation_id,
        question=make_question(f.relation_id, f.subject),
        context=" ".join(context),
        answers=[cf_obj],
        orig_answers=[f.obj],
        orig_context=" ".join(orig),
        target_sentence=cf_sent,
        counterfactual=True,
        source_id=f.known_id,
    )


def _statements(f: Fact, split: str, true_sent: str, cf_sent: str) -> list[dict]:
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


def _emit_rows(facts: list[Fact], pool: dict[str, set[str]], k: int, rng: random.Random, out: Ingested) -> None:
    """Split the facts by subject, draw counterfactuals and contexts, and append items and statements."""
    split_of = split_groups(sorted({f.subject for f in facts}), rng)
    cf_object: dict[str, str] = {}
    sentences: dict[str, tuple[str, str]] = {}  # known_id -> (true sentence, counterfactual sentence)
    for f in facts:
        cf_object[f.known_id] = rng.choice(_alternatives(pool, f))
        sentences[f.known_id] = (
            make_sentence(f.relation_id, f.subject, f.obj),
            make_sentence(f.relation_id, f.subject, cf_object[f.known_id]),
        )
    by_split: dict[str, list[Fact]] = {}
    for f in facts:
        by_split.setdefault(split_of[f.subject], []).append(f)
    unsplittable = 0
    for f in facts:
        split = split_of[f.subject]
        true_sent, cf_sent = sentences[f.known_id]
        others = [o for o in by_split[split] if o.subject != f.subject]
        context, slot = _build_context(cf_sent, others, sentences, k, rng)
        orig = context[:slot] + [true_sent] + context[slot + 1 :]
        if [t for t, _, _ in split_sentences(" ".join(context))] != context:
            unsplittable += 1
        out.items.append(_item(f, split, context, orig, cf_object[f.known_id], cf_sent))
        out.statements.extend(_statements(f, split, true_sent, cf_sent))
    if unsplittable:
        log.warning("known-facts: %d contexts do not split back into their sentences", unsplittable)


def _apply_budget(out: Ingested, facts: list[Fact], data: list[RawRecord], opts: ReadOptions, source: str) -> None:
    """Reject or truncate the contexts over the token budget (their probe statements stay)."""
    kept: list[dict] = []
    for item, fact in zip(out.items, facts):
        try:
            context, truncated = fit_context(item["context"], opts)
        except RecordReject as rej:
            out.rejects.append(_reject(source, fact.record, data[fact.record].value, rej.reason, rej.detail))
            continue
        if truncated:
            target = item["target_sentence"]
            item.update(context=context, truncated=True, target_sentence=target if target in context else None)
        kept.append(item)
    out.items = kept
    out.n_kept = len(kept)


def build_known_facts(path: Path | None, opts: ReadOptions) -> Ingested:
    """Build the counterfactual known-facts benchmark from the bundled (or given) fact file."""
    path = Path(path) if path else KNOWN_FACTS_PATH
    data = load_format(path, NAME, _REQUIRED_STR)
    rng = random.Random(f"known-facts:{opts.seed}")

    # Counterfactual objects may come from any valid record of the file, sampled or not, so that a
    # quick run (limit) still finds a counterfactual for every fact the full run would.
    checked = [_check_record(rec) for rec in data]
    pool: dict[str, set[str]] = {}
    for fact in checked:
        if isinstance(fact, Fact):
            pool.setdefault(fact.relation_id, set()).add(fact.obj)

    positions, note = sample_positions(len(data), rng, opts)
    out = Ingested(dataset=NAME, n_read=len(positions), note=note)
    facts = _select_facts(data, checked, positions, pool, out, path.name)
    out.n_kept = len(facts)
    _emit_rows(facts, pool, opts.n_distractors, rng, out)
    _apply_budget(out, facts, data, opts, path.name)
    return out


# Not a plain file reader (it generates contexts across records), so it fills the Reader interface itself.
READERS = [
    Reader(
        name=NAME,
        read=build_known_facts,
        version=VERSION,
        files=lambda path: [Path(path) if path else KNOWN_FACTS_PATH],
        summary="Offline default: real Wikidata facts (804) as counterfactual QA items and probe statements.",
        source=SOURCE,
        needs_path=False,
    )
]
