"""SQuAD (v1.1 / v2.0): plain extractive QA with no conflict, the utility check of a faithful model."""

from __future__ import annotations

from schemas.rejects import EMPTY_ANSWERS, EMPTY_CONTEXT, EMPTY_QUESTION, MISSING_FIELD, WRONG_TYPE
from tasks.ingest.formats.fields import RecordReject, get_answers, get_id, get_text
from tasks.ingest.formats.items import Parsed, question_group
from tasks.ingest.formats.reader import file_reader

NAME = "squad"
VERSION = "1"
REQUIRED = ("question", "context", "answers")
SOURCE = (
    "https://huggingface.co/datasets/rajpurkar/squad (plain_text/validation-*.parquet) or the official"
    " dev-v1.1.json / dev-v2.0.json from https://rajpurkar.github.io/SQuAD-explorer/"
)


def squad_answers(rec: dict) -> list[str]:
    """Answer texts of the three published shapes: HF {text: [...]}, a list of strings, official [{text}]."""
    value = rec.get("answers")
    if value is None:
        raise RecordReject(MISSING_FIELD, "field 'answers' is missing")
    if isinstance(value, dict):
        if "text" not in value:
            raise RecordReject(MISSING_FIELD, "field 'answers' has no 'text' list")
        value = value["text"]
    elif isinstance(value, list) and value and all(isinstance(a, dict) for a in value):
        if not all(isinstance(a.get("text"), str) for a in value):
            raise RecordReject(WRONG_TYPE, "an entry of 'answers' has no 'text' string")
        value = [a["text"] for a in value]
    answers = get_answers({"answers": value}, "answers", allow_empty=True)
    if not answers:
        raise RecordReject(EMPTY_ANSWERS, "no answer (an unanswerable SQuAD v2 question?)")
    return answers


def parse_record(rec: dict) -> Parsed:
    """Item of one SQuAD question: no counterfactual, no memorised answer."""
    source_id = get_id(rec, "id") if rec.get("id") is not None else None  # id-less rows: content hash
    question = get_text(rec, "question", EMPTY_QUESTION)
    item = {
        "group": question_group(question),
        "question": question,
        "context": get_text(rec, "context", EMPTY_CONTEXT),
        "answers": squad_answers(rec),
        "counterfactual": False,
    }
    return Parsed(item=item, source_id=source_id)


# HF rows (Parquet/JSON/JSONL) or the official nested JSON, flattened per question
READERS = [
    file_reader(
        NAME, "SQuAD: extractive QA without conflict (utility check); HF rows or the official nested JSON.", SOURCE,
        REQUIRED, parse_record, VERSION, id_field="id", nested_squad=True,
    )
]
