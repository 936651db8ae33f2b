"""known-facts v2, the offline default: a benchmark where the context must be read and where only the
question's subject AND relation together pick the answer sentence.

- Wordings: every relation has three question and three sentence paraphrases (known_facts_templates.py). A
  seeded split per relation gives one question and one sentence wording to the test split and the other two
  to train; dev shares train's (it selects probe layers on statements, not wordings). Each fact gets one
  sentence wording of its split, used for every sentence stating it (true or counterfactual) in any context
  and for its two probe statements, so every context sentence is a statement with one truth label. Test
  items thus use question and sentence wordings that no train (fine-tuning) item uses.
- Contexts: the relevant sentence (subject + relation) among distractors of the same split, in a seeded
  order: ``same_relation_distractors`` sentences of the question's relation about other subjects (some true,
  some counterfactual), ``same_subject_distractors`` sentences of another relation about the same subject
  (true or counterfactual; the bundled file has a second fact for only 9 subjects, so most contexts have
  none), and ``unrelated_distractors`` sentences about other subjects and relations. A split with fewer
  candidates gives what it has; a value no context of a split could meet is one ValueError naming the option
  (checked on every valid record of the file, sampled or not, so a quick run with --limit is never refused).
- Conditions (KAFT's): ``counterfactual`` (the relevant sentence states a substituted object; answers = it),
  ``aligned`` (it states the true object) and ``irrelevant`` (no sentence about subject + relation, one more
  unrelated sentence instead so the length does not give it away; answers = the true object, memory). Train
  and dev items are counterfactual only (what CLEAR fine-tunes on, as in v1); ``all_train_conditions`` also builds
  every train fact aligned and irrelevant (what the kaft arm trains on), drawn after every other item so those
  stay the same. Item ids: kf-<id>-<condition>.
- Budget: ``make run`` evaluates every test item with every method (~1.5 s per item and generated method on
  two cores), so ``test_conditions_per_fact`` (default 1) builds each test fact in one condition, rotated over
  the seeded order of the test facts: the three conditions get equal thirds and the test set keeps v1's size
  (~164 items) instead of tripling it. 3 builds every condition of every fact (paired comparisons).
- ``holdout_relations``: relations whose train facts give no train items and no sentences in train contexts
  (their probe statements stay), to measure transfer to relations fine-tuning never saw.
- Subjects are split over every valid record of the file (sampled or not), so a quick run's test facts are
  test facts of the full run too.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from schemas.tables import CONDITIONS
from tasks.core.splitter import split_sentences
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
from tasks.ingest.formats.known_facts_options import KnownFactsOptions
from tasks.ingest.formats.known_facts_templates import (
    PARAPHRASES,
    Q,
    S,
    render_question,
    render_sentence,
    template_ids,
)
from tasks.ingest.formats.reader import Ingested
from tasks.ingest.formats.records import RawRecord, load_format
from tasks.ingest.formats.splits import split_groups

log = logging.getLogger(__name__)

COUNTERFACTUAL, ALIGNED, IRRELEVANT = CONDITIONS


@dataclass(frozen=True)
class Stated:
    """A fact as the generator states it: its split, wordings and counterfactual object."""

    fact: Fact
    split: str
    question_template: str
    sentence_template: str
    cf_obj: str

    @property
    def true_sentence(self) -> str:
        return render_sentence(self.sentence_template, self.fact.subject, self.fact.obj)

    @property
    def cf_sentence(self) -> str:
        return render_sentence(self.sentence_template, self.fact.subject, self.cf_obj)


def v2_sentences(relation_id: str, subject: str, obj: str) -> list[str] | None:
    """Every sentence wording of a fact (None: a relation without a paraphrase set)."""
    if relation_id not in PARAPHRASES:
        return None
    return [render_sentence(t, subject, obj) for t in template_ids(relation_id, S)]


def template_split(relations: list[str], rng: random.Random) -> dict[tuple[str, str, str], list[str]]:
    """(split, relation, kind) -> template ids: one wording of each kind is the test split's alone."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for rel in sorted(relations):
        for kind in (Q, S):
            ids = template_ids(rel, kind)
            rng.shuffle(ids)
            out["test", rel, kind], out["train", rel, kind], out["dev", rel, kind] = ids[:1], ids[1:], ids[1:]
    return out


def _check_holdout(kf: KnownFactsOptions, facts: list[Fact], split_of: dict[str, str]) -> None:
    """Held-out relations must exist and leave training items."""
    unknown = [r for r in kf.holdout_relations if r not in PARAPHRASES]
    if unknown:
        raise ValueError(f"ingest.holdout_relations={list(kf.holdout_relations)}: {unknown} are not relations"
                         f" of the paraphrase table ({', '.join(sorted(PARAPHRASES))})")
    if kf.holdout_relations and all(
        f.relation_id in kf.holdout_relations for f in facts if split_of[f.subject] == "train"
    ):
        raise ValueError(f"ingest.holdout_relations={list(kf.holdout_relations)} holds out every relation of the"
                         " train split: no fine-tuning item would be left")


def check_options(kf: KnownFactsOptions, facts: list[Fact], split_of: dict[str, str], source: str) -> None:
    """One ValueError naming the option whose value no context of a split (or of the file) could meet."""
    _check_holdout(kf, facts, split_of)
    for split in sorted(set(split_of.values())):
        in_split = [f for f in facts if split_of[f.subject] == split]
        per_rel = Counter(f.relation_id for f in in_split)
        rel, most = per_rel.most_common(1)[0]
        if kf.same_relation > most - 1:
            raise ValueError(f"ingest.same_relation_distractors={kf.same_relation} cannot be met: the {split} split"
                             f" of {source} has at most {most - 1} other subjects sharing a relation ({rel});"
                             f" use at most {most - 1}")
        room = len(in_split) - min(per_rel.values())  # other-relation facts of the split's smallest relation
        if kf.unrelated > room:
            raise ValueError(f"ingest.unrelated_distractors={kf.unrelated} cannot be met: the {split} split of"
                             f" {source} has {len(in_split)} facts; use at most {room}")
    per_subject = Counter(f.subject for f in facts).most_common(1)
    most_facts = per_subject[0][1] if per_subject else 0
    if kf.same_subject > most_facts - 1:
        raise ValueError(f"ingest.same_subject_distractors={kf.same_subject} cannot be met: no subject of {source}"
                         f" has more than {most_facts - 1} other facts; use at most {most_facts - 1}")


def _truth_flags(n: int, rng: random.Random) -> list[bool]:
    """Whether each of n distractors is true: some true and some counterfactual when there are two or more."""
    if n < 2:
        return [rng.random() < 0.5 for _ in range(n)]
    n_true = rng.randint(1, n - 1)
    flags = [True] * n_true + [False] * (n - n_true)
    rng.shuffle(flags)
    return flags


class Contexts:
    """Draws the sentences of v2 contexts from the stated facts of each split."""

    def __init__(self, stated: list[Stated], kf: KnownFactsOptions, rng: random.Random):
        self.kf, self.rng = kf, rng
        held = set(kf.holdout_relations)
        self.pool: dict[str, list[Stated]] = {}
        for s in stated:
            if not (s.split == "train" and s.fact.relation_id in held):
                self.pool.setdefault(s.split, []).append(s)
        self.short: Counter = Counter()  # contexts with fewer distractors of a kind than asked

    def _draw(self, kind: str, candidates: list[Stated], k: int) -> list[tuple[Stated, bool]]:
        """k candidates (fewer when there are fewer, counted) with mixed truth."""
        if len(candidates) < k:
            self.short[kind] += 1
        chosen = self.rng.sample(candidates, min(k, len(candidates)))
        return list(zip(chosen, _truth_flags(len(chosen), self.rng)))

    def distractors(self, s: Stated, condition: str) -> list[tuple[Stated, bool]]:
        """The distractors of one context: same relation, same subject, unrelated."""
        pool, f = self.pool.get(s.split, []), s.fact
        same_rel = [o for o in pool if o.fact.relation_id == f.relation_id and o.fact.subject != f.subject]
        same_subj = [o for o in pool if o.fact.subject == f.subject and o.fact.relation_id != f.relation_id]
        unrelated = [o for o in pool if o.fact.subject != f.subject and o.fact.relation_id != f.relation_id]
        n_unrelated = self.kf.unrelated + (condition == IRRELEVANT)
        return (self._draw("same_relation", same_rel, self.kf.same_relation)
                + (self._draw("same_subject", same_subj, self.kf.same_subject) if same_subj else [])
                + self._draw("unrelated", unrelated, n_unrelated))

    def build(self, s: Stated, condition: str) -> tuple[list[str], list[bool], list[bool]]:
        """(sentences, truthful, relevant) of the context of one fact in one condition, in seeded order."""
        rows = [(o.true_sentence if true else o.cf_sentence, true, False) for o, true in self.distractors(s, condition)]
        if condition == COUNTERFACTUAL:
            rows.append((s.cf_sentence, False, True))
        elif condition == ALIGNED:
            rows.append((s.true_sentence, True, True))
        self.rng.shuffle(rows)
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _item(name: str, s: Stated, condition: str, ctx: tuple[list[str], list[bool], list[bool]]) -> dict:
    """The items row of one fact in one condition."""
    sentences, truthful, relevant = ctx
    f = s.fact
    target = next((t for t, rel in zip(sentences, relevant) if rel), None)
    orig = [s.true_sentence if rel else t for t, rel in zip(sentences, relevant)]
    return item_row(
        name,
        item_id=f"kf-{f.known_id}-{condition}",
        split=s.split,
        group=f.subject,
        relation_id=f.relation_id,
        question=render_question(s.question_template, f.subject),
        context=" ".join(sentences),
        answers=[s.cf_obj if condition == COUNTERFACTUAL else f.obj],
        orig_answers=[f.obj],
        orig_context=" ".join(orig),
        target_sentence=target,
        counterfactual=condition == COUNTERFACTUAL,
        source_id=f.known_id,
        condition=condition,
        question_template=s.question_template,
        sentence_template=None if condition == IRRELEVANT else s.sentence_template,
        sentence_labels=labels_of(sentences, truthful, relevant),
    )


def conditions_of(stated: list[Stated], n: int, rng: random.Random) -> dict[str, list[str]]:
    """known_id -> its conditions: train/dev counterfactual; test facts n each, rotated in a seeded order."""
    out = {s.fact.known_id: [COUNTERFACTUAL] for s in stated if s.split != "test"}
    test = [s.fact.known_id for s in stated if s.split == "test"]
    rng.shuffle(test)
    for i, kid in enumerate(test):
        out[kid] = [c for c in CONDITIONS if (CONDITIONS.index(c) - i) % 3 < n]
    return out


def _state(facts: list[Fact], split_of: dict[str, str], pool: dict[str, set[str]], rng: random.Random) -> list[Stated]:
    """Each fact's wordings (from its split's share) and counterfactual object."""
    wordings = template_split(sorted({f.relation_id for f in facts}), rng)
    stated = []
    for f in facts:
        split = split_of[f.subject]
        stated.append(Stated(
            fact=f, split=split,
            question_template=rng.choice(wordings[split, f.relation_id, Q]),
            sentence_template=rng.choice(wordings[split, f.relation_id, S]),
            cf_obj=rng.choice(alternatives(pool, f)),
        ))
    return stated


def _append_item(out: Ingested, name: str, s: Stated, condition: str, contexts: Contexts) -> bool:
    """Append the item of one fact in one condition; True when its context does not split back into its sentences."""
    item = _item(name, s, condition, contexts.build(s, condition))
    out.items.append(item)
    return [t for t, _, _ in split_sentences(item["context"])] != [lab["text"] for lab in item["sentence_labels"]]


def _emit(stated: list[Stated], kf: KnownFactsOptions, rng: random.Random, out: Ingested, name: str) -> None:
    """Items (per fact and condition) and the two probe statements of every fact."""
    contexts = Contexts(stated, kf, rng)
    conditions = conditions_of(stated, kf.conditions_per_test_fact, rng)
    held = set(kf.holdout_relations)
    itemised = [s for s in stated if not (s.split == "train" and s.fact.relation_id in held)]
    unsplittable = sum(_append_item(out, name, s, c, contexts) for s in itemised for c in conditions[s.fact.known_id])
    if kf.all_train_conditions:  # drawn after every other item, so those are the same with the option or without
        unsplittable += sum(_append_item(out, name, s, c, contexts)
                            for s in itemised if s.split == "train" for c in (ALIGNED, IRRELEVANT))
    for s in stated:
        out.statements.extend(statements(s.fact, s.split, s.true_sentence, s.cf_sentence))
    if unsplittable:
        log.warning("known-facts v2: %d contexts do not split back into their sentences", unsplittable)
    if contexts.short:
        short = ", ".join(f"{k} {v}" for k, v in sorted(contexts.short.items()))
        out.note = "; ".join(filter(None, [out.note, f"contexts with fewer distractors than asked: {short}"]))


def _all_facts(data: list[RawRecord], checked: list, pool: dict[str, set[str]], source: str) -> list[Fact]:
    """The usable facts of the whole file (sampled or not): what the split and the option checks see."""
    scratch = Ingested(dataset="scratch")
    return select_facts(data, checked, list(range(len(data))), pool, scratch, source)


def build_v2(path: Path, opts: ReadOptions, name: str) -> Ingested:
    """known-facts v2 from a fact file: see the module docstring."""
    kf = opts.known_facts
    data = load_format(path, name, REQUIRED_STR)
    rng = random.Random(f"known-facts-v2:{opts.seed}")
    checked = [check_record(rec, v2_sentences) for rec in data]
    pool = object_pool(checked)
    every = _all_facts(data, checked, pool, path.name)
    split_of = split_groups(sorted({f.subject for f in every}), rng)
    if every:
        check_options(kf, every, split_of, path.name)
    positions, note = sample_positions(len(data), rng, opts)
    out = Ingested(dataset=name, n_read=len(positions), note=note)
    facts = select_facts(data, checked, positions, pool, out, path.name)
    out.n_kept = len(facts)
    _emit(_state(facts, split_of, pool, rng), kf, rng, out, name)
    apply_budget(out, facts, data, opts, path.name)
    return out
