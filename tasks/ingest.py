"""Stage 1, ingest: read a benchmark into the `items`, `statements` and `rejects` tables.

The offline default benchmark, ``known-facts``, is built from real Wikidata facts (data/known_facts.json,
see data/NOTICE.md): each fact becomes a counterfactual QA item whose context states a different object
of the same relation among irrelevant sentences about other subjects of the same split, and two probe
training statements (the true sentence, label 0, and the counterfactual one, label 1).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from schemas.tables import ITEMS, REJECTS, STATEMENTS
from tasks.config import RunConfig
from tasks.splitter import split_sentences
from tasks.storage import RunPaths, text_key, write_parquet

log = logging.getLogger(__name__)

KNOWN_FACTS_PATH = Path(__file__).resolve().parents[1] / "data" / "known_facts.json"
SPLIT_FRACTIONS = (("train", 0.6), ("dev", 0.2), ("test", 0.2))

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


@dataclass
class Ingested:
    """Rows of the three ingest tables plus the counts of the summary line."""

    dataset: str
    items: list[dict] = field(default_factory=list)
    statements: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    n_read: int = 0
    n_kept: int = 0
    note: str = ""

    def summary(self) -> str:
        """One line a human reads after the stage: nothing may vanish between read and kept + rejected."""
        reasons = Counter(r["reason"] for r in self.rejects)
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        line = f"{self.dataset}: {self.n_read} read, {self.n_kept} kept, {len(self.rejects)} rejected ({detail})"
        return f"{line} [{self.note}]" if self.note else line


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
    """A rejects row that keeps the raw record so nothing is lost."""
    record_id = None
    if isinstance(raw, dict) and raw.get("known_id") is not None:
        record_id = f"kf-{raw['known_id']}"
    return {
        "source": source,
        "record": index,
        "record_id": record_id,
        "reason": reason,
        "detail": detail,
        "raw": json.dumps(raw, ensure_ascii=False, default=str),
    }


def _check_record(raw: Any) -> tuple[str, str] | Fact:
    """Validate one raw record: a Fact, or (reason, detail) explaining why it cannot be used."""
    if not isinstance(raw, dict):
        return "not_an_object", f"record is a {type(raw).__name__}, not a JSON object"
    for name in (*_REQUIRED_STR, "known_id"):
        if name not in raw or raw[name] is None:
            return "missing_field", f"field {name!r} is missing"
    for name in _REQUIRED_STR:
        if not isinstance(raw[name], str):
            return "wrong_type", f"field {name!r} is a {type(raw[name]).__name__}, not a string"
        if not raw[name].strip():
            return "empty_field", f"field {name!r} is empty"
    kid = raw["known_id"]
    if isinstance(kid, bool) or not isinstance(kid, (int, str)):
        return "wrong_type", f"field 'known_id' is a {type(kid).__name__}, not an integer or string"
    if isinstance(kid, str) and not kid.strip():
        return "empty_field", "field 'known_id' is empty"
    relation = raw["relation_id"].strip()
    if relation not in RELATION_TEMPLATES:
        return "unknown_relation", f"no question/sentence template for relation {relation!r}"
    subject, obj = raw["subject"].strip(), raw["attribute"].strip()
    for name, value in (("subject", subject), ("attribute", obj)):
        if _FORBIDDEN_CHARS & set(value):
            return "unformable_sentence", f"{name} {value!r} contains a brace or control character"
    sentence = make_sentence(relation, subject, obj)
    # Twice in a row: a subject or object that confuses the splitter at a sentence start or end
    # (e.g. a trailing "S.p.A.") would merge it with its neighbour in a context and lose its label.
    if [s for s, _, _ in split_sentences(f"{sentence} {sentence}")] != [sentence, sentence]:
        return "unformable_sentence", f"sentence {sentence!r} does not split back into itself between neighbours"
    return Fact(record=-1, known_id=str(kid).strip(), subject=subject, obj=obj, relation_id=relation)


def _split_subjects(subjects: list[str], rng: random.Random) -> dict[str, str]:
    """Seeded 60/20/20 subject split; every split gets a subject as soon as there are three."""
    order = sorted(subjects)
    rng.shuffle(order)
    n = len(order)
    n_dev = round(n * SPLIT_FRACTIONS[1][1])
    n_test = round(n * SPLIT_FRACTIONS[2][1])
    if n >= 3:
        n_dev, n_test = max(n_dev, 1), max(n_test, 1)
    n_train = n - n_dev - n_test
    names = ["train"] * n_train + ["dev"] * n_dev + ["test"] * n_test
    return dict(zip(order, names))


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


def build_known_facts(cfg: RunConfig) -> Ingested:
    """Build the counterfactual known-facts benchmark from the bundled (or cfg.data_path) fact file."""
    path = Path(cfg.data_path) if cfg.data_path else KNOWN_FACTS_PATH
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of fact records, got {type(data).__name__}")
    source = path.name
    rng = random.Random(f"known-facts:{cfg.seed}")

    # Counterfactual objects may come from any valid record of the file, sampled or not, so that a
    # quick run (cfg.limit) still finds a counterfactual for every fact the full run would.
    checked = [_check_record(raw) for raw in data]
    pool: dict[str, set[str]] = {}
    for fact in checked:
        if isinstance(fact, Fact):
            pool.setdefault(fact.relation_id, set()).add(fact.obj)

    positions = list(range(len(data)))
    note = ""
    if cfg.limit is not None and cfg.limit < len(data):
        positions = sorted(rng.sample(positions, cfg.limit))
        note = f"limit: {cfg.limit} of {len(data)} records sampled with seed {cfg.seed}"

    out = Ingested(dataset="known-facts", n_read=len(positions), note=note)
    facts: list[Fact] = []
    seen_pair: dict[tuple[str, str], int] = {}
    seen_id: dict[str, int] = {}
    for i in positions:
        raw, fact = data[i], checked[i]
        if not isinstance(fact, Fact):
            out.rejects.append(_reject(source, i, raw, *fact))
            continue
        pair = (fact.subject.casefold(), fact.relation_id)
        if pair in seen_pair:
            detail = f"same (subject, relation_id) as record {seen_pair[pair]}"
            out.rejects.append(_reject(source, i, raw, "duplicate", detail))
            continue
        if fact.known_id in seen_id:
            detail = f"known_id already used by record {seen_id[fact.known_id]}"
            out.rejects.append(_reject(source, i, raw, "duplicate_id", detail))
            continue
        alternatives = sorted(o for o in pool[fact.relation_id] if o.casefold() != fact.obj.casefold())
        if not alternatives:
            detail = f"relation {fact.relation_id} has no object other than {fact.obj!r}"
            out.rejects.append(_reject(source, i, raw, "no_counterfactual", detail))
            continue
        seen_pair[pair] = i
        seen_id[fact.known_id] = i
        facts.append(replace(fact, record=i))
    out.n_kept = len(facts)

    split_of = _split_subjects(sorted({f.subject for f in facts}), rng)
    cf_object: dict[str, str] = {}
    sentences: dict[str, tuple[str, str]] = {}  # known_id -> (true sentence, counterfactual sentence)
    for f in facts:
        alternatives = sorted(o for o in pool[f.relation_id] if o.casefold() != f.obj.casefold())
        cf_object[f.known_id] = rng.choice(alternatives)
        sentences[f.known_id] = (
            make_sentence(f.relation_id, f.subject, f.obj),
            make_sentence(f.relation_id, f.subject, cf_object[f.known_id]),
        )

    by_split: dict[str, list[Fact]] = {}
    unsplittable = 0
    for f in facts:
        by_split.setdefault(split_of[f.subject], []).append(f)
    for f in facts:
        split = split_of[f.subject]
        true_sent, cf_sent = sentences[f.known_id]
        others = [o for o in by_split[split] if o.subject != f.subject]
        context, slot = _build_context(cf_sent, others, sentences, cfg.ingest.n_distractors, rng)
        orig = context[:slot] + [true_sent] + context[slot + 1 :]
        if [t for t, _, _ in split_sentences(" ".join(context))] != context:
            unsplittable += 1
        out.items.append(
            {
                "item_id": f"kf-{f.known_id}",
                "dataset": "known-facts",
                "split": split,
                "group": f.subject,
                "relation_id": f.relation_id,
                "question": make_question(f.relation_id, f.subject),
                "context": " ".join(context),
                "answers": [cf_object[f.known_id]],
                "orig_answers": [f.obj],
                "orig_context": " ".join(orig),
                "target_sentence": cf_sent,
                "counterfactual": True,
            }
        )
        for label, text in ((0, true_sent), (1, cf_sent)):
            out.statements.append(
                {
                    "stmt_id": f"kf-{f.known_id}-{label}",
                    "key": text_key(text),
                    "text": text,
                    "label": label,
                    "group": f.subject,
                    "relation_id": f.relation_id,
                    "split": split,
                }
            )
    if unsplittable:
        log.warning("known-facts: %d contexts do not split back into their sentences", unsplittable)
    return out


# Benchmark name -> builder; other readers (ConFiQA, FaithEval, NQ-Swap, ...) register here.
DATASETS: dict[str, Callable[[RunConfig], Ingested]] = {
    "known-facts": build_known_facts,
}


def ingest(cfg: RunConfig) -> Ingested:
    """Build the rows of the configured benchmark, refusing names no reader handles."""
    builder = DATASETS.get(cfg.dataset)
    if builder is None:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; supported datasets: {', '.join(sorted(DATASETS))}")
    return builder(cfg)


def run_ingest(cfg: RunConfig, paths: RunPaths) -> dict[str, str]:
    """Write items, statements and rejects of the configured benchmark and print the read/kept/rejected line."""
    result = ingest(cfg)
    written = {
        "items": write_parquet(result.items, paths.table("items"), ITEMS),
        "statements": write_parquet(result.statements, paths.table("statements"), STATEMENTS),
        "rejects": write_parquet(result.rejects, paths.table("rejects"), REJECTS),
    }
    print(result.summary(), flush=True)
    return {name: str(p) for name, p in written.items()}
