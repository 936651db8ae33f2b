"""FaithEval (Salesforce): counterfactual multiple choice, unanswerable ("unknown") and inconsistent ("conflict")."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from schemas.rejects import EMPTY_ANSWERS, EMPTY_CONTEXT, EMPTY_QUESTION, MISSING_FIELD, WRONG_TYPE
from tasks.ingest.formats.fields import RecordReject, get_answers, get_id, get_text
from tasks.ingest.formats.items import Parsed, question_group
from tasks.ingest.formats.reader import Reader, file_reader

VERSION = "1"
HF = "https://huggingface.co/datasets/Salesforce/FaithEval-{subset}-v1.0 (data/test-00000-of-00001.parquet)"
UNKNOWN_INSTRUCTION = 'If the context does not contain the answer to the question, answer "unknown".'
CONFLICT_INSTRUCTION = 'If the context gives inconsistent (conflicting) answers to the question, answer "conflict".'


def _choices(rec: dict) -> tuple[list[str], list[str]]:
    """(labels, texts) of the `choices` field: {label: [...], text: [...]} or a list of {label, text}."""
    value = rec.get("choices")
    if value is None:
        raise RecordReject(MISSING_FIELD, "field 'choices' is missing")
    if isinstance(value, list) and all(isinstance(c, dict) for c in value):
        value = {"label": [c.get("label") for c in value], "text": [c.get("text") for c in value]}
    labels = value.get("label") if isinstance(value, dict) else None
    texts = value.get("text") if isinstance(value, dict) else None
    ok = isinstance(labels, list) and isinstance(texts, list) and len(labels) == len(texts) > 0
    if not ok or not all(isinstance(x, str) for x in [*labels, *texts]):
        raise RecordReject(WRONG_TYPE, "field 'choices' is not {label: [str, ...], text: [str, ...]} of equal length")
    return [x.strip() for x in labels], [x.strip() for x in texts]


def _answer_text(rec: dict, labels: list[str], texts: list[str]) -> str:
    """The answer text: `answer` itself, or the choice whose label is `answer` / `answerKey`."""
    answer = rec.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise RecordReject(WRONG_TYPE, f"field 'answer' is a {type(answer).__name__}, not a string")
    answer = (answer or "").strip()
    if answer and not (answer in labels and answer not in texts):
        return answer
    key = answer or rec.get("answerKey")
    if key is None:
        raise RecordReject(MISSING_FIELD, "neither 'answer' nor 'answerKey' is given")
    if not isinstance(key, str):
        raise RecordReject(WRONG_TYPE, f"field 'answerKey' is a {type(key).__name__}, not a string")
    if key.strip() not in labels:
        raise RecordReject(EMPTY_ANSWERS, f"answer key {key!r} names none of the choices {labels}")
    return texts[labels.index(key.strip())]


def _common(rec: dict, id_field: str) -> dict[str, Any]:
    """Fields every subset shares: id, question, context, group."""
    source_id = get_id(rec, id_field)
    question = get_text(rec, "question", EMPTY_QUESTION)
    context = get_text(rec, "context", EMPTY_CONTEXT)
    return {"source_id": source_id, "question": question, "context": context, "group": question_group(question)}


def parse_counterfactual(rec: dict) -> Parsed:
    """Multiple-choice item whose answer the counterfactual context supports."""
    base = _common(rec, "id")
    labels, texts = _choices(rec)
    answer = _answer_text(rec, labels, texts)
    choices = [f"{label}. {text}" for label, text in zip(labels, texts)]
    source_id = base.pop("source_id")
    item = {**base, "answers": [answer], "choices": choices, "counterfactual": True}
    return Parsed(item=item, source_id=source_id)


def parse_expected(answer: str, instruction: str, rec: dict) -> Parsed:
    """Item whose expected output is a fixed word ("unknown" / "conflict"); the record's answers kept as orig."""
    base = _common(rec, "qid")
    orig = get_answers(rec, "answers", allow_empty=True) or None
    source_id = base.pop("source_id")
    item = {**base, "answers": [answer], "orig_answers": orig, "instruction": instruction, "counterfactual": False}
    return Parsed(item=item, source_id=source_id, locate_target=False)


SUBSETS: dict[str, tuple[tuple[str, ...], str, Callable[[dict], Parsed], str]] = {
    # subset: (required fields, id field, parser, summary)
    "counterfactual": (
        ("id", "question", "context", "choices"), "id", parse_counterfactual,
        "FaithEval counterfactual: multiple choice over contexts that contradict common knowledge.",
    ),
    "unanswerable": (
        ("qid", "question", "context"), "qid", partial(parse_expected, "unknown", UNKNOWN_INSTRUCTION),
        'FaithEval unanswerable: the context lacks the answer; expected output "unknown".',
    ),
    "inconsistent": (
        ("qid", "question", "context"), "qid", partial(parse_expected, "conflict", CONFLICT_INSTRUCTION),
        'FaithEval inconsistent: the context contradicts itself; expected output "conflict".',
    ),
}


def _reader(subset: str) -> Reader:
    """The Reader of one FaithEval subset (Parquet as published; JSON and JSONL also accepted)."""
    required, id_field, parse, summary = SUBSETS[subset]
    name, source = f"faitheval-{subset}", HF.format(subset=subset)
    return file_reader(name, summary, source, required, parse, VERSION, id_field=id_field)


READERS = [_reader(subset) for subset in SUBSETS]
