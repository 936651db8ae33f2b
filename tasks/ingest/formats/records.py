"""Loading a published file into raw records: JSON, JSON Lines or Parquet, and the FormatError of a file that is
none of them or not the dataset's format.

A record that cannot even be parsed (a bad JSON line, undecodable bytes) is kept as a RawRecord carrying its
reject, so that the reader can still count and keep it in `rejects`; only a file that is not the format at all
stops the run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.rejects import MALFORMED_JSON, UNDECODABLE

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_DEPTH = 64  # levels of nesting a record may have: every format's records are a few levels deep


class FormatError(ValueError):
    """The input is not the dataset's format at all: the run must stop, not reject record by record."""


@dataclass
class RawRecord:
    """One record as loaded: the parsed value (or the raw line text) and a reject decided while loading."""

    value: Any
    reject: tuple[str, str] | None = None


def format_error(path: Path, dataset: str, expected: str, found: str) -> FormatError:
    """The one-line FormatError every reader raises: file, dataset, what was expected, what was found."""
    return FormatError(f"{path}: not a {dataset} file: expected {expected}; found {found}")


def require_path(path: Path | None, dataset: str, source: str) -> Path:
    """The --data-path of a dataset that has no bundled copy, with where to get it when it is missing."""
    if path is None:
        raise ValueError(f"dataset {dataset!r} needs --data-path (get the file from {source})")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (dataset {dataset}; get it from {source})")
    return path


def _walk(value: Any):
    """(depth, node) of every node of a JSON value, without recursion (a record may be nested ~1000 deep)."""
    stack = [(1, value)]
    while stack:
        depth, node = stack.pop()
        yield depth, node
        if isinstance(node, dict):
            stack.extend((depth + 1, x) for kv in node.items() for x in kv)
        elif isinstance(node, (list, tuple)):
            stack.extend((depth + 1, x) for x in node)


def nesting(value: Any) -> int:
    """How many levels of lists and objects a JSON value nests (a scalar: 1)."""
    return max(depth for depth, _ in _walk(value))


def has_surrogates(value: Any) -> bool:
    """Whether any string in a record holds a lone surrogate (undecodable bytes, or an escaped lone half)."""
    return any(isinstance(node, str) and any("\ud800" <= ch <= "\udfff" for ch in node) for _, node in _walk(value))


def _decode(data: bytes) -> str:
    """UTF-8 text where invalid bytes survive as lone surrogates, so the records holding them can be rejected."""
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _lines(text: str) -> list[str]:
    """Lines split at newlines only (str.splitlines would also cut at U+2028 inside a JSON string)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _jsonl_records(text: str, path: Path, dataset: str) -> list[RawRecord]:
    """One record per non-blank line; a line that does not parse is a malformed_json (or undecodable) reject."""
    records: list[RawRecord] = []
    n_parsed = 0
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            deep = nesting(value) > MAX_DEPTH
        except json.JSONDecodeError as exc:
            bad_bytes = has_surrogates(line)
            reason = UNDECODABLE if bad_bytes else MALFORMED_JSON
            detail = f"line {lineno} is not valid UTF-8" if bad_bytes else f"line {lineno}: {exc.msg}"
            records.append(RawRecord(line, (reason, detail)))
            continue
        except RecursionError:  # nested too deep for the parser itself
            deep = True
        n_parsed += 1
        too_deep = (MALFORMED_JSON, f"line {lineno}: nested more than {MAX_DEPTH} levels deep")
        records.append(RawRecord(line, too_deep) if deep else RawRecord(value))
    if records and not n_parsed:
        raise format_error(path, dataset, "JSON Lines (one JSON object per line)", "no line that parses as JSON")
    return records


def _looks_like_jsonl(text: str) -> bool:
    """Whether a .json file that does not parse whole is really JSON Lines (as HF `to_json` writes)."""
    first = next((line for line in _lines(text) if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _json_records(path: Path, dataset: str, nested_squad: bool) -> list[RawRecord]:
    """Records of a .json file: a JSON list, the nested SQuAD JSON where allowed, or JSON Lines after all."""
    text = _decode(path.read_bytes())
    try:
        doc = json.loads(text)
    except RecursionError:
        raise format_error(path, dataset, "a JSON list of records", "JSON nested too deep to parse") from None
    except json.JSONDecodeError as exc:
        if _looks_like_jsonl(text):  # HF `to_json` writes JSON Lines under a .json name
            return _jsonl_records(text, path, dataset)
        found = f"text that is not JSON ({exc.msg} at line {exc.lineno})"
        raise format_error(path, dataset, "a JSON list of records", found) from None
    if nested_squad and isinstance(doc, dict) and isinstance(doc.get("data"), list):
        return [RawRecord(r) for r in flatten_squad(doc)]
    if not isinstance(doc, list):
        shape = f"a JSON {type(doc).__name__}"
        if isinstance(doc, dict):
            shape = f"a JSON object with keys {sorted(doc)[:8]}"
        expected = "a JSON list of records" + (" or the nested SQuAD {'data': [...]} JSON" if nested_squad else "")
        raise format_error(path, dataset, expected, shape)
    return [RawRecord(r) for r in doc]


def flatten_squad(doc: dict) -> list[Any]:
    """Records of the official nested SQuAD JSON: one per question, with its paragraph's context and title."""
    out: list[Any] = []
    for article in doc["data"]:
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            out.append(article)  # rejected record by record (missing question/context), not lost
            continue
        for para in paragraphs:
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(qas, list):
                out.append(para)
                continue
            for qa in qas:
                extra = {"title": article.get("title"), "context": para.get("context")}
                out.append({**extra, **qa} if isinstance(qa, dict) else qa)
    return out


def _parquet_records(path: Path, dataset: str) -> list[RawRecord]:
    """Rows of a Parquet file as plain Python records."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise format_error(path, dataset, "a Parquet file", f"unreadable bytes ({str(exc).splitlines()[0]})") from None
    return [RawRecord(row) for row in table.to_pylist()]


def load_records(path: Path, dataset: str, *, nested_squad: bool = False) -> list[RawRecord]:
    """Records of a .json (list; nested SQuAD when allowed), .jsonl or .parquet file, by extension."""
    path = Path(path)
    if path.is_dir():
        raise format_error(path, dataset, "a .json, .jsonl or .parquet file", "a directory")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _parquet_records(path, dataset)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_records(_decode(path.read_bytes()), path, dataset)
    if suffix not in JSON_SUFFIXES:
        raise format_error(path, dataset, "a .json, .jsonl or .parquet file", f"the extension {suffix or '(none)'!r}")
    return _json_records(path, dataset, nested_squad)


def check_format(path: Path, dataset: str, records: list[RawRecord], required: Iterable[str]) -> None:
    """FormatError unless at least one record is an object carrying every required field."""
    required = tuple(required)
    expected = f"records with fields {', '.join(required)}"
    if not records:
        raise format_error(path, dataset, expected, "no records")
    if any(isinstance(r.value, dict) and all(k in r.value for k in required) for r in records):
        return
    first = next((r.value for r in records if isinstance(r.value, dict)), None)
    found = f"no JSON objects (the first record is a {type(records[0].value).__name__})"
    if first is not None:
        found = f"fields {sorted(first)[:10]}"
    raise format_error(path, dataset, expected, found)


def load_format(path: Path, dataset: str, required: Iterable[str], *, nested_squad: bool = False) -> list[RawRecord]:
    """The records of a file that must be the dataset's format (else FormatError naming the file)."""
    records = load_records(path, dataset, nested_squad=nested_squad)
    check_format(path, dataset, records, required)
    return records
