"""The offline default benchmark, ``known-facts``, built from real Wikidata facts (data/known_facts.json,
see data/NOTICE.md). ``--ingest.known-facts-version`` selects the generator: v2 (the default,
tasks/ingest/formats/known_facts_v2.py: paraphrased wordings split between train and test, three distractor
kinds, counterfactual / aligned / irrelevant test conditions) or v1 (here, kept byte for byte so old runs
reproduce: each fact becomes a counterfactual QA item whose context states a different object of the same
relation among irrelevant sentences about other subjects of the same split). Both give every fact two probe
training statements (the true sentence, label 0, and the counterfactual one, label 1); the reader version
differs per generator, so provenance and the ingest cache keep them apart.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from tasks.core.splitter import split_sentences
from tasks.ingest.formats import known_facts_options
from tasks.ingest.formats.items import ReadOptions, item_row, sample_positions
from tasks.ingest.formats.known_facts_common import (
    REQUIRED_STR,
    Fact,
    alternatives,
    apply_budget,
    check_record,
    labels_of,
    object_pool,
    select_facts,
    statements,
)
from tasks.ingest.formats.known_facts_templates import fill_sentence, sentence_start
from tasks.ingest.formats.known_facts_v2 import build_v2
from tasks.ingest.formats.reader import Ingested, Reader
from tasks.ingest.formats.records import load_format
from tasks.ingest.formats.splits import split_groups

log = logging.getLogger(__name__)

NAME = "known-facts"
VERSION = known_facts_options.VERSIONS["2"]  # the default generator's; v1 is "1"
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

def make_sentence(relation_id: str, subject: str, obj: str) -> str:
    """v1's declarative sentence stating `subject relation obj` (no doubled period after "S.p.A.")."""
    return fill_sentence(RELATION_TEMPLATES[relation_id][1], subject, obj)


def make_question(relation_id: str, subject: str) -> str:
    """v1's question asking for the object of `subject relation ?`."""
    return sentence_start(RELATION_TEMPLATES[relation_id][0].format(subject))


def _v1_sentences(relation_id: str, subject: str, obj: str) -> list[str] | None:
    """The one sentence v1 states of a fact (None: a relation without a template)."""
    return [make_sentence(relation_id, subject, obj)] if relation_id in RELATION_TEMPLATES else None


def _build_context(
    cf_sentence: str, others: list[Fact], sentences: dict[str, tuple[str, str]], k: int, rng: random.Random
) -> tuple[list[str], int, list[bool]]:
    """Sentences of one context (distractors about other subjects, true and false), the target's slot and
    whether each sentence is true."""
    chosen = rng.sample(others, min(k, len(others)))
    if len(chosen) >= 2:
        n_false = rng.randint(1, len(chosen) - 1)  # "some true and some false"
        flags = [True] * n_false + [False] * (len(chosen) - n_false)
        rng.shuffle(flags)
    else:
        flags = [rng.random() < 0.5 for _ in chosen]
    body = [sentences[f.known_id][1] if false else sentences[f.known_id][0] for f, false in zip(chosen, flags)]
    truthful = [not false for false in flags]
    slot = rng.randint(0, len(body))
    return body[:slot] + [cf_sentence] + body[slot:], slot, truthful[:slot] + [False] + truthful[slot:]


def _item(f: Fact, split: str, context: list[str], orig: list[str], cf_obj: str, truthful: list[bool]) -> dict:
    """The items row of one fact (its counterfactual sentence is the one relevant sentence)."""
    cf_sent = next(c for c, o in zip(context, orig) if c != o)
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
        condition="counterfactual",
        sentence_labels=labels_of(context, truthful, [c != o for c, o in zip(context, orig)]),
    )


def _emit_rows(facts: list[Fact], pool: dict[str, set[str]], k: int, rng: random.Random, out: Ingested) -> None:
    """Split the facts by subject, draw counterfactuals and contexts, and append items and statements."""
    split_of = split_groups(sorted({f.subject for f in facts}), rng)
    cf_object: dict[str, str] = {}
    sentences: dict[str, tuple[str, str]] = {}  # known_id -> (true sentence, counterfactual sentence)
    for f in facts:
        cf_object[f.known_id] = rng.choice(alternatives(pool, f))
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
        context, slot, truthful = _build_context(cf_sent, others, sentences, k, rng)
        orig = context[:slot] + [true_sent] + context[slot + 1 :]
        if [t for t, _, _ in split_sentences(" ".join(context))] != context:
            unsplittable += 1
        out.items.append(_item(f, split, context, orig, cf_object[f.known_id], truthful))
        out.statements.extend(statements(f, split, true_sent, cf_sent))
    if unsplittable:
        log.warning("known-facts: %d contexts do not split back into their sentences", unsplittable)


def _build_v1(path: Path, opts: ReadOptions) -> Ingested:
    """v1: one template per relation, one counterfactual context per fact among other subjects' sentences."""
    data = load_format(path, NAME, REQUIRED_STR)
    rng = random.Random(f"known-facts:{opts.seed}")
    checked = [check_record(rec, _v1_sentences) for rec in data]
    pool = object_pool(checked)
    positions, note = sample_positions(len(data), rng, opts)
    out = Ingested(dataset=NAME, n_read=len(positions), note=note)
    facts = select_facts(data, checked, positions, pool, out, path.name)
    out.n_kept = len(facts)
    _emit_rows(facts, pool, opts.n_distractors, rng, out)
    apply_budget(out, facts, data, opts, path.name)
    return out


def build_known_facts(path: Path | None, opts: ReadOptions) -> Ingested:
    """Build the known-facts benchmark from the bundled (or given) fact file with the selected generator."""
    path = Path(path) if path else KNOWN_FACTS_PATH
    if opts.known_facts.version == "1":
        return _build_v1(path, opts)
    return build_v2(path, opts, NAME)


# Not a plain file reader (it generates contexts across records), so it fills the Reader interface itself.
READERS = [
    Reader(
        name=NAME,
        read=build_known_facts,
        version=VERSION,
        files=lambda path: [Path(path) if path else KNOWN_FACTS_PATH],
        summary="Offline default: real Wikidata facts (804) as counterfactual / aligned / irrelevant QA items with"
        " paraphrased wordings, and probe statements (v1 with --ingest.known-facts-version 1).",
        source=SOURCE,
        needs_path=False,
        version_of=known_facts_options.loader_version,
    )
]
