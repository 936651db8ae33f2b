"""ConFiQA (Context-DPO; QA, MR and MC): counterfactual contexts with the original and counterfactual answers."""

from __future__ import annotations

from schemas.rejects import EMPTY_ANSWERS, EMPTY_CONTEXT, EMPTY_QUESTION, WRONG_TYPE
from tasks.ingest.formats.fields import RecordReject, get_aliases, get_text, with_aliases
from tasks.ingest.formats.items import Parsed, conflict_item
from tasks.ingest.formats.reader import Reader, file_reader

VERSION = "1"
REQUIRED = ("question", "cf_context", "cf_answer", "orig_answer")
SOURCE = "https://github.com/byronBBL/Context-DPO (ConFiQA/ConFiQA-{kind}.json)"
SUMMARIES = {
    "QA": "ConFiQA-QA: single-hop questions over counterfactual contexts.",
    "MR": "ConFiQA-MR: multi-hop questions, one counterfactual fact in the chain.",
    "MC": "ConFiQA-MC: multi-hop questions, several counterfactual facts in the chain.",
}


def _optional_text(rec: dict, name: str) -> str | None:
    """An optional string field (absent or null: None)."""
    value = rec.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordReject(WRONG_TYPE, f"field {name!r} is a {type(value).__name__}, not a string")
    return value.strip() or None


def parse_record(rec: dict) -> Parsed:
    """Item of one ConFiQA record: the cf side is what the model sees, the orig side what it memorised."""
    question = get_text(rec, "question", EMPTY_QUESTION)
    context = get_text(rec, "cf_context", EMPTY_CONTEXT)
    answers = with_aliases(get_text(rec, "cf_answer", EMPTY_ANSWERS), get_aliases(rec, "cf_alias"))
    orig = with_aliases(get_text(rec, "orig_answer", EMPTY_ANSWERS), get_aliases(rec, "orig_alias"))
    return conflict_item(question, context, answers, orig, _optional_text(rec, "orig_context"))


def _reader(kind: str) -> Reader:
    """The Reader of one ConFiQA subset (a JSON list as published; JSONL and Parquet also accepted)."""
    name, source = f"confiqa-{kind.lower()}", SOURCE.format(kind=kind)
    return file_reader(name, SUMMARIES[kind], source, REQUIRED, parse_record, VERSION)


READERS = [_reader(kind) for kind in ("QA", "MR", "MC")]
