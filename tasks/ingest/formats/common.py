"""What every benchmark reader shares: record loading, field checks, rejects, splits and the token budget.

A reader turns one published file into `items` / `statements` rows; every record it reads either ends in
those rows or in `rejects` with one of the reasons below, so that n_read == n_kept + len(rejects) always.
A file that is not the format at all raises FormatError at once instead.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.rejects import (  # noqa: F401  (re-exported: readers name reasons through this module)
    MISSING_FIELD,
    WRONG_TYPE,
    EMPTY_QUESTION,
    EMPTY_CONTEXT,
    EMPTY_ANSWERS,
    DUPLICATE_ID,
    UNDECODABLE,
    CONTEXT_TOO_LONG,
    SAME_ANSWER,
    NOT_AN_OBJECT,
    MALFORMED_JSON,
    MISALIGNED,
    EMPTY_FIELD,
    UNKNOWN_RELATION,
    DUPLICATE,
    NO_COUNTERFACTUAL,
    UNFORMABLE_SENTENCE,
    REASONS,
)
from schemas.tables import ITEMS
from tasks.core.text import normalize
from tasks.core.splitter import split_sentences

SPLIT_FRACTIONS = (("train", 0.6), ("dev", 0.2), ("test", 0.2))

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


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
        line = f"{self.dataset}: {self.n_read} read, {self.n_kept} kept, {len(self.rejects)} rejected"
        line += f" ({detail})" if detail else ""
        return f"{line} [{self.note}]" if self.note else line


class FormatError(ValueError):
    """The input is not the dataset's format at all: the run must stop, not reject record by record."""


@dataclass(frozen=True)
class ReadOptions:
    """How a reader samples and budgets: the part of the run config a reader needs."""

    seed: int = 0
    limit: int | None = None
    n_distractors: int = 3
    max_context_tokens: int | None = None
    truncation: str = "reject"
    count_tokens: Callable[[str], int] | None = None

    def __post_init__(self) -> None:
        if self.truncation not in ("reject", "truncate"):
            raise ValueError(f"truncation must be 'reject' or 'truncate', got {self.truncation!r}")


@dataclass(frozen=True)
class Reader:
    """One --dataset value: how to read it, what files it stands for, where to get them."""

    name: str
    read: Callable[[Path | None, ReadOptions], Ingested]
    version: str
    files: Callable[[Path | None], list[Path]]
    summary: str
    source: str
    needs_path: bool = True


class RecordReject(Exception):
    """Raised while checking one record: it goes to `rejects` with this reason and detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class RawRecord:
    """One record as loaded: the parsed value (or the raw line text) and a reject decided while loading."""

    value: Any
    reject: tuple[str, str] | None = None


# ---------------------------------------------------------------------------------------------- loading


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
            records.append(RawRecord(json.loads(line)))
            n_parsed += 1
        except json.JSONDecodeError as exc:
            bad_bytes = has_surrogates(line)
            reason = UNDECODABLE if bad_bytes else MALFORMED_JSON
            detail = f"line {lineno} is not valid UTF-8" if bad_bytes else f"line {lineno}: {exc.msg}"
            records.append(RawRecord(line, (reason, detail)))
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


# ------------------------------------------------------------------------------------------ field checks


def has_surrogates(value: Any) -> bool:
    """Whether any string in a record holds a lone surrogate (undecodable bytes, or an escaped lone half)."""
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(has_surrogates(k) or has_surrogates(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_surrogates(v) for v in value)
    return False


def get_field(rec: dict, name: str) -> Any:
    """A required field (missing or null: missing_field)."""
    if rec.get(name) is None:
        raise RecordReject(MISSING_FIELD, f"field {name!r} is missing")
    return rec[name]


def get_id(rec: dict, name: str) -> str:
    """A required record id (string or integer), as a string."""
    value = get_field(rec, name)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordReject(WRONG_TYPE, f"field {name!r} is a {type(value).__name__}, not a string or integer")
    if not str(value).strip():
        raise RecordReject(MISSING_FIELD, f"field {name!r} is empty")
    return str(value).strip()


def get_text(rec: dict, name: str, empty_reason: str = EMPTY_FIELD) -> str:
    """A required, non-blank string field, stripped."""
    value = get_field(rec, name)
    if not isinstance(value, str):
        raise RecordReject(WRONG_TYPE, f"field {name!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise RecordReject(empty_reason, f"field {name!r} is empty")
    return value.strip()


def _dedupe(values: Iterable[str]) -> list[str]:
    """Stripped, non-empty values in first-seen order without repeats."""
    out: list[str] = []
    for v in values:
        v = v.strip()
        if v and v not in out:
            out.append(v)
    return out


def get_answers(rec: dict, name: str, *, allow_empty: bool = False) -> list[str]:
    """An answer field given as a string or a list of strings, as a de-duplicated list."""
    value = get_field(rec, name)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecordReject(WRONG_TYPE, f"field {name!r} is a {type(value).__name__}, not a string or list of strings")
    answers = _dedupe(value)
    if not answers and not allow_empty:
        raise RecordReject(EMPTY_ANSWERS, f"field {name!r} holds no non-empty answer")
    return answers


def get_aliases(rec: dict, name: str) -> list[str]:
    """An optional list of alias strings (absent or null: none)."""
    value = rec.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecordReject(WRONG_TYPE, f"field {name!r} is a {type(value).__name__}, not a list of strings")
    return list(value)


def with_aliases(main: str, aliases: Iterable[str]) -> list[str]:
    """The answer followed by its aliases, de-duplicated: what scoring accepts."""
    return _dedupe([main, *aliases])


def check_same_answer(answers: list[str], orig_answers: list[str] | None, what: str = "answer") -> None:
    """Reject a counterfactual whose answer equals the original after SQuAD normalisation."""
    if orig_answers and normalize(answers[0]) == normalize(orig_answers[0]):
        raise RecordReject(SAME_ANSWER, f"counterfactual {what} {answers[0]!r} equals the original {orig_answers[0]!r}")


# -------------------------------------------------------------------------------- items, splits, budget


def question_group(question: str) -> str:
    """The unit that must not straddle splits for QA formats: the normalised question."""
    return normalize(question) or " ".join(question.casefold().split())


def content_hash(question: str, context: str, answers: list[str]) -> str:
    """Short id of an id-less record's content (question + context + answers)."""
    blob = json.dumps([question, context, answers], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def split_groups(groups: list[str], rng: random.Random) -> dict[str, str]:
    """Seeded 60/20/20 group split; every split gets a group as soon as there are three."""
    order = sorted(groups)
    rng.shuffle(order)
    n = len(order)
    n_dev = round(n * SPLIT_FRACTIONS[1][1])
    n_test = round(n * SPLIT_FRACTIONS[2][1])
    if n >= 3:
        n_dev, n_test = max(n_dev, 1), max(n_test, 1)
    n_train = n - n_dev - n_test
    names = ["train"] * n_train + ["dev"] * n_dev + ["test"] * n_test
    return dict(zip(order, names))


def target_sentence(context: str, answers: list[str], orig_context: str | None = None) -> str | None:
    """The context sentence that carries a context answer (case-insensitive), else None.

    With the original context at hand, a sentence that the substitution changed is preferred: an unchanged
    sentence that merely mentions the answer (a distractor) is not the conflicting one.
    """
    needles = [a.casefold() for a in answers if a.strip()]
    holding = [s for s, _, _ in split_sentences(context) if any(n in s.casefold() for n in needles)]
    if orig_context:
        unchanged = {s for s, _, _ in split_sentences(orig_context)}
        changed = [s for s in holding if s not in unchanged]
        if changed:
            return changed[0]
    return holding[0] if holding else None


def _fitting_prefix(context: str, budget: int, count: Callable[[str], int]) -> str | None:
    """The longest run of leading whole sentences within the budget (binary search), or None."""
    ends = [end for _, _, end in split_sentences(context)]
    lo, hi, best = 0, len(ends) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if count(context[: ends[mid]]) <= budget:
            best, lo = ends[mid], mid + 1
        else:
            hi = mid - 1
    return None if best is None else context[:best]


def fit_context(context: str, opts: ReadOptions) -> tuple[str, bool]:
    """(context, truncated) within the token budget, or context_too_long under the reject policy."""
    budget, count = opts.max_context_tokens, opts.count_tokens
    if budget is None or count is None:
        return context, False
    n = count(context)
    if n <= budget:
        return context, False
    if opts.truncation != "truncate":
        raise RecordReject(CONTEXT_TOO_LONG, f"context has {n} tokens, over the budget of {budget}")
    prefix = _fitting_prefix(context, budget, count)
    if prefix is None:
        raise RecordReject(CONTEXT_TOO_LONG, f"not even the first sentence of the context fits {budget} tokens")
    return prefix, True


def item_row(dataset: str, **fields: Any) -> dict:
    """An items row carrying every ITEMS column (absent ones null, truncated False)."""
    row = {name: None for name in ITEMS.names}
    row.update(dataset=dataset, truncated=False)
    unknown = set(fields) - set(row)
    if unknown:
        raise KeyError(f"not ITEMS columns: {sorted(unknown)}")
    row.update(fields)
    return row


def raw_json(value: Any) -> str:
    """A record as JSON text that json.loads gives back exactly (escaped where it holds lone surrogates)."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, default=str)
    return text


def reject_row(source: str, index: int, raw: Any, reason: str, detail: str, record_id: str | None = None) -> dict:
    """A rejects row that keeps the raw record so nothing is lost."""
    return {
        "source": source,
        "record": index,
        "record_id": record_id,
        "reason": reason,
        "detail": detail,
        "raw": raw_json(raw),
    }


def sample_positions(n: int, rng: random.Random, opts: ReadOptions) -> tuple[list[int], str]:
    """Record positions to read (all, or `limit` of them sampled with the seed) and the summary note."""
    positions = list(range(n))
    if opts.limit is not None and opts.limit < n:
        positions = sorted(rng.sample(positions, opts.limit))
        return positions, f"limit: {opts.limit} of {n} records sampled with seed {opts.seed}"
    return positions, ""


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class Parsed:
    """What one valid record yields: an item (partial ITEMS row) and/or probe statements (without split)."""

    item: dict | None = None
    statements: list[dict] = field(default_factory=list)
    source_id: str | None = None
    locate_target: bool = True  # fill target_sentence from the (final) context and answers


def conflict_item(
    question: str, context: str, answers: list[str], orig: list[str], orig_context: str | None
) -> Parsed:
    """A counterfactual item: the context's answer must differ from the memorised one."""
    check_same_answer(answers, orig)
    item = {
        "group": question_group(question),
        "question": question,
        "context": context,
        "answers": answers,
        "orig_answers": orig,
        "orig_context": orig_context,
        "counterfactual": True,
    }
    return Parsed(item=item)


def file_reader(
    name: str, read: Callable[[Path | None, ReadOptions], Ingested], version: str, summary: str, source: str
) -> Reader:
    """The Reader of a dataset that is one user-supplied file."""
    return Reader(name=name, read=read, version=version, files=lambda path: [require_path(path, name, source)],
                  summary=summary, source=source)


def _record_id(dataset: str, raw: Any, id_field: str | None) -> str | None:
    """The reject's record_id: the item id the record would have had, where its format carries ids."""
    if id_field and isinstance(raw, dict) and raw.get(id_field) is not None:
        return f"{dataset}-{raw[id_field]}"
    return None


def _finish_item(dataset: str, parsed: Parsed, opts: ReadOptions) -> tuple[str, dict]:
    """(dedupe key, item row) of a parsed record: id, token budget, target sentence."""
    item = dict(parsed.item)
    key = parsed.source_id or content_hash(item["question"], item["context"], item["answers"])
    context, truncated = fit_context(item["context"], opts)
    target = target_sentence(context, item["answers"], item.get("orig_context")) if parsed.locate_target else None
    row = item_row(dataset, **{**item, "context": context, "truncated": truncated, "target_sentence": target})
    row["item_id"] = f"{dataset}-{key}"
    row["source_id"] = parsed.source_id
    return key, row


def _assign_splits(out: Ingested, rng: random.Random) -> None:
    """Split groups 60/20/20 with the seed: item groups first, so items reach every split, then statement-only ones."""
    item_groups = sorted({r["group"] for r in out.items})
    split_of = split_groups(item_groups, rng)
    split_of.update(split_groups(sorted({s["group"] for s in out.statements} - set(item_groups)), rng))
    for row in (*out.items, *out.statements):
        row["split"] = split_of[row["group"]]


def read_dataset(
    dataset: str,
    source: str,
    records: list[RawRecord],
    opts: ReadOptions,
    parse: Callable[[dict], Parsed],
    id_field: str | None = None,
) -> Ingested:
    """Run `parse` over the (sampled) records: kept rows, or a reject per record, then seeded splits."""
    rng = random.Random(f"{dataset}:{opts.seed}")
    positions, note = sample_positions(len(records), rng, opts)
    out = Ingested(dataset=dataset, n_read=len(positions), note=note)
    seen: dict[str, int] = {}
    for i in positions:
        rec = records[i]
        try:
            key, item, statements = _check_one(dataset, rec, opts, parse, seen)
        except RecordReject as rej:
            record_id = _record_id(dataset, rec.value, id_field)
            out.rejects.append(reject_row(source, i, rec.value, rej.reason, rej.detail, record_id))
            continue
        seen[key] = i
        out.n_kept += 1
        out.items.extend([item] if item else [])
        out.statements.extend(statements)
    _assign_splits(out, rng)
    return out


def _check_one(
    dataset: str, rec: RawRecord, opts: ReadOptions, parse: Callable[[dict], Parsed], seen: dict[str, int]
) -> tuple[str, dict | None, list[dict]]:
    """(dedupe key, item row or None, statements) of one record, or RecordReject."""
    if rec.reject:
        raise RecordReject(*rec.reject)
    if not isinstance(rec.value, dict):
        raise RecordReject(NOT_AN_OBJECT, f"record is a {type(rec.value).__name__}, not a JSON object")
    if has_surrogates(rec.value):
        raise RecordReject(UNDECODABLE, "a string of the record holds bytes that are not valid UTF-8")
    parsed = parse(rec.value)
    if parsed.item is None:
        key = parsed.source_id or content_hash("", "", [s["text"] for s in parsed.statements])
        item = None
    else:
        key, item = _finish_item(dataset, parsed, opts)
    if key in seen:
        what = "id" if parsed.source_id else "content"
        raise RecordReject(DUPLICATE_ID, f"same {what} as record {seen[key]}")
    return key, item, parsed.statements
