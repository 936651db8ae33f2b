"""NQ conflict benchmarks: NQ-Swap (entity-substituted contexts) and the Zhou et al. orig/conflict file pair."""

from __future__ import annotations

from pathlib import Path

from schemas.rejects import EMPTY_CONTEXT, EMPTY_QUESTION, MISALIGNED, NOT_AN_OBJECT
from tasks.ingest.formats.fields import RecordReject, get_answers, get_text
from tasks.ingest.formats.items import Parsed, ReadOptions, conflict_item, question_group
from tasks.ingest.formats.reader import Ingested, Reader, file_reader, read_dataset
from tasks.ingest.formats.records import RawRecord, check_format, format_error, load_records, require_path

VERSION = "1"
NQ_SWAP = "nq-swap"
NQ_SWAP_REQUIRED = ("question", "org_context", "org_answer", "sub_context", "sub_answer")
NQ_SWAP_SOURCE = "https://huggingface.co/datasets/pminervini/NQ-Swap (Parquet files of the dataset)"
ZHOU = "zhou-nq"
ZHOU_REQUIRED = ("question", "context", "answer")
ZHOU_ORIG, ZHOU_CONFLICT = "orig_dev_filtered.json", "conflict_dev_filtered.json"
ZHOU_SOURCE = (
    "the data of Zhou et al. 2023, Context-faithful Prompting, https://github.com/wzhouad/context-faithful-llm"
    f" ({ZHOU_ORIG} and {ZHOU_CONFLICT})"
)


def parse_nq_swap(rec: dict) -> Parsed:
    """Item of one NQ-Swap record: the substituted context and answer, the original kept as orig."""
    question = get_text(rec, "question", EMPTY_QUESTION)
    context = get_text(rec, "sub_context", EMPTY_CONTEXT)
    answers = get_answers(rec, "sub_answer")
    orig = get_answers(rec, "org_answer")
    return conflict_item(question, context, answers, orig, get_text(rec, "org_context", EMPTY_CONTEXT))


def zhou_files(path: Path | None) -> list[Path]:
    """[orig file, conflict file] of the pair a --data-path names: their directory, or either file."""
    path = require_path(path, ZHOU, ZHOU_SOURCE)
    if path.is_dir():
        orig, conflict = path / ZHOU_ORIG, path / ZHOU_CONFLICT
    elif path.name.startswith("orig_"):
        orig, conflict = path, path.with_name("conflict_" + path.name.removeprefix("orig_"))
    elif path.name.startswith("conflict_"):
        orig, conflict = path.with_name("orig_" + path.name.removeprefix("conflict_")), path
    else:
        expected = f"a directory holding {ZHOU_ORIG} and {ZHOU_CONFLICT}, or one of them"
        raise format_error(path, ZHOU, expected, "another file name")
    for p in (orig, conflict):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file; {ZHOU} needs {orig.name} and {conflict.name} side by side")
    return [orig, conflict]


def _pair(i: int, orig: list[RawRecord], conflict: list[RawRecord], names: tuple[str, str]) -> RawRecord:
    """Position i of both files as one record {"orig": ..., "conflict": ...}, with any loading reject."""
    sides = {"orig": orig[i] if i < len(orig) else None, "conflict": conflict[i] if i < len(conflict) else None}
    value = {side: rec.value if rec else None for side, rec in sides.items()}
    sizes = {"orig": len(orig), "conflict": len(conflict)}
    for (side, rec), name in zip(sides.items(), names):
        if rec is None:
            return RawRecord(value, (MISALIGNED, f"{name} has no record {i} (it has {sizes[side]})"))
        if rec.reject:
            return RawRecord(value, (rec.reject[0], f"{name}: {rec.reject[1]}"))
    return RawRecord(value)


def _side(rec: object, name: str) -> tuple[str, str, list[str]]:
    """(question, context, answers) of one side of a pair; rejects name the file."""
    if not isinstance(rec, dict):
        raise RecordReject(NOT_AN_OBJECT, f"{name}: record is a {type(rec).__name__}, not a JSON object")
    try:
        question = get_text(rec, "question", EMPTY_QUESTION)
        return question, get_text(rec, "context", EMPTY_CONTEXT), get_answers(rec, "answer")
    except RecordReject as rej:
        raise RecordReject(rej.reason, f"{name}: {rej.detail}") from None


def parse_zhou_pair(pair: dict, names: tuple[str, str] = (ZHOU_ORIG, ZHOU_CONFLICT)) -> Parsed:
    """Item of one aligned pair: context and answers from the conflict file, orig_* from the orig file."""
    o_question, o_context, orig = _side(pair["orig"], names[0])
    question, context, answers = _side(pair["conflict"], names[1])
    if question_group(question) != question_group(o_question):
        raise RecordReject(MISALIGNED, f"questions differ: {o_question!r} ({names[0]}) vs {question!r} ({names[1]})")
    return conflict_item(question, context, answers, orig, o_context)


def read_zhou(path: Path | None, opts: ReadOptions) -> Ingested:
    """Read the Zhou et al. pair, aligned by position (a pair whose questions differ is rejected)."""
    orig_path, conflict_path = zhou_files(path)
    names = (orig_path.name, conflict_path.name)
    orig, conflict = load_records(orig_path, ZHOU), load_records(conflict_path, ZHOU)
    check_format(orig_path, ZHOU, orig, ZHOU_REQUIRED)
    check_format(conflict_path, ZHOU, conflict, ZHOU_REQUIRED)
    pairs = [_pair(i, orig, conflict, names) for i in range(max(len(orig), len(conflict)))]
    return read_dataset(ZHOU, conflict_path.name, pairs, opts, lambda pair: parse_zhou_pair(pair, names))


READERS = [
    # Parquet as published on HF; JSON and JSONL also accepted
    file_reader(
        NQ_SWAP, "NQ-Swap: Natural Questions with the answer entity swapped in the context.", NQ_SWAP_SOURCE,
        NQ_SWAP_REQUIRED, parse_nq_swap, VERSION,
    ),
    # two files aligned by position, not one: its own Reader built from the same parts
    Reader(
        name=ZHOU,
        read=read_zhou,
        version=VERSION,
        files=zhou_files,
        summary="Zhou et al. NQ conflict: MRQA NQ dev with entity-substituted contexts, as an orig/conflict file pair.",
        source=ZHOU_SOURCE,
    ),
]
