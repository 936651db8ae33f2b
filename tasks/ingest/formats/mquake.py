"""MQuAKE-CF-3k(-v2): knowledge-editing counterfactuals, the reference's probe training set (and multi-hop items)."""

from __future__ import annotations

from schemas.rejects import (
    EMPTY_ANSWERS,
    EMPTY_FIELD,
    EMPTY_QUESTION,
    SAME_ANSWER,
    UNFORMABLE_SENTENCE,
    WRONG_TYPE,
)
from tasks.core.storage import text_key
from tasks.core.text import normalize
from tasks.ingest.formats.fields import (
    RecordReject,
    check_same_answer,
    get_aliases,
    get_field,
    get_id,
    get_text,
    with_aliases,
)
from tasks.ingest.formats.items import Parsed, content_hash
from tasks.ingest.formats.reader import Ingested, file_reader

NAME = "mquake"
VERSION = "1"
REQUIRED = ("requested_rewrite",)
SOURCE = "https://github.com/princeton-nlp/MQuAKE (datasets/MQuAKE-CF-3k-v2.json)"


def _target(rewrite: dict, name: str, j: int) -> str:
    """The object string of target_true / target_new of rewrite j."""
    target = get_field(rewrite, name)
    if not isinstance(target, dict):
        raise RecordReject(WRONG_TYPE, f"requested_rewrite[{j}].{name} is a {type(target).__name__}, not an object")
    return get_text(target, "str", EMPTY_ANSWERS)


def _prompt(rewrite: dict, j: int) -> tuple[str, str]:
    """(filled prompt, subject) of rewrite j: prompt.format(subject)."""
    prompt, subject = get_text(rewrite, "prompt"), get_text(rewrite, "subject")
    if "{}" not in prompt:
        raise RecordReject(UNFORMABLE_SENTENCE, f"requested_rewrite[{j}].prompt {prompt!r} has no {{}} for the subject")
    try:
        return prompt.format(subject), subject
    except (IndexError, KeyError, ValueError) as exc:
        raise RecordReject(UNFORMABLE_SENTENCE, f"requested_rewrite[{j}].prompt {prompt!r}: {exc}") from None


def _rewrites(rec: dict) -> list[tuple[str, str, str, str, str | None]]:
    """(filled prompt, subject, true object, new object, relation) of every requested rewrite."""
    rewrites = get_field(rec, "requested_rewrite")
    if not isinstance(rewrites, list):
        raise RecordReject(WRONG_TYPE, f"field 'requested_rewrite' is a {type(rewrites).__name__}, not a list")
    if not rewrites:
        raise RecordReject(EMPTY_FIELD, "field 'requested_rewrite' is an empty list")
    out = []
    for j, rw in enumerate(rewrites):
        if not isinstance(rw, dict):
            raise RecordReject(WRONG_TYPE, f"requested_rewrite[{j}] is a {type(rw).__name__}, not an object")
        filled, subject = _prompt(rw, j)
        true, new = _target(rw, "target_true", j), _target(rw, "target_new", j)
        if normalize(true) == normalize(new):
            raise RecordReject(SAME_ANSWER, f"requested_rewrite[{j}]: target_new {new!r} equals target_true {true!r}")
        relation = rw.get("relation_id") if isinstance(rw.get("relation_id"), str) else None
        out.append((filled, subject, true, new, relation))
    return out


def _statements(case: str, rewrites: list) -> list[dict]:
    """Probe statements: prompt.format(subject) + " " + true object (0) / new object (1), grouped by subject."""
    rows = []
    for j, (filled, subject, true, new, relation) in enumerate(rewrites):
        for label, obj in ((0, true), (1, new)):
            text = f"{filled} {obj}"
            rows.append(
                {"stmt_id": f"{NAME}-{case}-{j}-{label}", "key": text_key(text), "text": text,
                 "label": label, "group": subject, "relation_id": relation}
            )
    return rows


def _item(rec: dict, rewrites: list) -> dict | None:
    """The multi-hop item of a record with questions: the rewritten facts as context, new vs original answer."""
    questions = rec.get("questions")
    if questions is None:
        return None
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise RecordReject(WRONG_TYPE, "field 'questions' is not a list of strings")
    if not questions:
        return None
    question = questions[0].strip()
    if not question:
        raise RecordReject(EMPTY_QUESTION, "questions[0] is empty")
    answers = with_aliases(get_text(rec, "new_answer", EMPTY_ANSWERS), get_aliases(rec, "new_answer_alias"))
    orig = with_aliases(get_text(rec, "answer", EMPTY_ANSWERS), get_aliases(rec, "answer_alias"))
    check_same_answer(answers, orig)
    return {
        "group": rewrites[0][1],
        "question": question,
        "context": " ".join(f"{filled} {new}." for filled, _, _, new, _ in rewrites),
        "answers": answers,
        "orig_answers": orig,
        "counterfactual": True,
    }


def parse_record(rec: dict) -> Parsed:
    """Statements of every rewrite, plus an item where the record has questions."""
    case = get_id(rec, "case_id") if rec.get("case_id") is not None else None
    rewrites = _rewrites(rec)
    tag = case if case is not None else content_hash("", "", [f"{r[0]} {r[2]} / {r[3]}" for r in rewrites])
    statements = _statements(tag, rewrites)
    item = _item(rec, rewrites)
    return Parsed(item=item, statements=statements, source_id=case)


def _dedupe_statements(out: Ingested) -> None:
    """One statement per text (shared edits repeat across cases); a text with both labels is dropped."""
    labels: dict[str, set[int]] = {}
    for s in out.statements:
        labels.setdefault(s["key"], set()).add(s["label"])
    seen: set[str] = set()
    kept = []
    for s in out.statements:
        if len(labels[s["key"]]) == 1 and s["key"] not in seen:
            seen.add(s["key"])
            kept.append(s)
    n_conflicting = sum(len(v) > 1 for v in labels.values())
    out.statements = kept
    if n_conflicting:
        note = f"{n_conflicting} statement texts with both labels dropped"
        out.note = f"{out.note}; {note}" if out.note else note


READERS = [
    file_reader(
        NAME, "MQuAKE-CF-3k(-v2): edit statements (true 0 / new 1) for probe training; multi-hop items where given.",
        SOURCE, REQUIRED, parse_record, VERSION, id_field="case_id", finish=_dedupe_statements,
    )
]
